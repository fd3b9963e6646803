"""utils/run/elastic.py with dataset.FaceSampler: the data position by samples across a world-size change, the stop step
and the lr schedule's position."""
from __future__ import annotations

import pytest

from dataset import FaceSampler
from utils.run.elastic import DataCourse, describe_change, position_record, saved_course, schedule_after_change
from utils.run.scaffold import plan_steps
from tests.helpers import headroom


def epoch_reads(n: int, batch: int, world: int, epoch: int, start_sample: int, batches: int | None = None) -> list:
    """Sample indices all ranks read, batch by batch (rank order inside a batch), from `start_sample` on."""
    samplers = [FaceSampler(n, batch, r, world, seed=3) for r in range(world)]
    per_rank = []
    for s in samplers:
        s.set_epoch(epoch, start_sample=start_sample)
        per_rank.append([i for i, _ in s])
    count = len(per_rank[0]) // batch if batches is None else batches
    return [i for b in range(count) for r in range(world) for i in per_rank[r][b * batch:(b + 1) * batch]]


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3), (3, 2), (4, 1)])
def test_no_sample_of_the_epoch_twice_or_skipped_across_a_world_size_change(old, new):
    n, batch, done = 101, 4, 3
    before = epoch_reads(n, batch, old, epoch=2, start_sample=0, batches=done)
    consumed = done * batch * old
    after = epoch_reads(n, batch, new, epoch=2, start_sample=consumed)
    seen = before + after
    assert len(seen) == len(set(seen))  # nothing twice
    dropped = (n - consumed) % (batch * new)  # drop_last of the new layout, as in any epoch
    reference = FaceSampler(n, 1, 0, 1, seed=3)
    reference.set_epoch(2)
    perm = [i for i, _ in reference]
    assert set(before) == set(perm[:consumed])  # the consumed samples are a prefix of the epoch's permutation
    for b in range(len(after) // (batch * new)):  # each new global batch: the next entries of the permutation
        lo = consumed + b * batch * new
        assert set(after[b * batch * new:(b + 1) * batch * new]) == set(perm[lo:lo + batch * new])
    assert sorted(seen) == sorted(perm[:n - dropped])  # nothing skipped but the new layout's last partial batch
    assert dropped < batch * new


def test_start_batch_and_start_sample_position_alike():
    a, b = FaceSampler(50, 3, 1, 2, seed=0), FaceSampler(50, 3, 1, 2, seed=0)
    a.set_epoch(4, start_batch=2)
    b.set_epoch(4, start_sample=2 * 3 * 2)
    assert list(a) == list(b) and len(a) == len(b) == (50 // 2 // 3 - 2) * 3
    with pytest.raises(ValueError, match="start_sample 51"):
        b.set_epoch(0, start_sample=51)


@pytest.mark.parametrize("micro", [1, 2])
def test_same_world_course_matches_the_step_count_plan(micro):
    """Without a change the course is what the plan says: positions, the stop step and the schedule's position."""
    n, batch, world, num_epoch = 100, 4, 2, 3
    bpe = n // world // batch
    plan = plan_steps(bpe, micro, num_epoch, warmup_epoch=0, max_steps=0, where="x")
    for step in range(plan.total_steps + 1):
        epoch, first = divmod(step * micro, bpe)
        course = DataCourse(step, epoch, first * batch * world, n, batch * world, micro)
        assert course.at_step(step) == (epoch, first * batch * world)
        later = min(plan.total_steps, step + 5)
        e2, b2 = divmod(later * micro, bpe)
        assert course.at_step(later) == (e2, b2 * batch * world)
        assert schedule_after_change(course, plan.total_steps, num_epoch, 0) == (step, plan.total_steps)


def test_schedule_is_placed_by_samples_after_a_change():
    # 2 ranks x 8 on 96 images: 6 steps per epoch; after 4 steps of epoch 1: 64 of 96 samples consumed
    course = DataCourse(step=10, epoch=1, consumed=64, dataset_len=96, samples_per_batch=8, micro_per_step=1)
    total = plan_steps(96 // 8, 1, num_epoch=2, warmup_epoch=0, max_steps=0, where="x").total_steps  # 24 on 1 rank
    assert course.steps_left(2) == 4  # 32 samples left = 4 batches of 8
    assert schedule_after_change(course, total, num_epoch=2, max_steps=0) == (20, 14)
    assert schedule_after_change(course, total, num_epoch=2, max_steps=12) == (20, 12)
    assert course.at_step(14) == (2, 0)
    line = describe_change(position_record(1, 64, 2, 8), course, 1, 8, 20, total, 14)
    assert "world size 2 -> 1: global batch 16 -> 8 samples" in line and "steps per epoch 6 -> 12" in line
    assert "20 of 24 steps, 4 left" in line


def test_saved_course_from_a_record_or_from_an_older_marker():
    assert saved_course({"step": 3, "data_position": position_record(0, 48, 2, 8)}, {}) == \
        {"epoch": 0, "consumed": 48, "world_size": 2, "batch_size": 8}
    meta = {"world_size": 2, "config": {"batch_size": 8, "gradient_acc": 1, "num_image": 96}}
    assert saved_course({"step": 8}, meta) == {"epoch": 1, "consumed": 32, "world_size": 2, "batch_size": 8}
    assert saved_course({"step": 8}, {"world_size": 2}) is None


# ---- end to end: train.py checkpointed on one world size, continued on another ----

def loss_lines(log_file) -> dict[int, str]:
    """{step: 'loss L lr R'} from rank 0's train.log progress lines."""
    import re

    found = {}
    for line in log_file.read_text().splitlines():
        m = re.search(r" step (\d+)/\d+ epoch \d+ (loss \S+ lr \S+)", line)
        if m:
            found[int(m.group(1))] = m.group(2)
    return found


def run_train(world: int, mini_toy, out, *extra) -> None:
    """train.py on `world` gloo ranks (torchrun) or in this process (1 rank)."""
    import train
    from tests.helpers import run, tiny_args, torchrun

    args = tiny_args(mini_toy, out, "val_targets=[]", *extra)
    if world == 1:
        train.main(args)
        return
    proc = run(torchrun(["train.py", *args], world), timeout=headroom(300))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("old, new, stop_old", [(2, 1, 2), (1, 2, 3)])
def test_checkpoint_continues_on_another_world_size(mini_toy, tmp_path, tiny_generator_file, old, new, stop_old):
    """A run checkpointed on `old` ranks continues on `new` ranks to the end of the schedule, crossing an epoch. Its
    losses equal those of a run of `new` ranks resumed from the same state re-sharded offline by tools.reshard (a
    same-world-size resume, which test_train shows equals an uninterrupted run)."""
    import json

    import torch

    from tools import reshard as tool

    common = (f"pretrained_synthesis_model={tiny_generator_file}", "rs_ratio=0.5", "k=1", "sample_rate=0.5",
              "num_epoch=2", "save_every=0")
    run_train(old, mini_toy, tmp_path / "elastic", f"max_steps={stop_old}", *common)
    before = loss_lines(tmp_path / "elastic" / "train.log")
    assert sorted(before) == list(range(1, stop_old + 1))
    source = tmp_path / "elastic" / "checkpoints" / f"step_{stop_old:08d}"
    tool.main([str(source), "--world-size", str(new), "--out",
               str(tmp_path / "offline" / "checkpoints" / f"step_{stop_old:08d}")])
    run_train(new, mini_toy, tmp_path / "elastic", "resume=True", *common)
    run_train(new, mini_toy, tmp_path / "offline", "resume=True", *common)
    log = (tmp_path / "elastic" / "train.log").read_text()
    assert f"resume: world size {old} -> {new}" in log
    after, reference = loss_lines(tmp_path / "elastic" / "train.log"), loss_lines(tmp_path / "offline" / "train.log")
    # 96 images, 16 per rank: the new run reads the rest of epoch 0 after the old run's samples, then epoch 1
    consumed = stop_old * 16 * old
    expected_steps = (96 - consumed) // (16 * new) + 96 // (16 * new)
    continued = {s: v for s, v in after.items() if s > stop_old}
    assert sorted(continued) == list(range(stop_old + 1, stop_old + expected_steps + 1))
    assert continued == reference, "the continued run differs from the offline re-shard's same-world resume"
    assert continued[stop_old + expected_steps].endswith("lr 0") or float(
        continued[stop_old + expected_steps].split()[-1]) < 1e-3  # the schedule ends where the data does
    a = torch.load(tmp_path / "elastic" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "offline" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "elastic" / "summary.json").read_text())
    assert summary["steps"] == stop_old + expected_steps and summary["epochs"] == pytest.approx(2.0)
    print("\n".join(f"world {old if s <= stop_old else new} step {s}: {v}"
                    for s, v in sorted({**before, **continued}.items())))


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (torchrun starts its workers in their own sessions: killpg would miss them)."""
    from pathlib import Path

    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids += _process_tree(int(d.name))
    return [pid] + kids


@pytest.mark.slow
def test_torchrun_elastic_restart_continues_on_fewer_ranks(mini_toy, tmp_path, tiny_generator_file):
    """Two torchrun agents (--nnodes=1:2, one rank each) train; one agent is SIGKILLed with its worker (a node
    leaves). The other agent restarts its worker, which resumes the 2-rank checkpoint as 1 rank, re-sharded, and
    finishes; the losses after the change equal a 1-rank resume of the same checkpoint re-sharded by tools.reshard."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO, free_port, launch_env, tiny_args, torchrun
    from tools import reshard as tool

    common = ("val_targets=[]", f"pretrained_synthesis_model={tiny_generator_file}", "rs_ratio=0.5", "k=1",
              "sample_rate=0.5", "num_epoch=2", "save_every=1", "keep_checkpoints=100")
    out = tmp_path / "elastic"
    env = launch_env()
    cmd = torchrun(["train.py", *tiny_args(mini_toy, out, *common)], 1, [
        "--nnodes=1:2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=elastic-test",
        "--max-restarts=3", "--rdzv-conf=last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=2"])
    logs = [open(tmp_path / f"agent_{i}.log", "w") for i in range(2)]
    agents = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[0], stderr=subprocess.STDOUT)]
    time.sleep(1)  # the first agent hosts the rendezvous store
    agents.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[1], stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            markers = [json.loads(p.read_text()) for p in out.glob("checkpoints/step_*/COMPLETE")]
            if any(m["world_size"] == 2 and m["step"] >= 2 for m in markers):
                break
            time.sleep(0.05)
        for pid in reversed(_process_tree(agents[1].pid)):  # the node leaves: its agent and its worker die
            os.kill(pid, signal.SIGKILL)
        assert agents[0].wait(timeout=headroom(240)) == 0, (tmp_path / "agent_0.log").read_text()[-3000:]
    finally:
        for agent in agents:
            if agent.poll() is None:
                for pid in reversed(_process_tree(agent.pid)):
                    os.kill(pid, signal.SIGKILL)
        for f in logs:
            f.close()
    log = (out / "train.log").read_text()
    assert "resume: world size 2 -> 1" in log, log[-3000:]
    resumed_step = int(log.split("resumed from ")[1].split("step_")[1].split()[0])
    after = {s: v for s, v in loss_lines(out / "train.log").items() if s > resumed_step}
    reference = tmp_path / "reference"
    tool.main([str(out / "checkpoints" / f"step_{resumed_step:08d}"), "--world-size", "1", "--out",
               str(reference / "checkpoints" / f"step_{resumed_step:08d}")])
    proc = subprocess.run([sys.executable, "train.py", *tiny_args(mini_toy, reference, *common, "resume=True")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=headroom(300))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = loss_lines(reference / "train.log")
    assert after and after == {s: v for s, v in expected.items() if s > resumed_step}
    assert json.loads((out / "summary.json").read_text())["epochs"] == pytest.approx(2.0)
