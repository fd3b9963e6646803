"""Toy replication study: baseline vs CFSM-guided training with equal steps on several seeds (not part of CI).

    python -m tools.toy_replication --out runs/replication --seeds 0 1 2

Each seed runs the toy pipeline (`tools.pipeline`) with that recognition seed; the stage-1 generator is trained once
(first seed) and shared, so the seeds differ only in the recognition runs. Prints and writes mean +- std (population
std over seeds) of toy_clean and toy_target accuracy, and the per-seed CFSM - baseline differences.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from utils.checkpoint import write_json
from utils.cli import ArgumentParser, run_command

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("toy_clean", "toy_target")


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output folder (runs already there are reused)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the baseline / CFSM run pairs")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for both recognition runs")
    p.add_argument("--generator", default=None,
                   help="use this generator instead of training one (default: train one with stage 1)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    shared_gen = Path(args.generator).resolve() if args.generator else None
    per_seed = {}
    for seed in args.seeds:
        run = out / f"seed_{seed}"
        if shared_gen is not None and not (run / "generator" / "generator.pth").exists():
            (run / "generator").mkdir(parents=True, exist_ok=True)
            shutil.copy(shared_gen, run / "generator" / "generator.pth")
        cmd = [sys.executable, "-m", "tools.pipeline", "--out", str(run), "--seed", str(seed)]
        if args.set:
            cmd += ["--set", *args.set]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
        per_seed[seed] = json.loads((run / "results.json").read_text())
        shared_gen = shared_gen or run / "generator" / "generator.pth"

    summary: dict = {"seeds": args.seeds, "per_seed": per_seed, "mean": {}, "std": {}, "cfsm_minus_baseline": {}}
    for method in ("baseline", "cfsm"):
        for target in TARGETS:
            values = np.array([per_seed[s][method][target] for s in args.seeds])
            summary["mean"].setdefault(method, {})[target] = float(values.mean())
            summary["std"].setdefault(method, {})[target] = float(values.std())
    for target in TARGETS:
        summary["cfsm_minus_baseline"][target] = [per_seed[s]["cfsm"][target] - per_seed[s]["baseline"][target]
                                                  for s in args.seeds]
    write_json(summary, out / "replication.json")
    print(f"\n{'method':<10}" + "".join(f"{t:>22}" for t in TARGETS))
    for method in ("baseline", "cfsm"):
        print(f"{method:<10}" + "".join(f"{100 * summary['mean'][method][t]:>14.2f} +- {100 * summary['std'][method][t]:.2f}"
                                        for t in TARGETS))
    for target in TARGETS:
        diffs = ", ".join(f"{100 * d:+.2f}" for d in summary["cfsm_minus_baseline"][target])
        print(f"cfsm - baseline on {target} per seed: {diffs}")
    return summary


if __name__ == "__main__":
    run_command(main)
