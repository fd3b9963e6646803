"""The test suite itself: subprocess timeouts leave room for a busy machine (`helpers.headroom`)."""
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
