"""Cost of the CFSM training step relative to the plain ArcFace step, measured interleaved in one process.

    python -m bench.step_cost --network r50 --batch-size 8                 # CPU
    python -m bench.step_cost --network r50 --batch-size 128 --amp fp16    # GPU

Both steps are the real training step (Partial FC ArcFace, backward, clip, SGD); the CFSM step adds the adversarial
style search with a generator of the released size (dim 64, 9.7 M parameters, random weights: cost does not depend
on the values). Repetitions alternate plain/CFSM so machine noise hits both alike; the last line is JSON with the
medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from backbones import get_model
from cfsm import Generator
from cfsm.attack import adversarial_mix, frozen_stats, split_counts
from losses import ArcFace
from partial_fc import PartialFC


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="r50")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rs-ratio", type=float, default=0.75)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--gen-dim", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp_dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    backbone = get_model(args.network, num_features=512).to(device).to(memory_format=fmt).train()
    pfc = PartialFC(ArcFace(s=64.0, margin=0.5), 512, args.num_classes).to(device)
    generator = Generator(dim=args.gen_dim).to(device).to(memory_format=fmt).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(list(backbone.parameters()) + list(pfc.parameters()), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = dict(device_type=device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    images = (torch.rand(args.batch_size, 3, 112, 112, device=device) * 2 - 1).contiguous(memory_format=fmt)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    rng = torch.Generator().manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(cfsm: bool) -> float:
        sync()
        t0 = time.perf_counter()
        x = images
        class_sample = pfc.sample_negatives(labels)
        if cfsm:
            def attack_loss(xs, ys):
                with frozen_stats(backbone), torch.autocast(**autocast):
                    emb = backbone(xs)
                return pfc(emb.float(), ys, class_sample=class_sample, update_stats=False)
            x = adversarial_mix(images, labels, generator, attack_loss, rs_ratio=args.rs_ratio, epsilon=0.314,
                                alpha=0.314, k=args.k, rng=rng, autocast_dtype=amp_dtype,
                                grad_scale=scaler.get_scale() if scaler.is_enabled() else 1.0).images
        with torch.autocast(**autocast):
            emb = backbone(x)
        loss = pfc(emb.float(), labels, class_sample=class_sample)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync()
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
    main()
