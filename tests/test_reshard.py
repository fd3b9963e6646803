"""utils/run/reshard.py: Partial FC class centres and their optimizer state re-partitioned for another world size, in
memory and from a checkpoint folder (resume on another number of ranks)."""
from __future__ import annotations

import logging

import pytest
import torch

from losses import CombinedMarginLoss
from partial_fc import PartialFC
from utils.run import rng_state, run_folder, run_state
from utils.checkpoint import CheckpointError, atomic_save
from utils.distributed import Ranks, shard_range
from utils.optim import PolyScheduler, build_optimizer
from utils.run.reshard import ReshardError, load_resharded, merged_class_centres, needed_old_ranks, reshard_states
from configs.loader import resume_policy
from tests.helpers import headroom

REC, STAGE1 = resume_policy("recognition"), resume_policy("cfsm_stage1")

C, D = 11, 6  # 11 classes do not split evenly over 2, 3 or 4 ranks


def _shard(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s rows of a full [C, D] matrix under the class split."""
    start, n = shard_range(full.shape[0], rank, world)
    return full[start:start + n].clone()


def rank_states(world: int, optimizer: str = "sgd", step: int = 5, seed: int = 0) -> tuple[dict, torch.Tensor, dict]:
    """The files a `world`-rank train.py run would write after `step` optimizer steps: one full class-centre matrix
    split by rank, the backbone and its optimizer state identical on every rank (DDP), per-rank RNG streams.
    Returns (states by rank, full centres, full optimizer state tensors of the centres by key)."""
    torch.manual_seed(seed)
    full = torch.randn(C, D)
    backbone = torch.nn.Linear(4, D)
    grads_b = [torch.randn_like(p) for p in backbone.parameters()]
    full_grads = [torch.randn(C, D) for _ in range(2)]
    states, opt_full = {}, {}
    for r in range(world):
        torch.manual_seed(seed)
        bb = torch.nn.Linear(4, D)
        pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, rank=r, world_size=world, seed=7)
        with torch.no_grad():
            pfc.weight.copy_(_shard(full, r, world))
        pfc.sample_step = step
        cfg = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
        opt = build_optimizer(optimizer, [{"params": bb.parameters()}, {"params": pfc.parameters()}], cfg)
        sched = PolyScheduler(opt, 20, 2)
        for g in full_grads:  # two real optimizer steps: momentum / moments are functions of the rows' gradients
            for p, gb in zip(bb.parameters(), grads_b):
                p.grad = gb.clone()
            pfc.weight.grad = _shard(g, r, world)
            opt.step()
            sched.step()
        style = torch.Generator().manual_seed(1000 + r)
        torch.rand(3, generator=style)
        torch.manual_seed(100 + r)
        states[r] = {"backbone": bb.state_dict(), "partial_fc": pfc.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "scaler": {}, "step": step,
                     "rng": rng_state.capture_rng_state({"style": style}),
                     "data_position": {"epoch": 1, "consumed": 40, "world_size": world, "batch_size": 4}}
    # the full optimizer state of the centres, from a 1-rank run of the same steps
    pfc1 = torch.nn.Parameter(full.clone())
    bb1 = torch.nn.Linear(4, D)
    cfg = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    opt1 = build_optimizer(optimizer, [{"params": bb1.parameters()}, {"params": [pfc1]}], cfg)
    sched1 = PolyScheduler(opt1, 20, 2)
    for g in full_grads:
        for p in bb1.parameters():
            p.grad = torch.zeros_like(p)
        pfc1.grad = g.clone()
        opt1.step()
        sched1.step()
    slot = opt1.state_dict()["param_groups"][-1]["params"][0]
    opt_full = {k: v for k, v in opt1.state_dict()["state"][slot].items() if torch.is_tensor(v) and v.dim() == 2}
    opt_full["weight"] = pfc1.detach().clone()
    return states, full, opt_full


def nested_equal(a, b, where="") -> None:
    """Bitwise equality of nested dict/list/tuple/tensor states; fails naming the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            nested_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def pfc_slot(state: dict) -> int:
    return state["optimizer"]["param_groups"][-1]["params"][0]


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3), (3, 2), (4, 3), (3, 4), (1, 4), (4, 1)])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_class_centre_and_its_optimizer_state_once_in_the_new_layout(old, new, optimizer):
    states, _, opt_full = rank_states(old, optimizer)
    out = reshard_states(states, old, new)
    assert sorted(out) == list(range(new))
    rows = torch.cat([out[r]["partial_fc"]["weight"] for r in range(new)])
    assert torch.equal(rows, opt_full["weight"])  # every centre exactly once, in class order (= a 1-rank run's)
    keys = {"sgd": ["momentum_buffer"], "adamw": ["exp_avg", "exp_avg_sq"]}[optimizer]
    for key in keys:
        merged = torch.cat([states[r]["optimizer"]["state"][pfc_slot(states[r])][key] for r in range(old)])
        again = torch.cat([out[r]["optimizer"]["state"][pfc_slot(out[r])][key] for r in range(new)])
        assert torch.equal(merged, again), key
    for r in range(new):
        start, n = shard_range(C, r, new)
        extra = out[r]["partial_fc"]["_extra_state"]
        assert (extra["rank"], extra["world_size"], extra["class_start"], extra["num_local"]) == (r, new, start, n)
        assert extra["sample_step"] == 5
        nested_equal(out[r]["backbone"], states[0]["backbone"], "backbone")
        nested_equal(out[r]["scheduler"], states[0]["scheduler"], "scheduler")
        assert out[r]["step"] == 5 and out[r]["data_position"] == states[0]["data_position"]
        for slot, entry in states[0]["optimizer"]["state"].items():  # the backbone's optimizer state carries over
            if slot != pfc_slot(states[0]):
                nested_equal(out[r]["optimizer"]["state"][slot], entry, f"optimizer state {slot}")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resharded_states_load_strictly_and_step_like_the_merged_one_rank_state(optimizer):
    """New ranks' modules and optimizers accept their states, and their next update equals the rows of the update
    a 1-rank run makes from the merged state (and the merged state is that of a 1-rank run of the same steps)."""
    states, full, opt_full = rank_states(3, optimizer)
    out = reshard_states(states, 3, 2)
    merged = reshard_states(out, 2, 1)[0]
    for key, value in opt_full.items():
        got = merged["partial_fc"]["weight"] if key == "weight" else merged["optimizer"]["state"][pfc_slot(merged)][key]
        assert torch.equal(got, value), key
    cfg = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    next_grad = torch.randn(C, D)
    updated = {}
    for world, layout in ((1, {0: merged}), (2, out)):
        for r, state in layout.items():
            pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, rank=r, world_size=world)
            pfc.load_state_dict(state["partial_fc"])  # strict: shard shape and metadata of the new layout
            assert pfc.sample_step == 5
            bb = torch.nn.Linear(4, D)
            bb.load_state_dict(state["backbone"])
            opt = build_optimizer(optimizer, [{"params": bb.parameters()}, {"params": pfc.parameters()}], cfg)
            opt.load_state_dict(state["optimizer"])
            pfc.weight.grad = _shard(next_grad, r, world)
            opt.step()
            updated[world, r] = pfc.weight.detach().clone()
    assert torch.equal(torch.cat([updated[2, 0], updated[2, 1]]), updated[1, 0])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_round_trip_through_one_rank_is_bitwise(world):
    states, _, opt_full = rank_states(world, "adamw")
    one = reshard_states(states, world, 1)
    full = opt_full["weight"]
    assert torch.equal(one[0]["partial_fc"]["weight"], full) and torch.equal(merged_class_centres(states, world), full)
    back = reshard_states(one, 1, world)
    for r in range(world):
        nested_equal(back[r], states[r], f"rank {r}")  # every key, the RNG streams included


