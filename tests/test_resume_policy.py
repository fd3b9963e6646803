"""Run state and resume policy (utils.run.run_state): the config stored in every checkpoint and compared on resume,
schedule changes applied from the resumed step, damaged-checkpoint fallback, finiteness recorded at save time,
per-node markers and a resume step agreed by all ranks, disk full, the output-folder lock."""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from configs.loader import resume_policy
from tests.helpers import REPO, headroom, start_ranks, tiny_args
from utils.run import config_policy, output_lock, rng_state, run_folder, run_state as rs
from utils.distributed import Ranks
from utils.checkpoint import CheckpointError
from utils.optim import PolyScheduler

REC, STAGE1 = resume_policy("recognition"), resume_policy("cfsm_stage1")  # derived from configs/base.py

SINGLE = Ranks()


def save(out: Path, step: int, value: float = 0.0, config: dict | None = None, keep: int = 5,
         ranks: Ranks = SINGLE, kind: str = "test") -> Path:
    state = {"w": torch.full((64,), value), "step": step}
    return rs.save_run_checkpoint(out, step, state, ranks, keep, kind, config or {"lr": 0.1})


# ---- layout, pruning, finiteness ----

def test_layout_marker_records_config_sizes_and_finiteness(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step, keep=2, config={"network": "r_tiny", "lr": 0.1})
    partial = run_folder.step_dir(tmp_path, 40)
    partial.mkdir()
    (partial / "rank_0.pt").write_bytes(b"half")  # a crash before COMPLETE
    assert [s for s, _, _ in run_folder.complete_checkpoints(tmp_path)] == [20, 30]
    step, directory, meta = run_folder.latest_complete(tmp_path)
    assert step == 30 and meta["world_size"] == 1 and meta["finite"] is True
    assert meta["config"] == {"network": "r_tiny", "lr": 0.1}
    assert meta["sizes"] == {"0": run_folder.rank_file(directory, 0).stat().st_size}
    resumed = rs.resume(tmp_path, "auto", SINGLE, "test", {})
    assert (resumed.step, resumed.directory, resumed.state["step"]) == (30, directory, 30)
    with pytest.raises(CheckpointError, match="written by 1 ranks but this run has 2"):
        rs.resume(tmp_path, "auto", Ranks(world_size=2, gather=lambda o: [o, o]), "test", {})
    with pytest.raises(CheckpointError, match="not 'recognition'"):
        rs.resume(tmp_path, True, SINGLE, "recognition", {})
    assert rs.resume(tmp_path, False, SINGLE, "test", {}) is None


def test_pruning_keeps_the_newest_finite_checkpoint(tmp_path):
    """Non-finite checkpoints never push out the last finite one, and the stop message can only name a finite one."""
    save(tmp_path, 10, value=1.0, keep=1)
    for step in (20, 30, 40):
        save(tmp_path, step, value=float("nan"), keep=1)
    found = {s: meta for s, _, meta in run_folder.complete_checkpoints(tmp_path)}
    assert sorted(found) == [10, 40]
    assert found[40]["finite"] is False and found[40]["nonfinite"] == {"0": "w"}
    assert run_folder.last_finite_checkpoint(tmp_path) == run_folder.step_dir(tmp_path, 10)
    save(tmp_path, 50, value=2.0, keep=1)  # a finite one again: the old finite one may go
    assert [s for s, _, _ in run_folder.complete_checkpoints(tmp_path)] == [50]


def test_first_nonfinite_names_the_key():
    state = {"backbone": {"bn.weight": torch.ones(2), "bn.running_var": torch.tensor([1.0, float("inf")])},
             "step": 3, "counts": torch.tensor([1, 2])}
    assert rs.first_nonfinite(state) == "backbone.bn.running_var"
    assert rs.first_nonfinite({"a": torch.zeros(3), "b": [torch.ones(1)]}) is None


def test_nan_buffers_stop_the_run_without_model_file(mini_toy, tmp_path):
    """NaN BatchNorm running statistics leave the loss finite (training uses batch statistics): the run used to
    exit 0 and write model.pt with NaN buffers. Now it stops naming the step and writes no model file."""
    from backbones import get_model

    model = get_model("r_tiny", num_features=32)
    state = model.state_dict()
    name = next(k for k in state if k.endswith("running_mean"))
    state[name] = torch.full_like(state[name], float("nan"))
    init = tmp_path / "nan_bn.pt"
    torch.save(state, init)
    out = tmp_path / "out"
    with pytest.raises(rs.NonFiniteStateError, match=rf"step 2: .*not finite.*rank 0: backbone\.{name}.*"
                                                     rf"Last finite checkpoint: none"):
        train.main(tiny_args(mini_toy, out, "max_steps=2", f"pretrained_backbone_model={init}"))
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()


