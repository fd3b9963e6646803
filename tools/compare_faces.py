"""Compare two faces: print the cosine similarity of their embeddings and, given a threshold, a verdict.

    python -m tools.compare_faces face1.png face2.png --model model.pt [--no-flip] [--bgr | --rgb]
    python -m tools.compare_faces photo1.jpg photo2.jpg --align --model model.pt \\
        --bin data/lfw.bin --far 1e-3        # or --threshold 0.3

Without ``--align`` the images must already be aligned 112x112 crops (as in the ``.bin`` sets or from
``tools.align``); any other size is an error rather than a silent resize. With ``--align`` they are raw photos: the
chosen face (``--face``, default the largest) is detected and aligned as by ``tools.align``. Embedding = raw(x) +
raw(mirror(x)) (``--no-flip``: raw(x)), L2-normalised; the first line printed is the cosine in [-1, 1] (the ``.bin``
protocol's squared distance is 2 - 2 cos).

Verdict: "same person" iff cosine >= threshold. The threshold is given (``--threshold``) or computed on a
verification ``.bin`` set with the same model (``--bin``): the lowest threshold whose false accept rate on the set's
impostor pairs is at most ``--far`` (``eval.metrics.threshold_at_far``). The line names the threshold and where it
came from. A threshold depends on the model: one computed for another model means nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from eval.align import ALIGN_HINT, FaceDetector, add_align_args, align_photo, crops_tensor, detector_from_args
from eval.common import FaceImages, add_network_args, embed_batches, embed_dataset, flip_fuse, model_from_args
from utils.cli import ArgumentParser, UsageError, add_bgr_arg, expanded_path, run_command


def _cosine(orig: np.ndarray, flipped: np.ndarray | None) -> float:
    e = flip_fuse(orig, flipped).astype(np.float64)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return float(e[0] @ e[1])


def compare(backbone: torch.nn.Module, path_a: str, path_b: str, flip: bool = True, bgr: bool = False,
            device: torch.device | None = None, unaligned_hint: str = "") -> float:
    """Cosine similarity of two aligned face images (`unaligned_hint`: added to a wrong-size image's error)."""
    device = device or torch.device("cpu")
    faces = FaceImages([path_a, path_b], None, bgr=bgr, unaligned_hint=unaligned_hint)
    orig, flipped = embed_dataset(backbone, faces, batch_size=2, device=device, flip=flip)
    return _cosine(orig, flipped)


def compare_photos(backbone: torch.nn.Module, path_a: str, path_b: str, which: str | int = "largest",
                   detector: FaceDetector | None = None, flip: bool = True, bgr: bool = False,
                   device: torch.device | None = None) -> float:
    """Cosine similarity of the chosen face of each of two raw photos (NoFaceError names a photo without one)."""
    device = device or torch.device("cpu")
    detector = detector or FaceDetector()
    items = [align_photo(detector, path, "largest" if which == "all" else which)[0] for path in (path_a, path_b)]
    backbone.eval()
    orig, flipped = embed_batches(backbone, [crops_tensor(items, bgr=bgr)], 2, device, flip=flip)
    return _cosine(orig, flipped)


def load_threshold_set(bin_path: Path, far: float) -> tuple[torch.Tensor, np.ndarray]:
    """A ``.bin`` set's images and labels, checked to have enough impostor pairs to measure ``far``."""
    from utils.data.binfile import load_bin

    images, issame = load_bin(bin_path)
    impostors = int(np.count_nonzero(~issame))
    if impostors == 0 or impostors == issame.size:
        raise UsageError(f"--bin {bin_path}: needs both genuine and impostor pairs to set a threshold, "
                         f"has {issame.size - impostors} genuine and {impostors} impostor pairs")
    if far < 1.0 / impostors:
        raise UsageError(f"--far {far:g} is below 1/{impostors}, the smallest FAR the {impostors} impostor pairs of "
                         f"{bin_path} can measure; use --far >= {1.0 / impostors:.2g} or a larger set")
    return images, issame


def threshold_from_bin(backbone: torch.nn.Module, bin_path: Path, far: float, device: torch.device,
                       flip: bool = True, bgr: bool = False, batch_size: int = 64,
                       loaded: tuple[torch.Tensor, np.ndarray] | None = None) -> tuple[float, str]:
    """Cosine threshold at ``far`` on a ``.bin`` set's pairs, embedded like the compared faces; and its source."""
    from eval.metrics import l2_normalize, threshold_at_far
    from eval.verification import embed_images

    images, issame = loaded or load_threshold_set(bin_path, far)  # RGB, like our models; --bgr flips the channels
    if bgr:
        images = images.flip(1)
    emb = l2_normalize(embed_images(backbone, images, batch_size=batch_size, device=device, flip=flip))
    scores = np.sum(emb[0::2] * emb[1::2], axis=1)
    found = threshold_at_far(scores, issame, far)
    source = (f"FAR {far:g} on {bin_path} (measured FAR {found['far']:.2e} over {found['impostors']} impostor pairs, "
              f"TAR {100 * found['tar']:.2f}% over {found['genuines']} genuine pairs)")
    return found["threshold"], source


def _probability(text: str) -> float:
    import argparse

    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def main(argv: list[str] | None = None) -> float:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("image_a", type=expanded_path, help="first face: an aligned 112x112 crop (a photo with --align)")
    ap.add_argument("image_b", type=expanded_path, help="second face: an aligned 112x112 crop (a photo with --align)")
    ap.add_argument("--model", required=True,
                    help="model file: a state dict, a train.py model.pt, a Lightning / AdaFace .ckpt, a CVLFace "
                         ".safetensors")
    add_network_args(ap)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    ap.add_argument("--no-flip", action="store_true", help="original image only (default: add the mirror's embedding)")
    add_bgr_arg(ap)
    ap.add_argument("--align", action="store_true", help="the images are raw photos: detect and align a face in each")
    add_align_args(ap, default_face="largest")
    ap.add_argument("--threshold", type=float, default=None,
                    help="cosine at or above which the verdict is 'same person' (default: none, or from --bin)")
    ap.add_argument("--bin", type=expanded_path, default=None, metavar="SET.bin",
                    help="verification .bin set (e.g. lfw.bin) on which to compute the threshold at --far "
                         "(default: none)")
    ap.add_argument("--far", type=_probability, default=1e-3,
                    help="false accept rate the computed threshold keeps on --bin's impostor pairs")
    args = ap.parse_args(argv)
    if args.threshold is not None and args.bin is not None:
        raise UsageError("--threshold and --bin both set a threshold; give one of them")
    if args.face == "all":
        raise UsageError("--face all: compare_faces compares one face per photo; use --face largest or an index")
    if args.bin is not None and not args.bin.is_file():
        raise UsageError(f"--bin {args.bin} does not exist; give a verification .bin set such as lfw.bin")
    backbone, device = model_from_args(args)  # prints what it loaded; args.bgr: the file's channel order
    threshold_set = load_threshold_set(args.bin, args.far) if args.bin is not None else None  # checked up front
    if args.align:
        cos = compare_photos(backbone, str(args.image_a), str(args.image_b), args.face, detector_from_args(args),
                             flip=not args.no_flip, bgr=args.bgr, device=device)
    else:
        cos = compare(backbone, str(args.image_a), str(args.image_b), flip=not args.no_flip, bgr=args.bgr,
                      device=device, unaligned_hint=ALIGN_HINT)
    print(f"{cos:.6f}")
    if threshold_set is not None:
        threshold, source = threshold_from_bin(backbone, args.bin, args.far, device, flip=not args.no_flip,
                                               bgr=args.bgr, loaded=threshold_set)
    elif args.threshold is not None:
        threshold, source = args.threshold, "given by --threshold"
    else:
        print("no verdict: give --threshold T, or --bin SET.bin [--far F] to compute T for this model")
        return cos
    verdict = "same person" if cos >= threshold else "different"
    print(f"verdict: {verdict} (cosine {cos:.4f} {'>=' if cos >= threshold else '<'} threshold {threshold:.4f}; "
          f"threshold: {source})")
    return cos


if __name__ == "__main__":
    run_command(main)
