"""Export a backbone to ONNX (dynamic batch axis) and check onnxruntime against PyTorch.

    python -m tools.export_onnx --model model.pt --out DIR [--bgr | --rgb] [--opset 17] [--tolerance 1e-4]

Writes ``DIR/<model file stem>.onnx`` (``--name`` to choose). Uses the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``): the dynamo exporter needs the ``onnxscript`` package, which is not a
dependency of this project. After export the graph is checked with ``onnx.checker`` and run with onnxruntime (CPU)
on random inputs of two batch sizes (to exercise the dynamic axis). Parity is judged relative to the embedding's
scale, so that models with large raw embeddings are judged like small ones: for every row, the max abs difference
divided by the L2 norm of PyTorch's embedding; the worst row must be <= ``--tolerance``, and the smallest cosine
between the two outputs is printed too. A failed check exits 1 and leaves no file behind (the model is written under
a temporary name and renamed only once it passes).

Input: float32 [B, 3, 112, 112] in [-1, 1] (``(x / 255 - 0.5) / 0.5``) in **RGB** order for every exported model:
for models trained on BGR input (AdaFace-family files, told by the file; ``--bgr`` for others) the graph reverses
the channels first. Output: the raw
embedding [B, D] (not normalised).
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

from utils.cli import ArgumentParser, add_bgr_arg, add_out_arg, expanded_path, run_command


class _ChannelsReversed(nn.Module):
    """Feeds the wrapped model BGR when given RGB (a model trained on BGR input keeps an RGB interface)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x.flip(1))


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
) -> dict[str, float]:
    """onnxruntime vs PyTorch on random inputs in [-1, 1]: ``relative_error`` (worst row's max abs difference / that
    row's PyTorch L2 norm), ``min_cosine`` and ``max_abs_diff``."""
    import onnx
    import onnxruntime as ort

    from eval.common import EvalInputError

    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    backbone = backbone.float().cpu().eval()
    result = {"relative_error": 0.0, "min_cosine": 1.0, "max_abs_diff": 0.0}
    for b in batch_sizes:
        x = torch.rand(b, 3, image_size, image_size, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = backbone(x).double().numpy()
        got = sess.run(None, {"input": x.numpy()})[0].astype(np.float64)
        if not (np.isfinite(ref).all() and np.isfinite(got).all()):  # NaN would pass every `<=` test below
            source = getattr(backbone, "source_file", path)
            raise EvalInputError(f"{source}: the model gives non-finite outputs (PyTorch finite: "
                                 f"{bool(np.isfinite(ref).all())}, ONNX finite: {bool(np.isfinite(got).all())}): "
                                 f"not a usable model; nothing is kept")
        if got.shape != ref.shape:
            raise RuntimeError(f"{path}: ONNX output shape {got.shape} != PyTorch {ref.shape} for batch {b}")
        norm = np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
        cosine = (got * ref).sum(1) / (np.maximum(np.linalg.norm(got, axis=1), 1e-12) * norm)
        result["relative_error"] = max(result["relative_error"], float((np.abs(got - ref).max(1) / norm).max()))
        result["min_cosine"] = min(result["min_cosine"], float(cosine.min()))
        result["max_abs_diff"] = max(result["max_abs_diff"], float(np.abs(got - ref).max()))
    return result


def _opset_range() -> tuple[int, int]:
    """The ONNX opsets this torch's exporter writes (its own constants; 7..20 if a future torch moves them)."""
    try:
        from torch.onnx import _constants
        return int(_constants.ONNX_MIN_OPSET), int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return 7, 20


def main(argv: list[str] | None = None) -> dict[str, float]:
    from eval.common import add_network_args, check_output_folder, model_from_args, single_process_env

    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, type=expanded_path,
                    help="model file: a state dict, a train.py model.pt, a Lightning / AdaFace .ckpt, a CVLFace "
                         ".safetensors")
    add_network_args(ap)
    add_out_arg(ap, "the .onnx file")
    ap.add_argument("--name", default=None, help="file name in --out (default: the model file's stem + .onnx)")
    add_bgr_arg(ap)
    ap.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="largest allowed max abs difference / embedding L2 norm (per row)")
    args = ap.parse_args(argv)
    # checked before the export runs: torch's own errors name no option, a bad --tolerance failed only at the end
    low, high = _opset_range()
    if not low <= args.opset <= high:
        ap.error(f"argument --opset: this torch ({torch.__version__}) exports ONNX opsets {low}..{high}, got "
                 f"{args.opset}")
    if not args.tolerance > 0:
        ap.error(f"argument --tolerance: must be > 0 (a relative error), got {args.tolerance}")
    if args.name is not None and (not args.name or Path(args.name).name != args.name):
        ap.error(f"argument --name: a file name inside --out, without folders, got {args.name!r}")
    out_dir = check_output_folder(args.out)
    path = out_dir / (args.name or f"{args.model.stem}.onnx")
    backbone, _ = model_from_args(args, single_process_env(torch.device("cpu")))  # args.bgr: the file's order
    if args.bgr:
        backbone = _ChannelsReversed(backbone)
    partial = path.with_name(f".{path.name}.partial")
    try:
        export_onnx(backbone, partial, args.opset)
        parity = check_onnx(backbone, partial)
        print(f"onnxruntime vs PyTorch: relative error {parity['relative_error']:.3e} (tolerance {args.tolerance:g}), "
              f"min cosine {parity['min_cosine']:.8f}, max abs diff {parity['max_abs_diff']:.3e}")
        if not parity["relative_error"] <= args.tolerance:
            print(f"error: the ONNX model differs from PyTorch by {parity['relative_error']:.3e} of the embedding "
                  f"norm > --tolerance {args.tolerance:g}; nothing written (try another --opset)", file=sys.stderr)
            raise SystemExit(1)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {path} (input: RGB{', reversed to BGR inside the graph' if args.bgr else ''})")
    return parity


if __name__ == "__main__":
    run_command(main)
