"""The mixed-precision policy: which low-precision dtype "fp16" means on a device, and the scaler and autocast
arguments a trainer uses. Training, the backbones' `fp16` flag, evaluation and the benchmarks all ask this module."""
from __future__ import annotations

import torch


def low_precision_dtype(device_type: str) -> torch.dtype:
    """The project's one mixed-precision policy for "fp16": float16 on CUDA (with loss scaling), bfloat16 elsewhere
    (CPU float16 kernels are slow or missing, and bfloat16 needs no scaler). Training, the backbones' `fp16` flag,
    evaluation and the benchmarks all ask this function."""
    return torch.float16 if device_type == "cuda" else torch.bfloat16


def mixed_precision(fp16: bool, bf16: bool, device_type: str) -> tuple[torch.dtype | None, torch.amp.GradScaler,
                                                                           dict]:
    """(autocast dtype or None, a GradScaler enabled only for float16, keyword arguments for torch.autocast)."""
    dtype = low_precision_dtype(device_type) if fp16 else torch.bfloat16 if bf16 else None
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    # a disabled autocast still needs a dtype the device accepts; bfloat16 is valid on CPU and CUDA
    autocast = dict(device_type=device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    return dtype, scaler, autocast