def test_round_trip_through_another_world_size_is_bitwise():
    states, _, _ = rank_states(3, "sgd")
    back = reshard_states(reshard_states(states, 3, 2), 2, 3)
    for r in range(3):
        nested_equal(back[r], states[r], f"rank {r}")


def test_new_rng_streams_are_distinct_and_deterministic():
    states, _, _ = rank_states(1)
    a, b = reshard_states(states, 1, 3, seed=3), reshard_states(states, 1, 3, seed=3)
    draws = []
    for r in range(3):
        nested_equal(a[r]["rng"], b[r]["rng"], f"rank {r} rng")
        g = torch.Generator()
        g.set_state(a[r]["rng"]["generators"]["style"])
        draws.append(torch.rand(4, generator=g))
        rng_state.restore_rng_state(a[r]["rng"], {"style": torch.Generator()})  # the format restore expects
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_needed_old_ranks_are_the_overlapping_shards():
    assert needed_old_ranks(11, 4, 0, 1) == [0, 1, 2, 3]
    assert needed_old_ranks(11, 1, 2, 3) == [0]
    assert needed_old_ranks(11, 3, 1, 2) == [1, 2]  # new rank 1 owns classes 6..10: old rank 1 (4..7), 2 (8..10)


def test_bad_inputs_are_named():
    states, _, _ = rank_states(2)
    other = dict(states)
    other[1] = {**states[1], "step": 7}
    with pytest.raises(ReshardError, match=r"different steps.*rank 0 step 5, rank 1 step 7"):
        reshard_states(other, 2, 1)
    with pytest.raises(ReshardError, match=r"old rank\(s\) \[1\]"):
        reshard_states({0: states[0]}, 2, 1)
    with pytest.raises(ReshardError, match=r"rank 2 holds the shard of rank 1 of 2, expected rank 2 of 2"):
        reshard_states({**states, 2: states[1]}, 2, 1)
    with pytest.raises(ReshardError, match="11 classes cannot be shared by 12 ranks"):
        reshard_states(states, 2, 12)
    three, _, _ = rank_states(3)
    with pytest.raises(ReshardError, match="class counts differ|holds the shard"):
        reshard_states({0: states[0], 1: three[1]}, 2, 1)