def test_stop_message_names_only_a_finite_checkpoint(mini_toy, tmp_path):
    """Every checkpoint of this run holds NaN BatchNorm buffers: the non-finite stop used to name the newest one
    as the "last good checkpoint"; it names none now, and those checkpoints are marked non-finite."""
    from backbones import get_model

    state = get_model("r_tiny", num_features=32).state_dict()
    name = next(k for k in state if k.endswith("running_var"))
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save(state, tmp_path / "nan_bn.pt")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"consecutive non-finite steps.*last good checkpoint: none"):
        train.main(tiny_args(mini_toy, out, "lr=1e30", "clip_grad_norm=0.0", "max_nonfinite_steps=2",
                             "max_steps=20", "save_every=1", "val_targets=[]",
                             f"pretrained_backbone_model={tmp_path / 'nan_bn.pt'}"))
    markers = run_folder.complete_checkpoints(out)
    assert markers and all(meta["finite"] is False for _, _, meta in markers)


# ---- the config stored in every checkpoint ----

def test_changed_state_keys_are_refused_with_every_change_listed(tmp_path):
    saved = {"network": "r50", "embedding_size": 512, "batch_size": 128, "lr": 0.1, "frequent": 10}
    directory = tmp_path / "checkpoints" / "step_00000100"
    current = {**saved, "network": "r100", "batch_size": 64, "frequent": 50}
    with pytest.raises(CheckpointError) as err:
        config_policy.check_config(saved, current, directory, REC)
    message = str(err.value)
    assert "network: 'r50' -> 'r100'" in message and "batch_size: 128 -> 64" in message
    assert str(directory) in message and "pretrained_backbone_model" in message and "frequent" not in message
    assert config_policy.check_config(saved, {**saved, "lr": 0.05, "frequent": 1, "output": "x"}, directory,
                           REC) == [("lr", 0.1, 0.05)]
    stage1 = {"gen_dim": 64, "gen_lr": 1e-4}
    with pytest.raises(CheckpointError, match="gen_dim: 64 -> 32"):
        config_policy.check_config(stage1, {**stage1, "gen_dim": 32}, directory, STAGE1)


def test_the_channel_order_fed_cannot_change_on_resume_and_old_runs_count_as_rgb(tmp_path):
    """The resolved order is stored (auto -> bgr for ir_*): saying the order auto resolved to is no change, the other
    order is refused; a checkpoint from before the key (train.py fed RGB) is compared as rgb, so an old ir_* run is
    not resumed on BGR silently. Stage 1's id_channel_order applies (listed), its identity network is not saved."""
    directory = tmp_path / "checkpoints" / "step_00000010"
    saved = {"network": "ir_tiny", "channel_order": "bgr", "lr": 0.1}
    assert config_policy.check_config(saved, dict(saved), directory, REC) == []
    with pytest.raises(CheckpointError, match=r"channel_order: 'bgr' -> 'rgb'"):
        config_policy.check_config(saved, {**saved, "channel_order": "rgb"}, directory, REC)
    old = {"network": "ir_tiny", "lr": 0.1}
    with pytest.raises(CheckpointError, match=r"channel_order: 'rgb' -> 'bgr'\).*Restore those values"):
        config_policy.check_config(old, {**old, "channel_order": "bgr"}, directory, REC)
    assert config_policy.check_config({"network": "r_tiny"}, {"network": "r_tiny", "channel_order": "rgb"},
                                      directory, REC) == []
    assert config_policy.check_config({"gen_dim": 4}, {"gen_dim": 4, "id_channel_order": "bgr"}, directory,
                                      STAGE1) == [("id_channel_order", "rgb", "bgr")]


def test_a_resume_feeding_the_other_channel_order_is_refused(mini_toy, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_args(mini_toy, out, "network=ir_tiny", "max_steps=1", "save_every=1", "val_targets=[]",
                         "image_every=0"))
    with pytest.raises(CheckpointError, match=r"channel_order: 'bgr' -> 'rgb'"):
        train.main(tiny_args(mini_toy, out, "network=ir_tiny", "max_steps=2", "val_targets=[]", "image_every=0",
                             "channel_order=rgb"))
    assert train.main(tiny_args(mini_toy, out, "network=ir_tiny", "max_steps=2", "val_targets=[]", "image_every=0",
                                "channel_order=bgr"))["steps"] == 2  # what auto resolved to: no change


