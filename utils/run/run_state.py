"""Saving a training run's checkpoints across ranks and resuming from them (file I/O itself is `utils.checkpoint`;
the folder layout and markers `utils.run.run_folder`; the config policy `utils.run.config_policy`; the lock
`utils.run.output_lock`; RNG state `utils.run.rng_state`).

Layout of a run's output folder::

    <output>/.lock                                 # flock held by rank 0 while a run runs: one job per folder
    <output>/checkpoints/step_00001200/rank_0.pt   # backbone, this rank's Partial FC shard, optimizer, RNG, ...
    <output>/checkpoints/step_00001200/rank_1.pt
    <output>/checkpoints/step_00001200/COMPLETE    # JSON: step, world size, kind, run config, finite, file sizes

Rules (they hold with one shared output folder and with one folder per node):

- Every rank writes its own file; after all ranks report (size, finite) the marker is written by every rank whose
  local rank is 0 (one per node; on shared storage they write the same content atomically), and that rank prunes.
- A rank counts a step as intact when COMPLETE parses (a JSON object) and its own file has the size and SHA-256
  COMPLETE recorded. Ranks all-gather their lists and resume from the newest step intact on every rank; a load
  failure on any rank makes all ranks fall back to the next older step together. Steps newer than the one resumed
  (damaged somewhere) are moved aside to `step_N.damaged` (kept for inspection, never resumed, never counted).
- Checkpoints that exist but none usable: an error, never a silent restart at step 0 in the same folder.
- Pruning keeps the newest `keep_checkpoints` complete steps, the step just written and the newest finite one.
- The run config is stored in COMPLETE; on resume keys that give the saved state its meaning must match (an error
  lists every change), schedule keys take the new value from the resumed step on (logged), others do not matter.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from utils.run import reshard
from utils.checkpoint import CheckpointError, atomic_save, file_sha256, recorded_file_problem, safe_load
from utils.run.config_policy import ConfigPolicy, check_config, json_form
from utils.distributed import Ranks
from utils.errors import RunFailedError
from utils.run.run_folder import COMPLETE, checkpoint_root, last_finite_checkpoint, mark_complete, prune, rank_file, \
    scan_checkpoints, set_aside, step_dir


_log = logging.getLogger(__name__)


class NonFiniteStateError(RunFailedError):
    """Weights or buffers hold NaN/Inf at the end of a run: nothing is written as a success."""


# ---- finiteness ----

def first_nonfinite(state: Any, prefix: str = "") -> str | None:
    """Name of the first floating-point tensor holding NaN/Inf in a nested dict/list state, or None."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            return None if bool(torch.isfinite(state).all()) else (prefix or "<tensor>")
        return None
    if isinstance(state, float):
        return None if math.isfinite(state) else prefix
    if isinstance(state, Mapping):
        items: Iterable = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def require_finite(states: Mapping[str, Any], step: int, ranks: Ranks, output: str | os.PathLike) -> None:
    """All ranks together: raise NonFiniteStateError when any rank's final weights/buffers hold NaN/Inf.

    Call before writing the final checkpoint and model file, so a broken model is never saved as a success."""
    bad = first_nonfinite(states)
    if ranks.agree_all(bad is None):
        return
    where = [f"rank {r}: {name}" for r, name in enumerate(ranks.gather(bad)) if name is not None]
    last = last_finite_checkpoint(output)
    raise NonFiniteStateError(
        f"step {step}: the final weights/buffers are not finite ({'; '.join(where)}); no final checkpoint or "
        f"model file was written. Last finite checkpoint: {last or 'none'}. Lower lr, check the data, or "
        f"disable fp16, then resume from it")


# ---- save ----

def save_run_checkpoint(output: str | os.PathLike, step: int, state: dict, ranks: Ranks, keep: int, kind: str,
                        config: Mapping[str, Any], meta: dict | None = None) -> Path:
    """Every rank writes its file atomically; once all did, each node's marker writer records COMPLETE (with the
    config, every rank's file size and whether all states are finite) and prunes.

    A failed write on any rank (e.g. a full disk) fails every rank, without a marker: the previous checkpoint
    stays the newest complete one. `kind` names the run type; resume only accepts the same kind."""
    directory = step_dir(output, step)
    error: BaseException | None = None
    size, digest = -1, ""
    bad = first_nonfinite(state)
    try:
        path = rank_file(directory, ranks.rank)
        atomic_save(state, path)
        size, digest = path.stat().st_size, file_sha256(path)
    except Exception as exc:  # reported to every rank below before anyone raises
        error = exc
    reports = ranks.gather({"ok": error is None, "size": size, "sha256": digest, "nonfinite": bad})
    failed = [r for r, rep in enumerate(reports) if not rep["ok"]]
    if failed:
        if error is not None:
            raise error
        raise CheckpointError(f"rank(s) {failed} could not write their file in {directory} (see their error); "
                              f"no rank marked step {step} complete")
    marker_error: BaseException | None = None
    if ranks.writes_markers:
        try:
            mark_complete(directory, {
                "step": step, "world_size": ranks.world_size, "kind": kind, **(meta or {}),
                "finite": all(rep["nonfinite"] is None for rep in reports),
                "nonfinite": {str(r): rep["nonfinite"] for r, rep in enumerate(reports) if rep["nonfinite"]},
                "sizes": {str(r): rep["size"] for r, rep in enumerate(reports)},
                "sha256": {str(r): rep["sha256"] for r, rep in enumerate(reports)},
                "config": json_form(dict(config))})
            prune(output, keep, written=step)
        except Exception as exc:
            marker_error = exc
    if not ranks.agree_all(marker_error is None):
        if marker_error is not None:
            raise marker_error
        raise CheckpointError(f"another node could not write {directory / COMPLETE} (see its error)")
    return directory


