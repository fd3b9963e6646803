"""10-fold verification on InsightFace ``.bin`` sets (LFW, CFP-FP, AgeDB-30, the toy sets) and the training callback.

Rule (``docs/eval_protocols.md`` §2): every image and its horizontal mirror go through the backbone; the pair
embedding is ``l2normalize(raw_orig + raw_flip)``; accuracy is :func:`eval.metrics.verification_accuracy`
(squared-L2 thresholds ``arange(0, 4, 0.01)``, strict ``<``, 10 contiguous folds, mean and population std);
``xnorm`` is the mean L2 norm of the raw embeddings over both the original and the mirrored list. The reference's
``acc1`` (no-flip accuracy, hard-coded 0) and its VAL@FAR (crashes on current SciPy, result unused) are not computed.

CLI: ``python -m eval.verification --model model.pt --network r50 --bin lfw.bin [--bin cfp_fp.bin ...]``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence
import sys

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from torch import nn

from eval import metrics
from eval.common import add_model_args, embed_batches, iter_chunks, model_from_args, write_json
from utils.binfile import load_bin
from utils.cli import ArgumentParser, run_command

__all__ = ["load_bin", "embed_images", "evaluate_verification", "CallBackVerification"]

log = logging.getLogger("eval.verification")


def _device_of(backbone: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(backbone.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _embed_raw(
    backbone: nn.Module,
    images_uint8: torch.Tensor | np.ndarray,
    batch_size: int,
    device: torch.device | str | None,
    flip: bool,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw (orig, flipped) embeddings of uint8 [N, 3, H, W] images; the backbone is left in the mode it had."""
    images = torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = _device_of(backbone, device)
    was_training = backbone.training
    backbone.eval()
    try:
        batches = (images[s:e] for s, e in iter_chunks(images.shape[0], batch_size))
        return embed_batches(backbone, batches, images.shape[0], dev, flip=flip, amp=amp)
    finally:
        backbone.train(was_training)


def embed_images(
    backbone: nn.Module,
    images_uint8: torch.Tensor | np.ndarray,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip: bool = True,
) -> np.ndarray:
    """Embeddings [N, D] float32 of uint8 [N, 3, H, W] images (already in the model's channel order).

    With ``flip`` the result is the raw sum ``emb(x) + emb(mirror(x))``; without, the raw ``emb(x)``. Not
    normalised (normalise for cosine). Runs in eval mode under no_grad and restores the previous mode.
    """
    orig, flipped = _embed_raw(backbone, images_uint8, batch_size, device, flip)
    return orig + flipped if flipped is not None else orig


def evaluate_verification(
    backbone: nn.Module,
    images_uint8: torch.Tensor | np.ndarray,
    issame: Sequence[bool] | np.ndarray,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    nfolds: int = 10,
) -> dict[str, float]:
    """Accuracy of a ``.bin`` set: returns ``{"accuracy", "std", "xnorm"}`` (accuracy/std as fractions).

    ``images_uint8`` are the 2N images in pair order ``[a0, b0, a1, b1, ...]`` (what :func:`load_bin` returns).
    """
    issame = np.asarray(issame).astype(bool).reshape(-1)
    n_img = int(torch.as_tensor(images_uint8).shape[0])
    if n_img != 2 * issame.size:
        raise ValueError(f"{n_img} images for {issame.size} pairs (need {2 * issame.size})")
    orig, flipped = _embed_raw(backbone, images_uint8, batch_size, device, flip=True)
    # xnorm over the raw embeddings of both lists, as the reference (2 * 2N vectors).
    xnorm = float(np.mean(np.linalg.norm(np.concatenate([orig, flipped]), axis=1)))
    emb = metrics.l2_normalize(orig + flipped)
    acc, std = metrics.verification_accuracy(emb[0::2], emb[1::2], issame, nfolds=nfolds)
    return {"accuracy": acc, "std": std, "xnorm": xnorm}


class CallBackVerification:
    """Periodic ``.bin`` verification for the training loop (rank 0 only).

    Loads ``<rec_dir>/<name>.bin`` for every name in ``val_targets`` once, at construction (a missing file raises
    FileNotFoundError naming it, before training starts). ``cb(step, backbone)`` evaluates every set with the
    plain (non-DDP) backbone in eval mode under no_grad, restores its previous mode, logs
    ``Accuracy-Flip: mean+-std`` and the best so far, writes ``val/<name>_accuracy`` and ``val/<name>_xnorm`` to
    ``summary_writer`` when given, and returns ``{name: accuracy}``.
    """

    def __init__(
        self,
        val_targets: Sequence[str],
        rec_dir: str | os.PathLike,
        batch_size: int = 64,
        summary_writer: Any = None,
        nfolds: int = 10,
    ) -> None:
        self.rec_dir = Path(rec_dir)
        self.batch_size = int(batch_size)
        self.summary_writer = summary_writer
        self.nfolds = nfolds
        self.sets: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
        self.highest: dict[str, float] = {}
        self.last: dict[str, dict[str, float]] = {}
        for name in val_targets:
            path = self.rec_dir / f"{name}.bin"
            if not path.is_file():
                raise FileNotFoundError(f"validation set '{name}' not found: {path} (val_targets={list(val_targets)})")
            self.sets[name] = load_bin(path)
            self.highest[name] = 0.0

    def __call__(self, step: int, backbone: nn.Module) -> dict[str, float]:
        results: dict[str, float] = {}
        for name, (images, issame) in self.sets.items():
            r = evaluate_verification(backbone, images, issame, batch_size=self.batch_size, nfolds=self.nfolds)
            self.highest[name] = max(self.highest[name], r["accuracy"])
            self.last[name] = r
            results[name] = r["accuracy"]
            log.info(f"[{name}][{step}] XNorm: {r['xnorm']:f}")
            log.info(f"[{name}][{step}] Accuracy-Flip: {r['accuracy']:1.5f}+-{r['std']:1.5f}")
            log.info(f"[{name}][{step}] Accuracy-Highest: {self.highest[name]:1.5f}")
            if self.summary_writer is not None:
                self.summary_writer.add_scalar(f"val/{name}_accuracy", r["accuracy"], step)
                self.summary_writer.add_scalar(f"val/{name}_xnorm", r["xnorm"], step)
        return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = ArgumentParser(description="10-fold .bin verification accuracy")
    add_model_args(ap)
    ap.add_argument("--bin", action="append", required=True, help=".bin file (repeatable)")
    ap.add_argument("--out", default=None, help="optional JSON file for the results")
    args = ap.parse_args(argv)
    backbone, device = model_from_args(args)
    out: dict[str, dict[str, float]] = {}
    for path in args.bin:
        images, issame = load_bin(path)
        if args.bgr:
            images = images.flip(1)  # load_bin returns RGB
        r = evaluate_verification(backbone, images, issame, batch_size=args.batch_size, device=device)
        out[Path(path).stem] = r
        print(f"{Path(path).stem}: accuracy {100 * r['accuracy']:.2f} +- {100 * r['std']:.2f}  xnorm {r['xnorm']:.3f}")
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    run_command(main)
