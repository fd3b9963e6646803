"""Config loading, next to the configs it loads (it reads the model registries, so it is not in utils/, which
imports no model code): `configs/base.py` holds every key; a job config overrides some; `key=value` overrides last.

Unknown keys are an error everywhere (a typo must not silently train with a default), and every value is checked at
load (`validate`): numeric ranges (`NUMERIC_RULES`, one rule per numeric key of base.py) and the choices of
`network`, `loss` and `optimizer`, which come from the registries in `backbones`, `losses` and `utils.optim` (the one
place a new architecture, margin head or optimizer is declared), and of `channel_order` / `id_channel_order`. `~` is
expanded in every path key (`PATH_KEYS`).
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

from easydict import EasyDict

# The registries are plain name -> (class, declared config keys) tables; importing them builds no model.
from backbones import BACKBONE_CONFIG_KEYS, BACKBONES
from backbones.channel_order import CHANNEL_ORDERS
from losses import MARGIN_LOSSES, margin_loss_from_config
from utils.config_policy import RENAMED_KEYS, STAGE1_KEYS, STAGE2_KEYS
from utils.degrade import DEGRADE_BOUNDS
from utils.errors import ConfigError  # re-exported: `from configs.loader import ConfigError`
from utils.optim import OPTIMIZERS

REPO_ROOT = Path(__file__).resolve().parents[1]
NOT_CONFIGS = ("__init__", "loader")  # modules of configs/ that are not job configs

# Keys whose value may legitimately change type (documented in configs/base.py).
_FLEXIBLE_TYPES: dict[str, tuple[type, ...]] = {
    "resume": (bool, str),
    "output": (str, type(None)),
    "num_classes": (int, type(None)),
    "num_image": (int, type(None)),
    "pretrained_synthesis_model": (str, type(None)),
    "pretrained_backbone_model": (str, type(None)),
    "lambda_id_schedule": (list, tuple),
    "id_model": (str, type(None)),
    "init_generator": (str, type(None)),
}


# Keys holding a file or folder path: `~` is expanded at load.
PATH_KEYS: tuple[str, ...] = ("rec", "output", "pretrained_synthesis_model", "pretrained_backbone_model", "target",
                              "id_model", "init_generator")


STAGE_SCRIPTS = {"recognition": "train.py", "cfsm_stage1": "train_generator.py"}


def refuse_other_stage(cfg: EasyDict, kind: str) -> None:
    """A key only the other stage reads (utils.config_policy STAGE1_KEYS / STAGE2_KEYS), set away from its
    default, is a mistake: it would be ignored silently."""
    other, script = (STAGE1_KEYS, "train_generator.py") if kind == "recognition" else (STAGE2_KEYS, "train.py")
    defaults = base_config()
    given = [k for k in other if _plain_value(cfg[k]) != _plain_value(defaults[k])]
    if given:
        listing = ", ".join(f"{k}={cfg[k]!r}" for k in given)
        raise ConfigError(f"{listing}: {'stage-1' if kind == 'recognition' else 'stage-2'} key(s) that "
                          f"{STAGE_SCRIPTS[kind]} does not read ({script} does); remove them from "
                          f"{cfg.get('config_name', 'the config')} / the command line")


def _plain_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _numbers(value: Any, count: int | None = None) -> bool:
    """A list/tuple of finite real numbers (of length `count` when given)."""
    return isinstance(value, (list, tuple)) and (count is None or len(value) == count) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def _range(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           none_ok: bool = False, note: str = "") -> tuple[Callable[[Any], bool], str]:
    """A rule `(check, text)` for one number in [low, high] (bounds optional, open when *_open)."""
    def check(v: Any) -> bool:
        if v is None:
            return none_ok
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return ((low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    if low is not None and high is not None:
        text = f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        text = f"must be {'>' if low_open else '>='} {low:g}"
    else:
        text = f"must be {'<' if high_open else '<='} {high:g}"
    text += " or None" if none_ok else ""
    return check, text + (f" ({note})" if note else "")


def _interval(low: float, high: float | None, what: str, low_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    """A rule for a (min, max) pair with low <= min <= max <= high."""
    def check(v: Any) -> bool:
        return _numbers(v, 2) and (v[0] > low if low_open else v[0] >= low) and v[0] <= v[1] and (
            high is None or v[1] <= high)

    bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
    return check, f"must be (min, max) with min <= max, both {bounds} ({what})"


# One range rule per numeric key of configs/base.py (tests/test_config.py checks that none is missing).
NUMERIC_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_classes": _range(1, none_ok=True, note="None = read from the data"),
    "num_image": _range(1, none_ok=True, note="None = read from the data"),
    "num_workers": _range(0, note="0 = load in the training process"),
    "val_batch_size": _range(1),
    "embedding_size": _range(1),
    "dropout": _range(0, 1, high_open=True),
    "s": _range(0, low_open=True, note="the logit scale; 64 is usual"),
    "m": _range(0, math.pi, high_open=True, note="the margin; 0.5 for arcface, 0.4 for cosface/adaface"),
    "margin_list": (lambda v: _numbers(v, 3), "must be three numbers (m1, m2, m3)"),
    "adaface_h": _range(0, low_open=True),
    "adaface_t_alpha": _range(0, 1, low_open=True, note="EMA rate"),
    "sample_rate": _range(0, 1, low_open=True),
    "lr": _range(0, low_open=True),
    "momentum": _range(0, 1, high_open=True, note="momentum >= 1 makes SGD diverge"),
    "weight_decay": _range(0),
    "batch_size": _range(2, note="BatchNorm needs at least 2 images per rank"),
    "gradient_acc": _range(1),
    "num_epoch": _range(1),
    "warmup_epoch": _range(0),
    "lr_power": _range(0, note="0 = constant lr after warm-up"),
    "clip_grad_norm": _range(0, note="0 = no clipping; a negative max norm would flip the gradient"),
    "max_nonfinite_steps": _range(1),
    "rs_ratio": _range(0, 1, note="the share of clean images"),
    "epsilon": _range(0),
    "alpha": _range(0),
    "k": _range(0, note="number of attack steps"),
    "seed": _range(0, 2**31, high_open=True),
    "max_steps": _range(0, note="0 = full schedule"),
    "save_every": _range(0, note="0 = only at the end"),
    "keep_checkpoints": _range(1),
    "dist_timeout_s": _range(0, low_open=True, note="seconds before a stuck rank fails the job"),
    "frequent": _range(1, note="log every N steps"),
    "verbose": _range(0, note="verification every N steps; 0 = only at the end"),
    "image_every": _range(0, note="0 = never"),
    "id_embedding_size": _range(1),
    "gen_dim": _range(1),
    "gen_n_downsample": _range(0),
    "gen_n_residual": _range(0),
    "gen_latent_dim": _range(1),
    "gen_style_dim": _range(1),
    "gen_lr": _range(0, low_open=True),
    "gen_lr_decay": _range(0, 1, high_open=True, note="the share of the run over which lr falls to 0"),
    "gen_betas": (lambda v: _numbers(v, 2) and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
    "lambda_id_schedule": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(
        _numbers(item, 2) and item[0] >= 0 and item[1] >= 0 for item in v),
        "must be a non-empty list of (start_epoch >= 0, lambda_id >= 0) pairs"),
    "id_distance_range": (lambda v: _numbers(v, 4) and v[0] != v[1], "must be four numbers (la, ua, lm, um), la != ua"),
    "lambda_rec": _range(0, note="weight of the reconstruction loss"),
    "lambda_mode_seeking": _range(0, note="weight of the mode-seeking term"),
    "lambda_basis": _range(0, note="weight of the basis term"),
    "basis_cos_margin": _range(0, 1, high_open=True, note="a |cos| below 1"),
    "dis_dim": _range(1),
    "style_report_faces": _range(0, note="0 = no style report"),
    "degrade_resize_prob": _range(0, 1, note="a probability"),
    **{key: _interval(low, high, what) for key, (low, high, what) in DEGRADE_BOUNDS.items()},
    "degrade_blur_prob": _range(0, 1, note="a probability"),
    "degrade_color_prob": _range(0, 1, note="a probability"),
    "degrade_color_strength": _range(0, 1, high_open=True, note="factors ~ U(1 - strength, 1 + strength)"),
    "degrade_noise_prob": _range(0, 1, note="a probability"),
    "degrade_jpeg_prob": _range(0, 1, note="a probability"),
}


def _close_matches(key: str, known: Iterable[str]) -> str:
    matches = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


def _import_config_module(name_or_path: str):
    """Import `configs/foo`, `configs/foo.py`, `configs.foo` or any path to a .py file."""
    text = str(name_or_path)
    candidates = []
    if text.endswith(".py") or os.sep in text or "/" in text:
        path = Path(text if text.endswith(".py") else text + ".py")
        candidates.append(path)
        candidates.append(REPO_ROOT / path)
    else:
        candidates.append(REPO_ROOT / "configs" / f"{text.split('.')[-1]}.py")
    if str(REPO_ROOT) not in sys.path:  # job configs may build on each other (`from configs.toy import config`)
        sys.path.insert(0, str(REPO_ROOT))
    for name in [m for m in sys.modules if m.startswith("configs.") and m != __name__]:
        del sys.modules[name]  # each load sees the files as they are now, never an object mutated by a caller
    for path in candidates:
        if path.is_file():
            spec = importlib.util.spec_from_file_location(f"_cfg_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            except SyntaxError as exc:
                raise ConfigError(f"{exc.filename or path}:{exc.lineno}: {exc.msg} (a Python syntax error in the "
                                  f"config)") from None
            except SystemExit as exc:  # not an Exception: it would end the command with its code and no output
                raise ConfigError(f"config file {path} exits while being loaded (SystemExit({exc.code!r})): a config "
                                  f"only defines `config = dict(...)`; remove the exit") from None
            except Exception as exc:  # noqa: BLE001 - the config file (or one it imports) raised: name where
                frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith(".py")
                          and Path(f.filename).resolve().parent.name == "configs" or Path(f.filename) == path]
                where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else str(path)
                raise ConfigError(f"{where}: {type(exc).__name__}: {exc} (raised while loading the config)") from None
            return module, path
    available = available_configs()
    raise ConfigError(f"config '{name_or_path}' not found (looked at {[str(c) for c in candidates]}); "
                      f"available configs: {', '.join(available)}")


def available_configs() -> list[str]:
    """The job configs in configs/ (every .py file but the package's own modules)."""
    return sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py") if p.stem not in NOT_CONFIGS)


def base_config() -> EasyDict:
    """A fresh copy of every key with its default."""
    module, _ = _import_config_module(str(REPO_ROOT / "configs" / "base.py"))
    return EasyDict(_copy(module.config))


def _copy(cfg: dict) -> dict:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in cfg.items()}


