"""Re-shard a recognition checkpoint written by W ranks for W' ranks (Partial FC class centres and their optimizer
state), in memory (`reshard_states`) and on disk (`load_resharded`, used by resume; `tools/reshard.py`).

What a rank file holds and what happens to each part when the world size changes:

- `partial_fc.weight` is the only sharded tensor: rank r holds the contiguous class rows `shard_range(C, r, W)`.
  The new rank r' gets the rows `shard_range(C, r', W')`, cut from the old shards that overlap them, so every class
  centre is in exactly one new shard. Its optimizer state (SGD `momentum_buffer`, AdamW `exp_avg`/`exp_avg_sq`: any
  state tensor shaped like the shard) is cut the same way; scalar state (AdamW `step`) is the same on every rank.
- `partial_fc._extra_state` is rewritten for the new rank (rank, world size, class_start, num_local); the negative
  sampling counter `sample_step` and the margin head's buffers (AdaFace EMA) are the same on every rank: kept.
- backbone, the rest of the optimizer state (DDP makes it identical on every rank), scheduler, scaler, step and the
  data position: carried over from the first old rank the new rank reads.
- RNG streams are per rank. A new rank takes the streams saved for its rank under the new world size when the
  checkpoint carries them (`rng_by_rank`, which a re-shard records when it read every old rank: this makes
  W -> 1 -> W bitwise); otherwise new streams seeded from (seed, rank, step, stream name). Both are deterministic
  given the checkpoint and W', and no two ranks share a stream. The streams only draw the attack's random style
  codes and other i.i.d. noise, so new seeds change which draws are made, not their distribution. The data order
  does not come from these streams (see `utils/run/elastic.py`), nor does the negative sampling (seeded by rank and
  `sample_step`).

Only the stored layout of `train.py` is assumed: keys `partial_fc`, `optimizer` (the last param group holds just the
Partial FC weight), `rng`, `step`.
"""
from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from utils.checkpoint import CheckpointError, recorded_file_problem, safe_load
from utils.distributed import shard_range  # the class split Partial FC uses

__all__ = ["ReshardError", "reshard_states", "needed_old_ranks", "load_resharded", "check_rank_files",
           "merged_class_centres", "RESHARD_KINDS"]


RESHARD_KINDS = ("recognition",)  # checkpoint kinds whose world size may change (stage 1 keeps refusing)
WEIGHT = "weight"  # the sharded tensor inside state["partial_fc"]


class ReshardError(CheckpointError):
    """The rank states cannot be re-sharded; the message names the rank file and the way forward."""


def needed_old_ranks(num_classes: int, old_world: int, new_rank: int, new_world: int) -> list[int]:
    """Old ranks whose class rows overlap new rank `new_rank`'s shard (the first one also gives the shared parts)."""
    start, n = shard_range(num_classes, new_rank, new_world)
    out = []
    for r in range(old_world):
        s, m = shard_range(num_classes, r, old_world)
        if s < start + n and start < s + m:
            out.append(r)
    return out


def _pfc_param_id(state: dict, name: Callable[[int], str], rank: int) -> int:
    groups = state["optimizer"]["param_groups"]
    ids = groups[-1]["params"] if groups else []
    if len(ids) != 1:
        raise ReshardError(f"{name(rank)}: the optimizer's last param group holds {len(ids)} parameters, not just the "
                           f"Partial FC weight (not a train.py recognition checkpoint)")
    return ids[0]


def _check_states(states: Mapping[int, dict], old_world: int, name: Callable[[int], str]) -> int:
    """Validate the loaded old states against each other; the class count."""
    first = min(states)
    counts, steps = {}, {}
    for r, st in states.items():
        for key in ("partial_fc", "optimizer", "step"):
            if key not in st:
                raise ReshardError(f"{name(r)} has no '{key}' entry: not a train.py recognition checkpoint")
        extra = st["partial_fc"].get("_extra_state") or {}
        if extra.get("world_size") != old_world or extra.get("rank") != r:
            raise ReshardError(f"{name(r)} holds the shard of rank {extra.get('rank')} of {extra.get('world_size')}, "
                               f"expected rank {r} of {old_world}: the folder mixes files of different runs; use "
                               f"the checkpoint folder as the run wrote it")
        counts[r], steps[r] = int(extra.get("num_classes", -1)), int(st["step"])
    if len(set(steps.values())) > 1:
        listing = ", ".join(f"{name(r)} step {s}" for r, s in sorted(steps.items()))
        raise ReshardError(f"ranks of different steps ({listing}): take every rank file from one complete "
                           f"checkpoint folder")
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name(r)} {c}" for r, c in sorted(counts.items()))
        raise ReshardError(f"class counts differ between ranks ({listing}): the files are of different runs")
    num_classes = counts[first]
    for r, st in states.items():
        rows = st["partial_fc"][WEIGHT].shape[0]
        if rows != shard_range(num_classes, r, old_world)[1]:
            raise ReshardError(f"{name(r)}: partial_fc.weight has {rows} rows, but rank {r} of {old_world} owns "
                               f"{shard_range(num_classes, r, old_world)[1]} of {num_classes} classes: damaged file")
    return num_classes


