"""Every command follows one convention (utils/cli.py): runs as a path and with -m, documents each argument with its
default, shares the meaning of --device/--workers/--out/--bgr, and reports a user's mistake as one line, exit 2."""
import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils import cli
from tests.helpers import headroom

REPO = Path(__file__).resolve().parents[1]


def _entry_points() -> list[str]:
    """Every module under tools/, eval/, bench/ with a __main__ block, plus the two trainers at the root."""
    found = []
    for folder in ("tools", "eval", "bench"):
        for path in sorted((REPO / folder).glob("*.py")):
            if 'if __name__ == "__main__"' in path.read_text():
                found.append(f"{folder}/{path.name}")
    found += [name for name in ("train.py", "train_generator.py") if (REPO / name).is_file()]
    return found


ENTRY_POINTS = _entry_points()


def _module_name(path: str) -> str:
    return path[:-3].replace("/", ".")


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_of(path: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser an entry point's main() builds (caught at its first parse, before any work)."""
    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    module = importlib.import_module(_module_name(path))
    with pytest.raises(_Captured) as caught:
        module.main(["--help"])
    return caught.value.parser


def test_entry_points_are_found():
    assert {"tools/export_onnx.py", "tools/embed.py", "eval/verification.py", "eval/ijb.py", "bench/modules.py",
            "train.py"} <= set(ENTRY_POINTS)
    assert set(SMOKE_ENTRY_POINTS) <= set(ENTRY_POINTS)


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_help_documents_every_argument_with_its_default(path, monkeypatch):
    parser = _parser_of(path, monkeypatch)
    assert isinstance(parser, cli.ArgumentParser), f"{path}: build the parser with utils.cli.ArgumentParser"
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{path}: argument {name} has no help text"
        flag = action.nargs == 0
        text = formatter._get_help_string(action) % {**vars(action), "prog": parser.prog}
        if not flag and not action.required and action.option_strings or action.nargs in ("?", "*"):
            assert "default" in text.lower(), f"{path}: help of {name} does not state its default: {text!r}"


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_shared_flags_mean_the_same_everywhere(path, monkeypatch):
    parser = _parser_of(path, monkeypatch)
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    if "--device" in actions:
        assert actions["--device"].default == "auto", f"{path}: --device must default to auto (CUDA when available)"
    if "--bgr" in actions:
        assert actions["--bgr"].nargs == 0 and actions["--bgr"].default is False
    if "--out" in actions:
        assert "folder" in (actions["--out"].help or ""), f"{path}: --out is a folder"
    if "--workers" in actions:
        assert "0 = in the main process" in actions["--workers"].help, f"{path}: --workers 0 = in the main process"


REPO_PACKAGES = {"backbones", "bench", "cfsm", "configs", "dataset", "eval", "losses", "partial_fc", "tools", "train",
                 "train_generator", "utils"}
PRELUDE_TEST = '__name__ == "__main__" and not __package__'
PRELUDE_BODY = "sys.path[0] = str(Path(__file__).resolve().parents[1])"


def _prelude_problem(source: str) -> str | None:
    """Why `source` (an entry point in a subfolder) would not run as a path: run so, Python puts the subfolder first
    on sys.path, so before its first import of a repo package it must put the repository root there instead."""
    import ast

    def same(nodes, text: str) -> bool:  # the same syntax tree as `text` (quotes, spacing, comments aside)
        return [ast.dump(n) for n in nodes] == [ast.dump(n) for n in ast.parse(text).body]

    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and same([ast.Expr(node.test)], PRELUDE_TEST):
            if not same(node.body, PRELUDE_BODY):
                return f"the prelude's body must be `{PRELUDE_BODY}`"
            return None
        imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        repo = [name for name in imported if name.split(".")[0] in REPO_PACKAGES]
        if repo:
            return f"imports {repo[0]} before the prelude `if {PRELUDE_TEST}:`"
    return f"no prelude `if {PRELUDE_TEST}: {PRELUDE_BODY}`"


def test_every_entry_point_in_a_subfolder_has_the_path_prelude():
    """Read from the source: every command under tools/, eval/, bench/ puts the repository root on sys.path before
    importing the repo's packages, so it runs as a path as well as with -m (the smoke test below runs a few)."""
    problems = [f"{path}: {why}" for path in ENTRY_POINTS if "/" in path
                for why in [_prelude_problem((REPO / path).read_text())] if why]
    assert not problems, "\n".join(problems)


def test_the_prelude_check_catches_a_missing_or_late_prelude():
    good = f"import sys\nfrom pathlib import Path\n\nif {PRELUDE_TEST}:\n    {PRELUDE_BODY}\n\nfrom utils import cli\n"
    assert _prelude_problem(good) is None
    assert "imports utils.cli before" in _prelude_problem("import sys\nfrom utils.cli import run_command\n" + good)
    assert "no prelude" in _prelude_problem("import sys\nimport numpy\n")
    assert "body" in _prelude_problem(good.replace("parents[1]", "parents[2]"))


SMOKE_ENTRY_POINTS = ["tools/embed.py", "eval/verification.py", "bench/modules.py", "train.py"]  # one per folder


@pytest.mark.slow
@pytest.mark.parametrize("path", SMOKE_ENTRY_POINTS)
def test_help_runs_as_path_and_as_module(path):
    env = {**os.environ, "PYTHONPATH": ""}
    for command in ([sys.executable, path, "--help"], [sys.executable, "-m", _module_name(path), "--help"]):
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=headroom(120))
        assert run.returncode == 0, f"{' '.join(command[1:])}: {run.stderr[-2000:]}"
        assert "usage:" in run.stdout


