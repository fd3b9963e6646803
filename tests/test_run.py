"""utils/run.py, the run scaffold both trainers share: step counts, batch grouping, resume positions, the guard."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.config import ConfigError, base_config
from utils.distributed import DistEnv
from utils.run import Run, plan_steps

REPO = Path(__file__).resolve().parents[1]


class FakeSampler:
    """Positions like dataset.FaceSampler: an epoch's batches start at `start_batch`."""

    def __init__(self, batches_per_epoch: int):
        self.batches_per_epoch = batches_per_epoch
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch


class FakeLoader:
    """Yields (epoch, batch index) labels and records every batch it handed out."""

    def __init__(self, batches_per_epoch: int):
        self.sampler = FakeSampler(batches_per_epoch)
        self.read: list[tuple[int, int]] = []

    def __iter__(self):
        for b in range(self.sampler.start_batch, self.sampler.batches_per_epoch):
            self.read.append((self.sampler.epoch, b))
            yield self.sampler.epoch, b


def make_run(tmp_path: Path, **keys) -> Run:
    cfg = base_config()
    cfg.update(output=str(tmp_path / "run"), config_name="test", **keys)
    return Run(cfg, DistEnv(0, 0, 1, torch.device("cpu"), None), kind="recognition", log_name="test_run",
               tensorboard_prefix="test")


def test_plan_counts_and_refuses_too_little_data():
    plan = plan_steps(batches_per_epoch=7, micro_per_step=2, num_epoch=3, warmup_epoch=1, max_steps=0, where="x")
    assert (plan.total_steps, plan.warmup_steps, plan.stop_step) == (10, 3, 10)
    assert plan_steps(7, 2, 3, 1, max_steps=4, where="x").stop_step == 4
    assert plan.epoch_of(4) == 1 and plan.epochs_done(7) == 2.0  # 14 micro-batches of 7 per epoch
    with pytest.raises(ConfigError, match="rec=/data: 1 batches per epoch, fewer than the 2"):
        plan_steps(1, 2, 3, 0, 0, where="rec=/data")


def test_step_batches_group_micro_batches_and_stop_without_reading_ahead(tmp_path):
    with make_run(tmp_path) as run:
        loader = FakeLoader(3)
        run.plan = plan_steps(3, 2, num_epoch=4, warmup_epoch=0, max_steps=5, where="x")
        got = list(run.step_batches(loader, 0))
    # 5 steps of 2 micro-batches cross epoch ends; the epoch reported is the one of the step's last batch
    assert [batch for _, batch in got] == [[(0, 0), (0, 1)], [(0, 2), (1, 0)], [(1, 1), (1, 2)],
                                          [(2, 0), (2, 1)], [(2, 2), (3, 0)]]
    assert [epoch for epoch, _ in got] == [0, 1, 1, 2, 3]
    assert len(loader.read) == 10  # not one batch more than the steps used


def test_step_batches_resumed_read_what_an_uninterrupted_run_reads(tmp_path):
    with make_run(tmp_path) as run:
        run.plan = plan_steps(5, 1, num_epoch=4, warmup_epoch=0, max_steps=0, where="x")
        whole = [b for _, b in run.step_batches(FakeLoader(5), 0)]
        resumed = [b for _, b in run.step_batches(FakeLoader(5), 7)]
        assert list(run.step_batches(FakeLoader(5), 20)) == []  # resumed at the stop step: nothing more to read
    assert len(whole) == 20 and resumed == whole[7:]


def test_guard_warns_then_stops_naming_step_loss_and_checkpoint(tmp_path, caplog):
    with make_run(tmp_path, max_nonfinite_steps=2) as run:
        run.log.propagate = True
        with caplog.at_level(logging.WARNING, logger="test_run"):
            run.check_finite(1, False, {"loss D": torch.tensor(float("nan")), "loss G": 1.5})
            run.check_finite(2, True, {"loss D": 0.1, "loss G": 0.2})  # a finite step resets the count
            run.check_finite(3, False, {"loss D": float("inf"), "loss G": 1.0})
            with pytest.raises(RuntimeError, match=r"2 consecutive non-finite steps .* at step 4, loss nan; "
                                                   r"last good checkpoint: none"):
                run.check_finite(4, False, {"loss D": float("nan"), "loss G": 1.0})
    assert "step 1: non-finite loss D nan, loss G 1.5: update skipped (1 in a row)" in caplog.text


@pytest.mark.parametrize("command", [["train_generator.py"], ["-m", "train_generator"]])
def test_stage1_trainer_runs_as_path_and_module_from_anywhere(tmp_path, command):
    """No PYTHONPATH, no sys.path rewrite: the script path works from another folder, -m from the repo root."""
    target = [str(REPO / command[0])] if command[0].endswith(".py") else command
    proc = subprocess.run([sys.executable, *target, "--help"], cwd=tmp_path if len(command) == 1 else REPO,
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: train_generator.py" in proc.stdout and "configs/cfsm_toy" in proc.stdout


def test_benchmarks_time_the_training_step_itself():
    import train
    from bench import profile_step

    assert profile_step.make_train_step is train.make_train_step
    step = profile_step.build_step("r_tiny", 4, torch.device("cpu"), "none", False, rs_ratio=0.5, k=1, gen_dim=4,
                                   num_classes=8)
    assert all(torch.isfinite(torch.tensor(step(cfsm))) for cfsm in (True, False))