def parse_value(key: str, text: str, current: Any) -> Any:
    """Parse `text` with the type of the existing value of `key`."""
    allowed = _FLEXIBLE_TYPES.get(key)
    if isinstance(current, bool) or allowed and bool in allowed:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        if not allowed:
            raise ConfigError(f"override {key}={text}: expected a boolean (True/False)")
    if key == "val_targets" and not text.strip().startswith(("[", "(")):  # a plain comma list: lfw,cfp_fp
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(current, str) and not allowed:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word is a string
    if text.strip().lower() == "none":
        value = None
    return check_type(key, value, current, source=f"override {key}={text}")


def check_type(key: str, value: Any, current: Any, source: str) -> Any:
    allowed = _FLEXIBLE_TYPES.get(key)
    if allowed is not None:
        if isinstance(value, allowed) or (int in allowed and isinstance(value, int)):
            return value
        raise ConfigError(f"{source}: key '{key}' takes {[t.__name__ for t in allowed]}, got {value!r}")
    if current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' takes a boolean, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value) if isinstance(current, list) else tuple(value)
    if not isinstance(value, type(current)) or isinstance(value, bool) != isinstance(current, bool):
        raise ConfigError(f"{source}: key '{key}' takes {type(current).__name__}, got {value!r}")
    return value