@pytest.mark.slow
def test_user_error_is_one_line_exit_2_and_traceback_on_request(tmp_path):
    command = [sys.executable, "tools/export_onnx.py", "--model", str(tmp_path / "missing.pt"), "--network", "r_tiny",
               "--out", str(tmp_path / "onnx")]
    env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=headroom(120))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.pt" in lines[0], run.stderr
    run = subprocess.run(command, cwd=REPO, env={**env, cli.TRACEBACK_ENV: "1"}, capture_output=True, text=True,
                         timeout=headroom(120))
    assert run.returncode != 0 and "Traceback" in run.stderr


@pytest.mark.slow
def test_config_typo_in_train_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "configs/toy", "btch_size=3"], cwd=REPO, capture_output=True,
                         text=True, timeout=headroom(120))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: unknown config key 'btch_size' in override 'btch_size=3'. Did you mean: batch_size, val_batch_size, "
        "embedding_size?"]


def test_bad_command_line_is_one_line_exit_2(capsys):
    parser = cli.ArgumentParser(prog="x")
    parser.add_argument("--n", type=int, default=1, help="a number")
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--n", "many"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --n: invalid int value: 'many'")


def test_run_command_classifies_errors(capsys, monkeypatch):
    from configs.loader import ConfigError

    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)

    def bad_config(argv):
        raise ConfigError("config key 'lr' = -1: must be > 0")

    with pytest.raises(SystemExit) as stop:
        cli.run_command(bad_config, [])
    assert stop.value.code == 2 and capsys.readouterr().err == "error: config key 'lr' = -1: must be > 0\n"

    def bug(argv):
        raise ZeroDivisionError("a bug keeps its traceback")

    with pytest.raises(ZeroDivisionError):
        cli.run_command(bug, [])
    with pytest.raises(SystemExit) as stop:
        cli.run_command(lambda argv: 3, [])
    assert stop.value.code == 3


def test_device_auto_and_unavailable_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.resolve_device("auto").type == "cpu"
    with pytest.raises(cli.UsageError, match="--device 'cuda'.*not available.*--device cpu or auto"):
        cli.resolve_device("cuda")
    with pytest.raises(cli.UsageError, match="--device 'gpu0' is not a device"):
        cli.resolve_device("gpu0")


def test_tilde_is_expanded_in_every_path_argument(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    parser = cli.ArgumentParser(prog="x")
    parser.add_argument("--root", default=None, help="a folder (default: none)")
    parser.add_argument("--bin", action="append", help="files")
    args = parser.parse_args(["--root", "~/data", "--bin", "~/a.bin", "--bin", "b.bin"])
    assert args.root == f"{tmp_path}/data" and args.bin == [f"{tmp_path}/a.bin", "b.bin"]
