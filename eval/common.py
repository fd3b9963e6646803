"""Shared pieces of the evaluation CLIs: model loading, face alignment, batched flip embedding, CLI arguments.

Preprocessing follows ``docs/eval_protocols.md`` §1: a least-squares similarity (scikit-image, Umeyama) from the
five landmarks to the 112x112 ArcFace template, ``cv2.warpAffine`` with bilinear interpolation and a black border,
then ``(x / 255 - 0.5) / 0.5``. The mirror image is the horizontal flip of the aligned crop.

Channel order: our models (like the CFSM / arcface_torch ones) are trained on RGB, so RGB is the default; AdaFace-
family models are trained on BGR, pass ``--bgr`` for them.

Embedding size: taken from the model file (the length of its last BatchNorm's ``running_var``) unless
``--embedding-size`` is given; every buffer uses the real size, so 128-d or 1024-d models work (the reference
hard-codes 1024 = 2 x 512 columns).
"""
from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from dataset import _worker_init
from utils.checkpoint import write_json as _write_json
from utils.cli import positive_int, resolve_device
from utils.optim import low_precision_dtype  # resolve_device re-exported: one meaning of --device

IMAGE_SIZE = 112

# ArcFace 112x112 template (left eye, right eye, nose tip, left / right mouth corner), x already shifted by +8.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


class EvalInputError(ValueError):
    """A benchmark file or image is missing or malformed; the message names it."""


# ----------------------------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------------------------
def landmarks_68_to_5(lmk68: np.ndarray) -> np.ndarray:
    """68-point landmarks -> the 5 template points: eye centres (36,39) and (42,45), nose 30, mouth corners 48, 54."""
    p = np.asarray(lmk68, dtype=np.float64).reshape(68, 2)
    return np.stack(
        [(p[36] + p[39]) / 2, (p[42] + p[45]) / 2, p[30], p[48], p[54]]
    ).astype(np.float32)


