"""Generate the toy face benchmark: ``python -m tools.make_toy_data --out data/toy [--domains camera motion]``.

``--domains`` adds target domains that the hand-crafted augmentation does not contain (utils/toyface.DOMAINS):
``toy_<name>.bin`` (the pairs of toy_clean.bin in that capture) and ``target_faces_<name>/`` (unlabelled faces for
stage 1, ``target=DATA/target_faces_<name>``); the rest of the toy set is left as it is."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from utils.cli import ArgumentParser, add_workers_arg, run_command
from utils.data.toyface import DOMAINS, ensure_toy_data, ensure_toy_domains  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "toy"


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--num-identities", type=int, default=None, help="training identities (default 300)")
    ap.add_argument("--images-per-identity", type=int, default=None, help="training images per identity (default 24)")
    ap.add_argument("--num-eval-identities", type=int, default=None,
                    help="held-out identities for the .bin pairs (default 200)")
    ap.add_argument("--num-pairs", type=int, default=None, help="pairs per .bin (even; default 600)")
    ap.add_argument("--num-target-faces", type=int, default=None, help="unlabelled target faces (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rendering")
    ap.add_argument("--domains", nargs="*", default=[], choices=DOMAINS, metavar="NAME",
                    help=f"extra target domains to add ({', '.join(DOMAINS)}; default: none)")
    add_workers_arg(ap, min(os.cpu_count() or 1, 8), "rendering faces")
    args = ap.parse_args(argv)
    # counts of 0 wrote an empty dataset and --workers -1 hung; --out naming a file failed after rendering began
    for flag, value, low in (("--num-identities", args.num_identities, 2), ("--images-per-identity",
                             args.images_per_identity, 2), ("--num-eval-identities", args.num_eval_identities, 2),
                             ("--num-pairs", args.num_pairs, 2), ("--num-target-faces", args.num_target_faces, 1)):
        if value is not None and value < low:
            ap.error(f"argument {flag}: must be >= {low}, got {value}")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"argument --out: {args.out} is a file; give a folder for the toy data")
    root = ensure_toy_data(
        args.out,
        num_identities=args.num_identities,
        images_per_identity=args.images_per_identity,
        seed=args.seed,
        num_eval_identities=args.num_eval_identities,
        num_pairs=args.num_pairs,
        num_target_faces=args.num_target_faces,
        workers=max(1, args.workers),  # 1 renders in this process
        verbose=True,
    )
    if args.domains:
        ensure_toy_domains(root, args.domains, workers=max(1, args.workers), verbose=True)
    meta = json.loads((root / "toy_meta.json").read_text())
    print(f"toy data at {root}: num_classes={meta['num_classes']} num_image={meta['num_image']}")
    return 0


if __name__ == "__main__":
    run_command(main)
