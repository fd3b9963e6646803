"""utils/run/scaffold.py, the run scaffold both trainers share: step counts, batch grouping, resume positions, the guard."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.loader import ConfigError, base_config, resume_policy
from utils.distributed import DistEnv
from utils.run.scaffold import Run, plan_steps
from tests.helpers import headroom, launch_env

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
    return Run(cfg, DistEnv(0, 0, 1, torch.device("cpu"), None), resume_policy("recognition"),
               log_name="test_run", tensorboard_prefix="test")


def test_plan_counts_and_refuses_too_little_data(tmp_path):
    plan = plan_steps(batches_per_epoch=7, micro_per_step=2, num_epoch=3, warmup_epoch=1, max_steps=0, where="x")
    assert (plan.total_steps, plan.warmup_steps, plan.stop_step) == (10, 3, 10)
    assert plan_steps(7, 2, 3, 1, max_steps=4, where="x").stop_step == 4
    assert plan.epoch_of(4) == 1  # 8 micro-batches of 7 per epoch
    with make_run(tmp_path) as run:  # the run's epochs of data (what the summary and the resume check read)
        run.plan = plan
        assert run.epochs_done(7) == 2.0 and run.epochs_done(4) == 8 / 7  # 14 micro-batches of 7 per epoch
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
    assert "step 1: non-finite loss D nan, loss G 1.5: update skipped (1 in a row, 1 in all)" in caplog.text


@pytest.mark.parametrize("command", [["train_generator.py"], ["-m", "train_generator"]])
def test_stage1_trainer_runs_as_path_and_module_from_anywhere(tmp_path, command):
    """No PYTHONPATH, no sys.path rewrite: the script path works from another folder, -m from the repo root."""
    target = [str(REPO / command[0])] if command[0].endswith(".py") else command
    proc = subprocess.run([sys.executable, *target, "--help"], cwd=tmp_path if len(command) == 1 else REPO,
                          capture_output=True, text=True, timeout=headroom(120),
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


# ---- the run folder never lies (a damaged, mixed, re-run or all-skipped run never ends "done" with exit 0) ----

def _tiny(rec, out, *extra):
    from tests.helpers import tiny_args

    return tiny_args(rec, out, *extra)


def _files(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_a_checkpoint_damaged_at_unchanged_size_falls_back_to_the_newest_intact_step(mini_toy, tmp_path):
    import train

    out = tmp_path / "run"
    train.main(_tiny(mini_toy, out, "max_steps=4", "save_every=2"))
    newest = out / "checkpoints" / "step_00000004" / "rank_0.pt"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(255 - b for b in data[middle:middle + 4])  # 4 bytes flipped, size unchanged
    newest.write_bytes(bytes(data))
    summary = train.main(_tiny(mini_toy, out, "max_steps=6", "save_every=2"))
    log = (out / "train.log").read_text()
    assert "step_00000004 is damaged (rank_0.pt does not match the SHA-256" in log
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in log
    assert summary["steps"] == 6 and (out / "checkpoints" / "step_00000004.damaged").is_dir()


def test_a_new_run_never_starts_in_a_folder_that_holds_another(mini_toy, tmp_path):
    import train

    out = tmp_path / "run"
    train.main(_tiny(mini_toy, out, "max_steps=6", "save_every=3"))
    before = _files(out)
    with pytest.raises(ConfigError, match=r"already holds a run \(rank 0: 2 checkpoint folder\(s\) up to "
                                          r"step_00000006, summary.json, model.pt\); resume=False would mix"):
        train.main(_tiny(mini_toy, out, "resume=False", "max_steps=2", "save_every=1"))
    assert _files(out) == before
    (out / "checkpoints").rename(tmp_path / "elsewhere")  # results without checkpoints: step 0 would mix too
    with pytest.raises(ConfigError, match=r"already holds a run \(rank 0: summary.json, model.pt\); starting at "
                                          r"step 0 would mix"):
        train.main(_tiny(mini_toy, out, "max_steps=2"))


def test_rerunning_a_finished_command_touches_nothing_and_a_lowered_stop_is_refused(mini_toy, tmp_path):
    import train
    from utils.checkpoint import CheckpointError

    out = tmp_path / "run"
    args = _tiny(mini_toy, out, "max_steps=3")
    train.main(args)
    before = _files(out)
    again = train.main(args)
    assert _files(out) == before  # train.log, summary.json, model.pt, checkpoints, TensorBoard: untouched
    assert again == json.loads((out / "summary.json").read_text()) and again["steps"] == 3
    with pytest.raises(CheckpointError, match=r"is at step 3, past this run's stop step 2 \(max_steps=2"):
        train.main(_tiny(mini_toy, out, "max_steps=2"))
    assert "error: checkpoint" in (out / "train.log").read_text()  # a failure after the folder opened is logged


@pytest.mark.parametrize("lowered, refusal", [
    ("max_steps=6", "is at step 12, past this run's stop step 6 (max_steps=6, num_epoch=2)"),
    ("num_epoch=1", "is at step 12, 2 epochs into the data, past this run's num_epoch=1: raise num_epoch to 2 or "
                    "more to continue that run"),
])
def test_a_refused_rerun_prints_the_refusal_only_and_writes_nothing(mini_toy, tmp_path, lowered, refusal):
    """A finished 2-epoch run, re-run with a lowered stop and a changed lr: one error line, no warning first that
    changed values "apply from here on", and model.pt / summary.json as they were (a lowered num_epoch was finished
    again as "epochs 2.0 of a 1-epoch schedule", exit 0)."""
    import train

    out = tmp_path / "run"
    train.main(_tiny(mini_toy, out, "val_targets=[]"))
    kept = {name: (out / name).read_bytes() for name in ("model.pt", "summary.json")}
    proc = subprocess.run([sys.executable, "train.py", *_tiny(mini_toy, out, "val_targets=[]", "lr=0.05", lowered)],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=headroom(120))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "apply from here on" not in proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: checkpoint {out / 'checkpoints' / 'step_00000012'} {refusal}"), line
    assert {name: (out / name).read_bytes() for name in kept} == kept


def test_a_run_whose_updates_were_mostly_skipped_fails_without_a_model(mini_toy, tmp_path):
    from backbones import get_model

    model = get_model("r_tiny", num_features=32)
    state = model.state_dict()
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], 3.0e38)  # finite, overflows every forward
    weights = tmp_path / "huge.pt"
    torch.save(state, weights)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", *_tiny(mini_toy, out, "max_steps=3",
                                                             f"pretrained_backbone_model={weights}")],
                          cwd=REPO, capture_output=True, text=True, timeout=headroom(300))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 3 of 3 updates were skipped as non-finite")
    assert "Traceback" not in proc.stderr and not (out / "model.pt").exists()
    assert "update skipped (3 in a row, 3 in all)" in (out / "train.log").read_text()


@pytest.mark.slow
def test_ctrl_c_is_one_line_naming_the_step_checkpoint_and_command(mini_toy, tmp_path):
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *_tiny(mini_toy, out, "save_every=2", "max_steps=1000",
                                                               "num_epoch=200")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job inherits SIGINT ignored (and Python then keeps it so): a
                            # suite started with `&` would see the run finish with 0; Ctrl-C reaches a foreground one
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if "step 5/" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=headroom(120))
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    log = (out / "train.log").read_text()
    assert "interrupted at step" in log and "newest checkpoint: " + str(out / "checkpoints" / "step_0000000") in log
    assert "continue with the same command (it resumes from there): python train.py configs/toy" in log


def test_a_failed_start_names_every_missing_input_and_leaves_no_folder(tmp_path):
    import train

    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"missing input\(s\): pretrained_synthesis_model='.*nogen.pth', "
                                                r"rec='.*nodata': no such file or folder.*rec: the folder holding"):
        train.main(["configs/toy", f"rec={tmp_path / 'nodata'}", "generate_toy_data=False", f"output={out}",
                    "rs_ratio=0.5", f"pretrained_synthesis_model={tmp_path / 'nogen.pth'}"])
    assert not out.exists()


def test_toy_configs_never_write_into_a_users_data_folder(tmp_path):
    import train
    from utils.data.toyface import ToyDataError

    pack = tmp_path / "mypack"
    pack.mkdir()
    (pack / "train.rec").write_bytes(b"the user's data")
    with pytest.raises(ToyDataError, match=r"holds files that are not a toy data set \(train.rec; no toy_meta.json\)"
                                           r".*generate_toy_data=False"):
        train.main(["configs/toy", f"rec={pack}", f"output={tmp_path / 'out'}"])
    assert [p.name for p in pack.iterdir()] == ["train.rec"] and not (tmp_path / "out").exists()


def test_resume_drift_refuses_the_seed_and_lists_applied_keys_in_one_line(mini_toy, tmp_path):
    import train
    from utils.checkpoint import CheckpointError

    out = tmp_path / "run"
    train.main(_tiny(mini_toy, out, "max_steps=2"))
    with pytest.raises(CheckpointError, match=r"seed: 2048 -> 7\)"):
        train.main(_tiny(mini_toy, out, "max_steps=3", "seed=7"))
    train.main(_tiny(mini_toy, out, "max_steps=3", "s=16.0", "clip_grad_norm=1.0", "dropout=0.1",
                     "degrade_blur_prob=0.5"))
    lines = [l for l in (out / "train.log").read_text().splitlines() if "apply from here on" in l]
    assert len(lines) == 1 and lines[0].endswith(
        "resume from step 2: config changed, the new values apply from here on: dropout 0.0 -> 0.1, s 32.0 -> 16.0, "
        "clip_grad_norm 5.0 -> 1.0, degrade_blur_prob 0.0 -> 0.5")


RUN_WORKER = """
import json, sys
import torch, torch.distributed as dist
from configs.loader import base_config, resume_policy
from utils.distributed import DistEnv
from utils.run.scaffold import Run

