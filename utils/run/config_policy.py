"""The run config stored in every checkpoint and compared on resume (which changed keys refuse, apply or do not
matter), and whether an output folder already holds this exact command's finished run."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from utils.checkpoint import CheckpointError
from utils.run.run_folder import rank_file, read_summary


@dataclass(frozen=True)
class ConfigPolicy:
    """How a changed config key is treated when a run of `kind` resumes. Derived from the key rows of
    configs/base.py (configs.schema.resume_policy); this module only applies it."""
    kind: str                # the run type its checkpoints record (recognition | cfsm_stage1)
    refuse: tuple[str, ...]  # give the saved state its meaning (or the data order): a change is an error
    apply: tuple[str, ...]   # change the training from the resumed step on: applied, listed in one warning line
    free: tuple[str, ...]    # where and how the run is watched, or keys the other stage reads: no word
    inert: tuple[str, ...] = ()  # (of `free`) change nothing a run records: a finished command re-run is a no-op
    init_key: str = "pretrained_backbone_model"  # the key that starts a new run from a checkpoint's weights
    # keys added after runs were saved without them: the value those runs had (a saved config lacking the key is
    # compared with it, so an old run is not resumed on another value silently)
    legacy: Mapping[str, Any] = field(default_factory=dict)
    # keys renamed after runs were saved under the old name, old -> new: a saved config is compared under the new name
    renamed: Mapping[str, str] = field(default_factory=dict)

    def current_names(self, saved: Mapping[str, Any]) -> dict:
        """A saved config with renamed keys under their new names."""
        return {self.renamed.get(k, k): v for k, v in saved.items()}


def json_form(value: Any) -> Any:
    """The JSON form of a value (tuples become lists), so a saved and a live config compare equal."""
    return json.loads(json.dumps(value, default=str))


def run_config(cfg: Mapping[str, Any], **derived: Any) -> dict:
    """The config as stored in COMPLETE: every key, plus values the run derived (world_size, num_classes, ...)."""
    return json_form({**dict(cfg), **derived})


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], directory: Path,
                 policy: ConfigPolicy | None) -> list[tuple[str, Any, Any]]:
    """Raise for changed keys that give the state its meaning; return the (key, old, new) changes that apply
    from the resumed step (listed by the caller in one warning). A key the policy does not name (or every key,
    with no policy) counts as applied."""
    policy = policy or ConfigPolicy("", (), (), ())
    current = json_form(dict(current))
    saved = {**{k: v for k, v in policy.legacy.items() if k in current}, **policy.current_names(saved)}
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


# ---- a re-run of a finished command ----

def finished_summary(output: str | os.PathLike, cfg: Mapping[str, Any], policy: ConfigPolicy) -> dict | None:
    """The summary of a run that already finished in `output` with this config (the policy's inert keys aside),
    else None: re-running a finished command is then a no-op."""
    summary = read_summary(output)
    if summary is None or not isinstance(summary.get("config"), dict) or "steps" not in summary:
        return None
    saved = {k: v for k, v in policy.current_names(summary["config"]).items() if k not in policy.inert}
    current = {k: v for k, v in json_form(dict(cfg)).items() if k not in policy.inert}
    return summary if saved == current else None