def test_resume_with_another_architecture_names_the_keys(mini_toy, tmp_path):
    """Used to fail inside load_state_dict with thousands of key names."""
    out = tmp_path / "out"
    train.main(tiny_args(mini_toy, out, "max_steps=1"))
    with pytest.raises(CheckpointError, match=r"step_00000001: .*network: 'r_tiny' -> 'mbf_tiny', "
                                              r"embedding_size: 32 -> 16.*pretrained_backbone_model"):
        train.main(tiny_args(mini_toy, out, "max_steps=2", "network=mbf_tiny", "embedding_size=16"))


def test_optimizer_and_schedule_follow_the_new_config_from_the_resumed_step():
    def build(lr, total, momentum=0.9):
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([w], lr=lr, momentum=momentum)
        return w, opt, PolyScheduler(opt, total, 0, 2.0)

    w, opt, sched = build(0.1, 10)
    for _ in range(4):
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    continued = opt.param_groups[0]["lr"]

    w2, opt2, sched2 = build(0.1, 10)  # unchanged config: exactly the lr of the uninterrupted run
    rs.load_optimizer_keeping_config(opt2, saved_opt)
    rs.load_scheduler_keeping_config(sched2, saved_sched)
    assert opt2.param_groups[0]["lr"] == continued

    w3, opt3, sched3 = build(0.05, 20, momentum=0.5)  # lr halved, schedule twice as long, other momentum
    rs.load_optimizer_keeping_config(opt3, saved_opt)
    rs.load_scheduler_keeping_config(sched3, saved_sched)
    assert opt3.param_groups[0]["lr"] == pytest.approx(0.05 * (1 - 4 / 20) ** 2)
    assert opt3.param_groups[0]["momentum"] == 0.5
    assert torch.equal(opt3.state[w3]["momentum_buffer"], saved_opt["state"][0]["momentum_buffer"])
    sched3.step()
    assert opt3.param_groups[0]["lr"] == pytest.approx(0.05 * (1 - 5 / 20) ** 2)


def test_longer_num_epoch_trains_the_added_steps(mini_toy, tmp_path):
    """A finished 1-epoch run resumed with num_epoch=2: the old schedule ended at lr 0, so the added steps used to
    change nothing. Now the new schedule applies from the resumed step (logged)."""
    out = tmp_path / "out"
    train.main(tiny_args(mini_toy, out, "num_epoch=1", "val_targets=[]"))
    first = torch.load(out / "model.pt", weights_only=True)
    summary = train.main(tiny_args(mini_toy, out, "num_epoch=2", "val_targets=[]"))
    second = torch.load(out / "model.pt", weights_only=True)
    assert summary["steps"] == 12
    weights = [k for k in first if "running_" not in k and "num_batches" not in k]  # buffers move at lr 0 too
    assert any(not torch.equal(first[k], second[k]) for k in weights)
    assert "resume from step 6: config changed, the new values apply from here on: num_epoch 1 -> 2" in \
        (out / "train.log").read_text()


# ---- damaged newest checkpoint ----

def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    for step in (10, 20, 30):
        save(tmp_path, step, value=step)
    newest = run_folder.rank_file(run_folder.step_dir(tmp_path, 30), 0)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated (size differs from COMPLETE)
    middle = run_folder.rank_file(run_folder.step_dir(tmp_path, 20), 0)
    middle.write_bytes(b"\0" * middle.stat().st_size)  # same size, unreadable: found only by loading
    marker = run_folder.step_dir(tmp_path, 20) / run_folder.COMPLETE
    meta = json.loads(marker.read_text())
    del meta["sha256"]  # a marker of an older version: sizes only
    marker.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        resumed = rs.resume(tmp_path, "auto", SINGLE, "test", {})
    assert resumed.step == 10 and float(resumed.state["w"][0]) == 10
    assert "step_00000030 is damaged (rank_0.pt has 100 bytes" in caplog.text
    assert "step_00000020 could not be loaded" in caplog.text
    # the damaged steps are moved aside: kept for inspection, never resumed, never counted by pruning
    assert sorted(d.name for d in run_folder.checkpoint_root(tmp_path).iterdir()) == [
        "step_00000010", "step_00000020.damaged", "step_00000030.damaged"]
    run_folder.rank_file(run_folder.step_dir(tmp_path, 10), 0).unlink()
    for policy in (True, "auto"):  # never a silent restart at step 0 next to another run's checkpoints
        with pytest.raises(CheckpointError, match="none is complete and intact.*step 10: rank_0.pt is missing"):
            rs.resume(tmp_path, policy, SINGLE, "test", {})


