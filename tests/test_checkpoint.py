"""Checkpoint file I/O: atomic writes (umask, full disk), safe loading, strict loading errors.
(The run layout, RNG capture and resume policy: tests/test_resume_policy.py.)"""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from utils import checkpoint as ckpt
from utils.model_file import load_state_dict_file
from tests.helpers import headroom


def test_atomic_save_roundtrip_and_no_temp_left(tmp_path):
    path = tmp_path / "a" / "x.pt"
    ckpt.atomic_save({"w": torch.arange(3)}, path)
    assert torch.equal(ckpt.safe_load(path)["w"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


def test_safe_load_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt"):
        ckpt.safe_load(path)
    assert not marker.exists()


def test_safe_load_missing_and_garbage(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found.*nope.pt"):
        ckpt.safe_load(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="junk.pt"):
        ckpt.safe_load(tmp_path / "junk.pt")


def test_killed_writer_leaves_previous_checkpoint_intact(tmp_path):
    """SIGKILL in the middle of torch.save: the old file stays loadable, the partial temp file is not picked up."""
    path = tmp_path / "state.pt"
    ckpt.atomic_save({"v": torch.zeros(4)}, path)
    script = textwrap.dedent(f"""
        import sys, os, torch
        sys.path.insert(0, {str(ckpt.__file__.rsplit('/utils/', 1)[0])!r})
        from utils import checkpoint as ckpt
        class Slow:
            def write(self, b): pass
        orig = torch.save
        def slow_save(obj, f, *a, **k):
            f.write(b"partial bytes")
            f.flush()
            print("writing", flush=True)
            import time; time.sleep(60)
        torch.save = slow_save
        ckpt.atomic_save({{"v": torch.ones(4)}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=headroom(30))
    assert torch.equal(ckpt.safe_load(path)["v"], torch.zeros(4))


def test_strict_load_names_first_mismatching_key(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    other = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    with pytest.raises(ckpt.CheckpointError, match=r"1\.weight.*\[4, 3\].*\[1, 3\]"):
        ckpt.load_state_dict_strict(model, other.state_dict(), "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="first mismatching key '2.weight'"):
        ckpt.load_state_dict_strict(model, {**model.state_dict(), "2.weight": torch.zeros(1)}, "x.pt")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    ckpt.load_state_dict_strict(model, load_state_dict_file(tmp_path / "ddp.pt"), "ddp.pt")


def _fail_writes_into(folder, real_write=os.write):
    """An os.write that reports a full disk for files under `folder` (what the kernel says when it is full)."""
    def write(fd, data):
        if str(folder) in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    return write


@pytest.mark.parametrize("save", [
    lambda path, value: ckpt.atomic_save({"v": torch.full((1000,), value)}, path),
    lambda path, value: ckpt.atomic_write_text(f"value {value}", path),
], ids=["atomic_save", "atomic_write_text"])
def test_disk_full_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, save):
    path = tmp_path / "ckpt" / "state.pt"
    save(path, 1.0)
    before = path.read_bytes()
    monkeypatch.setattr(os, "write", _fail_writes_into(tmp_path / "ckpt"))
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write .*state\.pt: no space left"):
        save(path, 2.0)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the previous file, untouched
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temp file left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    """Not 0600 from mkstemp: other users on shared storage read model.pt and checkpoints as the umask allows."""
    old = os.umask(umask)
    try:
        ckpt.atomic_save({"w": torch.zeros(2)}, tmp_path / "model.pt")
        ckpt.atomic_write_text("{}", tmp_path / "summary.json")
    finally:
        os.umask(old)
    for name in ("model.pt", "summary.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_every_json_file_is_valid_json_non_finite_numbers_become_null(tmp_path):
    from utils.checkpoint import write_json

    path = tmp_path / "summary.json"
    write_json({"final_loss": float("nan"), "val": {"a": float("inf")}, "pair": (1.0, float("-inf"))}, path)

    def refuse(token):
        raise AssertionError(f"invalid JSON token {token}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"final_loss": None, "val": {"a": None},
                                                                    "pair": [1.0, None]}