def check_renamed(key: str, where: str) -> None:
    """A key's old name (utils.config_policy.RENAMED_KEYS) is an error that names the new one."""
    if key in RENAMED_KEYS:
        raise ConfigError(f"config key '{key}' was renamed to '{RENAMED_KEYS[key]}' ({where})")


def apply_overrides(cfg: EasyDict, overrides: Iterable[str]) -> EasyDict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        check_renamed(key, f"override '{item}'")
        if key not in cfg:
            raise ConfigError(f"unknown config key '{key}' in override '{item}'.{_close_matches(key, cfg)}")
        cfg[key] = parse_value(key, text, cfg[key])
    return cfg


def load_config(config: str, overrides: Iterable[str] = ()) -> EasyDict:
    """base.py defaults <- job config module <- `key=value` overrides; validates the result."""
    cfg = base_config()
    module, path = _import_config_module(config)
    job = getattr(module, "config", None)
    if job is None:
        raise ConfigError(f"config file {path} defines no `config` object")
    if not isinstance(job, dict):  # a list, a module, ...: its .items() would be an AttributeError traceback
        shown = f"the module {job.__name__}" if isinstance(job, type(os)) else f"a {type(job).__name__} ({job!r:.60})"
        raise ConfigError(f"config file {path}: `config` is {shown}, not a dict of config keys: write "
                          f"`config = dict(key=value, ...)` (the keys are in configs/base.py)")
    if path.resolve() != (REPO_ROOT / "configs" / "base.py").resolve():
        for key, value in job.items():
            check_renamed(key, str(path))
            if key not in cfg:
                raise ConfigError(f"unknown config key '{key}' in {path}.{_close_matches(key, cfg)}")
            cfg[key] = check_type(key, value, cfg[key], source=str(path))
    cfg.config_name = path.stem
    apply_overrides(cfg, overrides)
    for key in PATH_KEYS:
        if isinstance(cfg.get(key), str):
            value = cfg[key].strip()  # ' /data/x' from a shell quote would be a folder named ' '
            if not value and key in ("rec", "output"):
                raise ConfigError(f"config key '{key}' is empty: give a folder, or leave the key out for its default")
            cfg[key] = os.path.expanduser(value)
    validate(cfg)
    return cfg