def test_train_resumes_from_the_newest_intact_checkpoint(mini_toy, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_args(mini_toy, out, "max_steps=3", "save_every=2", "keep_checkpoints=3", "val_targets=[]"))
    rank0 = run_folder.rank_file(run_folder.step_dir(out, 3), 0)
    rank0.write_bytes(rank0.read_bytes()[: rank0.stat().st_size // 2])  # a copy cut short
    summary = train.main(tiny_args(mini_toy, out, "max_steps=4", "val_targets=[]"))
    assert summary["steps"] == 4
    log = (out / "train.log").read_text()
    assert "step_00000003 is damaged" in log and "resumed from" in log and "step_00000002 at step 2" in log


# ---- disk full ----

def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 10, value=1.0)
    real_write = os.write

    def full(fd, data):
        if "step_00000020" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(CheckpointError, match=r"step_00000020/rank_0\.pt: no space left"):
        save(tmp_path, 20, value=2.0)
    monkeypatch.undo()
    assert [s for s, _, _ in run_folder.complete_checkpoints(tmp_path)] == [10]
    assert float(rs.resume(tmp_path, True, SINGLE, "test", {}).state["w"][0]) == 1.0


# ---- one job per output folder ----

@pytest.mark.slow
def test_second_job_in_the_same_output_fails_at_once(mini_toy, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from utils.run.output_lock import lock_output; "
                               f"lock = lock_output({str(out)!r}); print('locked', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.time()
        with pytest.raises(RuntimeError, match=rf"output folder {out} is in use by another run \(pid {holder.pid}"):
            train.main(tiny_args(mini_toy, out, "max_steps=1"))
        assert time.time() - start < 30
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train.main(tiny_args(mini_toy, out, "max_steps=1", "val_targets=[]"))["steps"] == 1  # freed on exit


# ---- RNG state ----

def test_rng_state_roundtrip_through_weights_only(tmp_path):
    from utils.checkpoint import atomic_save, safe_load

    g = torch.Generator().manual_seed(5)
    state = rng_state.capture_rng_state({"g": g})
    atomic_save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    rng_state.restore_rng_state(safe_load(tmp_path / "rng.pt"), {"g": g})
    got = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and expected[2] == got[2]
    assert torch.equal(expected[3], got[3])


# ---- two real gloo ranks, each with its own output folder (two nodes without a shared filesystem) ----

WORKER = textwrap.dedent("""
    import errno, json, os, sys, traceback
    import torch, torch.distributed as dist
    from configs.loader import resume_policy
    from utils.run import output_lock, run_folder, run_state as rs
    from utils.distributed import DistEnv, Ranks

    REC = resume_policy("recognition")
    rank, folder, result_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ranks = Ranks.from_env(DistEnv(rank, 0, 2, torch.device("cpu"), "gloo"))  # local rank 0: own node
    results = {}

    def scenario(name, fn):
        try:
            results[name] = {"ok": fn()}
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}

    def save(out, step, value=0.0, keep=5):
        state = {"w": torch.full((64,), float(value))}
        return str(rs.save_run_checkpoint(out, step, state, ranks, keep, "recognition", {"batch_size": 8}))

    def markers(out):
        return [s for s, _, _ in run_folder.complete_checkpoints(out)]

    def resumed_step(out):
        found = rs.resume(out, "auto", ranks, "recognition", {"batch_size": 8}, rules=REC)
        return None if found is None else [found.step, float(found.state["w"][0])]

    # markers and pruning in every node's folder
    agree = os.path.join(folder, "agree")
    scenario("markers", lambda: [save(agree, s, s, keep=2) for s in (10, 20, 30)] and markers(agree))
    # node 1 lost step 30's COMPLETE (crash between files and marker): both ranks resume from 20
    if rank == 1:
        os.remove(os.path.join(agree, "checkpoints", "step_00000030", "COMPLETE"))
    scenario("agreed_step", lambda: resumed_step(agree))

    # rank 1's newest file truncated, its next one unreadable at full size: both fall back to 10
    damaged = os.path.join(folder, "damaged")
    for s in (10, 20, 30):
        save(damaged, s, s)
    if rank == 1:
        f = run_folder.rank_file(run_folder.step_dir(damaged, 30), 1)
        f.write_bytes(f.read_bytes()[:50])
        g = run_folder.rank_file(run_folder.step_dir(damaged, 20), 1)
        g.write_bytes(b"\\0" * g.stat().st_size)
    scenario("fallback", lambda: resumed_step(damaged))

    # disk full on rank 1 only: every rank raises, no marker anywhere, the previous checkpoint stays newest
    full = os.path.join(folder, "full")
    save(full, 10, 1)
    real_write = os.write
    def write(fd, data):
        if rank == 1 and "step_00000020" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    os.write = write
    scenario("disk_full", lambda: save(full, 20, 2))
    os.write = real_write
    scenario("after_full", lambda: markers(full))

    # non-finite final state on rank 1 only: both ranks refuse
    scenario("nonfinite", lambda: rs.require_finite({"w": torch.tensor([float("nan") if rank else 0.0])}, 7,
                                                    ranks, agree))
    # another job holds rank 0's folder: both ranks stop at once
    scenario("lock", lambda: output_lock.lock_output(os.path.join(folder, "locked"), ranks) and "locked")
    # a changed batch size is refused on both ranks
    scenario("config", lambda: rs.resume(agree, "auto", ranks, "recognition", {"batch_size": 16}, rules=REC)
             and "resumed")
    with open(result_file, "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Run WORKER on 2 gloo ranks, each with LOCAL_RANK 0 and its own folder; return (folders, results)."""
    root = tmp_path_factory.mktemp("two_nodes")
    folders = [root / "node0", root / "node1"]
    (folders[0] / "locked").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from utils.run.output_lock import lock_output; import time; "
                               f"l = lock_output({str(folders[0] / 'locked')!r}); print('locked', flush=True); "
                               f"time.sleep(300)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    try:
        procs = start_ranks([[sys.executable, "-c", WORKER, str(r), str(folders[r]), str(root / f"{r}.json")]
                             for r in range(2)])
        outputs = [p.communicate(timeout=headroom(300))[0] for p in procs]
    finally:
        holder.kill()
        holder.wait()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    return folders, [json.loads((root / f"{r}.json").read_text()) for r in range(2)], outputs


@pytest.mark.slow
def test_two_nodes_each_folder_gets_markers_and_pruning(two_nodes):
    folders, results, _ = two_nodes
    assert [r["markers"] for r in results] == [{"ok": [20, 30]}] * 2


@pytest.mark.slow
def test_two_nodes_agree_on_the_resume_step(two_nodes):
    _, results, outputs = two_nodes
    assert [r["agreed_step"] for r in results] == [{"ok": [20, 20.0]}] * 2
    assert [r["fallback"] for r in results] == [{"ok": [10, 10.0]}] * 2
    assert "step_00000030 is damaged (rank_1.pt has 50 bytes" in outputs[1]
    assert "step_00000020 is damaged (rank_1.pt does not match the SHA-256" in outputs[1]
    assert "step(s) [30] are intact here but not on every rank" in outputs[0]


@pytest.mark.slow
def test_two_nodes_disk_full_on_one_rank_fails_every_rank(two_nodes):
    _, results, _ = two_nodes
    assert "rank_1.pt: no space left" in results[1]["disk_full"]["error"]
    assert "rank(s) [1] could not write" in results[0]["disk_full"]["error"]
    assert [r["after_full"] for r in results] == [{"ok": [10]}] * 2


@pytest.mark.slow
def test_two_nodes_refuse_together(two_nodes):
    _, results, _ = two_nodes
    for r in results:
        assert "NonFiniteStateError: step 7" in r["nonfinite"]["error"] and "rank 1: w" in r["nonfinite"]["error"]
        assert "is in use by another run" in r["lock"]["error"]
        assert "batch_size: 8 -> 16" in r["config"]["error"]
    assert "node0/locked is in use by another run (pid" in results[0]["lock"]["error"]  # rank 0 names the holder


# ---- the run folder never lies: pruning, unreadable markers, drift rules ----

def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step, keep=2)
    save(tmp_path, 5, keep=2)  # e.g. a run that went back: the newest numbers must not push out what it wrote
    assert [s for s, _, _ in run_folder.complete_checkpoints(tmp_path)] == [5, 20, 30]


def test_unreadable_markers_warn_fall_back_and_do_not_count_towards_keep(tmp_path, caplog):
    for step in (10, 20, 30):
        save(tmp_path, step, value=step)
    (run_folder.step_dir(tmp_path, 30) / run_folder.COMPLETE).write_text("[1, 2]")
    (run_folder.step_dir(tmp_path, 20) / run_folder.COMPLETE).write_text('{"step": 2')
    with caplog.at_level(logging.WARNING):
        resumed = rs.resume(tmp_path, "auto", SINGLE, "test", {})
    assert resumed.step == 10
    assert "COMPLETE holds a list, not a JSON object): falling back to" in caplog.text
    assert "COMPLETE is not readable JSON (JSONDecodeError)): falling back to" in caplog.text
    save(tmp_path, 40, value=40, keep=2)  # the damaged newer steps were set aside: step 10 is still kept
    assert [s for s, _, _ in run_folder.complete_checkpoints(tmp_path)] == [10, 40]


def test_every_config_key_has_exactly_one_resume_rule_in_each_stage():
    """Derived from base.py's rows (one resume rule each): the other stage's keys are free, derived keys named."""
    from configs.loader import base_config

    keys = set(base_config()) | {"config_name", "world_size", "num_classes", "num_image"}
    for policy in (REC, STAGE1):
        groups = [set(policy.refuse), set(policy.apply), set(policy.free)]
        assert keys - set.union(*groups) == set(), policy.kind
        assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1:]), policy.kind
        assert set(policy.inert) < set(policy.free) and {"output", "frequent"} <= set(policy.inert)
    assert "world_size" in STAGE1.refuse and "world_size" in REC.free  # stage 2 re-shards onto another world size
    assert "gen_dim" in REC.free and "lr" in STAGE1.free  # the other stage's keys: no word