def similarity_matrix(lmk5: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """2x3 matrix of the least-squares similarity mapping ``lmk5`` onto the template (scaled by ``image_size/112``)."""
    from skimage.transform import SimilarityTransform

    src = np.asarray(lmk5, dtype=np.float64).reshape(5, 2)
    dst = ARCFACE_TEMPLATE.astype(np.float64) * (image_size / IMAGE_SIZE)
    if not np.all(np.isfinite(src)):
        raise EvalInputError(f"landmarks contain NaN/inf: {src.tolist()}")
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26; same result as .estimate
        tf = SimilarityTransform.from_estimate(src, dst)
        if not tf:
            raise EvalInputError(f"similarity estimation failed for landmarks {src.tolist()}")
    else:  # pragma: no cover - older scikit-image
        tf = SimilarityTransform()
        if not tf.estimate(src, dst):
            raise EvalInputError(f"similarity estimation failed for landmarks {src.tolist()}")
    return tf.params[0:2, :]


def align_face(img: np.ndarray, lmk5: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Warp ``img`` (HxWxC) so that ``lmk5`` lands on the ArcFace template: an ``image_size`` square crop."""
    m = similarity_matrix(lmk5, image_size)
    return cv2.warpAffine(img, m, (image_size, image_size), borderValue=0.0)


def read_image_bgr(path: str | os.PathLike) -> np.ndarray:
    """cv2.imread in colour (BGR); raises EvalInputError naming the file when it is missing or undecodable."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        reason = "does not exist" if not Path(path).exists() else "cannot be decoded"
        raise EvalInputError(f"image {path} {reason}")
    return img


class FaceImages(torch.utils.data.Dataset):
    """Images by path, optionally aligned from 5 landmarks; items are uint8 [3, S, S] tensors (RGB unless ``bgr``).

    Without landmarks the images must already be aligned ``image_size`` squares (an error names any other size:
    resizing a non-aligned crop would give a silently wrong feature).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        landmarks: np.ndarray | None = None,
        bgr: bool = False,
        image_size: int = IMAGE_SIZE,
    ) -> None:
        self.paths = [str(p) for p in paths]
        if landmarks is not None:
            landmarks = np.asarray(landmarks, dtype=np.float32).reshape(len(self.paths), 5, 2)
        self.landmarks = landmarks
        self.bgr = bgr
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = read_image_bgr(self.paths[i])
        if self.landmarks is not None:
            try:
                img = align_face(img, self.landmarks[i], self.image_size)
            except EvalInputError as e:  # the landmarks alone do not tell the user which image it was
                raise EvalInputError(f"image {self.paths[i]}: {e}") from None
        elif img.shape[:2] != (self.image_size, self.image_size):
            raise EvalInputError(
                f"image {self.paths[i]} is {img.shape[1]}x{img.shape[0]}, expected an aligned "
                f"{self.image_size}x{self.image_size} face"
            )
        if not self.bgr:
            img = img[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------------------
def infer_embedding_size(state: dict[str, torch.Tensor]) -> int | None:
    """Embedding size of a backbone state dict: the length of its last BatchNorm ``running_var`` (the feature BN of
    IResNet / MobileFaceNet), or None when there is none."""
    last = None
    for key, value in state.items():
        if key.endswith("running_var") and value.ndim == 1:
            last = int(value.shape[0])
    return last


def load_backbone(
    model_path: str | os.PathLike,
    network: str,
    embedding_size: int | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build ``backbones.get_model(network, num_features=...)`` and strictly load a plain state dict into it.

    The file is read with ``torch.load(weights_only=True)`` (``utils.checkpoint``; a DDP ``module.`` prefix and the
    arcface_torch ``state_dict_backbone`` wrapper are accepted). A file of another architecture raises an error that
    names the first mismatching key. Returns the model in eval mode on ``device``.
    """
    from backbones import get_model
    from utils.checkpoint import load_state_dict_file, load_state_dict_strict

    from utils.run_state import first_nonfinite

    state = load_state_dict_file(model_path)
    bad = first_nonfinite(state)
    if bad is not None:
        raise EvalInputError(f"{model_path}: weight '{bad}' holds NaN/Inf: a non-finite model cannot be evaluated "
                             f"(its scores would be meaningless); use the run's last finite checkpoint")
    size = embedding_size or infer_embedding_size(state) or 512
    model = get_model(network, num_features=size)
    load_state_dict_strict(model, state, source=str(model_path))
    model.source_file = str(model_path)  # named when its embeddings turn out non-finite (embed_batches)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def embed_batches(
    backbone: nn.Module,
    batches: Iterable[torch.Tensor],
    total: int,
    device: torch.device,
    flip: bool = True,
    amp: bool | None = None,
    progress: bool = False,
    desc: str = "embed",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``backbone`` over uint8 [B, 3, H, W] batches; returns raw float32 embeddings ``(orig, flipped or None)``.

    Normalisation is ``(x / 255 - 0.5) / 0.5``; the mirror is a flip along W, and both go through one forward of size
    2B (identical in eval mode, half the launches). ``amp`` (default: on for CUDA) runs under float16 autocast.
    The caller sets eval mode.
    """
    from tqdm import tqdm

    use_amp = (device.type == "cuda") if amp is None else (amp and device.type == "cuda")
    orig: np.ndarray | None = None
    flipped: np.ndarray | None = None
    pos = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="img", dynamic_ncols=True)
    for batch in batches:
        x = batch.to(device, non_blocking=True).float().div_(255.0).sub_(0.5).div_(0.5)
        b = x.shape[0]
        if flip:
            x = torch.cat([x, torch.flip(x, dims=[3])], dim=0)
        with torch.autocast(device_type=device.type, dtype=low_precision_dtype(device.type), enabled=use_amp):
            emb = backbone(x)
        if isinstance(emb, (tuple, list)):  # models returning (embedding, norm) -- use the embedding
            emb = emb[0]
        emb = emb.float().cpu().numpy()
        if orig is None:
            orig = np.empty((total, emb.shape[1]), dtype=np.float32)
            flipped = np.empty((total, emb.shape[1]), dtype=np.float32) if flip else None
        if pos + b > total:
            raise EvalInputError(f"got more than the announced {total} images")
        orig[pos : pos + b] = emb[:b]
        if flip:
            flipped[pos : pos + b] = emb[b:]
        pos += b
        bar.update(b)
    bar.close()
    if pos != total or orig is None:
        raise EvalInputError(f"embedded {pos} images, expected {total}")
    require_finite_embeddings(orig if flipped is None else np.concatenate([orig, flipped]),
                              getattr(backbone, "source_file", "the model"))
    return orig, flipped


def require_finite_embeddings(embeddings: np.ndarray, source: str) -> None:
    """Refuse NaN/Inf embeddings: every metric would turn them into a meaningless (often perfect) score."""
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        raise EvalInputError(f"{source}: {int(bad.sum())} of {len(bad)} embeddings hold NaN/Inf (weights that "
                             f"overflow or are not finite): refusing to score them; use a finite model")


def embed_dataset(
    backbone: nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 128,
    workers: int = 0,
    device: torch.device | None = None,
    flip: bool = True,
    amp: bool | None = None,
    progress: bool = False,
    desc: str = "embed",
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`embed_batches` over a dataset of uint8 images read by ``workers`` DataLoader processes, in order."""
    device = device or next(backbone.parameters()).device
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        # the project's one worker-init; one OpenCV thread each (spawned workers, see below)
        worker_init_fn=partial(_worker_init, opencv_threads=1) if workers > 0 else None,
        # Workers are spawned, not forked: a forked child inherits OpenCV's thread pool in a broken state once the
        # parent has run a parallel cv2 call, and then hangs in imread / warpAffine (seen on this machine).
        multiprocessing_context="spawn" if workers > 0 else None,
        persistent_workers=False,
    )
    backbone.eval()
    return embed_batches(backbone, loader, len(dataset), device, flip=flip, amp=amp, progress=progress, desc=desc)


def flip_fuse(orig: np.ndarray, flipped: np.ndarray | None) -> np.ndarray:
    """Flip fusion of the reference tools: raw ``orig + flipped`` (no normalisation before the sum)."""
    return orig if flipped is None else orig + flipped


# ----------------------------------------------------------------------------------------------------------------
# CLI helpers
# ----------------------------------------------------------------------------------------------------------------
def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder that exists or can be created, checked before any work (a file of that name found
    after hours of embedding would lose the results)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise EvalInputError(f"{flag} {folder} is a file; give a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalInputError(f"{flag} {folder}: cannot create the folder ({e.strerror})") from None
    return folder


def add_model_args(parser: argparse.ArgumentParser, image_workers: bool = True) -> None:
    """Arguments shared by the benchmark CLIs: model file, network, device, batching, channel order, AMP, progress.

    ``image_workers=False`` for commands whose images are already in memory (``.bin`` sets): no ``--workers``."""
    from backbones import BACKBONE_NAMES
    from utils.cli import add_bgr_arg, add_device_arg, add_workers_arg

    parser.add_argument("--model", required=True, help="plain state dict (torch.save(backbone.state_dict()))")
    parser.add_argument("--network", default="r50", choices=BACKBONE_NAMES, metavar="NETWORK",
                        help=f"backbone architecture: {', '.join(BACKBONE_NAMES)}")
    parser.add_argument("--embedding-size", type=int, default=None,
                        help="default: read from the model file (last BatchNorm size)")
    add_device_arg(parser)
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per forward (x2 with the mirror)")
    if image_workers:
        add_workers_arg(parser, min(8, os.cpu_count() or 1), "reading and aligning images")
    add_bgr_arg(parser)
    parser.add_argument("--no-amp", action="store_true", help="disable float16 autocast on CUDA (default: on with CUDA)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def model_from_args(args: argparse.Namespace) -> tuple[nn.Module, torch.device]:
    device = resolve_device(args.device)
    return load_backbone(args.model, args.network, args.embedding_size, device), device


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Results file of the eval CLIs through the project's one JSON writer (utils.checkpoint.write_json)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_json(obj, path)


def iter_chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(n, s + size)
