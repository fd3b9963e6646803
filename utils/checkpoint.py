"""Checkpoint file I/O in one place: atomic writes that honour the umask and report a full disk, safe loads,
plain and strict state-dict loading. The run layout, run state and resume policy live in `utils.run.run_state`."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from utils.errors import UserError, unsafe_pickle_refusal

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable, unwritable or of the wrong kind; the message names the file."""


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask() alone must set it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _FdWriter(io.RawIOBase):
    """Writes through os.write and remembers the OSError it saw: torch.save turns a failed write into a generic
    RuntimeError ("unexpected pos ..."), and we still want to say "no space left" and name the file."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return os.write(self.fd, data)
        except OSError as exc:
            self.error = exc
            raise


def _disk_full(exc: BaseException, seen: OSError | None) -> bool:
    chain: list[BaseException | None] = [seen, exc, exc.__cause__, exc.__context__]
    return any(isinstance(e, OSError) and e.errno in _DISK_FULL for e in chain)


def _atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write to a temp file in the target folder, fsync, chmod to what open() would give under the umask, rename.

    A crash or a full disk never leaves a half file under `path`: the previous file, if any, stays intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    raw = _FdWriter(fd)
    try:
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: others on shared storage could not read
            with io.BufferedWriter(raw, buffer_size=1 << 20) as f:
                write(f)
                f.flush()
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
        except BaseException as exc:
            if _disk_full(exc, raw.error):
                raise CheckpointError(f"cannot write {path}: no space left on device ({path.parent}). The previous "
                                      f"file there, if any, is intact; free space or set another `output`") from exc
            raise
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file, fsync, rename: never a half file; honours the umask; a full disk names the file."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Text written with the same guarantees as atomic_save (summaries, COMPLETE markers)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN/Infinity float replaced by None (JSON has no such numbers; Python would write invalid
    `NaN` tokens) and tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """The project's one JSON writer (summaries, results, reports): indented, other values as str, non-finite
    numbers as null (always valid JSON), atomic."""
    text = json.dumps(json_safe(obj), indent=1, default=str, allow_nan=False)
    _atomic_write(path, lambda f: f.write((text + "\n").encode()))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content (recorded per rank file in a checkpoint's COMPLETE, checked on resume)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def recorded_file_problem(directory: str | os.PathLike, meta: Mapping[str, Any], rank: int) -> str | None:
    """None when `directory/rank_<rank>.pt` has the size and SHA-256 a checkpoint marker `meta` recorded, else what
    is wrong. (Markers of older versions record sizes only; then the size is all that is checked.)"""
    path = Path(directory) / f"rank_{rank}.pt"
    if not path.is_file():
        return f"{path.name} is missing"
    sizes, digests = meta.get("sizes"), meta.get("sha256")
    if not isinstance(sizes if sizes is not None else {}, dict) or not isinstance(digests or {}, dict):
        return f"{Path(directory) / 'COMPLETE'} has no per-rank sizes/checksums"
    expected = (sizes or {}).get(str(rank))
    actual = path.stat().st_size
    if expected is not None and int(expected) != actual:
        return f"{path.name} has {actual} bytes, COMPLETE recorded {expected}"
    digest = (digests or {}).get(str(rank))
    if digest and file_sha256(path) != digest:
        return f"{path.name} does not match the SHA-256 COMPLETE recorded (its content changed after writing)"
    return None


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True: a crafted file cannot run code while loading."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, truncated files
        refusal = unsafe_pickle_refusal(path, exc)  # a pickled class: one line naming it, not torch's paragraph
        raise CheckpointError(refusal or f"cannot load {path} safely (weights_only=True): {type(exc).__name__}: "
                              f"{exc}. Do not load it with weights_only=False unless you trust its source: a pickle "
                              "can run code") from exc


def state_dict_mismatch(expected: Mapping[str, Sequence[int]], state: Mapping[str, torch.Tensor]) -> str | None:
    """What differs between a model's key -> shape table and a state dict (the first mismatching key, or the first
    key whose shape differs), or None when they match. The one strict-load check: backbones, identity networks and
    generators all go through it."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        return f"first mismatching key '{first}' ({len(missing)} missing, {len(unexpected)} unexpected keys)"
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            return f"key '{key}' has shape {list(state[key].shape)} in the file, the model expects {list(shape)}"
    return None


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a message that names the first mismatching key (architecture mismatch)."""
    problem = state_dict_mismatch({k: v.shape for k, v in module.state_dict().items()}, state)
    if problem is not None:
        raise CheckpointError(f"{source} does not match the model ({type(module).__name__}): {problem}. "
                              f"Is it another architecture or embedding size?")
    module.load_state_dict(state, strict=True)
