"""Embeddings of aligned faces (or, with ``--align``, of the faces in raw photos): the step before any custom
evaluation.

    python -m tools.embed IMAGES --model model.pt --out DIR [--no-flip] [--normalize] [--bgr | --rgb]
    python -m tools.embed PHOTOS --align [--face largest|all|N] --model model.pt --out DIR

IMAGES is a folder (searched recursively for .jpg/.jpeg/.png/.bmp/.webp, in sorted order), a .txt list with one
image path per line (relative paths are relative to the list's folder) or one image file. The images must be aligned
112x112 faces (``tools/pack_rec.py`` and the eval CLIs use the same crop); any other size is an error naming the file.
With ``--align`` they are raw photos (.tif/.tiff too): faces are detected and aligned as by ``tools.align`` (photos
without a face are skipped with a ``warning:`` line), and ``DIR/faces.csv`` says which photo and face each row is.

Writes ``DIR/embeddings.npy`` (float32 [N, D]; row i is the i-th line of ``DIR/images.txt``). By default each row is
the flip-fused raw embedding ``emb(x) + emb(mirror(x))`` as in the evaluation tools; ``--no-flip`` keeps ``emb(x)``
and ``--normalize`` L2-normalises the rows (compare them with a dot product). Without ``--workers`` the number of
reader processes follows the input (none below 20,000 images: starting one costs seconds); the line
``image readers: N (why)`` says what was decided.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from eval.align import ALIGN_HINT, add_align_args, align_photos, crops_tensor, detector_from_args, require_faces, \
    write_faces_csv
from eval.common import EvalInputError, FaceImages, add_model_args, check_output_folder, embed_batches, \
    embed_dataset, eval_ranks, flip_fuse, iter_chunks, model_from_args
from eval.metrics import l2_normalize
from utils.cli import ArgumentParser, UsageError, add_auto_workers_arg, add_out_arg, auto_workers, \
    expanded_path, run_command
from utils.distributed import DistEnv

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PHOTO_SUFFIXES = IMAGE_SUFFIXES + (".tif", ".tiff")  # raw photos (read by PIL): camera / scanner TIFFs too


def list_images(source: str | os.PathLike, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The images of a folder (recursive, sorted), of a .txt list (one path per line; blank lines skipped), or one
    image file (a name ending in one of ``suffixes``)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
        if not paths:
            raise EvalInputError(f"IMAGES folder {source} holds no {'/'.join(suffixes)} files; "
                                 f"give a folder of images or a .txt list of image paths")
        return paths
    if source.is_file() and source.suffix.lower() in suffixes:
        return [source]
    if source.is_file() and source.suffix.lower() == ".txt":
        paths, missing = [], []
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if not line.strip():
                continue
            path = Path(os.path.expanduser(line.strip()))
            path = path if path.is_absolute() else source.parent / path
            paths.append(path)
            if not path.is_file():
                missing.append(f"line {number}: {path}")
        if missing:
            raise EvalInputError(f"IMAGES list {source}: {len(missing)} of {len(paths)} files do not exist "
                                 f"({'; '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); fix the paths")
        if not paths:
            raise EvalInputError(f"IMAGES list {source} is empty; put one image path per line")
        return paths
    what = "does not exist" if not source.exists() else "is neither a folder, a .txt list nor an image file"
    raise EvalInputError(f"IMAGES {source} {what}; give a folder, a .txt list of image paths or a "
                         f"{'/'.join(suffixes)} file")


def main(argv: list[str] | None = None) -> Path:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("images", type=expanded_path,
                    help="folder of aligned 112x112 faces, a .txt list of paths or one image (photos with --align)")
    add_model_args(ap, image_workers=False)
    add_auto_workers_arg(ap)  # from the number of images: starting readers for a handful costs seconds
    add_out_arg(ap, "embeddings.npy and images.txt")
    ap.add_argument("--no-flip", action="store_true", help="original image only (default: add the mirror's embedding)")
    ap.add_argument("--normalize", action="store_true", help="L2-normalise each embedding (default: raw)")
    ap.add_argument("--align", action="store_true",
                    help="IMAGES are raw photos: detect and align the faces first (as tools.align)")
    add_align_args(ap, default_face="largest")
    args = ap.parse_args(argv)
    with eval_ranks(args.device) as env:  # one process, or one rank of torchrun
        return embed(args, env)


def embed(args: argparse.Namespace, env: DistEnv) -> Path | None:
    """Embed on this rank: every rank its share, rank 0 writes the files (others: None)."""
    out = check_output_folder(args.out)  # before any work
    paths = list_images(args.images, PHOTO_SUFFIXES if args.align else IMAGE_SUFFIXES)
    if args.align and env.distributed:
        raise UsageError("--align runs in one process: align first with python -m tools.align PHOTOS --out DIR, "
                         "then embed DIR on N processes")
    backbone, device = model_from_args(args, env)
    if args.align:
        detector = detector_from_args(args)
        items, skipped = align_photos(detector, paths, args.face, progress=not args.no_progress)
        require_faces(items, skipped, len(paths))
        write_faces_csv(out / "faces.csv", items)
        paths = [item.source for item in items]
        crops = crops_tensor(items, bgr=args.bgr)
        batches = (crops[s:e] for s, e in iter_chunks(len(crops), args.batch_size))
        backbone.eval()
        orig, flipped = embed_batches(backbone, batches, len(crops), device, flip=not args.no_flip,
                                      amp=not args.no_amp, progress=not args.no_progress, desc="embed")
    else:
        workers, why = auto_workers(args.workers, -(-len(paths) // env.world_size))  # this rank's share
        if env.is_main:
            print(f"image readers: {workers} ({why})")
        embedded = embed_dataset(backbone, FaceImages(paths, None, bgr=args.bgr, unaligned_hint=ALIGN_HINT),
                                 batch_size=args.batch_size, workers=min(workers, len(paths)), device=device,
                                 flip=not args.no_flip,
                                 amp=not args.no_amp, progress=not args.no_progress, desc="embed", env=env)
        if embedded is None:
            return None  # another rank than 0: rank 0 has every row and writes the results
        orig, flipped = embedded
    embeddings = flip_fuse(orig, flipped)
    if args.normalize:
        embeddings = l2_normalize(embeddings)
    np.save(out / "embeddings.npy", embeddings.astype(np.float32))
    (out / "images.txt").write_text("".join(f"{p}\n" for p in paths))
    extra = f", {out / 'faces.csv'}" if args.align else ""
    print(f"wrote {out / 'embeddings.npy'} ({embeddings.shape[0]} x {embeddings.shape[1]}), {out / 'images.txt'}"
          f"{extra}")
    return out


if __name__ == "__main__":
    run_command(main)
