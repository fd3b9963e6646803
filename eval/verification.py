"""10-fold verification on InsightFace ``.bin`` sets (LFW, CFP-FP, AgeDB-30, the toy sets): the metric and its CLI.

The training-time callback (periodic verification, the pre-check of ``val_targets``) is
``eval/verification_callback.py``.

Rule (``docs/eval_protocols.md`` §2): every image and its horizontal mirror go through the backbone; the pair
embedding is ``l2normalize(raw_orig + raw_flip)``; accuracy is :func:`eval.metrics.verification_accuracy`
(squared-L2 thresholds ``arange(0, 4, 0.01)``, strict ``<``, 10 contiguous folds, mean and population std);
``xnorm`` is the mean L2 norm of the raw embeddings over both the original and the mirrored list. The reference's
``acc1`` (no-flip accuracy, hard-coded 0) and its VAL@FAR (crashes on current SciPy, result unused) are not computed.

CLI: ``python -m eval.verification --model model.pt --bin lfw.bin [--bin cfp_fp.bin ...] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from torch import nn

from eval import metrics
from eval.common import EvalInputError, add_model_args, check_output_folder, embed_batches, embed_sharded, eval_ranks, \
    model_from_args, write_json
from utils.cli import ArgumentParser, add_out_arg, expanded_path, run_command
from utils.data.binfile import load_bin
from utils.distributed import DistEnv

__all__ = ["load_bin", "embed_images", "evaluate_verification"]

NFOLDS = 10  # the standard protocol's folds (LFW, CFP-FP, AgeDB)


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
    progress: bool = False,
    env: DistEnv | None = None,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Raw (orig, flipped) embeddings of uint8 [N, 3, H, W] images; the backbone is left in the mode it had.
    With ``env`` of a process group the batches are split across ranks (rank 0 returns all, the others None)."""
    images = torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = _device_of(backbone, device)
    was_training = backbone.training
    backbone.eval()
    try:
        def embed_part(batches: list[range]) -> tuple[np.ndarray, np.ndarray | None]:
            count = sum(len(b) for b in batches)
            return embed_batches(backbone, (images[b.start:b.stop] for b in batches), count, dev, flip=flip, amp=amp,
                                 progress=progress and (env is None or env.is_main))

        return embed_sharded(embed_part, images.shape[0], batch_size, env, flip)
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
    nfolds: int = NFOLDS,
    amp: bool = False,
    progress: bool = False,
    env: DistEnv | None = None,
) -> dict[str, float] | None:
    """Accuracy of a ``.bin`` set: returns ``{"accuracy", "std", "xnorm"}`` (accuracy/std as fractions).

    ``images_uint8`` are the 2N images in pair order ``[a0, b0, a1, b1, ...]`` (what :func:`load_bin` returns).
    ``amp``: float16 autocast on CUDA (the CLI's default; training-time verification runs in float32).
    ``env`` of a process group: the images are split across its ranks; rank 0 returns the result, the others None.
    """
    issame = np.asarray(issame).astype(bool).reshape(-1)
    n_img = int(torch.as_tensor(images_uint8).shape[0])
    if n_img != 2 * issame.size:
        raise ValueError(f"{n_img} images for {issame.size} pairs (need {2 * issame.size})")
    embedded = _embed_raw(backbone, images_uint8, batch_size, device, flip=True, amp=amp, progress=progress, env=env)
    if embedded is None:
        return None
    orig, flipped = embedded
    # xnorm over the raw embeddings of both lists, as the reference (2 * 2N vectors).
    xnorm = float(np.mean(np.linalg.norm(np.concatenate([orig, flipped]), axis=1)))
    emb = metrics.l2_normalize(orig + flipped)
    acc, std = metrics.verification_accuracy(emb[0::2], emb[1::2], issame, nfolds=nfolds)
    return {"accuracy": acc, "std": std, "xnorm": xnorm}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = ArgumentParser(description=__doc__)
    add_model_args(ap, image_workers=False)  # the .bin images are decoded in memory: no reader processes
    ap.add_argument("--bin", action="append", required=True, type=expanded_path,
                    help=".bin verification file (repeat for several)")
    add_out_arg(ap, "verification.json", optional=True)
    args = ap.parse_args(argv)
    with eval_ranks(args.device) as env:  # one process, or one rank of torchrun
        return evaluate(args, env)


def evaluate(args: argparse.Namespace, env: DistEnv) -> dict[str, dict[str, float]] | None:
    """The .bin sets on this rank: every rank embeds its share, rank 0 computes, prints and writes (others: None)."""
    out_dir = check_output_folder(args.out) if args.out is not None else None  # checked before any work
    backbone, device = model_from_args(args, env)
    out: dict[str, dict[str, float]] = {}
    for path in args.bin:
        images, issame = load_bin(path)
        if issame.size < NFOLDS:
            raise EvalInputError(f"{path}: {issame.size} pairs; {NFOLDS}-fold verification needs at least {NFOLDS}")
        if args.bgr:
            images = images.flip(1)  # load_bin returns RGB
        r = evaluate_verification(backbone, images, issame, batch_size=args.batch_size, device=device,
                                  amp=not args.no_amp, progress=not args.no_progress, env=env)
        if r is None:
            continue  # another rank than 0
        out[Path(path).stem] = r
        print(f"{Path(path).stem}: accuracy {100 * r['accuracy']:.2f} +- {100 * r['std']:.2f}  xnorm {r['xnorm']:.3f}")
    if not env.is_main:
        return None
    if out_dir is not None:
        write_json(out_dir / "verification.json", out)
    return out


if __name__ == "__main__":
    run_command(main)
