"""Style control figure: how each learned basis direction (and random styles) changes a face.

    python -m tools.style_grid GENERATOR.pth --faces data/toy --out work_dirs/style_grid [--num-faces 2]
    python -m tools.style_grid GENERATOR.pth --faces my_faces/ --out out/ --tensorboard out/tb

For each input face one PNG `style_grid_<i>.png`: the input tile, then rows = basis direction 1..style_dim with
columns = coefficient -3..3 (o = c * e_i), then a row of random unit directions scaled to |o| = 0..6.
Faces: a folder with train.rec/train.idx (e.g. the toy data), a `.rec` file, a folder of images (searched
recursively) or a .txt list of image paths.
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

from utils.cli import ArgumentParser, run_command


def load_faces(faces: str | Path, num_faces: int, seed: int = 0, flag: str = "--faces",
               count_flag: str = "--num-faces") -> torch.Tensor:
    """``num_faces`` faces as a [-1, 1] [N,3,112,112] batch, picked evenly (deterministic) from ``faces``; errors
    name the command's options ``flag`` / ``count_flag``."""
    from cfsm.target_data import TargetFaceDataset

    path = Path(faces)
    if num_faces < 1:
        raise ValueError(f"{count_flag} must be >= 1, got {num_faces}")
    if path.is_file() and path.suffix == ".rec":
        path = path.parent
    if path.is_dir() and (path / "train.rec").is_file():
        from dataset import MXFaceDataset

        ds = MXFaceDataset(path, augment=False)
        # spread over the file: neighbouring records are usually the same identity
        picks = np.linspace(0, ds.num_images - 1, num_faces).round().astype(int)
        return torch.stack([ds[(int(i), False)][0] for i in picks])
    ds = TargetFaceDataset(path, key=flag)
    picks = np.linspace(0, len(ds) - 1, num_faces).round().astype(int)
    return torch.stack([ds[(int(i), False)] for i in picks])


def make_style_grids(generator, faces: torch.Tensor, coefficients: Sequence[float], magnitudes: Sequence[float],
                     seed: int = 0) -> list[np.ndarray]:
    """One style-control grid (uint8 RGB HWC) per face; random-style rows are reproducible from ``seed``."""
    from cfsm.visualize import style_grid_image

    rng = torch.Generator().manual_seed(seed)
    return [style_grid_image(generator, face, coefficients, magnitudes, rng) for face in faces]


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("generator", help="CFSM generator file (released format: dict with 'G_state_dict')")
    p.add_argument("--faces", required=True, help="toy/RecordIO folder, .rec file, image folder or .txt list")
    p.add_argument("--out", required=True, help="output folder for style_grid_<i>.png")
    p.add_argument("--num-faces", type=int, default=1, help="faces taken from --faces, one grid each")
    p.add_argument("--coefficients", type=float, nargs="+", default=[-3, -2, -1, 0, 1, 2, 3],
                   help="values of each single style coefficient (grid columns)")
    p.add_argument("--magnitudes", type=float, nargs="+", default=[0, 1, 2, 3, 4, 5, 6],
                   help="|o| of the random-style row")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-style directions")
    p.add_argument("--tensorboard", default=None,
                   help="also write the grids to this TensorBoard log folder (default: none)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    return p.parse_args(argv)


def main(argv=None) -> list[Path]:
    from cfsm import load_generator
    from cfsm.visualize import save_png
    from eval.common import check_output_folder, resolve_device

    args = parse_args(argv)
    # every argument is checked before the generator is loaded and any grid is drawn
    if args.num_faces < 1:
        raise ValueError(f"--num-faces must be >= 1, got {args.num_faces}")
    if min(args.magnitudes) < 0:
        raise ValueError(f"--magnitudes {args.magnitudes}: a style magnitude |o| is >= 0")
    if args.tensorboard and Path(args.tensorboard).is_file():
        raise ValueError(f"--tensorboard {args.tensorboard} is a file; give a folder for the event files")
    device = resolve_device(args.device)
    out = check_output_folder(args.out)
    generator = load_generator(args.generator).to(device)
    faces = load_faces(args.faces, args.num_faces, args.seed)
    grids = make_style_grids(generator, faces, args.coefficients, args.magnitudes, args.seed)
    paths = [save_png(g, out / f"style_grid_{i:02d}.png") for i, g in enumerate(grids)]
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=args.tensorboard) as writer:
            for i, g in enumerate(grids):
                writer.add_image(f"style_grid/face_{i:02d}", g, 0, dataformats="HWC")
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    run_command(main)