# ---- from a checkpoint folder, as resume reads it ----

def write_folder(tmp_path, states: dict, world: int, step: int = 5, config: dict | None = None):
    directory = run_folder.step_dir(tmp_path, step)
    sizes = {}
    for r, st in states.items():
        atomic_save(st, run_folder.rank_file(directory, r))
        sizes[str(r)] = run_folder.rank_file(directory, r).stat().st_size
    run_folder.mark_complete(directory, {"step": step, "world_size": world, "kind": "recognition", "finite": True,
                                        "sizes": sizes, "config": {"num_classes": C, "seed": 0, "world_size": world,
                                                                   **(config or {})}})
    return directory


def ranks_of(world: int, rank: int) -> Ranks:
    return Ranks(rank=rank, world_size=world, gather=lambda obj: [obj] * world)


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (3, 2)])
def test_resume_on_another_world_size_reads_the_files_it_needs(tmp_path, old, new):
    states, full, _ = rank_states(old)
    write_folder(tmp_path, states, old)
    expected = reshard_states(states, old, new)
    for r in range(new):
        resumed = run_state.resume(tmp_path, True, ranks_of(new, r), "recognition",
                                   {"num_classes": C, "seed": 0, "world_size": new}, logging.getLogger("t"))
        assert resumed.step == 5
        expected[r].pop("rng_by_rank", None)  # recorded only by a re-shard that read every old rank
        resumed.state.pop("rng_by_rank", None)
        nested_equal(resumed.state, expected[r], f"new rank {r}")


def test_missing_rank_file_is_refused_with_the_way_forward(tmp_path):
    states, _, _ = rank_states(2)
    directory = write_folder(tmp_path, states, 2)
    run_folder.rank_file(directory, 1).unlink()  # e.g. rank 1's node kept it on its own disk
    with pytest.raises(CheckpointError, match=r"rank_1\.pt is missing.*tools\.reshard .*--world-size 1.*or resume "
                                              r"with 2 ranks"):
        run_state.resume(tmp_path, "auto", ranks_of(1, 0), "recognition",
                         {"num_classes": C, "world_size": 1}, rules=REC)
    with pytest.raises(ReshardError, match=r"rank_1\.pt is missing"):
        load_resharded(directory, {"world_size": 2, "config": {"num_classes": C}}, 0, 1)


def test_damaged_old_rank_file_falls_back_to_an_older_checkpoint(tmp_path, caplog):
    states, _, _ = rank_states(2, step=5)
    write_folder(tmp_path, states, 2, step=5)
    newer = write_folder(tmp_path, {r: {**s, "step": 9} for r, s in states.items()}, 2, step=9)
    with open(run_folder.rank_file(newer, 1), "ab") as f:
        f.write(b"x")
    resumed = run_state.resume(tmp_path, True, ranks_of(1, 0), "recognition",
                         {"num_classes": C, "world_size": 1}, rules=REC)
    assert resumed.step == 5 and "rank_1.pt has" in caplog.text


