"""A training run's state on disk and the resume policy (file I/O itself is `utils.checkpoint`).

Layout of a run's output folder::

    <output>/.lock                                 # flock held by rank 0 for the whole run: one job per folder
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

import fcntl
import json
import logging
import math
import os
import random
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from utils import reshard
from utils.checkpoint import CheckpointError, atomic_save, file_sha256, recorded_file_problem, safe_load, \
    write_json
from utils.errors import RunFailedError

COMPLETE = "COMPLETE"
LOCK_NAME = ".lock"

_log = logging.getLogger(__name__)


class NonFiniteStateError(RunFailedError):
    """Weights or buffers hold NaN/Inf at the end of a run: nothing is written as a success."""


class OutputBusyError(CheckpointError):
    """Another live job holds the output folder's lock."""


# ---- the ranks, as the few collectives this module needs (a test passes plain functions) ----

@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    agree_all: Callable[[bool], bool] = field(default=lambda ok: ok)  # True only if True on every rank
    gather: Callable[[Any], list] = field(default=lambda obj: [obj])  # every rank's object, by rank

    @property
    def writes_markers(self) -> bool:
        """Rank 0 and the first rank of every node: each node's folder gets its markers and pruning."""
        return self.rank == 0 or self.local_rank == 0

    @classmethod
    def from_env(cls, env) -> "Ranks":
        """From utils.distributed.DistEnv: `agree_all` / `gather_objects` over the default process group."""
        if not env.distributed:
            return cls(env.rank, env.world_size, env.local_rank)
        from utils.distributed import agree_all, gather_objects

        return cls(env.rank, env.world_size, env.local_rank, lambda ok: agree_all(env, ok),
                   lambda obj: gather_objects(env, obj))


# ---- layout ----

def checkpoint_root(output: str | os.PathLike) -> Path:
    return Path(output) / "checkpoints"


def step_dir(output: str | os.PathLike, step: int) -> Path:
    return checkpoint_root(output) / f"step_{step:08d}"


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank}.pt"


def mark_complete(directory: Path, meta: dict) -> None:
    write_json(meta, directory / COMPLETE)


def scan_checkpoints(output: str | os.PathLike) -> list[tuple[int, Path, dict | None, str | None]]:
    """(step, dir, meta or None, what is wrong) of every `step_N` folder holding a COMPLETE marker, oldest first.
    A marker that is not a JSON object (truncated, hand-edited, a list) gives meta None and the problem."""
    root = checkpoint_root(output)
    found = []
    if root.is_dir():
        for d in root.glob("step_*"):
            marker = d / COMPLETE
            try:
                step = int(d.name[len("step_"):])
            except ValueError:
                continue  # step_N.damaged and other leftovers
            if not marker.is_file():
                continue
            meta, problem = None, None
            try:
                meta = json.loads(marker.read_text())
            except (OSError, ValueError) as exc:
                problem = f"{marker} is not readable JSON ({type(exc).__name__})"
            if meta is not None and not isinstance(meta, dict):
                meta, problem = None, f"{marker} holds a {type(meta).__name__}, not a JSON object"
            found.append((step, d, meta, problem))
    return sorted(found, key=lambda t: t[0])


def complete_checkpoints(output: str | os.PathLike) -> list[tuple[int, Path, dict]]:
    """(step, dir, meta) of every checkpoint with a readable COMPLETE marker, oldest first."""
    return [(step, d, meta) for step, d, meta, _ in scan_checkpoints(output) if meta is not None]


