"""Checkpoint I/O: atomic writes, safe loading, run layout, RNG capture, strict loading errors."""
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from utils import checkpoint as ckpt


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
    proc.wait(timeout=30)
    assert torch.equal(ckpt.safe_load(path)["v"], torch.zeros(4))


def test_run_layout_complete_marker_and_prune(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_run_checkpoint(tmp_path, step, 0, 1, {"step": step}, barrier=lambda: None, keep=2, kind="test")
    partial = ckpt.step_dir(tmp_path, 40)
    partial.mkdir()
    (partial / "rank_0.pt").write_bytes(b"half")  # a crash before COMPLETE
    steps = [s for s, _, _ in ckpt.complete_checkpoints(tmp_path)]
    assert steps == [20, 30]
    step, directory, meta = ckpt.latest_complete(tmp_path)
    assert step == 30 and meta["world_size"] == 1
    assert ckpt.resume_checkpoint(tmp_path, "auto", 1, kind="test") == (30, directory)
    assert ckpt.safe_load(ckpt.rank_file(directory, 0))["step"] == 30
    with pytest.raises(ckpt.CheckpointError, match="written by 1 ranks but this run has 2"):
        ckpt.resume_checkpoint(tmp_path, "auto", 2, kind="test")
    with pytest.raises(ckpt.CheckpointError, match="not 'recognition'"):
        ckpt.resume_checkpoint(tmp_path, True, 1, kind="recognition")
    assert ckpt.resume_checkpoint(tmp_path, False, 1, kind="test") is None


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    g = torch.Generator().manual_seed(5)
    state = ckpt.capture_rng_state({"g": g})
    ckpt.atomic_save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    ckpt.restore_rng_state(ckpt.safe_load(tmp_path / "rng.pt"), {"g": g})
    got = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and expected[2] == got[2]
    assert torch.equal(expected[3], got[3])


def test_strict_load_names_first_mismatching_key(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    other = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    with pytest.raises(ckpt.CheckpointError, match=r"1\.weight.*\(4, 3\).*\(1, 3\)"):
        ckpt.load_state_dict_strict(model, other.state_dict(), "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="first mismatching key '2.weight'"):
        ckpt.load_state_dict_strict(model, {**model.state_dict(), "2.weight": torch.zeros(1)}, "x.pt")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    ckpt.load_state_dict_strict(model, ckpt.load_state_dict_file(tmp_path / "ddp.pt"), "ddp.pt")