def test_stage1_refusals_name_the_stage1_way_forward(tmp_path):
    with pytest.raises(CheckpointError, match=r"gen_dim: 64 -> 32\).*init_generator=.*rank_0.pt"):
        config_policy.check_config({"gen_dim": 64, "seed": 1}, {"gen_dim": 32, "seed": 1}, tmp_path, STAGE1)
    changes = config_policy.check_config({"lambda_rec": 1.0, "frequent": 10}, {"lambda_rec": 10.0, "frequent": 1}, tmp_path,
                              STAGE1)
    assert changes == [("lambda_rec", 1.0, 10.0)]  # applied and listed; monitoring keys change freely


def test_a_stage1_run_saved_before_lambda_mode_seeking_was_renamed_resumes_under_the_new_name(tmp_path):
    """Runs saved `lambda_diversity` (configs.loader refuses the old name now): compared as lambda_mode_seeking."""
    old = {"gen_dim": 4, "lambda_diversity": 0.5, "frequent": 10}
    assert STAGE1.renamed == {"lambda_diversity": "lambda_mode_seeking"}  # from the row's renamed_from
    assert config_policy.check_config(old, {"gen_dim": 4, "lambda_mode_seeking": 0.5, "frequent": 10}, tmp_path,
                                      STAGE1) == []
    assert config_policy.check_config(old, {"gen_dim": 4, "lambda_mode_seeking": 0.1}, tmp_path,
                                      STAGE1) == [("lambda_mode_seeking", 0.5, 0.1)]  # applied, listed
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 6, "config": old}))
    assert config_policy.finished_summary(tmp_path, {"gen_dim": 4, "lambda_mode_seeking": 0.5, "frequent": 10},
                                          STAGE1)


def test_a_stale_lock_is_taken_over_at_once_and_a_busy_folder_is_a_user_error(tmp_path):
    from utils.cli import is_user_error

    out = tmp_path / "run"
    out.mkdir()
    (out / output_lock.LOCK_NAME).write_text("pid 999999 on a-host-that-died since 2026-01-01 00:00:00\n")  # no flock held
    start = time.time()
    lock = output_lock.lock_output(out)
    assert time.time() - start < 1 and f"pid {os.getpid()}" in (out / output_lock.LOCK_NAME).read_text()
    assert is_user_error(output_lock.OutputBusyError("busy"))  # a second job: one `error:` line, exit 2
    lock.release()


def test_the_generator_shape_keys_are_all_refused_on_a_stage1_resume():
    from cfsm.loading import GENERATOR_CONFIG_KEYS

    assert set(GENERATOR_CONFIG_KEYS.values()) <= set(STAGE1.refuse)