def _cut(states: Mapping[int, dict], pieces: list[tuple[int, int, int]],
         get: Callable[[int, dict], torch.Tensor | None], rows_of: Mapping[int, int]) -> Any:
    """Concatenate rows [lo, hi) of each old rank's tensor `get(rank, state)`."""
    parts = [get(r, states[r]) for r, _, _ in pieces]
    out = []
    for (r, lo, hi), p in zip(pieces, parts):
        if p is None or not isinstance(p, torch.Tensor) or p.dim() == 0 or p.shape[0] != rows_of[r]:
            raise ReshardError(f"rank {r}: Partial FC optimizer state is missing or not shaped like its shard")
        out.append(p[lo:hi])
    return torch.cat(out, dim=0) if len(out) > 1 else out[0].clone()


def _fresh_rng(template: dict, seed: int, rank: int, step: int) -> dict:
    """New RNG streams for `rank`, in `capture_rng_state`'s format, seeded from (seed, rank, step, stream name)."""
    def key(stream: str) -> int:
        return zlib.crc32(f"reshard:{seed}:{rank}:{step}:{stream}".encode())

    np_state = np.random.RandomState(key("numpy")).get_state()
    return {
        "torch": torch.Generator().manual_seed(key("torch")).get_state(),
        "python": random.Random(key("python")).getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "generators": {g: torch.Generator().manual_seed(key(f"gen:{g}")).get_state()
                       for g in (template.get("generators") or {})},
    }


def reshard_states(states: Mapping[int, dict], old_world: int, new_world: int, new_ranks: list[int] | None = None,
                   seed: int = 0, name: Callable[[int], str] = lambda r: f"rank {r}") -> dict[int, dict]:
    """The states of `new_ranks` (default all) of a `new_world`-rank run, from old rank states (at least the ranks
    `needed_old_ranks` names for each requested new rank). `seed`: the run's seed, for new RNG streams."""
    if new_world < 1 or old_world < 1:
        raise ReshardError(f"world sizes must be >= 1 (got {old_world} -> {new_world})")
    if not states:
        raise ReshardError("no rank states given")
    num_classes = _check_states(states, old_world, name)
    if num_classes < new_world:
        raise ReshardError(f"{num_classes} classes cannot be shared by {new_world} ranks: every rank needs at "
                           f"least one class centre; use --world-size <= {num_classes}")
    new_ranks = list(range(new_world)) if new_ranks is None else new_ranks
    rows_of = {r: shard_range(num_classes, r, old_world)[1] for r in range(old_world)}
    complete = set(states) == set(range(old_world))
    carried_rng = next((st["rng_by_rank"] for st in states.values() if "rng_by_rank" in st), None)
    if complete and carried_rng is None and all("rng" in states[r] for r in states):
        carried_rng = {"world_size": old_world, "ranks": [states[r]["rng"] for r in range(old_world)]}
    out = {}
    for nr in new_ranks:
        need = needed_old_ranks(num_classes, old_world, nr, new_world)
        missing = [r for r in need if r not in states]
        if missing:
            raise ReshardError(f"new rank {nr} of {new_world} needs the class centres of old rank(s) {missing}, "
                               f"which were not given")
        start, n = shard_range(num_classes, nr, new_world)
        pieces = []
        for r in need:
            s, m = shard_range(num_classes, r, old_world)
            pieces.append((r, max(s, start) - s, min(s + m, start + n) - s))
        base = states[need[0]]
        pid = {r: _pfc_param_id(states[r], name, r) for r in need}
        new = dict(base)
        pfc = dict(base["partial_fc"])
        pfc[WEIGHT] = _cut(states, pieces, lambda r, st: st["partial_fc"][WEIGHT], rows_of)
        extra = dict(base["partial_fc"]["_extra_state"])
        extra.update(rank=nr, world_size=new_world, num_classes=num_classes, class_start=start, num_local=n)
        pfc["_extra_state"] = extra
        new["partial_fc"] = pfc
        opt = base["optimizer"]
        opt_state = dict(opt["state"])
        slot = pid[need[0]]
        if slot in opt_state:
            entry = {}
            for key, value in opt_state[slot].items():
                sharded = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows_of[need[0]] \
                    and tuple(value.shape[1:]) == tuple(base["partial_fc"][WEIGHT].shape[1:])
                entry[key] = _cut(states, pieces, lambda r, st, k=key: st["optimizer"]["state"].get(pid[r], {}).get(k),
                                  rows_of) if sharded else value.clone() if isinstance(value, torch.Tensor) else value
            opt_state[slot] = entry
        new["optimizer"] = {**opt, "state": opt_state}
        if carried_rng is not None and carried_rng["world_size"] == new_world:
            rng = carried_rng["ranks"][nr]
        elif new_world == old_world and nr in states:
            rng = states[nr].get("rng")
        else:
            rng = _fresh_rng(base["rng"], seed, nr, int(base["step"])) if "rng" in base else None
        new.pop("rng", None)
        if rng is not None:
            new["rng"] = rng
        new.pop("rng_by_rank", None)
        if carried_rng is not None and carried_rng["world_size"] != new_world:
            new["rng_by_rank"] = carried_rng  # kept until a re-shard returns to that world size
        out[nr] = new
    return out


