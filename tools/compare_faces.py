"""Compare two aligned face images: print the cosine similarity of their embeddings.

    python -m tools.compare_faces --model model.pt face1.jpg face2.jpg [--no-flip] [--bgr]

The images must already be aligned 112x112 crops (as in the ``.bin`` sets or after ``eval.common.align_face``); any
other size is an error rather than a silent resize. Embedding = raw(x) + raw(mirror(x)) (``--no-flip``: raw(x)),
L2-normalised; the printed score is the cosine in [-1, 1] (the ``.bin`` protocol's squared distance is 2 - 2 cos).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from eval.common import FaceImages, add_network_args, embed_dataset, flip_fuse, load_backbone, resolve_device
from utils.cli import ArgumentParser, run_command


def compare(backbone: torch.nn.Module, path_a: str, path_b: str, flip: bool = True, bgr: bool = False,
            device: torch.device | None = None) -> float:
    """Cosine similarity of two aligned face images."""
    device = device or torch.device("cpu")
    orig, flipped = embed_dataset(backbone, FaceImages([path_a, path_b], None, bgr=bgr), batch_size=2,
                                  device=device, flip=flip)
    e = flip_fuse(orig, flipped).astype(np.float64)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return float(e[0] @ e[1])


def main(argv: list[str] | None = None) -> float:
    ap = ArgumentParser(description="cosine similarity of two aligned face images")
    ap.add_argument("image_a", help="first face image (an aligned 112x112 crop)")
    ap.add_argument("image_b", help="second face image (an aligned 112x112 crop)")
    ap.add_argument("--model", required=True,
                    help="plain state dict of the backbone (torch.save(backbone.state_dict()))")
    add_network_args(ap)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    ap.add_argument("--no-flip", action="store_true", help="original image only (default: add the mirror's embedding)")
    ap.add_argument("--bgr", action="store_true", help="feed BGR (AdaFace-family models)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    backbone = load_backbone(args.model, args.network, args.embedding_size, device)
    cos = compare(backbone, args.image_a, args.image_b, flip=not args.no_flip, bgr=args.bgr, device=device)
    print(f"{cos:.6f}")
    return cos


if __name__ == "__main__":
    run_command(main)