# ---- resume ----

@dataclass
class Resumed:
    step: int
    directory: Path
    state: dict       # this rank's file
    meta: dict        # its COMPLETE marker
    changes: list     # (key, old, new) schedule keys whose new value applies from `step` on

    def change_line(self) -> str | None:
        """The one warning naming the changed keys; logged by the caller once the resume is accepted (a refusal
        must not be preceded by news of values that will not apply)."""
        if not self.changes:
            return None
        return (f"resume from step {self.step}: config changed, the new values apply from here on: "
                + ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in self.changes))


def _own_file_status(directory: Path, meta: dict, rank: int) -> str | None:
    """None when this rank's file is present with the size and SHA-256 COMPLETE recorded, else what is wrong."""
    return recorded_file_problem(directory, meta, rank)


def resume(output: str | os.PathLike, policy: bool | str, ranks: Ranks, kind: str, config: Mapping[str, Any],
           log: logging.Logger | None = None, rules: ConfigPolicy | None = None) -> Resumed | None:
    """Find, check and load the checkpoint to resume from under `policy` (False | True | "auto"), on all ranks
    together; None when there is nothing to resume. Collective: every rank calls it. `rules`: which changed
    config keys refuse or apply (None: every change applies).

    Checkpoints that exist but of which none is usable are an error: restarting at step 0 in their folder would
    mix two runs. Steps newer than the one resumed are moved aside (`set_aside`) by each node's marker writer."""
    log = log or _log
    if not policy:
        return None
    scanned = scan_checkpoints(output)
    intact, damaged, metas = [], {}, {}
    for step, directory, meta, problem in reversed(scanned):
        if meta is not None:
            metas[step] = meta
            problem = _files_status(directory, meta, ranks, kind)
        if problem is None:
            intact.append(step)
        else:
            damaged[step] = problem
    every_rank = ranks.gather({"intact": intact, "found": bool(scanned), "damaged": damaged})
    common = sorted(set.intersection(*(set(r["intact"]) for r in every_rank)), reverse=True)
    root = checkpoint_root(output)
    if not common and any(r["intact"] for r in every_rank):
        log.warning(f"{root}: no checkpoint step is complete and intact on every rank (per rank: "
                    f"{[sorted(r['intact'])[-3:] for r in every_rank]}, damaged here: {damaged or 'none'})")
    last_error: BaseException | None = None
    for step in common:
        directory = step_dir(output, step)
        for newer, problem in damaged.items():
            if newer > step:
                log.warning(f"checkpoint {step_dir(output, newer)} is damaged ({problem}): falling back to {directory}")
        damaged = {s: p for s, p in damaged.items() if s < step}
        elsewhere = [s for s in intact if s > step and s not in common]
        if elsewhere:
            log.warning(f"step(s) {elsewhere} are intact here but not on every rank: resuming from {directory}")
        intact = [s for s in intact if s < step]
        meta = metas[step]
        error, changes = None, []
        try:
            changes = _check_meta(directory, meta, ranks.world_size, kind, config, log, rules)
            _require_resharded_files(directory, meta, ranks)
        except CheckpointError as exc:
            error = exc
        if not ranks.agree_all(error is None):  # the same markers give the same verdict; agree anyway, never hang
            raise error or CheckpointError(f"another rank refused {directory} (see its error)")
        try:
            state = _load_rank_state(directory, meta, ranks)
        except CheckpointError as exc:
            state, last_error = None, exc
        if not ranks.agree_all(state is not None):
            log.warning(f"checkpoint {directory} could not be loaded on every rank"
                        f"{f' ({last_error})' if state is None else ''}: falling back to an older one")
            continue
        if meta.get("finite") is False:
            log.warning(f"resuming from {directory}, whose state is not finite ({meta.get('nonfinite')}); last "
                        f"finite checkpoint: {last_finite_checkpoint(output) or 'none'}")
        if ranks.writes_markers:
            for newer, newer_dir, _, _ in scanned:
                if newer > step and newer_dir.exists():
                    moved = set_aside(newer_dir)
                    if moved is not None:
                        log.warning(f"checkpoint {newer_dir} is not usable on every rank: moved aside to {moved}")
        return Resumed(step, directory, state, meta, changes)
    if any(r["found"] for r in every_rank):
        problems = {s: p for r in every_rank for s, p in r["damaged"].items()}
        detail = "; ".join(f"step {s}: {p}" for s, p in sorted(problems.items())) or str(last_error or "")
        raise CheckpointError(
            f"{root} holds checkpoints but none is complete and intact on every rank ({detail}). Starting over at "
            f"step 0 there would mix two runs: restore the damaged files, or move {root} aside (or set output= to "
            f"a new folder) to start afresh")
    if policy is True:
        raise CheckpointError(f"resume=True but {root} holds no complete checkpoint: use resume=auto to start a "
                              f"new run")
    return None


