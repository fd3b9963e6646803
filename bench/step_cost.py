"""Cost of the CFSM training step relative to the plain ArcFace step, measured interleaved in one process.

    python -m bench.step_cost --network r50 --batch-size 8                 # CPU
    python -m bench.step_cost --network r50 --batch-size 128 --amp fp16    # GPU

Both steps are train.py's own step (`make_train_step`, set up by bench/profile_step.py's `build_step`: Partial FC
ArcFace, backward, clip, SGD); the CFSM step adds the adversarial style search with a generator of the released
size (dim 64, 9.7 M parameters, random weights: cost does not depend on the values). `cfsm_measured` is the CFSM
step of a logging step, which also measures the attack gain (one more forward of the synthesized share; train.py
does it every `frequent` steps). Repetitions rotate the order so machine noise hits all alike; the last line is
JSON with the medians.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from bench.profile_step import add_step_args, step_from_args
from cfsm.attack import split_counts
from utils.cli import ArgumentParser, run_command


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__)
    add_step_args(p, batch_size=8)
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device, train_step = step_from_args(args)

    variants = {"plain": (False, False), "cfsm": (True, False), "cfsm_measured": (True, True)}

    def step(variant: str) -> float:
        cfsm, measure_attack = variants[variant]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(cfsm, measure_attack)  # returns the loss as a float: the step has finished on the device
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for variant in variants:
            step(variant)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    names = list(variants)
    for rep in range(args.reps):
        for variant in names[rep % 3:] + names[:rep % 3]:  # rotate the order so drift hits all alike
            times[variant].append(step(variant))
        print(f"rep {rep}: " + "  ".join(f"{v} {t[-1]:.3f} s" for v, t in times.items()), flush=True)

    plain_s, cfsm_s, measured_s = (statistics.median(times[v]) for v in names)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "network": args.network, "batch_size": args.batch_size,
        "amp": args.amp, "channels_last": args.channels_last, "rs_ratio": args.rs_ratio, "k": args.k,
        "n_synth": split_counts(args.batch_size, args.rs_ratio)[1], "gen_dim": args.gen_dim, "reps": args.reps,
        "plain_step_s": round(plain_s, 4), "cfsm_step_s": round(cfsm_s, 4), "ratio": round(cfsm_s / plain_s, 3),
        "cfsm_measured_step_s": round(measured_s, 4),  # + the attack-gain forward (train.py: logging steps only)
        "plain_samples_per_sec": round(args.batch_size / plain_s, 1),
        "cfsm_samples_per_sec": round(args.batch_size / cfsm_s, 1),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    run_command(main)
