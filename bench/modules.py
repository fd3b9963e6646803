"""Per-image cost of the main modules: forward and forward+backward time, plus forward GMACs.

    python -m bench.modules [--device cpu|cuda] [--batch-size 4] [--reps 3] [--amp] [--networks r50,mbf,vit_t]

Modules: the `--networks` backbones (train mode, backward to the parameters), the CFSM generator's encoder (backward
to the parameters, as in stage 1) and decoder (frozen parameters, backward to the style code o, as in the stage-2
attack). Weights are random: timings and MACs do not depend on them. Backbone GMACs are those of an eval-mode
(inference) forward: a training ViT with patch masking runs its blocks on fewer tokens. `vit_gmacs` gives the GMACs
of every registered ViT, counted on the meta device (shapes only: no memory, no time, any size). Prints one JSON
object (last line).
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
from torch.utils.flop_counter import FlopCounterMode

from utils.cli import ArgumentParser, UsageError, resolve_device, run_command
from utils.precision import low_precision_dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    fn()  # warm-up (allocator, cuDNN autotune, oneDNN primitive cache)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def _gmacs(fn: Callable[[], None], batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2 / batch / 1e9  # one multiply-add = 2 flops


def vit_gmacs() -> dict[str, float]:
    """Eval-mode forward GMACs per 112×112 image of every registered ViT, counted on the meta device."""
    from backbones import BACKBONE_NAMES, VisionTransformer, get_model

    out = {}
    for name in BACKBONE_NAMES:
        with torch.device("meta"):
            model = get_model(name)
        if isinstance(model, VisionTransformer):
            x = torch.empty(1, 3, 112, 112, device="meta")
            out[name] = round(_gmacs(lambda: model.eval()(x), 1), 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    ap.add_argument("--batch-size", type=int, default=4, help="images per forward")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (mean time reported)")
    ap.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    ap.add_argument("--networks", default="r50,mbf,vit_t",
                    help="comma-separated backbones to time (names of backbones.BACKBONE_NAMES)")
    args = ap.parse_args(argv)

    from backbones import BACKBONE_NAMES, get_model

    networks = [n for n in args.networks.split(",") if n]
    unknown = [n for n in networks if n not in BACKBONE_NAMES]
    if unknown:
        raise UsageError(f"--networks: unknown backbone {', '.join(unknown)}; choices: {', '.join(BACKBONE_NAMES)}")

    from cfsm import Generator

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    b = args.batch_size
    amp_dtype = low_precision_dtype(device.type)  # the training policy (utils.precision)
    x = torch.rand(b, 3, 112, 112, device=device) * 2 - 1

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=args.amp)

    results: dict[str, dict] = {}

    for name in networks:
        model = get_model(name).to(device).train()

        def fwd(model=model):
            with torch.no_grad(), autocast():
                model(x)

        def fwd_bwd(model=model):
            model.zero_grad(set_to_none=True)
            with autocast():
                out = model(x)
            out.float().square().mean().backward()

        model.eval()  # MACs of inference: a training ViT masks patches
        gmacs = _gmacs(fwd, b)
        model.train()
        results[name] = {"gmacs_fwd": gmacs, "fwd_ms_per_img": _time(fwd, device, args.reps) / b * 1e3,
                         "fwd_bwd_ms_per_img": _time(fwd_bwd, device, args.reps) / b * 1e3}
        del model

    gen = Generator().to(device).eval()
    o = torch.randn(b, gen.style_dim, device=device)
    with torch.no_grad(), autocast():
        content = gen.encode(x)

    def enc_fwd():
        with torch.no_grad(), autocast():
            gen.encode(x)

    def enc_fwd_bwd():
        gen.zero_grad(set_to_none=True)
        gen.encoder.requires_grad_(True)
        with autocast():
            out = gen.encode(x)
        out.float().square().mean().backward()

    def dec_fwd():
        with torch.no_grad(), autocast():
            gen.decode(content, o)

    def dec_fwd_bwd():
        gen.requires_grad_(False)
        oo = o.clone().requires_grad_()
        with autocast():
            img = gen.decode(content, oo)
        img.float().square().mean().backward()

    results["generator_encoder"] = {"gmacs_fwd": _gmacs(enc_fwd, b),
                                    "fwd_ms_per_img": _time(enc_fwd, device, args.reps) / b * 1e3,
                                    "fwd_bwd_ms_per_img": _time(enc_fwd_bwd, device, args.reps) / b * 1e3,
                                    "backward_to": "parameters"}
    results["generator_decoder"] = {"gmacs_fwd": _gmacs(dec_fwd, b),
                                    "fwd_ms_per_img": _time(dec_fwd, device, args.reps) / b * 1e3,
                                    "fwd_bwd_ms_per_img": _time(dec_fwd_bwd, device, args.reps) / b * 1e3,
                                    "backward_to": "style code o (frozen parameters)"}
    for v in results.values():
        for k in list(v):
            if isinstance(v[k], float):
                v[k] = round(v[k], 3)
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "threads": torch.get_num_threads(), "batch_size": b, "reps": args.reps, "amp": args.amp,
              "torch": torch.__version__, "modules": results, "vit_gmacs": vit_gmacs()}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    run_command(main)
