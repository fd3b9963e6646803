"""Conventions every command shares: the argument parser, the shared flags, and how a user's mistake is reported.

* `ArgumentParser`: `--help` shows every argument with its default; a bad command line prints one line and exits 2;
  `~` is expanded in every argument value that starts with it.
* Shared flags mean the same everywhere: `--device` (auto = CUDA when available), `--workers` (DataLoader worker
  processes), `--out` (a folder), `--bgr` / `--rgb` (channel order; default: the model file's, BGR for AdaFace files).
* `run_command(main)`: a user's mistake (a missing or malformed file, a bad config key or value) prints
  `error: <what>, <which file/key>, <how to fix>` on one line and exits 2; a run that failed (non-finite state,
  too many skipped updates) prints one `error:` line and exits 1; Ctrl-C exits 130 after one line. The traceback is printed only when the
  environment variable CFSM_TRACEBACK=1 is set. Anything else (a bug) keeps its traceback.

Every entry point starts with the same two lines so that it also runs as a script path (`python tools/x.py`), where
Python puts the script's folder, not the repository root, first on sys.path:

    if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
        sys.path[0] = str(Path(__file__).resolve().parents[1])
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from utils.errors import RunFailedError, UserError

TRACEBACK_ENV = "CFSM_TRACEBACK"
USAGE_ERROR_EXIT = 2

# (module, class) of the errors that mean "the user gave a wrong input"; looked up in sys.modules only, so this
# module imports none of them (a class whose module was never imported cannot have been raised).
RUN_FAILED_EXIT = 1  # the run itself failed (utils.errors.RunFailedError): one line too
INTERRUPTED_EXIT = 130  # as a shell reports a process ended by SIGINT
_USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class UsageError(UserError, ValueError):
    """A command-line value is wrong (e.g. `--device cuda` without CUDA); the message names the flag and the fix."""


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends `(default: X)` to every option whose help does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = action.nargs == 0  # store_true & co: the flag's presence is the value
        if "default" in text.lower() or flag or action.default in (None, argparse.SUPPRESS) or action.required:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default)) or "none"
        return f"{text} (default: {default})".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `DefaultsHelpFormatter` and a one-line `error: ...` (exit 2) for a bad command line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        """As argparse; then `~` is expanded in every value that starts with it (all path arguments alike)."""
        parsed, rest = super().parse_known_args(args, namespace)
        for name, value in vars(parsed).items():
            setattr(parsed, name, _expand_home(value))
        return parsed, rest

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(USAGE_ERROR_EXIT)


def _expand_home(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, Path) and str(value).startswith("~"):
        return value.expanduser()
    if isinstance(value, list):
        return [_expand_home(v) for v in value]
    return value


def expanded_path(text: str) -> Path:
    """argparse type: a path with `~` expanded."""
    return Path(os.path.expanduser(text))


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")


def add_workers_arg(parser: argparse.ArgumentParser, default: int, what: str = "reading images") -> None:
    parser.add_argument("--workers", type=non_negative_int, default=default,
                        help=f"worker processes {what} (0 = in the main process)")


IMAGES_PER_READER = 20_000  # a spawned reader takes seconds to start: the main process reads ~20k aligned faces then


def add_auto_workers_arg(parser: argparse.ArgumentParser, what: str = "reading images") -> None:
    """`--workers` whose default is chosen from the input size (`auto_workers`)."""
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help=f"worker processes {what} (0 = in the main process; default: one per "
                             f"{IMAGES_PER_READER:,} images, at most {min(8, os.cpu_count() or 1)})")


def auto_workers(requested: int | None, images: int) -> tuple[int, str]:
    """(reader processes, why) for `images` images: `requested` when given, else one per `IMAGES_PER_READER`
    (at most min(8, CPU cores)). Each reader is a spawned process importing torch and OpenCV (seconds); reading an
    aligned 112x112 face takes ~0.15 ms, so a few thousand images are read faster than one reader starts."""
    if requested is not None:
        return requested, f"--workers {requested}"
    count = min(min(8, os.cpu_count() or 1), images // IMAGES_PER_READER)
    if count == 0:
        return 0, (f"{images} images: read in the main process, faster than starting a reader process "
                   f"(--workers N to choose)")
    return count, f"{images} images: one reader per {IMAGES_PER_READER:,} (--workers N to choose)"


def add_out_arg(parser: argparse.ArgumentParser, what: str, default: str | None = None,
                optional: bool = False) -> None:
    """`--out`: always a folder (created when missing). Required unless `default` is given or `optional`."""
    note = " (default: nothing written)" if optional and default is None else ""
    parser.add_argument("--out", type=expanded_path, default=default, required=default is None and not optional,
                        help=f"output folder for {what} (created when missing){note}")


def add_bgr_arg(parser: argparse.ArgumentParser) -> None:
    """`--bgr` / `--rgb` (one of them at most): the channel order to feed. Neither = the model file's own order
    (BGR for AdaFace-family files, RGB otherwise); a flag against what the file tells is an error."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--bgr", action="store_true",
                       help="feed the model BGR images; default: the file's order (AdaFace-family files: BGR, "
                            "read from the file; CFSM / arcface_torch: RGB)")
    group.add_argument("--rgb", action="store_true",
                       help="feed the model RGB images; default: the file's order")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option and the value when this raises)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def resolve_device(name: str | None = "auto") -> "torch.device":  # noqa: F821 - torch is imported lazily
    """`auto` (or None) = CUDA when available, else CPU; otherwise the named device, checked to exist."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def is_user_error(exc: BaseException) -> bool:
    """True for the errors that report a wrong input (their messages name the file / key and the fix)."""
    return isinstance(exc, _USER_OS_ERRORS + (UserError,))


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def one_line(exc: BaseException) -> str:
    """`error: <message>` on one line. An error re-raised from a DataLoader worker carries the worker's whole
    traceback in its message; the user gets the original error's own line."""
    message = str(exc)
    if _WORKER_TRACEBACK in message:
        last = [line for line in message.split(_WORKER_TRACEBACK, 1)[1].splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        message = last.split(prefix, 1)[1] if prefix in last else last.split(": ", 1)[-1]
    text = " ".join(message.split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return f"error: {text}"


def end_progress_bars() -> None:
    """Close every tqdm bar still open: an error raised inside a bar's loop leaves it on screen with the cursor at
    its end, and the `error:` line (or a traceback) would be glued to it. A closed bar ends its line."""
    std = sys.modules.get("tqdm.std")  # no tqdm imported: no bar to end
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot draw any more must not hide the error itself
            pass


def run_command(main: Callable[..., Any], argv: list[str] | None = None) -> None:
    """Run an entry point's `main(argv)`; a user's mistake becomes one `error: ...` line and exit status 2.

    An int returned by `main` is the exit status; any other return value means success."""
    traceback_wanted = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    try:
        result = main(argv)
    except KeyboardInterrupt:
        end_progress_bars()
        if traceback_wanted:
            raise
        print("interrupted", file=sys.stderr)  # a trainer has logged the step reached and how to continue
        raise SystemExit(INTERRUPTED_EXIT) from None
    except Exception as exc:  # noqa: BLE001 - classified below; anything not a user error is re-raised untouched
        end_progress_bars()
        failed = isinstance(exc, RunFailedError)
        if not (failed or is_user_error(exc)) or traceback_wanted:
            raise
        print(one_line(exc), file=sys.stderr)
        raise SystemExit(RUN_FAILED_EXIT if failed else USAGE_ERROR_EXIT) from None
    if isinstance(result, int) and not isinstance(result, bool):
        raise SystemExit(result)