def test_class_count_change_and_other_kinds_still_refuse(tmp_path):
    states, _, _ = rank_states(2)
    write_folder(tmp_path, states, 2)
    with pytest.raises(CheckpointError, match=r"num_classes: 11 -> 12"):
        run_state.resume(tmp_path, True, ranks_of(1, 0), "recognition",
                         {"num_classes": 12, "world_size": 1}, rules=REC)
    marker = run_folder.step_dir(tmp_path, 5) / run_folder.COMPLETE
    marker.write_text(marker.read_text().replace('"recognition"', '"cfsm_stage1"'))
    with pytest.raises(CheckpointError, match=r"written by 2 ranks but this run has 1.*same world size only"):
        run_state.resume(tmp_path, True, ranks_of(1, 0), "cfsm_stage1",
                         {"num_classes": C, "world_size": 1}, rules=STAGE1)


# ---- tools/reshard.py ----

def test_tool_round_trip_through_one_file_is_bitwise(tmp_path, capsys):
    from tools import reshard as tool

    states, _, opt_full = rank_states(3, "adamw")
    src = write_folder(tmp_path / "run", states, 3, config={"batch_size": 4, "num_image": 100})
    one = tool.main([str(src), "--world-size", "1", "--out", str(tmp_path / "one"), "--num-classes", str(C)])
    assert "3 ranks, 11 classes, step 5" in capsys.readouterr().out
    merged = torch.load(one / "rank_0.pt", weights_only=True)
    assert torch.equal(merged["partial_fc"]["weight"], opt_full["weight"])  # the full classifier
    marker = __import__("json").loads((one / "COMPLETE").read_text())
    assert marker["world_size"] == 1 and marker["config"]["world_size"] == 1
    assert marker["resharded_from"]["world_size"] == 3
    assert marker["sizes"] == {"0": (one / "rank_0.pt").stat().st_size}
    back = tool.main([str(one), "--world-size", "3", "--out", str(tmp_path / "back")])
    for r in range(3):
        nested_equal(torch.load(back / f"rank_{r}.pt", weights_only=True), states[r], f"rank {r}")


def test_tool_bad_inputs_are_one_line_errors(tmp_path):
    from tools import reshard as tool
    from utils.cli import UsageError

    states, _, _ = rank_states(2)
    src = write_folder(tmp_path / "run", states, 2)
    with pytest.raises(UsageError, match=r"11 class centres but --num-classes 12: the data does not match"):
        tool.main([str(src), "--world-size", "1", "--out", str(tmp_path / "o1"), "--num-classes", "12"])
    atomic_save({**states[1], "step": 9}, run_folder.rank_file(src, 1))
    with pytest.raises(UsageError, match=r"ranks of different steps \(.*rank_0\.pt step 5, .*rank_1\.pt step 9\)"):
        tool.main([str(src), "--world-size", "1", "--out", str(tmp_path / "o2")])
    with pytest.raises(UsageError, match=r"COMPLETE does not exist"):
        tool.main([str(tmp_path), "--world-size", "1", "--out", str(tmp_path / "o3")])


@pytest.mark.parametrize("as_path", [False, True])
def test_tool_runs_as_module_and_as_path(tmp_path, as_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    states, _, _ = rank_states(2)
    src = write_folder(tmp_path / "run", states, 2)
    entry = [str(repo / "tools" / "reshard.py")] if as_path else ["-m", "tools.reshard"]
    if as_path:  # a good run
        proc = subprocess.run([sys.executable, *entry, str(src), "--world-size", "3", "--out", str(tmp_path / "o")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=headroom(300))
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["COMPLETE", "rank_0.pt", "rank_1.pt",
                                                                      "rank_2.pt"]
    else:  # a missing rank file: one error line naming it, exit 2
        run_folder.rank_file(src, 1).unlink()
        proc = subprocess.run([sys.executable, *entry, str(src), "--world-size", "1", "--out", str(tmp_path / "o")],
                              cwd=repo, capture_output=True, text=True, timeout=headroom(300))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("error: ") and "rank_1.pt missing of the 2 rank files" in proc.stderr