def merged_class_centres(states: Mapping[int, dict], old_world: int) -> torch.Tensor:
    """The full [num_classes, D] class-centre matrix from every old rank's state."""
    return reshard_states(states, old_world, 1)[0]["partial_fc"][WEIGHT]


# ---- on disk: the checkpoint folder of utils/run/run_state.py (rank_R.pt + COMPLETE) ----

def _rank_path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rank_{rank}.pt"


def _class_count(directory: Path, meta: Mapping[str, Any]) -> int:
    count = (meta.get("config") or {}).get("num_classes")
    if count is not None:
        return int(count)
    first = safe_load(_rank_path(directory, 0))  # older markers record no config: the shard says
    return int(first["partial_fc"]["_extra_state"]["num_classes"])


def check_rank_files(directory: Path, meta: Mapping[str, Any], new_rank: int,
                     new_world: int) -> tuple[list[int], str | None, str | None]:
    """(old ranks `new_rank` reads, what is missing, what is damaged), None when all is well. A missing file is
    reported with the way forward (one disk per node); a damaged one (size or SHA-256 not as recorded) only
    names the file, so that resume falls back to an older checkpoint."""
    old_world = int(meta.get("world_size", -1))
    ranks = needed_old_ranks(_class_count(directory, meta), old_world, new_rank, new_world)
    for r in ranks:
        path = _rank_path(directory, r)
        if not path.is_file():
            return ranks, (f"{path} is missing: resuming a checkpoint of {old_world} ranks on {new_world} ranks, "
                           f"rank {new_rank} reads the old rank file(s) {ranks}. With one disk per node, run "
                           f"`python -m tools.reshard {directory} --world-size {new_world} --out DIR` where every "
                           f"rank file is visible and give each node DIR, or resume with {old_world} ranks"), None
        problem = recorded_file_problem(directory, meta, r)  # size and SHA-256 as COMPLETE recorded
        if problem is not None:
            return ranks, None, problem
    return ranks, None, None


def load_resharded(directory: Path, meta: Mapping[str, Any], new_rank: int, new_world: int) -> dict:
    """This rank's state under `new_world` ranks, read from the old rank files it needs (shared storage)."""
    old_world = int(meta.get("world_size", -1))
    if old_world < 1:
        raise ReshardError(f"{Path(directory) / 'COMPLETE'} records no world size: cannot re-shard")
    ranks, missing, damaged = check_rank_files(directory, meta, new_rank, new_world)
    if missing or damaged:
        raise ReshardError(missing or f"{directory}: {damaged}")
    states = {r: safe_load(_rank_path(directory, r)) for r in ranks}
    seed = int((meta.get("config") or {}).get("seed", 0))
    return reshard_states(states, old_world, new_world, [new_rank], seed=seed,
                          name=lambda r: str(_rank_path(directory, r)))[new_rank]