def set_aside(directory: Path) -> Path | None:
    """Rename a damaged step folder to `<name>.damaged` (kept for inspection; never resumed or counted)."""
    target = directory.with_name(directory.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{directory.name}.damaged{n}")
    try:
        os.replace(directory, target)
    except OSError:  # another node's marker writer moved it first (shared storage)
        return None
    return target


def latest_complete(output: str | os.PathLike) -> tuple[int, Path, dict] | None:
    found = complete_checkpoints(output)
    return found[-1] if found else None


def last_finite_checkpoint(output: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint whose marker records finite weights, buffers and optimizer state."""
    finite = [d for _, d, meta in complete_checkpoints(output) if meta.get("finite") is True]
    return finite[-1] if finite else None


def prune(output: str | os.PathLike, keep: int, written: int | None = None) -> None:
    """Keep the newest `keep` complete checkpoints, the step just `written` and the newest finite one; delete older
    ones and incomplete leftovers older than the oldest kept."""
    found = complete_checkpoints(output)
    if not found:
        return
    kept = {d for _, d, _ in found[-max(keep, 1):]}
    kept |= {d for s, d, _ in found if s == written}  # never the checkpoint this run has just written
    finite = [d for _, d, meta in found if meta.get("finite") is True]
    if finite:
        kept.add(finite[-1])  # NaN checkpoints never push out the last one worth resuming from
    for _, d, _ in found:
        if d not in kept:
            shutil.rmtree(d, ignore_errors=True)
    oldest_kept = min(int(d.name[len("step_"):]) for d in kept)
    for d in checkpoint_root(output).glob("step_*"):
        try:
            step = int(d.name[len("step_"):])
        except ValueError:
            continue
        if not (d / COMPLETE).exists() and step < oldest_kept:
            shutil.rmtree(d, ignore_errors=True)


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


# ---- the run config stored in every checkpoint and compared on resume ----

@dataclass(frozen=True)
class ConfigPolicy:
    """How a changed config key is treated on resume; every key of configs/base.py is in one of the three."""
    refuse: tuple[str, ...]  # give the saved state its meaning (or the data order): a change is an error
    apply: tuple[str, ...]   # change the training from the resumed step on: applied, listed in one warning line
    free: tuple[str, ...]    # where and how the run is watched, or keys the other stage reads: no word
    init_key: str            # the key that starts a new run from a checkpoint's weights (named in refusals)


_RUN_CONTROL = ("output", "config_name", "resume", "device", "dist_timeout_s", "num_workers", "max_steps",
                "save_every", "keep_checkpoints", "max_nonfinite_steps", "frequent", "verbose", "image_every",
                "tensorboard", "generate_toy_data", "val_targets", "val_batch_size")
_DEGRADE = ("degrade_resize_prob", "degrade_resize_range", "degrade_blur_prob", "degrade_blur_sigma",
            "degrade_color_prob", "degrade_color_strength", "degrade_noise_prob", "degrade_noise_std",
            "degrade_jpeg_prob", "degrade_jpeg_quality")
_STAGE1_ONLY = ("target", "id_network", "id_model", "id_embedding_size", "gen_dim", "gen_n_downsample",
                "gen_n_residual", "gen_latent_dim", "gen_style_dim", "gen_input_skip", "init_generator", "gen_lr",
                "gen_betas", "lambda_id_schedule", "id_distance_range", "lambda_rec", "lambda_diversity",
                "style_sampling", "dis_dim", "style_report_faces")
_STAGE2_ONLY = ("network", "embedding_size", "dropout", "use_checkpoint", "channels_last", "loss", "s", "m",
                "margin_list", "adaface_h", "adaface_t_alpha", "sample_rate", "optimizer", "lr", "momentum",
                "weight_decay", "gradient_acc", "warmup_epoch", "lr_power", "clip_grad_norm",
                "pretrained_synthesis_model", "rs_ratio", "epsilon", "alpha", "k", "pretrained_backbone_model",
                "weight_decay_exclude", *_DEGRADE)

CONFIG_POLICY: dict[str, ConfigPolicy] = {
    "recognition": ConfigPolicy(
        # world_size may change: the state is re-sharded on resume (utils/reshard.py, utils/elastic.py)
        refuse=("network", "embedding_size", "loss", "optimizer", "batch_size", "gradient_acc", "sample_rate", "num_classes", "num_image", "fp16", "seed", "weight_decay_exclude"),
        apply=("lr", "num_epoch", "warmup_epoch", "lr_power", "momentum", "weight_decay", "s", "m", "margin_list",
               "adaface_h", "adaface_t_alpha", "clip_grad_norm", "dropout", "use_checkpoint", "channels_last",
               "bf16", "rec", "pretrained_synthesis_model", "rs_ratio", "epsilon", "alpha", "k", *_DEGRADE),
        free=(*_RUN_CONTROL, "world_size", "pretrained_backbone_model", *_STAGE1_ONLY),  # world: logged by elastic
        init_key="pretrained_backbone_model"),
    "cfsm_stage1": ConfigPolicy(
        refuse=("gen_dim", "gen_n_downsample", "gen_n_residual", "gen_latent_dim", "gen_style_dim", "gen_input_skip",
                "dis_dim", "id_network", "id_embedding_size", "batch_size", "world_size", "num_classes", "num_image",
                "fp16", "seed"),
        apply=("gen_lr", "gen_betas", "num_epoch", "lambda_id_schedule", "id_distance_range", "lambda_rec",
               "lambda_diversity", "style_sampling", "id_model", "target", "rec", "bf16"),
        free=(*_RUN_CONTROL, "init_generator", "style_report_faces",
              *_STAGE2_ONLY),
        init_key="init_generator"),
}


def _plain(value: Any) -> Any:
    """The JSON form of a value (tuples become lists), so a saved and a live config compare equal."""
    return json.loads(json.dumps(value, default=str))


def run_config(cfg: Mapping[str, Any], **derived: Any) -> dict:
    """The config as stored in COMPLETE: every key, plus values the run derived (world_size, num_classes, ...)."""
    return _plain({**dict(cfg), **derived})


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], directory: Path,
                 kind: str) -> list[tuple[str, Any, Any]]:
    """Raise for changed keys that give the state its meaning; return the (key, old, new) changes that apply
    from the resumed step (listed by the caller in one warning). A key no policy names counts as applied."""
    policy = CONFIG_POLICY.get(kind, ConfigPolicy((), (), (), "pretrained_backbone_model"))
    current = _plain(dict(current))
    changed = [(k, saved[k], current[k]) for k in current  # in config order
               if k in saved and saved[k] != current[k] and k not in policy.free]
    refused = [c for c in changed if c[0] in policy.refuse]
    if refused:
        listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in refused)
        raise CheckpointError(
            f"cannot resume from {directory}: the config changed keys its saved state depends on ({listing}). "
            f"Restore those values to resume, or start a fresh `output` folder with "
            f"{policy.init_key}={rank_file(directory, 0)} (or resume=False in a new folder)")
    return changed


# ---- what an output folder already holds ----

SUMMARY = "summary.json"
MODEL_FILES = ("model.pt", "generator.pth")  # the stages' final model files
_RERUN_FREE = ("output", "resume", "device", "dist_timeout_s", "num_workers", "frequent", "tensorboard",
               "keep_checkpoints", "save_every", "image_every", "generate_toy_data")  # a re-run may change these


def run_files(output: str | os.PathLike) -> list[str]:
    """What of a run `output` holds: checkpoints (damaged ones too), the summary, the model files; [] for none."""
    output = Path(output)
    found = []
    steps = sorted(d.name for d in checkpoint_root(output).glob("step_*")) if checkpoint_root(output).is_dir() else []
    if steps:
        found.append(f"{len(steps)} checkpoint folder(s) up to {steps[-1]}")
    found += [name for name in (SUMMARY, *MODEL_FILES) if (output / name).exists()]
    return found


def finished_summary(output: str | os.PathLike, cfg: Mapping[str, Any]) -> dict | None:
    """The summary of a run that already finished in `output` with this config (keys a re-run may change aside),
    else None: re-running a finished command is then a no-op."""
    path = Path(output) / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict) or "steps" not in summary:
        return None
    saved = {k: v for k, v in summary["config"].items() if k not in _RERUN_FREE}
    current = {k: v for k, v in _plain(dict(cfg)).items() if k not in _RERUN_FREE}
    return summary if saved == current else None


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
                "config": _plain(dict(config))})
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


def _own_file_status(directory: Path, meta: dict, rank: int) -> str | None:
    """None when this rank's file is present with the size and SHA-256 COMPLETE recorded, else what is wrong."""
    return recorded_file_problem(directory, meta, rank)


def resume(output: str | os.PathLike, policy: bool | str, ranks: Ranks, kind: str, config: Mapping[str, Any],
           log: logging.Logger | None = None) -> Resumed | None:
    """Find, check and load the checkpoint to resume from under `policy` (False | True | "auto"), on all ranks
    together; None when there is nothing to resume. Collective: every rank calls it.

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
            changes = _check_meta(directory, meta, ranks.world_size, kind, config, log)
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
        if changes:
            log.warning(f"resume from step {step}: config changed, the new values apply from here on: "
                        + ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes))
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
                log: logging.Logger) -> list[tuple[str, Any, Any]]:
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
    return check_config(meta["config"], config, directory, kind)


# ---- a checkpoint of another world size (re-sharded on load: utils/reshard.py) ----

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


# ---- one job per output folder ----

class OutputLock:
    """flock on <output>/.lock, held by rank 0 from start to exit; the kernel releases it if the process dies."""

    def __init__(self, fd: int | None, path: Path | None = None) -> None:
        self._fd = fd
        self._path = path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
            if _HELD.get(self._path) is self:
                del _HELD[self._path]

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output(output: str | os.PathLike, ranks: Ranks = Ranks(), wait_s: float | None = None) -> OutputLock:
    """Take the output folder's lock on rank 0; every rank raises at once when another job holds it.

    After an elastic restart (TORCHELASTIC_RESTART_COUNT > 0) rank 0 waits up to 60 s for the previous
    attempt's process to be gone; otherwise a held lock fails immediately."""
    output = Path(output)
    fd, holder = None, ""
    if ranks.rank == 0:
        key = output.resolve() / LOCK_NAME
        if key in _HELD:  # runs in one process are sequential: a lock this process still holds is a finished
            _HELD[key].release()  # run's (e.g. kept alive by a traceback), not another job's
        if wait_s is None:
            wait_s = 60.0 if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 else 0.0
        output.mkdir(parents=True, exist_ok=True)
        path = output / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    os.close(fd)
                    fd = None
                    break
                time.sleep(0.2)
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    if not ranks.agree_all(ranks.rank != 0 or fd is not None):
        raise OutputBusyError(f"output folder {output} is in use by another run ({holder or 'see its ' + LOCK_NAME}): "
                           f"two jobs in one folder would interleave checkpoints. Wait for it, stop it, or set "
                           f"another `output`")
    lock = OutputLock(fd, output.resolve() / LOCK_NAME)
    if fd is not None:
        _HELD[lock._path] = lock
    return lock


_HELD: dict[Path, OutputLock] = {}  # this process's output locks, by lock file


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
