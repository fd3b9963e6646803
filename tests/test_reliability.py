"""Failure behaviour as a feature: elastic restart after a killed rank, no hangs on a bad record, non-finite stop."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import train
from tests.helpers import REPO, free_port, headroom, launch_env, load_model, tiny_args, torchrun
from utils.data.recordio import IndexedRecordReader


def start_train(mini_toy_or_rec, out, extra, max_restarts=0):
    cmd = torchrun(["train.py", *tiny_args(mini_toy_or_rec, out, *extra)], 2, [
        f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"])
    return subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def worker_pids(launcher_pid: int) -> list[int]:
    """PIDs of the processes running train.py below the launcher (read from /proc, no extra dependency)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == launcher_pid and b"train.py" in cmdline and b"torch.distributed.run" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)


@pytest.mark.slow
def test_elastic_restart_after_killed_rank_is_bitwise_identical(mini_toy, tmp_path):
    """torchrun --max-restarts=1: rank 1 is SIGKILLed after the first checkpoint; the restarted group resumes
    (resume="auto") and ends with exactly the weights of an uninterrupted run."""
    extra = ("max_steps=14", "save_every=3", "num_epoch=4", "keep_checkpoints=10", "verbose=0",
             "val_targets=[]")
    ref = start_train(mini_toy, tmp_path / "ref", extra)
    out_ref, _ = ref.communicate(timeout=headroom(600))
    assert ref.returncode == 0, out_ref[-3000:]

    proc = start_train(mini_toy, tmp_path / "elastic", extra, max_restarts=1)
    marker = tmp_path / "elastic" / "checkpoints" / "step_00000003" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    pids = worker_pids(proc.pid)
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)
    killed_at = max(int(p.name.split("_")[1]) for p in (tmp_path / "elastic" / "checkpoints").glob("step_*"))
    out, _ = proc.communicate(timeout=headroom(600))
    assert proc.returncode == 0, out[-3000:]
    assert killed_at < 14, "the kill came too late to test anything"
    log = (tmp_path / "elastic" / "train.log").read_text()
    assert "resumed from" in log, log[-2000:]
    ref_state, state = load_model(tmp_path / "ref" / "model.pt"), load_model(tmp_path / "elastic" / "model.pt")
    for key in ref_state:
        assert torch.equal(ref_state[key], state[key]), f"elastic run differs at {key}"


@pytest.mark.slow
def test_bad_record_on_one_rank_stops_every_rank(mini_toy, tmp_path):
    """A corrupted image in the .rec: the rank that reads it raises (naming file and key) and no rank hangs."""
    bad = tmp_path / "bad_rec"
    bad.mkdir()
    for name in ("train.rec", "train.idx", "property", "toy_clean.bin"):
        (bad / name).write_bytes((Path(mini_toy) / name).read_bytes())
    reader = IndexedRecordReader(bad / "train.rec", bad / "train.idx")
    key = 7
    offset = int([line.split("\t")[1] for line in (bad / "train.idx").read_text().splitlines()
                  if int(line.split("\t")[0]) == key][0])
    payload_len = len(reader.read(key))
    with open(bad / "train.rec", "r+b") as f:  # keep the framing, destroy the JPEG body
        f.seek(offset + 8 + 24 + 4)
        f.write(b"\xff" * (payload_len - 24 - 8))
    start = time.time()
    proc = start_train(bad, tmp_path / "out", ("max_steps=20", "num_workers=1", "val_targets=[]",
                                            "dist_timeout_s=60"))
    out, _ = proc.communicate(timeout=headroom(300))
    assert proc.returncode != 0
    assert time.time() - start < 240
    assert f"key {key}" in out or f"key={key}" in out or f"record {key}" in out, out[-3000:]
    assert "train.rec" in out


def test_nonfinite_loss_stops_with_step_loss_and_checkpoint(mini_toy, tmp_path):
    with pytest.raises(RuntimeError, match=r"consecutive non-finite steps.*at step \d+, loss .*last good checkpoint"):
        train.main(tiny_args(mini_toy, tmp_path / "nan", "lr=1e30", "clip_grad_norm=0.0", "max_nonfinite_steps=2",
                             "max_steps=20", "save_every=1"))
    log = (tmp_path / "nan" / "train.log").read_text()
    assert "update skipped" in log
