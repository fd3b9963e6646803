"""Config loading, next to the configs it loads (it reads the model registries, so it is not in utils/, which
imports no model code): `configs/base.py` declares every key as one row (configs/schema.py); a job config overrides
some; `key=value` overrides last.

Unknown keys are an error everywhere (a typo must not silently train with a default), and every value is checked at
load (`validate`) against its row's rule: a range, or the choices the owning code declares (the registries in
`backbones`, `losses` and `utils.optim`, the generator's input skips, ...). `~` is expanded in every path key.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable

from easydict import EasyDict

# The registries are plain name -> (class, declared config keys) tables; importing them builds no model.
from backbones import BACKBONE_CONFIG_KEYS, BACKBONES
from configs import schema
from losses import MARGIN_LOSSES, margin_loss_from_config
from utils.run.config_policy import ConfigPolicy
from utils.errors import ConfigError  # re-exported: `from configs.loader import ConfigError`

REPO_ROOT = Path(__file__).resolve().parents[1]
NOT_CONFIGS = ("__init__", "loader", "schema")  # modules of configs/ that are not job configs
BASE = REPO_ROOT / "configs" / "base.py"
STAGE_SCRIPTS = {"recognition": "train.py", "cfsm_stage1": "train_generator.py"}


_ROWS: dict[tuple[int, int], dict[str, schema.Key]] = {}  # base.py's rows by the file's (mtime, size)


def base_keys() -> dict[str, schema.Key]:
    """Every key's row in configs/base.py, by name, as the file is now."""
    stat = BASE.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    if version not in _ROWS:
        module, _ = _import_config_module(str(BASE))
        _ROWS.clear()
        _ROWS[version] = {key.name: key for key in module.KEYS}
    return _ROWS[version]


def resume_policy(kind: str) -> ConfigPolicy:
    """The resume policy of a trainer (recognition | cfsm_stage1), derived from base.py's rows."""
    return schema.resume_policy(list(base_keys().values()), kind)


def refuse_other_stage(cfg: EasyDict, kind: str) -> None:
    """A key only the other stage reads (its row's stage), set away from its default, is a mistake: it would be
    ignored silently."""
    other_stage, script = ((schema.STAGE1, "train_generator.py") if kind == "recognition"
                           else (schema.STAGE2, "train.py"))
    keys = base_keys()
    given = [k for k in schema.stage_keys(list(keys.values()), other_stage)
             if _plain_value(cfg[k]) != _plain_value(keys[k].default)]
    if given:
        listing = ", ".join(f"{k}={cfg[k]!r}" for k in given)
        raise ConfigError(f"{listing}: {'stage-1' if kind == 'recognition' else 'stage-2'} key(s) that "
                          f"{STAGE_SCRIPTS[kind]} does not read ({script} does); remove them from "
                          f"{cfg.get('config_name', 'the config')} / the command line")


def _plain_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


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
    for name in [m for m in sys.modules if m.startswith("configs.") and m not in (__name__, schema.__name__)]:
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
    """A fresh copy of every key with its default (from the rows `base_keys` already read: base.py runs once)."""
    return EasyDict(_copy({name: row.default for name, row in base_keys().items()}))


def _copy(cfg: dict) -> dict:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in cfg.items()}


def _types(key: str) -> tuple[type, ...] | None:
    row = base_keys().get(key)
    return row.types if row is not None else None


def parse_value(key: str, text: str, current: Any) -> Any:
    """Parse `text` with the type of the existing value of `key` (or the types its row allows)."""
    allowed = _types(key)
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
    allowed = _types(key)
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
    """A key's former name (its row's `renamed_from`) is an error that names the new one."""
    renamed = {old: row.name for row in base_keys().values() for old in row.renamed_from}
    if key in renamed:
        raise ConfigError(f"config key '{key}' was renamed to '{renamed[key]}' ({where})")


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
    for key in (row.name for row in base_keys().values() if row.path):
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

    keys = base_keys()
    for key, row in keys.items():  # each key's own rule: a range, or the choices its code declares
        if row.rule is not None and key in cfg:
            need(row.rule.check(cfg[key]), key, row.rule.text)
    for key in BACKBONE_CONFIG_KEYS:  # a value the chosen network would silently ignore is a mistake
        default = keys[key].default
        need(key in BACKBONES[cfg.network].config_keys or cfg[key] == default, key,
             f"network {cfg.network} does not use it; leave it at {default!r} or choose another network")
    try:  # the head's own constructor checks combinations (e.g. combined margins it does not implement)
        margin_loss_from_config(cfg.loss, cfg)
    except (ValueError, TypeError) as exc:
        loss_keys = ", ".join(MARGIN_LOSSES[cfg.loss].config_keys)
        raise ConfigError(f"config keys {loss_keys} of loss={cfg.loss!r}: {exc}") from None
    need(not (cfg.fp16 and cfg.bf16), "fp16", "fp16 and bf16 cannot both be True")
    if cfg.wandb:  # checked on every rank before any work: rank 0 alone would fail later, the others would wait
        from utils.wandb_logging import wandb_installed

        need(wandb_installed(), "wandb", "the wandb package is not installed: `pip install wandb` (an optional "
             "dependency, see docs/monitoring.md), or set wandb=False")
    need(cfg.warmup_epoch <= cfg.num_epoch, "warmup_epoch", f"must be <= num_epoch ({cfg.num_epoch})")
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
