"""The project's error families, in a leaf module every other module can import (it imports nothing).

* `UserError`: the input is wrong (a file, a config key or value, a command-line flag, the launch environment). Its
  message names the file / key / value and the fix; every command prints it as one `error:` line and exits 2
  (`utils.cli.run_command`). Each module's own input error derives from it (`ConfigError`, `DataError`, ...).
* `RunFailedError`: the run itself failed (non-finite state, most updates skipped); one `error:` line, exit 1.
"""
from __future__ import annotations


class UserError(Exception):
    """A user's mistake in an input; the message says which and how to fix it."""


class LaunchError(UserError, ValueError):
    """The launch environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or the device is wrong."""


class ConfigError(UserError, ValueError):
    """A config file, key or value is wrong; the message names it (raised by configs.loader and the run checks)."""


class RunFailedError(RuntimeError):
    """The run ended without a model worth keeping; the message says why and names the newest usable checkpoint."""


def unsafe_pickle_refusal(path: object, exc: BaseException) -> str | None:
    """The one line for `torch.load(weights_only=True)` refusing a pickled global (a class or function the file would
    have run), naming the file and that global; None for any other load error. torch's own text is a paragraph that
    suggests `weights_only=False`, which would run it."""
    text = str(exc)
    start = text.find("GLOBAL ")  # torch: "Unsupported global: GLOBAL mod.Name ..." / "unsupported GLOBAL mod.name ..."
    if start < 0:
        return None
    name = text[start + len("GLOBAL "):].split()[0] if text[start + len("GLOBAL "):].split() else "?"
    return (f"refused to load {path}: unpickling it would run {name} (code, not tensors; torch.load with "
            f"weights_only=True stopped it). Re-save its state dict of tensors where you trust its source")