def _check_meta(directory: Path, meta: dict, world_size: int, kind: str, config: Mapping[str, Any],
                log: logging.Logger, rules: ConfigPolicy | None) -> list[tuple[str, Any, Any]]:
    if int(meta.get("world_size", -1)) != world_size and not (meta.get("kind") == kind
                                                                and kind in reshard.RESHARD_KINDS):
        raise CheckpointError(
            f"checkpoint {directory} was written by {meta.get('world_size')} ranks but this run has {world_size}: "
            f"a {meta.get('kind')!r} checkpoint resumes with the same world size only (a {kind!r} run resumes "
            f"{'on any world size from its own kind of checkpoint' if kind in reshard.RESHARD_KINDS else 'so'}). "
            f"Resume with {meta.get('world_size')} ranks, or start a new output folder initialised from "
            f"{rank_file(directory, 0)}")
    if meta.get("kind") != kind:
        raise CheckpointError(f"checkpoint {directory} is a {meta.get('kind')!r} checkpoint, not {kind!r}: "
                              f"use another `output` folder or resume=False")
    if "config" not in meta:
        log.warning(f"checkpoint {directory} records no config (written by an older version): not compared")
        return []
    return check_config(meta["config"], config, directory, rules)


# ---- a checkpoint of another world size (re-sharded on load: utils/run/reshard.py) ----

def _resharded(meta: dict, ranks: Ranks, kind: str) -> bool:
    return (meta.get("kind") == kind and kind in reshard.RESHARD_KINDS
            and int(meta.get("world_size", -1)) != ranks.world_size)


def _files_status(directory: Path, meta: dict, ranks: Ranks, kind: str) -> str | None:
    """None when the files this rank loads are intact, else what is wrong. A foreign checkpoint (another kind, or
    a world size its kind cannot change) and missing old rank files count as intact here: refused by name later."""
    if _resharded(meta, ranks, kind):
        try:
            return reshard.check_rank_files(directory, meta, ranks.rank, ranks.world_size)[2]
        except CheckpointError as exc:  # an older marker without config and no rank_0.pt here: not usable
            return str(exc)
    foreign = int(meta.get("world_size", -1)) != ranks.world_size or meta.get("kind") != kind
    return None if foreign else _own_file_status(directory, meta, ranks.rank)


def _require_resharded_files(directory: Path, meta: dict, ranks: Ranks) -> None:
    """Every old rank file this rank needs must be visible (shared storage); else the way forward, by name."""
    if _resharded(meta, ranks, meta.get("kind")):
        missing = reshard.check_rank_files(directory, meta, ranks.rank, ranks.world_size)[1]
        if missing:
            raise CheckpointError(missing)


def _load_rank_state(directory: Path, meta: dict, ranks: Ranks) -> dict:
    """This rank's file, or, for a checkpoint of another world size, this rank's re-sharded state."""
    if _resharded(meta, ranks, meta.get("kind")):
        return reshard.load_resharded(directory, meta, ranks.rank, ranks.world_size)
    return safe_load(rank_file(directory, ranks.rank))


def load_optimizer_keeping_config(optimizer: torch.optim.Optimizer, saved: dict,
                                  keys: tuple[str, ...] = ("lr", "initial_lr", "momentum", "weight_decay", "betas",
                                                           "eps")) -> None:
    """optimizer.load_state_dict, but the hyper-parameters come from this run's config, not the checkpoint
    (torch would silently restore the old lr, momentum, ...); the per-parameter state (momentum buffers) loads."""
    fresh = [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)


def load_scheduler_keeping_config(scheduler: torch.optim.lr_scheduler.LRScheduler, saved: dict,
                                  keys: tuple[str, ...] = ("base_lrs", "total_steps", "warmup_steps", "power")) -> None:
    """Resume the scheduler's position (its step count) under this run's schedule: lr, num_epoch, warm-up and
    power as configured now, evaluated at the resumed step. Unchanged config: exactly the saved lr."""
    fresh = {k: getattr(scheduler, k) for k in keys if hasattr(scheduler, k)}
    scheduler.load_state_dict(saved)
    for k, v in fresh.items():
        setattr(scheduler, k, v)
    lrs = scheduler.get_lr()
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
