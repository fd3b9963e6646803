"""Config loading: `configs/base.py` holds every key; a job config overrides some; `key=value` overrides last.

Unknown keys are an error everywhere (a typo must not silently train with a default).
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from easydict import EasyDict

REPO_ROOT = Path(__file__).resolve().parents[1]

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


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


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
    for name in [m for m in sys.modules if m.startswith("configs.")]:
        del sys.modules[name]  # each load sees the files as they are now, never an object mutated by a caller
    for path in candidates:
        if path.is_file():
            spec = importlib.util.spec_from_file_location(f"_cfg_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)  # type: ignore[union-attr]
            return module, path
    available = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py") if p.stem != "__init__")
    raise ConfigError(f"config '{name_or_path}' not found (looked at {[str(c) for c in candidates]}); "
                      f"available configs: {', '.join(available)}")


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


def apply_overrides(cfg: EasyDict, overrides: Iterable[str]) -> EasyDict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
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
    if path.resolve() != (REPO_ROOT / "configs" / "base.py").resolve():
        for key, value in job.items():
            if key not in cfg:
                raise ConfigError(f"unknown config key '{key}' in {path}.{_close_matches(key, cfg)}")
            cfg[key] = check_type(key, value, cfg[key], source=str(path))
    cfg.config_name = path.stem
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: EasyDict) -> None:
    """Range checks that need no data or files."""
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}' = {cfg[key]!r}: {what}")

    need(0.0 <= cfg.rs_ratio <= 1.0, "rs_ratio", "must be in [0, 1] (the share of clean images)")
    need(cfg.k >= 0, "k", "must be >= 0 (number of attack steps)")
    need(cfg.epsilon >= 0, "epsilon", "must be >= 0")
    need(cfg.alpha >= 0, "alpha", "must be >= 0")
    need(cfg.batch_size > 0, "batch_size", "must be > 0")
    need(0.0 < cfg.sample_rate <= 1.0, "sample_rate", "must be in (0, 1]")
    need(cfg.resume in (True, False, "auto"), "resume", "must be False, True or \"auto\"")
    need(cfg.max_steps >= 0, "max_steps", "must be >= 0 (0 = full schedule)")
    need(cfg.save_every >= 0, "save_every", "must be >= 0 (0 = only at the end)")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    need(cfg.gradient_acc >= 1, "gradient_acc", "must be >= 1")
    need(cfg.loss in ("arcface", "cosface", "combined", "adaface"), "loss", "choices: arcface, cosface, combined, adaface")
    need(len(cfg.margin_list) == 3, "margin_list", "must be (m1, m2, m3)")
    need(cfg.optimizer in ("sgd", "adamw"), "optimizer", "choices: sgd, adamw")
    need(not (cfg.fp16 and cfg.bf16), "fp16", "fp16 and bf16 cannot both be True")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", "choices: auto, cpu, cuda")
    need(cfg.num_epoch > 0, "num_epoch", "must be > 0")
    need(cfg.warmup_epoch >= 0, "warmup_epoch", "must be >= 0")
    if cfg.rs_ratio < 1.0:
        need(bool(cfg.pretrained_synthesis_model), "pretrained_synthesis_model",
             "rs_ratio < 1 synthesizes faces and needs a generator file (train one with "
             "`python -m cfsm.train configs/cfsm_<name>`; released ones are listed in the CFSM README)")


def parse_launch_args(argv, description: str, example_config: str):
    """`SCRIPT CONFIG [key=value ...] [--local-rank N]`: the command line of both training stages.

    torch 2.x `torch.distributed.launch` passes `--local-rank=N` (older: `--local_rank`); LOCAL_RANK from the
    environment wins when both exist."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=f"config module, e.g. {example_config}")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value config overrides")
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help="set by torch.distributed.launch; LOCAL_RANK from the environment wins")
    return parser.parse_args(argv)