rank, root = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", rank=rank, world_size=2)
env = DistEnv(rank, 0, 2, torch.device("cpu"), "gloo")  # local rank 0 on both: a folder (disk) per node
results = {}

def cfg_for(name, **keys):
    cfg = base_config()
    cfg.update(config_name="t", output=f"{root}/{name}/node{rank}", **keys)
    return cfg

def scenario(name, fn):
    try:
        results[name] = {"ok": fn()}
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}

def start(cfg):
    with Run(cfg, env, resume_policy("recognition"), log_name=f"t{rank}", tensorboard_prefix="t") as run:
        return None if run.finished is None else run.finished["steps"]

scenario("mixing", lambda: start(cfg_for("mixing", resume=False)))
done = cfg_for("finished")
if rank == 0:  # only node 0 holds the finished run's summary
    import os
    os.makedirs(done.output, exist_ok=True)
    with open(f"{done.output}/summary.json", "w") as f:
        json.dump({"config": {**done, "output": "moved"}, "steps": 7}, f)
scenario("finished", lambda: start(done))

def inputs():
    with Run(cfg_for("inputs"), env, resume_policy("recognition"), log_name=f"t{rank}",
             tensorboard_prefix="t") as run:
        run.require_inputs({"pretrained_backbone_model": f"{root}/weights{rank}.pt"})  # only weights0.pt exists
scenario("inputs", inputs)
with open(f"{root}/{rank}.json", "w") as f:
    json.dump(results, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_whose_folders_differ_agree_on_the_folder_rules(tmp_path):
    """A branch one rank's disk decides (another run there, a finished summary, a missing input) is taken by both."""
    from tests.helpers import start_ranks

    (tmp_path / "mixing" / "node1" / "checkpoints" / "step_00000003").mkdir(parents=True)  # node 1 only
    (tmp_path / "weights0.pt").write_bytes(b"rank 0's disk only")
    procs = start_ranks([[sys.executable, "-c", RUN_WORKER, str(r), str(tmp_path)] for r in range(2)])
    outputs = [p.communicate(timeout=headroom(240))[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert "already holds a run (rank 1: 1 checkpoint folder(s) up to step_00000003)" in r["mixing"]["error"]
        assert r["finished"] == {"ok": 7}
        assert f"missing input(s): pretrained_backbone_model='{tmp_path}/weights1.pt' (rank 1):" in r["inputs"]["error"]
    assert not (tmp_path / "mixing" / "node0").exists()  # refused before anything was written
