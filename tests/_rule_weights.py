"""Deterministic weight rule of tests/fixtures/compat/README.md §3, plus helpers shared by the model tests."""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch

COMPAT = Path(__file__).resolve().parent / "fixtures" / "compat"


def rule_array(key: str, shape, dtype: str) -> np.ndarray:
    """The rule value of one state_dict entry (float32 or int64 numpy array)."""
    if dtype == "int64":
        return np.zeros(shape, dtype=np.int64)
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
    n = rng.standard_normal(tuple(shape))
    last = key.rsplit(".", 1)[-1]
    if key.endswith("running_var"):
        v = 1.0 + 0.1 * np.abs(n)
    elif n.ndim >= 2:
        v = n / math.sqrt(int(np.prod(shape[1:])))
    elif n.ndim == 1 and last in ("weight", "gamma"):
        v = 1.0 + 0.1 * n
    else:
        v = 0.1 * n
    return np.asarray(v, dtype=np.float32)


def rule_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rule weights for every state_dict entry of `module` (keys, shapes and dtypes taken from the module)."""
    out = {}
    for k, t in module.state_dict().items():
        dt = "int64" if t.dtype == torch.int64 else "float32"
        out[k] = torch.from_numpy(rule_array(k, list(t.shape), dt))
    return out


def load_rule_weights(module: torch.nn.Module) -> torch.nn.Module:
    module.load_state_dict(rule_state_dict(module), strict=True)
    return module


def manifest(name: str) -> dict:
    return json.loads((COMPAT / "manifests" / f"{name}.json").read_text())


def layout(module_or_sd) -> list[tuple[str, list[int], str]]:
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, torch.nn.Module) else module_or_sd
    return [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()]


def manifest_layout(name: str) -> list[tuple[str, list[int], str]]:
    return [(e["key"], list(e["shape"]), e["dtype"]) for e in manifest(name)["entries"]]


def check_digests(sd: dict[str, torch.Tensor], name: str) -> None:
    """Per-tensor and all-tensor sha256 digests of the rule weights equal the manifest's."""
    man = manifest(name)
    total = hashlib.sha256()
    for e in man["entries"]:
        b = sd[e["key"]].numpy().astype("<" + ("i8" if e["dtype"] == "int64" else "f4")).tobytes()
        assert hashlib.sha256(b).hexdigest()[:16] == e["rule_sha256_16"], e["key"]
        total.update(b)
    assert total.hexdigest() == man["rule_sha256_all"], name


def rel_err(got, ref) -> float:
    """README §5 metric: max|got − ref| / max|ref|."""
    got = got.detach().cpu().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    denom = np.abs(ref).max()
    return float(np.abs(got - ref).max() / (denom if denom > 0 else 1.0))


def fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(COMPAT / f"{name}.npz") as d:
        return {k: d[k] for k in d.files}


def input_x() -> torch.Tensor:
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    return torch.from_numpy(x)


def input_x128() -> torch.Tensor:
    x = np.random.default_rng(8).uniform(-1, 1, (2, 3, 128, 128)).astype(np.float32)
    return torch.from_numpy(x)


def input_z() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).standard_normal((2, 10)).astype(np.float32))
