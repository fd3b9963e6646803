"""Checkpoint I/O in one place: atomic writes, safe loads, the on-disk layout, RNG state capture.

Layout of a training run's checkpoints::

    <output>/checkpoints/step_00001200/rank_0.pt   # backbone, this rank's Partial FC shard, optimizer, ...
    <output>/checkpoints/step_00001200/rank_1.pt
    <output>/checkpoints/step_00001200/COMPLETE    # written by rank 0 after every rank's file is on disk

A directory without COMPLETE (a rank died while writing) is ignored on resume and pruned later.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or of the wrong kind; the message names the file."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True: a crafted file cannot run code while loading."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, truncated files
        raise CheckpointError(f"cannot load {path} safely (weights_only=True): {type(exc).__name__}: {exc}. "
                              "Do not load it with weights_only=False unless you trust its source: a pickle can "
                              "run code") from exc


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict (InsightFace backbone.pth / model.pt); strips a DDP `module.` prefix if present."""
    obj = safe_load(path)
    if isinstance(obj, dict) and "state_dict_backbone" in obj:  # arcface_torch full checkpoint
        obj = obj["state_dict_backbone"]
    elif isinstance(obj, dict) and isinstance(obj.get("backbone"), dict):  # our run checkpoint (rank_0.pt)
        obj = obj["backbone"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a plain state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a message that names the first mismatching key (architecture mismatch)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise CheckpointError(
            f"{source} does not match the model ({type(module).__name__}): first mismatching key '{first}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys). Is it another architecture?")
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{source}: key '{key}' has shape {tuple(state[key].shape)}, the model expects "
                                  f"{tuple(tensor.shape)}. Is it another architecture or embedding size?")
    module.load_state_dict(state, strict=True)


# ---- run layout ----

def checkpoint_root(output: str | os.PathLike) -> Path:
    return Path(output) / "checkpoints"


def step_dir(output: str | os.PathLike, step: int) -> Path:
    return checkpoint_root(output) / f"step_{step:08d}"


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank}.pt"


def mark_complete(directory: Path, meta: dict) -> None:
    atomic_write_text(json.dumps(meta, indent=1), directory / COMPLETE)


def complete_checkpoints(output: str | os.PathLike) -> list[tuple[int, Path, dict]]:
    """(step, dir, meta) of every complete checkpoint, oldest first."""
    root = checkpoint_root(output)
    found = []
    if root.is_dir():
        for d in root.glob("step_*"):
            marker = d / COMPLETE
            if not marker.is_file():
                continue
            try:
                meta = json.loads(marker.read_text())
                step = int(d.name.split("_")[1])
            except (ValueError, json.JSONDecodeError, IndexError):
                continue
            found.append((step, d, meta))
    return sorted(found, key=lambda t: t[0])


def latest_complete(output: str | os.PathLike) -> tuple[int, Path, dict] | None:
    found = complete_checkpoints(output)
    return found[-1] if found else None


def prune(output: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; delete older ones and incomplete leftovers older than them."""
    found = complete_checkpoints(output)
    if not found:
        return
    for _, d, _ in found[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    newest_kept = found[-keep:][0][0]
    for d in checkpoint_root(output).glob("step_*"):
        try:
            step = int(d.name.split("_")[1])
        except (ValueError, IndexError):
            continue
        if not (d / COMPLETE).exists() and step < newest_kept:
            shutil.rmtree(d, ignore_errors=True)


# ---- RNG state in weights_only-loadable form ----

def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_random_state(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


def _as_python_random_state(obj):
    # pickling round-trips random's state tuple as tuple/list mixes; random.setstate needs tuples
    version, internal, gauss = obj
    return version, tuple(internal), gauss


def save_run_checkpoint(output: str | os.PathLike, step: int, rank: int, world_size: int, state: dict,
                        barrier, keep: int, kind: str, meta: dict | None = None) -> Path:
    """Every rank writes its file atomically; after a barrier rank 0 marks the step complete and prunes.

    `kind` names the run type; `resume_checkpoint` only resumes a checkpoint of the same kind."""
    directory = step_dir(output, step)
    atomic_save(state, rank_file(directory, rank))
    barrier()
    if rank == 0:
        mark_complete(directory, {"step": step, "world_size": world_size, "kind": kind, **(meta or {})})
        prune(output, keep)
    barrier()
    return directory


def resume_checkpoint(output: str | os.PathLike, resume: bool | str, world_size: int,
                      kind: str) -> tuple[int, Path] | None:
    """(step, directory) to resume from under the `resume` policy (False | True | "auto"), or None.

    Refuses a checkpoint written by another world size (per-rank shards and data order) or by another kind of run
    (a stage-1 folder given to stage 2 and vice versa)."""
    found = latest_complete(output) if resume else None
    if resume is True and found is None:
        raise CheckpointError(f"resume=True but {checkpoint_root(output)} holds no complete checkpoint")
    if found is None:
        return None
    step, directory, meta = found
    if int(meta.get("world_size", -1)) != world_size:
        raise CheckpointError(
            f"checkpoint {directory} was written by {meta.get('world_size')} ranks but this run has {world_size}: "
            f"shards, optimizer states and data order are per rank. Resume with the same world size, or start a "
            f"new output folder initialised from {rank_file(directory, 0)}")
    if meta.get("kind") != kind:
        raise CheckpointError(f"checkpoint {directory} is a {meta.get('kind')!r} checkpoint, not {kind!r}: "
                              f"use another `output` folder or resume=False")
    return step, directory
