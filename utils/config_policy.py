"""The run config stored in every checkpoint and compared on resume (which changed keys refuse, apply or do not
matter), and whether an output folder already holds this exact command's finished run."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from utils.checkpoint import CheckpointError
from utils.degrade import DEGRADE_KEYS
from utils.run_folder import rank_file, read_summary


@dataclass(frozen=True)
class ConfigPolicy:
    """How a changed config key is treated on resume; every key of configs/base.py is in one of the three."""
    refuse: tuple[str, ...]  # give the saved state its meaning (or the data order): a change is an error
    apply: tuple[str, ...]   # change the training from the resumed step on: applied, listed in one warning line
    free: tuple[str, ...]    # where and how the run is watched, or keys the other stage reads: no word
    init_key: str            # the key that starts a new run from a checkpoint's weights (named in refusals)


_RUN_CONTROL = ("output", "config_name", "resume", "device", "dist_timeout_s", "num_workers", "max_steps",
                "save_every", "keep_checkpoints", "max_nonfinite_steps", "frequent", "verbose", "image_every",
                "tensorboard", "generate_toy_data", "val_targets", "val_batch_size", "wandb", "wandb_project",
                "wandb_entity", "wandb_run_suffix", "wandb_notes", "wandb_resume", "wandb_save_artifacts")
# Keys only one stage reads (configs/base.py holds both stages' keys): giving one to the other stage is an error
# (configs.loader.refuse_other_stage); on resume the other stage's keys are free.
STAGE1_KEYS: tuple[str, ...] = (
    "target", "id_network", "id_model", "id_embedding_size", "id_channel_order", "gen_dim", "gen_n_downsample",
    "gen_n_residual", "gen_latent_dim", "gen_style_dim", "gen_input_skip", "init_generator", "gen_lr", "gen_lr_decay",
    "gen_betas", "lambda_id_schedule", "id_distance_range", "lambda_rec", "lambda_mode_seeking", "lambda_basis",
    "basis_cos_margin", "style_sampling", "dis_dim", "style_report_faces")
STAGE2_KEYS: tuple[str, ...] = (
    "network", "embedding_size", "dropout", "use_checkpoint", "channels_last", "channel_order", "loss", "s", "m",
    "margin_list", "adaface_h", "adaface_t_alpha", "sample_rate", "optimizer", "lr", "momentum", "weight_decay",
    "weight_decay_exclude", "gradient_acc", "warmup_epoch", "lr_power", "clip_grad_norm",
    "pretrained_synthesis_model", "rs_ratio", "epsilon", "alpha", "k", "style_search", "pretrained_backbone_model",
    *DEGRADE_KEYS)

CONFIG_POLICY: dict[str, ConfigPolicy] = {
    "recognition": ConfigPolicy(
        # world_size may change: the state is re-sharded on resume (utils/reshard.py, utils/elastic.py)
        # channel_order: the weights learnt one colour order; stored resolved (auto -> rgb/bgr), so switching auto
        # to the order it resolved to is no change, but feeding the other order is refused
        refuse=("network", "embedding_size", "loss", "optimizer", "batch_size", "gradient_acc", "sample_rate",
                "num_classes", "num_image", "fp16", "seed", "weight_decay_exclude", "channel_order"),
        apply=("lr", "num_epoch", "warmup_epoch", "lr_power", "momentum", "weight_decay", "s", "m", "margin_list",
               "adaface_h", "adaface_t_alpha", "clip_grad_norm", "dropout", "use_checkpoint", "channels_last",
               "bf16", "rec", "pretrained_synthesis_model", "rs_ratio", "epsilon", "alpha", "k", "style_search",
               *DEGRADE_KEYS),
        free=(*_RUN_CONTROL, "world_size", "pretrained_backbone_model", *STAGE1_KEYS),  # world: logged by elastic
        init_key="pretrained_backbone_model"),
    "cfsm_stage1": ConfigPolicy(
        # the generator's shape keys (cfsm.loading.GENERATOR_CONFIG_KEYS; a test checks they are all here)
        refuse=("gen_dim", "gen_n_downsample", "gen_n_residual", "gen_latent_dim", "gen_style_dim", "gen_input_skip",
                "dis_dim", "id_network", "id_embedding_size", "batch_size", "world_size", "num_classes", "num_image",
                "fp16", "seed"),
        apply=("gen_lr", "gen_lr_decay", "gen_betas", "num_epoch", "lambda_id_schedule", "id_distance_range",
               "lambda_rec", "lambda_mode_seeking", "lambda_basis", "basis_cos_margin", "style_sampling", "id_model",
               "id_channel_order", "target", "rec", "bf16"),  # the frozen identity network: reloaded, not saved
        free=(*_RUN_CONTROL, "init_generator", "style_report_faces", *STAGE2_KEYS),
        init_key="init_generator"),
}


# Keys added after runs were saved without them: the value those runs had (train.py fed every network RGB before
# channel_order existed). A saved config lacking the key is compared with this value, so an old ir_* run is not
# resumed on BGR silently.
LEGACY_VALUES: dict[str, Any] = {"channel_order": "rgb", "id_channel_order": "rgb"}
# Keys renamed after runs were saved with the old name, old -> new: a saved config is compared under the new name;
# in a config file or override the old name is an error (configs.loader.check_renamed).
RENAMED_KEYS: dict[str, str] = {"lambda_diversity": "lambda_mode_seeking"}


def renamed(saved: Mapping[str, Any]) -> dict:
    """A saved config with the keys of `RENAMED_KEYS` under their new names."""
    return {RENAMED_KEYS.get(k, k): v for k, v in saved.items()}


def json_form(value: Any) -> Any:
    """The JSON form of a value (tuples become lists), so a saved and a live config compare equal."""
    return json.loads(json.dumps(value, default=str))


def run_config(cfg: Mapping[str, Any], **derived: Any) -> dict:
    """The config as stored in COMPLETE: every key, plus values the run derived (world_size, num_classes, ...)."""
    return json_form({**dict(cfg), **derived})


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], directory: Path,
                 kind: str) -> list[tuple[str, Any, Any]]:
    """Raise for changed keys that give the state its meaning; return the (key, old, new) changes that apply
    from the resumed step (listed by the caller in one warning). A key no policy names counts as applied."""
    policy = CONFIG_POLICY.get(kind, ConfigPolicy((), (), (), "pretrained_backbone_model"))
    current = json_form(dict(current))
    saved = {**{k: v for k, v in LEGACY_VALUES.items() if k in current}, **renamed(saved)}
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

_RERUN_FREE = ("output", "resume", "device", "dist_timeout_s", "num_workers", "frequent", "tensorboard",
               "keep_checkpoints", "save_every", "image_every", "generate_toy_data")  # a re-run may change these


def finished_summary(output: str | os.PathLike, cfg: Mapping[str, Any]) -> dict | None:
    """The summary of a run that already finished in `output` with this config (keys a re-run may change aside),
    else None: re-running a finished command is then a no-op."""
    summary = read_summary(output)
    if summary is None or not isinstance(summary.get("config"), dict) or "steps" not in summary:
        return None
    saved = {k: v for k, v in renamed(summary["config"]).items() if k not in _RERUN_FREE}
    current = {k: v for k, v in json_form(dict(cfg)).items() if k not in _RERUN_FREE}
    return summary if saved == current else None
