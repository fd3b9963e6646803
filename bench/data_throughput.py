"""Data pipeline throughput: read + decode + flip + normalise images/s from a ``.rec``.

    python -m bench.data_throughput [--rec DIR] [--max-workers N] [--images N] [--repeats R]

Default data: the toy benchmark (``data/toy``, generated if missing). Measures (1) one process, no workers, best of
``--repeats`` passes -> ``images_per_sec_per_core``; (2) a DataLoader with 1..N workers (batch 128). The last line of
output is JSON.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import cv2  # noqa: E402
import torch  # noqa: E402

from dataset import MXFaceDataset, get_dataloader  # noqa: E402
from utils.cli import ArgumentParser, run_command

REPO = Path(__file__).resolve().parents[1]


def single_process(ds: MXFaceDataset, n: int, repeats: int) -> float:
    """Best images/s over ``repeats`` passes of ``ds[(i, flip)]`` in this process."""
    n = min(n, len(ds))
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(n):
            ds[(i, bool(i & 1))]
        best = max(best, n / (time.perf_counter() - t))
    return best


def with_workers(ds: MXFaceDataset, workers: int, n: int, batch_size: int = 128) -> float:
    loader = get_dataloader(ds, batch_size, seed=0, num_workers=workers)
    loader.sampler.set_epoch(0)
    batches = max(1, min(n // batch_size, loader.sampler.batches_per_epoch))
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    seen = 0
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            break
        seen += images.shape[0]
    rate = seen / (time.perf_counter() - t)
    del it
    return rate


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--rec", type=Path, default=None, help="folder with train.rec/train.idx (default: toy data)")
    ap.add_argument("--max-workers", type=int, default=os.cpu_count() or 1,
                    help="largest DataLoader worker count measured (1, 2 and this)")
    ap.add_argument("--images", type=int, default=4000, help="images per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="passes of the single-process measurement (best reported)")
    args = ap.parse_args(argv)
    if args.rec is None:
        from utils.data.toyface import ensure_toy_data

        args.rec = ensure_toy_data(REPO / "data" / "toy")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    ds = MXFaceDataset(args.rec, augment=True)
    single = single_process(ds, args.images, args.repeats)
    print(f"one process: {single:,.0f} img/s", flush=True)
    scaling = {}
    for w in sorted({1, args.max_workers} | ({2} if args.max_workers >= 2 else set())):
        scaling[w] = with_workers(ds, w, args.images)
        print(f"DataLoader {w} worker(s): {scaling[w]:,.0f} img/s", flush=True)
    print(json.dumps({
        "rec": str(args.rec),
        "num_images": len(ds),
        "images_per_sec_per_core": round(single, 1),
        "dataloader_images_per_sec": {str(k): round(v, 1) for k, v in scaling.items()},
        "cpu_count": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    run_command(main)
