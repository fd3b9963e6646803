"""The layout of a run's output folder and its checkpoint markers (what `utils.run.run_state` writes and resumes from).

    <output>/.lock                                 # flock held by rank 0 while a run runs (utils.run.output_lock)
    <output>/checkpoints/step_00001200/rank_0.pt   # backbone, this rank's Partial FC shard, optimizer, RNG, ...
    <output>/checkpoints/step_00001200/COMPLETE    # JSON: step, world size, kind, run config, finite, file sizes
    <output>/summary.json, model.pt | generator.pth  # a finished run

A step counts as complete when COMPLETE parses; steps damaged somewhere are set aside as `step_N.damaged`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from utils.checkpoint import write_json

COMPLETE = "COMPLETE"

_log = logging.getLogger(__name__)


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


# ---- what an output folder already holds ----

SUMMARY = "summary.json"
MODEL_FILES = ("model.pt", "generator.pth")  # the stages' final model files
def read_summary(output: str | os.PathLike) -> dict | None:
    """`output/summary.json` as a dict, or None when it is missing, unreadable or not a JSON object."""
    try:
        summary = json.loads((Path(output) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def run_files(output: str | os.PathLike) -> list[str]:
    """What of a run `output` holds: checkpoints (damaged ones too), the summary, the model files; [] for none."""
    output = Path(output)
    found = []
    steps = sorted(d.name for d in checkpoint_root(output).glob("step_*")) if checkpoint_root(output).is_dir() else []
    if steps:
        found.append(f"{len(steps)} checkpoint folder(s) up to {steps[-1]}")
    found += [name for name in (SUMMARY, *MODEL_FILES) if (output / name).exists()]
    return found
