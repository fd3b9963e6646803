"""Export a backbone to ONNX (dynamic batch axis) and check onnxruntime against PyTorch.

    python -m tools.export_onnx --model model.pt --network r50 --out model.onnx [--opset 17] [--atol 1e-4]

Uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): the dynamo exporter needs the
``onnxscript`` package, which is not a dependency of this project. After export the graph is checked with
``onnx.checker`` and run with onnxruntime (CPU) on random inputs of two batch sizes (to exercise the dynamic axis);
the max abs difference to PyTorch is printed and the command fails (exit 1) when it exceeds ``--atol``.
Input: float32 [B, 3, 112, 112] in [-1, 1] (``(x / 255 - 0.5) / 0.5``, RGB unless the model was trained on BGR);
output: the raw embedding [B, D] (not normalised).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from torch import nn

from utils.cli import ArgumentParser, run_command


def export_onnx(backbone: nn.Module, out: str | Path, opset: int = 17, image_size: int = 112) -> Path:
    """Write ``backbone`` (eval mode, CPU, float32) as ONNX with a dynamic batch axis named ``batch``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    backbone = backbone.float().cpu().eval()
    dummy = torch.zeros(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript exporter": chosen on purpose
        torch.onnx.export(
            backbone, (dummy,), str(out), input_names=["input"], output_names=["embedding"],
            dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
    return out


def check_onnx(
    backbone: nn.Module, path: str | Path, batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0, image_size: int = 112
) -> float:
    """Max abs difference between onnxruntime and PyTorch outputs on random inputs in [-1, 1]."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    backbone = backbone.float().cpu().eval()
    worst = 0.0
    for b in batch_sizes:
        x = torch.rand(b, 3, image_size, image_size, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = backbone(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"{path}: ONNX output shape {got.shape} != PyTorch {ref.shape} for batch {b}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def main(argv: list[str] | None = None) -> float:
    from eval.common import load_backbone

    ap = ArgumentParser(description="export a backbone to ONNX and verify it with onnxruntime")
    ap.add_argument("--model", required=True, help="plain state dict")
    ap.add_argument("--network", default="r50")
    ap.add_argument("--embedding-size", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    backbone = load_backbone(args.model, args.network, args.embedding_size, "cpu")
    path = export_onnx(backbone, args.out, args.opset)
    diff = check_onnx(backbone, path)
    print(f"wrote {path}; max abs diff onnxruntime vs PyTorch: {diff:.3e} (tolerance {args.atol:g})")
    if not diff <= args.atol:
        print(f"error: ONNX output differs from PyTorch by {diff:.3e} > {args.atol:g}", file=sys.stderr)
        raise SystemExit(1)
    return diff


if __name__ == "__main__":
    run_command(main)
