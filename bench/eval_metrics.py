"""Benchmark the evaluation metrics at real benchmark sizes and print JSON.

    python -m bench.eval_metrics [--pairs 15658489] [--images 469375] [--dim 512] [--repeat 1]

* ``tar_at_far`` on IJB-C's 15,658,489 template-pair scores (19,557 genuine). Target: <= 10 s on 2 cores.
* ``template_features`` on IJB-C's 469,375 image features (512-d float32, 23,124 templates). Target: <= 5 s.
* ``pair_scores`` (cosine of the 15.6 M template pairs, 23,124 templates), ``verification_accuracy`` on an LFW-sized set (6,000 pairs) and ``identification_ranks`` on an IJB-C 1:N-sized
  problem (19,593 probes x 3,531 gallery) for context.

Data are synthetic (random scores / features); the timings do not depend on the values. Peak memory: ~1 GB for
the image features.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from eval import metrics
from utils.cli import ArgumentParser, run_command


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=15_658_489, help="number of 1:1 pairs (IJB-C: 15,658,489)")
    ap.add_argument("--genuine", type=int, default=19_557, help="genuine pairs among them")
    ap.add_argument("--images", type=int, default=469_375, help="images embedded (IJB-C: 469,375)")
    ap.add_argument("--templates", type=int, default=23_124, help="templates (IJB-C: 23,124)")
    ap.add_argument("--dim", type=int, default=512, help="embedding size")
    ap.add_argument("--repeat", type=int, default=1, help="report the best of this many runs")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    out: dict = {"machine": platform.processor() or platform.machine(), "numpy": np.__version__}

    labels = np.zeros(args.pairs, dtype=bool)
    labels[rng.choice(args.pairs, args.genuine, replace=False)] = True
    scores = (rng.standard_normal(args.pairs) * 0.1 + 0.5 * labels).astype(np.float32)
    sec = _time(lambda: metrics.tar_at_far(scores, labels), args.repeat)
    out["tar_at_far"] = {"n_scores": args.pairs, "seconds": round(sec, 3), "target_seconds": 10.0}
    del scores, labels

    feats = rng.standard_normal((args.images, args.dim), dtype=np.float32)
    templates = rng.integers(1, args.templates + 1, args.images)
    medias = rng.integers(0, args.images // 8, args.images)
    sec = _time(lambda: metrics.template_features(feats, templates, medias), args.repeat)
    out["template_features"] = {
        "n_images": args.images, "dim": args.dim, "seconds": round(sec, 3), "target_seconds": 5.0
    }
    del feats

    a = metrics.l2_normalize(rng.standard_normal((6000, args.dim)).astype(np.float32))
    b = metrics.l2_normalize(rng.standard_normal((6000, args.dim)).astype(np.float32))
    same = rng.random(6000) < 0.5
    sec = _time(lambda: metrics.verification_accuracy(a, b, same), args.repeat)
    out["verification_accuracy"] = {"n_pairs": 6000, "seconds": round(sec, 3)}

    tf = metrics.l2_normalize(rng.standard_normal((args.templates, args.dim)))
    tids = np.arange(1, args.templates + 1)
    gal = rng.choice(tids, 3531, replace=False)
    t1 = rng.choice(gal, args.pairs)
    t2 = rng.choice(np.setdiff1d(tids, gal), args.pairs)
    sec = _time(lambda: metrics.pair_scores(tids, tf, t1, t2), args.repeat)
    out["pair_scores"] = {"n_pairs": args.pairs, "n_templates": args.templates, "seconds": round(sec, 3)}
    del t1, t2

    g = metrics.l2_normalize(rng.standard_normal((3531, args.dim)).astype(np.float32))
    p = metrics.l2_normalize(rng.standard_normal((19593, args.dim)).astype(np.float32))
    gl = np.arange(3531)
    pl = rng.integers(0, 3531, 19593)
    sec = _time(lambda: metrics.identification_ranks(p, pl, g, gl), args.repeat)
    out["identification_ranks"] = {"n_probe": 19593, "n_gallery": 3531, "seconds": round(sec, 3)}
    out["ok"] = (
        out["tar_at_far"]["seconds"] <= 10.0 and out["template_features"]["seconds"] <= 5.0
    )
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    run_command(main)
