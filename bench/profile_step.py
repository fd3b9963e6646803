"""torch.profiler view of the CFSM training step: where the time of the adversarial style search goes.

    python -m bench.profile_step --network r50 --batch-size 128 --amp fp16 --channels-last   # GPU
    python -m bench.profile_step --network r_tiny --batch-size 8 --steps 2                   # CPU smoke run

Profiles train.py's own step (`make_train_step`: Partial FC ArcFace, adversarial_mix with a released-size
generator, backward, clip, SGD; its `record_function` labels name the phases): `--warmup` untimed steps, then
`--steps` profiled ones on the current device. Prints the top ops by self device time (CPU time without a GPU)
and, last, one JSON line. `--trace FILE` also writes a Chrome trace.
`build_step` sets that step up on random data; bench/step_cost.py imports it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch.profiler import ProfilerActivity, profile

from backbones import ChannelOrder, get_model
from cfsm import Generator
from losses import margin_loss_from_config
from partial_fc import PartialFC
from train import Stage2, make_train_step
from utils.cli import ArgumentParser, resolve_device, run_command
from configs.loader import base_config
from utils.distributed import DistEnv
from utils.optim import PolyScheduler, build_optimizer
from utils.precision import mixed_precision


def build_step(network: str, batch_size: int, device: torch.device, amp: str, channels_last: bool,
               rs_ratio: float, k: int, gen_dim: int, num_classes: int) -> Callable[..., float]:
    """train.py's own step (`make_train_step`) as a closure `step(cfsm=True) -> loss`; cfsm=False is the same step
    without a generator (plain ArcFace). Both share one backbone, Partial FC and optimizer.

    Random weights and data: the cost is what counts. bench/step_cost.py times both variants with it."""
    cfg = base_config()  # every other key at its documented default (ArcFace s=64 m=0.5, SGD momentum 0.9, clip 5)
    cfg.update(network=network, batch_size=batch_size, fp16=amp == "fp16", bf16=amp == "bf16", k=k,
               channels_last=channels_last, rs_ratio=rs_ratio, num_classes=num_classes, lr=0.01, weight_decay=0.0)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=device, backend=None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    backbone = get_model(network, num_features=cfg.embedding_size).to(device).to(memory_format=fmt).train()
    pfc = PartialFC(margin_loss_from_config(cfg.loss, cfg), cfg.embedding_size, num_classes).to(device)
    generator = Generator(dim=gen_dim).to(device).to(memory_format=fmt).eval().requires_grad_(False)
    optimizer = build_optimizer(cfg.optimizer, [{"params": backbone.parameters()}, {"params": pfc.parameters()}],
                                cfg)
    scheduler = PolyScheduler(optimizer, total_steps=10**9, warmup_steps=0, power=cfg.lr_power)
    _, scaler, autocast = mixed_precision(cfg.fp16, cfg.bf16, device.type)
    style_rng = torch.Generator().manual_seed(0)
    channel = ChannelOrder("rgb", told=False, reason="random weights")
    steps = {cfsm: make_train_step(cfg, env, Stage2(backbone, pfc, generator if cfsm else None, optimizer, scheduler,
                                                    scaler, autocast, channel), backbone, style_rng)
             for cfsm in (False, True)}
    images = torch.rand(batch_size, 3, 112, 112, device=device) * 2 - 1
    labels = torch.randint(0, num_classes, (batch_size,), device=device)

    def step(cfsm: bool = True) -> float:
        return float(steps[cfsm]([(images, labels)]).loss)  # a float: the step has finished on the device

    return step


def add_step_args(p: ArgumentParser, batch_size: int) -> None:
    """The arguments of `build_step`, shared by this profiler and bench/step_cost.py."""
    p.add_argument("--network", default="r50", help="backbones.get_model name")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per step")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"],
                   help="autocast precision: none, fp16 or bf16")
    p.add_argument("--channels-last", action="store_true",
                   help="run backbone and generator in channels_last memory format")
    p.add_argument("--rs-ratio", type=float, default=0.75, help="share of clean images per batch (train.py's rs_ratio)")
    p.add_argument("--k", type=int, default=1, help="attack steps (train.py's k)")
    p.add_argument("--gen-dim", type=int, default=64, help="generator base width (released: 64)")
    p.add_argument("--num-classes", type=int, default=1000, help="Partial FC classes")


def step_from_args(args) -> tuple[torch.device, Callable[..., float]]:
    """(device, build_step(...)) from the arguments of `add_step_args`; cuDNN autotuning on CUDA."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device, build_step(args.network, args.batch_size, device, args.amp, args.channels_last, args.rs_ratio,
                              args.k, args.gen_dim, args.num_classes)


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(description=__doc__)
    add_step_args(p, batch_size=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--top", type=int, default=15, help="rows of the operator table")
    p.add_argument("--trace", default=None,
                   help="write a Chrome trace (chrome://tracing, Perfetto) here (default: none)")
    args = p.parse_args(argv)

    device, step = step_from_args(args)
    use_cuda = device.type == "cuda"

    def sync() -> None:
        if use_cuda:
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):  # cuDNN autotune and allocator growth stay out of the profile
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.steps):
            loss = step()
        sync()
    wall = (time.perf_counter() - t0) / args.steps

    sort_key = "self_device_time_total" if use_cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    print(averages.table(sort_by=sort_key, row_limit=args.top, max_name_column_width=60), flush=True)
    if args.trace:
        prof.export_chrome_trace(args.trace)

    def self_us(e) -> float:
        return float(getattr(e, sort_key, 0.0))

    ops = sorted((e for e in averages if not e.key.startswith(("cfsm/", "step/"))), key=self_us, reverse=True)
    total = sum(self_us(e) for e in ops) or 1.0
    # A phase's CPU time on CUDA is launch time only (kernels run async); its device time is what the GPU spent.
    phases = {e.key: {"cpu_ms": round(e.cpu_time_total / args.steps / 1e3, 3),
                      "device_ms": round(getattr(e, "device_time_total", 0.0) / args.steps / 1e3, 3)}
              for e in averages if e.key.startswith(("cfsm/", "step/"))}
    result = {
        "bench": "profile_step", "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
        "network": args.network, "batch_size": args.batch_size, "amp": args.amp, "channels_last": args.channels_last,
        "rs_ratio": args.rs_ratio, "k": args.k, "steps": args.steps, "step_ms_profiled": round(wall * 1e3, 2),
        "sorted_by": sort_key, "phase_ms_per_step": phases,
        "top_ops": [{"op": e.key, "self_ms_per_step": round(self_us(e) / args.steps / 1e3, 3),
                     "share": round(self_us(e) / total, 3), "calls": e.count} for e in ops[:args.top]],
        "loss": loss, "torch": torch.__version__, "trace": args.trace,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    run_command(main)
