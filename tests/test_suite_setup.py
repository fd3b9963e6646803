"""The test suite itself: subprocess timeouts leave room for a busy machine (`helpers.headroom`), and the README's
test command installs what the tests use, so nothing is skipped but the CUDA tests (read from the sources: no
collection run)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import helpers

REPO = Path(__file__).resolve().parents[1]
TESTS = sorted((REPO / "tests").glob("*.py"))


def test_no_subprocess_timeout_is_a_bare_number() -> None:
    """A fixed limit fails a passing test on a loaded machine; every limit goes through `headroom`."""
    fixed = [f"{p.name}:{n}: {line.strip()}" for p in TESTS for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"(?<![\w.])timeout=\d", line)]
    assert not fixed, "use timeout=headroom(N) (tests/helpers.py):\n" + "\n".join(fixed)


def test_headroom_grows_with_load_and_the_scale_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(helpers.TIMEOUT_SCALE_ENV, raising=False)
    monkeypatch.setattr(helpers.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(helpers.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert helpers.headroom(100) == 300  # idle: three times the base
    monkeypatch.setattr(helpers.os, "getloadavg", lambda: (6.0, 1.0, 1.0))
    assert helpers.headroom(100) == 900  # three busy processes per core: three times longer again
    monkeypatch.setenv(helpers.TIMEOUT_SCALE_ENV, "2")
    assert helpers.headroom(100) == 1800


def _readme_test_command() -> str:
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if "python -m pytest" in line]
    assert lines, "README has no test command"
    return lines[0].split("#")[0].strip()


def test_readme_and_ci_run_the_same_command_which_installs_the_test_requirements() -> None:
    command = _readme_test_command()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line
          and not line.lstrip().startswith(("#", "echo"))]
    assert ci == [command], (ci, command)
    assert command.startswith("pip install -r requirements-test.txt && "), command
    test_requirements = (REPO / "requirements-test.txt").read_text().splitlines()
    assert "-r requirements.txt" in test_requirements  # the product's own requirements, then what tests add
    assert any(re.fullmatch(r"wandb>=\d+\.\d+(\.\d+)?", line.strip()) for line in test_requirements)


_SKIP = re.compile(r"pytest\.(skip|importorskip)\(|mark\.skipif\(")


def test_nothing_is_skipped_but_the_cuda_tests() -> None:
    """Every skip in the suite is about CUDA: an optional integration (wandb, onnx) is installed by the test
    command and runs; a skip there would hide a path that never ran."""
    others = []
    for path in TESTS:
        text = path.read_text()
        if "pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available()" in text:
            continue  # a CUDA-only module: every skip in it is behind the module's CUDA skip
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            if _SKIP.search(line) and path.name != Path(__file__).name:
                context = " ".join(lines[max(0, n - 3):n + 1])  # the condition may sit a line or two above
                if "cuda" not in context.lower():
                    others.append(f"{path.name}:{n}: {line.strip()}")
    assert not others, "skips that are not about CUDA:\n" + "\n".join(others)


def test_the_test_requirements_are_installed() -> None:
    """What requirements-test.txt adds is importable here (the README's command installed it)."""
    import wandb

    assert wandb.__version__
