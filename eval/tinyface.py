"""TinyFace closed-set identification (Rank-1/5/20 with 153k distractors), AdaFace protocol.

    python -m eval.tinyface --model model.pt --root <data root> --out results/

What the user must prepare (``docs/eval_protocols.md`` §5.1): the **aligned** 112x112 copies distributed by
AdaFace (they are MTCNN-aligned; TinyFace itself ships unaligned crops without landmarks)::

    <root>/aligned_pad_0.1_pad_high/Probe/*.jpg
    <root>/aligned_pad_0.1_pad_high/Gallery_Match/*.jpg
    <root>/aligned_pad_0.1_pad_high/Gallery_Distractor/*.jpg

Optionally also the original ``<root>/tinyface/Testing_Set/{Probe,Gallery_Match,Gallery_Distractor}``: when present,
the image lists come from it (as the reference does) and every original must have an aligned copy with the same
basename (without extension), otherwise it is an error naming the file. Without it the aligned folders are listed.
The ``.mat`` protocol files are not needed (the reference reads but ignores them).

Protocol: label = ``int(basename.split('_')[0])`` for probe and gallery-match images, distractors get -100; feature =
``l2norm(raw(x) + raw(mirror(x)))``; score = inner product; a probe succeeds at rank k when any of the k best gallery
items (match + distractors) has its label (:func:`eval.metrics.identification_ranks`). Images are fed in the
model file's channel order (AdaFace-family files BGR, told by the file; ``--bgr`` for another BGR-trained model). Aligned images that are not 112x112 are an
error (resizing would silently change the feature).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from eval import metrics
from eval.common import (
    EvalInputError,
    FaceImages,
    add_model_args,
    check_output_folder,
    embed_dataset,
    eval_ranks,
    flip_fuse,
    model_from_args,
    write_json,
)
from utils.cli import ArgumentParser, run_command
from utils.distributed import DistEnv

SPLITS = ("Probe", "Gallery_Match", "Gallery_Distractor")
ALIGNED_DIR = "aligned_pad_0.1_pad_high"
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp"}
DISTRACTOR_LABEL = -100


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file())


def list_split(root: Path, split: str, aligned_dir: str = ALIGNED_DIR) -> list[Path]:
    """Aligned image paths of one split, in a deterministic (sorted) order."""
    aligned = root / aligned_dir / split
    if not aligned.is_dir():
        raise EvalInputError(f"TinyFace aligned folder not found: {aligned}")
    by_stem: dict[str, Path] = {}
    for p in _list_images(aligned):
        if p.stem in by_stem:
            raise EvalInputError(f"two aligned images with basename {p.stem!r}: {by_stem[p.stem]} and {p}")
        by_stem[p.stem] = p
    original = root / "tinyface" / "Testing_Set" / split
    if original.is_dir():
        out = []
        for p in _list_images(original):
            if p.stem not in by_stem:
                raise EvalInputError(f"no aligned copy of {p} in {aligned} (matched by basename {p.stem!r})")
            out.append(by_stem[p.stem])
    else:
        out = [by_stem[k] for k in sorted(by_stem)]
    if not out:
        raise EvalInputError(f"no images in {aligned}")
    return out


def label_of(path: Path) -> int:
    """Identity label from a TinyFace file name ``<id>_<n>.jpg``."""
    try:
        return int(path.stem.split("_")[0])
    except ValueError:
        raise EvalInputError(f"cannot read the identity from {path} (expected '<id>_<n>.jpg')") from None


def parse_ranks(text: str) -> list[int]:
    """``--ranks`` "1,5,20" -> [1, 5, 20]; anything but positive integers is an error naming the option."""
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise EvalInputError(f"--ranks {text!r}: expected comma-separated integers such as 1,5,20") from None
    if not ranks or min(ranks) < 1:
        raise EvalInputError(f"--ranks {text!r}: ranks must be integers >= 1, such as 1,5,20")
    return ranks


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(description="TinyFace Rank-1/5/20 (AdaFace protocol)")
    add_model_args(ap)
    ap.add_argument("--root", required=True, help=f"folder containing {ALIGNED_DIR}/")
    ap.add_argument("--aligned-dir", default=ALIGNED_DIR, help="sub-folder of --root with the aligned faces")
    ap.add_argument("--out", default="results", help="output folder")
    ap.add_argument("--ranks", default="1,5,20", help="comma-separated CMC ranks to report")
    ap.add_argument("--no-flip", action="store_true", help="original image only (the reference uses flip)")
    args = ap.parse_args(argv)
    with eval_ranks(args.device) as env:  # one process, or one rank of torchrun
        return evaluate(args, env)


def evaluate(args: argparse.Namespace, env: DistEnv) -> dict | None:
    """The evaluation on this rank: every rank embeds its share, rank 0 computes and writes (others: None)."""
    t0 = time.time()
    ranks = parse_ranks(args.ranks)
    out_dir = check_output_folder(args.out)
    root = Path(args.root)
    lists = {s: list_split(root, s, args.aligned_dir) for s in SPLITS}
    probe_labels = np.asarray([label_of(p) for p in lists["Probe"]])
    match_labels = np.asarray([label_of(p) for p in lists["Gallery_Match"]])
    gallery_labels = np.concatenate([match_labels, np.full(len(lists["Gallery_Distractor"]), DISTRACTOR_LABEL)])
    backbone, device = model_from_args(args, env)
    paths = lists["Probe"] + lists["Gallery_Match"] + lists["Gallery_Distractor"]
    embedded = embed_dataset(
        backbone, FaceImages(paths, None, bgr=args.bgr), batch_size=args.batch_size, workers=args.workers,
        device=device, flip=not args.no_flip, amp=not args.no_amp, progress=not args.no_progress, desc="TinyFace",
        env=env,
    )
    if embedded is None:
        return None  # another rank than 0: rank 0 has every row and writes the results
    orig, flipped = embedded
    feats = metrics.l2_normalize(flip_fuse(orig, flipped))
    n_p = len(lists["Probe"])
    res = metrics.identification_ranks(feats[:n_p], probe_labels, feats[n_p:], gallery_labels, ranks=ranks)
    n_mated = int(np.isin(probe_labels, match_labels).sum())
    result = {
        "benchmark": "TinyFace", "model": str(args.model), "network": args.network,
        "embedding_size": int(orig.shape[1]), "bgr": args.bgr, "flip": not args.no_flip,
        "n_probe": n_p, "n_probe_with_mate": n_mated, "n_gallery_match": len(lists["Gallery_Match"]),
        "n_distractor": len(lists["Gallery_Distractor"]),
        "ranks": {str(k): v for k, v in res.items()}, "seconds": time.time() - t0,
    }
    # Rank-k counts only probes with a mate in Gallery_Match (the reference's rule): say so, with both counts
    print("TinyFace " + "  ".join(f"Rank-{k} {100 * v:.2f}" for k, v in res.items())
          + f"  (over the {n_mated} of {n_p} probes that have a gallery mate; {len(gallery_labels)} gallery incl. "
          f"{result['n_distractor']} distractors)")
    out = out_dir / f"TinyFace_{Path(args.model).stem}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    run_command(main)