def validate(cfg: EasyDict) -> None:
    """Value checks that need no data or files: ranges, registry choices, combinations."""
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}' = {cfg[key]!r}: {what}")

    for key, (check, text) in NUMERIC_RULES.items():
        if key in cfg:
            need(check(cfg[key]), key, text)
    need(cfg.network in BACKBONES, "network", f"choices: {', '.join(BACKBONES)}")
    need(cfg.id_network in BACKBONES, "id_network", f"choices: {', '.join(BACKBONES)}")
    need(cfg.loss in MARGIN_LOSSES, "loss", f"choices: {', '.join(MARGIN_LOSSES)}")
    need(cfg.optimizer in OPTIMIZERS, "optimizer", f"choices: {', '.join(OPTIMIZERS)}")
    for key in ("channel_order", "id_channel_order"):  # auto: resolved by the trainer from the file / network
        need(cfg[key] in CHANNEL_ORDERS, key, f"choices: {', '.join(CHANNEL_ORDERS)}")
    defaults = base_config()
    for key in BACKBONE_CONFIG_KEYS:  # a value the chosen network would silently ignore is a mistake
        need(key in BACKBONES[cfg.network].config_keys or cfg[key] == defaults[key], key,
             f"network {cfg.network} does not use it; leave it at {defaults[key]!r} or choose another network")
    try:  # the head's own constructor checks combinations (e.g. combined margins it does not implement)
        margin_loss_from_config(cfg.loss, cfg)
    except (ValueError, TypeError) as exc:
        keys = ", ".join(MARGIN_LOSSES[cfg.loss].config_keys)
        raise ConfigError(f"config keys {keys} of loss={cfg.loss!r}: {exc}") from None
    need(cfg.resume in (True, False, "auto"), "resume", "must be False, True or \"auto\"")
    need(not (cfg.fp16 and cfg.bf16), "fp16", "fp16 and bf16 cannot both be True")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", "choices: auto, cpu, cuda")
    need(isinstance(cfg.wandb_project, str) and bool(cfg.wandb_project.strip()), "wandb_project",
         "must be a non-empty project name")
    need(cfg.wandb_entity is None or isinstance(cfg.wandb_entity, str) and bool(cfg.wandb_entity.strip()),
         "wandb_entity", "must be a wandb user or team name, or None (your default entity)")
    if cfg.wandb:  # checked on every rank before any work: rank 0 alone would fail later, the others would wait
        from utils.wandb_logging import wandb_installed

        need(wandb_installed(), "wandb", "the wandb package is not installed: `pip install wandb` (an optional "
             "dependency, see docs/monitoring.md), or set wandb=False")
    from cfsm.attack import STYLE_SEARCHES

    need(cfg.style_search in STYLE_SEARCHES, "style_search", f"choices: {', '.join(STYLE_SEARCHES)}")
    need(cfg.warmup_epoch <= cfg.num_epoch, "warmup_epoch", f"must be <= num_epoch ({cfg.num_epoch})")
    need(isinstance(cfg.val_targets, (list, tuple)) and all(isinstance(v, str) and v for v in cfg.val_targets),
         "val_targets", "must be a list of .bin set names or .bin paths, e.g. ['lfw', 'cfp_fp'] (files "
         "<rec>/<name>.bin) or lfw,cfp_fp on the command line")
    if cfg.rs_ratio < 1.0:
        need(bool(cfg.pretrained_synthesis_model), "pretrained_synthesis_model",
             "rs_ratio < 1 synthesizes faces and needs a generator file (train one with "
             "`python train_generator.py configs/cfsm_<name>`; released ones are listed in the CFSM README)")


def parse_launch_args(argv, description: str, example_config: str):
    """`SCRIPT CONFIG [key=value ...] [--local-rank N]`: the command line of both training stages.

    torch 2.x `torch.distributed.launch` passes `--local-rank=N` (older: `--local_rank`); LOCAL_RANK from the
    environment wins when both exist."""
    from utils.cli import ArgumentParser

    parser = ArgumentParser(description=description)
    parser.add_argument("config", help=f"config module, e.g. {example_config} (every key and its default: "
                                       f"configs/base.py)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="key=value config overrides, e.g. lr=0.05 (default: none)")
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help="set by torch.distributed.launch (default: from LOCAL_RANK, which wins when both exist)")
    return parser.parse_args(argv)
