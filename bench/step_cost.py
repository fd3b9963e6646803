"""Cost of the CFSM training step relative to the plain ArcFace step, measured interleaved in one process.

    python -m bench.step_cost --network r50 --batch-size 8                 # CPU
    python -m bench.step_cost --network r50 --batch-size 128 --amp fp16    # GPU

Both steps are train.py's own step (`make_train_step`, set up by bench/profile_step.py's `build_step`: Partial FC
ArcFace, backward, clip, SGD); the CFSM step adds the adversarial style search with a generator of the released
size (dim 64, 9.7 M parameters, random weights: cost does not depend on the values). Repetitions alternate
plain/CFSM so machine noise hits both alike; the last line is JSON with the medians.
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

    def step(cfsm: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(cfsm)  # returns the loss as a float: the step has finished on the device
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step(False), step(True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plain, cfsm = [], []
    for rep in range(args.reps):
        order = (False, True) if rep % 2 == 0 else (True, False)  # alternate so drift hits both alike
        for is_cfsm in order:
            (cfsm if is_cfsm else plain).append(step(is_cfsm))
        print(f"rep {rep}: plain {plain[-1]:.3f} s  cfsm {cfsm[-1]:.3f} s", flush=True)

    plain_s, cfsm_s = statistics.median(plain), statistics.median(cfsm)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "network": args.network, "batch_size": args.batch_size,
        "amp": args.amp, "channels_last": args.channels_last, "rs_ratio": args.rs_ratio, "k": args.k,
        "n_synth": split_counts(args.batch_size, args.rs_ratio)[1], "gen_dim": args.gen_dim, "reps": args.reps,
        "plain_step_s": round(plain_s, 4), "cfsm_step_s": round(cfsm_s, 4), "ratio": round(cfsm_s / plain_s, 3),
        "plain_samples_per_sec": round(args.batch_size / plain_s, 1),
        "cfsm_samples_per_sec": round(args.batch_size / cfsm_s, 1),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    run_command(main)
