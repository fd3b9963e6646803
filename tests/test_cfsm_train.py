"""Stage 1 (train_generator.py): objectives, target sampling, a few real steps, checkpoints, exact resume, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cfsm.stage1 import BASIS_COEFFICIENT, BASIS_DIRECTIONS, ExtraTerms, append_basis_probes, \
    basis_distinctness_loss, check_lambda_schedule, identity_loss, is_synthesis_step, lambda_id_at, lr_at, lsgan_loss, \
    mode_seeking_loss, sample_style, target_distance
from cfsm.target_data import TargetBatchSampler, TargetFaceDataset, list_target_images
from tests.helpers import headroom

REPO = Path(__file__).resolve().parents[1]


# ---------------- pure parts ----------------

def test_published_lambda_schedule():
    sched = [(0, 8.0), (5, 5.0), (8, 2.0)]
    assert [lambda_id_at(sched, e) for e in range(20)] == [8.0] * 5 + [5.0] * 3 + [2.0] * 12
    for bad in ([(1, 8.0)], [(0, 8.0), (0, 5.0)], [(0, -1.0)], [], [(0,)]):
        with pytest.raises(ValueError, match="lambda_id_schedule"):
            check_lambda_schedule(bad)


def test_lr_is_constant_then_falls_linearly_over_the_last_share_of_the_run():
    assert [lr_at(s, 400, 1e-3, 0.0) for s in (0, 399)] == [1e-3, 1e-3]  # 0: constant, as CFSM
    lrs = [lr_at(s, 400, 1e-3, 0.25) for s in range(400)]
    assert lrs[:301] == [1e-3] * 301  # the first 75 % at the base lr
    assert lrs[350] == pytest.approx(0.5e-3) and lrs[399] == pytest.approx(1e-3 / 100)
    assert all(b < a for a, b in zip(lrs[300:], lrs[301:]))  # then strictly down towards 0 at the stop step


def test_target_distance_and_losses():
    o = torch.zeros(3, 10)
    o[1, 0], o[2, :] = 6.0, 3.0 / np.sqrt(10)
    d = target_distance(o, (0.0, 6.0, 0.05, 0.65))
    assert torch.allclose(d, torch.tensor([0.05, 0.65, 0.35]), atol=1e-6)
    e = torch.randn(3, 8)
    # identical embeddings: distance 0, loss = mean(d*^2)
    assert identity_loss(e, e, d).item() == pytest.approx((d ** 2).mean().item(), rel=1e-5)
    assert identity_loss(e, -e, torch.full((3,), 2.0)).item() == pytest.approx(0.0, abs=1e-6)
    outs = [torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 2, 2)]
    assert lsgan_loss(outs, 1.0).item() == pytest.approx(1.0)
    assert lsgan_loss(outs, 0.0).item() == pytest.approx(1.0)
    assert [is_synthesis_step(s) for s in range(4)] == [True, False, True, False]


def test_mode_seeking_loss_rewards_styles_that_change_the_image():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    sa, sb = torch.zeros(2, 10), torch.ones(2, 10)
    # image change 0.5 per unit of style change 1 -> 1 / 0.5
    assert mode_seeking_loss(a, b, sa, sb).item() == pytest.approx(2.0, rel=1e-3)
    # a collapsed generator (same image for both styles) is penalised heavily; a bigger change costs less
    assert mode_seeking_loss(a, a, sa, sb).item() > 1e4
    assert mode_seeking_loss(a, 2 * b, sa, sb) < mode_seeking_loss(a, b, sa, sb)
    fa = a.clone().requires_grad_(True)
    mode_seeking_loss(fa, b, sa, sb).backward()
    assert (fa.grad > 0).all()  # lowering the loss pushes G(x, a) away from G(x, b)


def test_basis_probes_are_the_first_face_at_zero_and_at_c_times_basis_vectors():
    sources, style = torch.randn(6, 3, 4, 4), torch.randn(6, 10)
    rng = torch.Generator().manual_seed(0)
    probed, probe_style = append_basis_probes(sources, style, rng)
    assert probed.shape[0] == probe_style.shape[0] == 6 + 1 + BASIS_DIRECTIONS
    assert torch.equal(probed[:6], sources) and torch.equal(probe_style[:6], style)  # the batch is untouched
    assert all(torch.equal(face, sources[0]) for face in probed[6:])
    probes = probe_style[6:]
    assert torch.equal(probes[0], torch.zeros(10))  # o = 0, then c e_i for distinct i
    assert torch.equal(probes[1:].abs().sum(dim=1), torch.full((BASIS_DIRECTIONS,), BASIS_COEFFICIENT))
    chosen = probes[1:].argmax(dim=1)
    assert len(set(chosen.tolist())) == BASIS_DIRECTIONS
    # the report measures directions at the same c
    from cfsm.style_report import style_report
    import inspect
    assert inspect.signature(style_report).parameters["coefficient"].default == BASIS_COEFFICIENT


def test_basis_distinctness_loss_is_zero_for_distinct_changes_and_largest_for_a_collapsed_basis():
    base = torch.randn(1, 3, 4, 4)
    orthogonal = torch.zeros(3, 3, 4, 4)
    for i in range(3):
        orthogonal.view(3, -1)[i, i] = 2.0 + i  # disjoint pixels: orthogonal whatever the sizes
    assert basis_distinctness_loss(torch.cat([base, base + orthogonal]), 0.5).item() == pytest.approx(0.0, abs=1e-6)
    change = torch.randn(1, 3, 4, 4)
    collapsed = torch.cat([base, base + change, base + 3 * change, base - change])  # one look, any sign or size
    assert basis_distinctness_loss(collapsed, 0.5).item() == pytest.approx(1.0 - 0.5 ** 2, abs=1e-5)
    assert basis_distinctness_loss(collapsed, 0.8).item() == pytest.approx(1.0 - 0.8 ** 2, abs=1e-5)
    # a floor, not a maximum: two changes with |cos| below the margin cost nothing
    u, v = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    u.view(-1)[0], v.view(-1)[0], v.view(-1)[1] = 1.0, 0.4, (1 - 0.4 ** 2) ** 0.5  # cos(u, v) = 0.4
    assert basis_distinctness_loss(torch.cat([base, base + u, base + v]), 0.5).item() == 0.0
    assert basis_distinctness_loss(torch.cat([base, base + u, base + v]), margin=0.3).item() == pytest.approx(
        0.4 ** 2 - 0.3 ** 2, abs=1e-6)
    # scale-free: shrinking every change leaves it unchanged, so it cannot be met by changing less
    mixed = torch.cat([base, base + change + 0.5 * torch.randn(3, 3, 4, 4)])  # alike, not identical
    assert basis_distinctness_loss(mixed, 0.5).item() > 0.05
    scaled = torch.cat([base, base + 0.01 * (mixed[1:] - base)])
    assert basis_distinctness_loss(scaled, 0.5).item() == pytest.approx(
        basis_distinctness_loss(mixed, 0.5).item(), rel=1e-4)
    assert basis_distinctness_loss(collapsed[:2], 0.5).item() == 0.0  # one direction: no pair
    leaf = collapsed.clone().requires_grad_(True)
    basis_distinctness_loss(leaf, 0.5).backward()
    assert leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("rows", [5, 6, 1])
@pytest.mark.parametrize("mode_seeking, basis", [(0.5, 2.0), (0.5, 0.0), (0.0, 2.0), (0.0, 0.0)])
def test_extra_terms_lay_out_the_batch_and_add_their_weighted_terms_as_the_step_did(rows, mode_seeking, basis):
    """ExtraTerms builds the batch and the loss the stage-1 step built inline before the terms moved to cfsm.stage1
    (same RNG draws in the same order, same rows, same sums bit for bit): the reference below is that code."""
    terms = ExtraTerms(mode_seeking, basis, basis_cos_margin=0.1)
    sources = torch.randn(rows, 3, 8, 8, generator=torch.Generator().manual_seed(rows))

    def reference(rng: torch.Generator):
        x, n = sources, sources.shape[0]
        pairs = mode_seeking > 0 and n >= 2
        half = n // 2
        if pairs:
            x = torch.cat([x[:half], x[:half], x[2 * half:]])
        style = sample_style(x.shape[0], 4, rng, "uniform_magnitude", 6.0)
        first_probe = x.shape[0]
        if basis > 0:
            x, style = append_basis_probes(x, style.cpu(), rng)
        fake = torch.tanh(x[:, :, :4, :4] * style[:, :1, None, None])  # any function of both
        loss_g = fake.mean() + 0.25
        if pairs:
            loss_g = loss_g + mode_seeking * mode_seeking_loss(fake[:half], fake[half:2 * half], style[:half],
                                                               style[half:2 * half])
        if basis > 0:
            loss_g = loss_g + basis * basis_distinctness_loss(fake[first_probe:], 0.1)
        return x, style, loss_g

    rng = torch.Generator().manual_seed(7)
    extra = terms.batch(sources, lambda n: sample_style(n, 4, rng, "uniform_magnitude", 6.0), rng)
    ref_sources, ref_style, ref_loss = reference(torch.Generator().manual_seed(7))
    assert torch.equal(extra.sources, ref_sources) and torch.equal(extra.style, ref_style)
    fake = torch.tanh(extra.sources[:, :, :4, :4] * extra.style[:, :1, None, None])
    loss_g, logged = extra.added_to(fake.mean() + 0.25, fake)
    assert torch.equal(loss_g, ref_loss)
    assert list(logged) == [n for n in terms.names if n != "mode_seeking" or rows >= 2]
    assert terms.names == ["mode_seeking"] * (mode_seeking > 0) + ["basis_distinctness"] * (basis > 0)


def test_target_sampler_no_repeats_across_ranks_and_resumable():
    n, batch = 50, 4
    samplers = [TargetBatchSampler(n, batch, rank=r, world_size=3, seed=7) for r in range(3)]
    per_rank = n // 3
    steps = per_rank // batch  # whole batches inside the first target epoch
    seen = []
    for s in samplers:
        s.set_range(0, steps)
        seen += [i for b in s for i, _ in b]
    assert len(seen) == len(set(seen)) == 3 * steps * batch  # no image twice in a target epoch, on any rank
    # the stream is a function of the step: a resumed sampler yields what an uninterrupted one yields
    full = TargetBatchSampler(n, batch, 1, 3, seed=7)
    full.set_range(0, 30)
    resumed = TargetBatchSampler(n, batch, 1, 3, seed=7)
    resumed.set_range(12, 18)
    assert list(full)[12:] == list(resumed)
    # every image of a rank's shard appears once per target epoch, then a new permutation starts
    one = TargetBatchSampler(10, 5, 0, 1, seed=1)
    one.set_range(0, 4)
    batches = [[i for i, _ in b] for b in one]
    assert sorted(batches[0] + batches[1]) == list(range(10)) == sorted(batches[2] + batches[3])
    assert batches[:2] != batches[2:]


def test_target_sampler_with_dataloader_workers(tmp_path):
    import cv2
    from torch.utils.data import DataLoader

    for i in range(12):  # image i has constant value i*10 (odd sizes are resized to 112)
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), np.full((64 if i % 2 else 112,) * 2 + (3,), i * 10, np.uint8))
    ds = TargetFaceDataset(tmp_path)
    sampler = TargetBatchSampler(len(ds), 3, seed=0)
    sampler.set_range(0, 4)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2)
    values = [int(round((float(x[0, 0, 0]) + 1) * 127.5)) // 10 for b in loader for x in b]
    assert sorted(values) == list(range(12))  # two workers, no repeats
    assert next(iter(loader)).shape == (3, 3, 112, 112)


def test_target_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="target.*no such folder"):
        list_target_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_target_images(tmp_path / "empty")
    (tmp_path / "list.txt").write_text("# faces\nnope.jpg\n")
    with pytest.raises(FileNotFoundError, match="line 2"):
        list_target_images(tmp_path / "list.txt")
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "ok.txt").write_text("a.jpg\n")
    with pytest.raises(ValueError, match="a.jpg"):
        TargetFaceDataset(tmp_path / "ok.txt")[0]


# ---------------- real runs on tiny data ----------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Toy data with 16 source images / 12 targets, and a random r_tiny identity network file."""
    from backbones import get_model
    from utils.data.toyface import ensure_toy_data

    root = tmp_path_factory.mktemp("stage1")
    data = ensure_toy_data(root / "toy", num_identities=4, images_per_identity=4, num_eval_identities=2,
                           num_pairs=2, num_target_faces=12, workers=1)
    torch.manual_seed(0)
    id_model = root / "id_r_tiny.pt"
    torch.save(get_model("r_tiny", num_features=32).state_dict(), id_model)
    return {"root": root, "data": data, "id_model": id_model}


def _overrides(tiny: dict, output: Path, **extra) -> list[str]:
    keys = dict(rec=tiny["data"], target=tiny["data"] / "target_faces", generate_toy_data=False,
                id_model=tiny["id_model"], id_network="r_tiny", id_embedding_size=32, gen_dim=4, gen_latent_dim=16,
                gen_style_dim=4, batch_size=4, num_epoch=2, max_steps=0, num_workers=0, tensorboard=False,
                image_every=0, save_every=0, frequent=1, output=output, seed=3,
                lambda_id_schedule="[(0, 8.0), (1, 2.0)]",
                gen_lr_decay=0.0)  # a decay spans the run's steps: raising max_steps on a resume moves it (test below)
    keys.update(extra)
    return [f"{k}={v}" for k, v in keys.items()]


def _run(args: list[str]) -> dict:
    import train_generator

    return train_generator.main(["configs/cfsm_toy"] + args)


def test_steps_checkpoint_and_exact_resume(tiny):
    from cfsm import Generator, load_generator
    from utils.run.run_folder import latest_complete

    straight = tiny["root"] / "straight"
    summary = _run(_overrides(tiny, straight, max_steps=6, tensorboard=True, image_every=2))
    assert summary["steps"] == 6 and summary["finite"]
    assert set(summary["losses"]) >= {"d", "g_gan", "id", "rec", "regu"}
    assert all(np.isfinite(v) for v in summary["losses"].values())
    assert list(straight.glob("tensorboard/events.*")) and (straight / "samples.png").is_file()

    # released format: loads with cfsm.load_generator (what stage-2 train.py calls) as the configured architecture
    final = torch.load(straight / "generator.pth", weights_only=True)
    assert list(final) == ["G_state_dict", "D_state_dict", "optimizerG_state_dict", "optimizerD_state_dict"]
    gen = load_generator(straight / "generator.pth")
    assert isinstance(gen, Generator) and gen.style_dim == 4 and not any(p.requires_grad for p in gen.parameters())
    step, directory, meta = latest_complete(straight)
    assert step == 6 and meta["epoch"] == 1 and meta["world_size"] == 1
    load_generator(directory / "rank_0.pt")  # a mid-run checkpoint is a generator file too

    # 3 steps, stop, resume to 6 (crossing the epoch-1 boundary, where lambda_id changes): identical result
    parted = tiny["root"] / "parted"
    _run(_overrides(tiny, parted, max_steps=3))
    assert latest_complete(parted)[0] == 3
    resumed = _run(_overrides(tiny, parted, max_steps=6))
    assert resumed["steps"] == 6
    log = (parted / "train.log").read_text()
    assert "resumed from" in log and "at step 3 (epoch 0, batch 3)" in log
    assert "step 5/6 epoch 1 lambda_id 2" in log  # epoch 1 after the boundary, with its lambda
    again = torch.load(parted / "generator.pth", weights_only=True)
    for key in ("G_state_dict", "D_state_dict"):
        for name, tensor in final[key].items():
            assert torch.equal(tensor, again[key][name]), f"{key}.{name} differs after resume"
    for key in ("optimizerG_state_dict", "optimizerD_state_dict"):
        s0, s1 = final[key]["state"][0], again[key]["state"][0]
        assert float(s1["step"]) == 6.0  # optimizer state restored, not restarted at step 3
        assert torch.equal(s0["exp_avg_sq"], s1["exp_avg_sq"])

    # init_generator: a new run starts from this generator (shared origin for comparable bases)
    tuned = tiny["root"] / "tuned"
    _run(_overrides(tiny, tuned, max_steps=1, init_generator=straight / "generator.pth"))
    start = torch.load(tuned / "generator.pth", weights_only=True)["G_state_dict"]["pca.U"]
    assert (start - final["G_state_dict"]["pca.U"]).abs().max() < 1e-2  # one Adam step of 1e-4 away


def test_lr_decay_follows_the_step_and_survives_a_resume(tiny):
    straight = _run(_overrides(tiny, tiny["root"] / "decay", max_steps=4, gen_lr=1e-3, gen_lr_decay=0.5))
    log = (tiny["root"] / "decay" / "train.log").read_text()
    assert "step 2/4 epoch 0 lambda_id 8 gen_lr 0.001 " in log and "step 4/4 epoch 0 lambda_id 8 gen_lr 0.0005 " in log
    final = torch.load(tiny["root"] / "decay" / "generator.pth", weights_only=True)
    assert [g["lr"] for g in final["optimizerG_state_dict"]["param_groups"]] == [0.0005]  # the last step's
    _run(_overrides(tiny, tiny["root"] / "decay_parted", max_steps=2, gen_lr=1e-3, gen_lr_decay=0.5))
    # (its 2 steps ran at 1e-3, as the straight run's first 2); the resumed half decays as the straight run did: lr
    # comes from the step and the stop step, not from the saved optimizer (whose lr is the configured one)
    resumed = _run(_overrides(tiny, tiny["root"] / "decay_parted", max_steps=4, gen_lr=1e-3, gen_lr_decay=0.5))
    assert resumed["losses"] == straight["losses"]
    again = torch.load(tiny["root"] / "decay_parted" / "generator.pth", weights_only=True)
    assert all(torch.equal(t, again["G_state_dict"][k]) for k, t in final["G_state_dict"].items())


def test_bf16_steps_finite(tiny):
    summary = _run(_overrides(tiny, tiny["root"] / "bf16", max_steps=2, bf16=True))
    assert summary["finite"] and summary["steps"] == 2


def test_mode_seeking_term_pairs_faces_with_two_styles(tiny):
    summary = _run(_overrides(tiny, tiny["root"] / "div", max_steps=2, lambda_mode_seeking=0.5))
    assert summary["finite"] and summary["losses"]["mode_seeking"] > 0  # the synthesis step (step 0) used the pairs
    plain = _run(_overrides(tiny, tiny["root"] / "nodiv", max_steps=2, lambda_mode_seeking=0.0, lambda_basis=0.0))
    assert "mode_seeking" not in plain["losses"] and "basis_distinctness" not in plain["losses"]


def test_basis_term_runs_on_synthesis_steps(tiny):
    summary = _run(_overrides(tiny, tiny["root"] / "basis", max_steps=2, lambda_basis=1.0, lambda_mode_seeking=0.5,
                              basis_cos_margin=0.9))
    assert summary["finite"] and 0 <= summary["losses"]["basis_distinctness"] <= 1 - 0.9 ** 2  # under the margin
    assert summary["losses"]["mode_seeking"] > 0


def test_the_old_name_of_lambda_mode_seeking_is_refused_with_the_new_name(tmp_path):
    from configs.loader import ConfigError, load_config

    with pytest.raises(ConfigError, match="config key 'lambda_diversity' was renamed to 'lambda_mode_seeking'"):
        load_config("configs/cfsm_toy", ["lambda_diversity=0.5"])
    (tmp_path / "old.py").write_text("config = dict(lambda_diversity=0.5)\n")
    with pytest.raises(ConfigError, match="config key 'lambda_diversity' was renamed to 'lambda_mode_seeking'"):
        load_config(str(tmp_path / "old.py"))


def test_clear_errors(tiny, tmp_path):
    from utils.checkpoint import CheckpointError
    from configs.loader import ConfigError

    with pytest.raises(ConfigError, match="id_model.*file not found"):
        _run(_overrides(tiny, tmp_path / "a", id_model=tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="'id_model' = None"):
        _run(_overrides(tiny, tmp_path / "a", id_model=None))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="'target'.*no images"):
        _run(_overrides(tiny, tmp_path / "a", target=tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="id_model.*mbf_tiny"):
        _run(_overrides(tiny, tmp_path / "a", id_network="mbf_tiny"))
    with pytest.raises(ConfigError, match="lambda_id_schedule"):
        _run(_overrides(tiny, tmp_path / "a", lambda_id_schedule="[(2, 8.0)]"))
    from cfsm import Generator

    torch.save({"G_state_dict": Generator(dim=8, latent_dim=16, style_dim=4).state_dict()}, tmp_path / "g8.pth")
    with pytest.raises(CheckpointError, match="init_generator"):
        _run(_overrides(tiny, tmp_path / "a", init_generator=tmp_path / "g8.pth"))


@pytest.mark.slow
def test_two_process_gloo(tiny):
    """torchrun with 2 CPU ranks: DDP over gloo, per-rank checkpoint files, the released-format generator."""
    out = tiny["root"] / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a script path at the repo root: no PYTHONPATH needed
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_generator.py",
           "configs/cfsm_toy", *_overrides(tiny, out, max_steps=2, device="cpu", batch_size=2, gen_lr=1e-3,
                                             gen_lr_decay=0.75)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=headroom(240))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step_dir = out / "checkpoints" / "step_00000002"
    assert json.loads((step_dir / "COMPLETE").read_text())["world_size"] == 2
    rank1 = torch.load(step_dir / "rank_1.pt", weights_only=True)
    assert {"G_state_dict", "optimizerG_state_dict", "step", "rng"} <= set(rank1)  # full state on every rank:
    # with one output folder per node, each node resumes from its own files
    rank0 = torch.load(step_dir / "rank_0.pt", weights_only=True)
    for state in (rank0, rank1):  # the decayed lr of step 1 (of 2, decay from 0.5), the same on both ranks
        assert [g["lr"] for g in state["optimizerG_state_dict"]["param_groups"]] == [pytest.approx(1e-3 / 1.5)]
    from cfsm import load_generator

    load_generator(out / "generator.pth")
    # resuming with another world size is refused with a message naming both sizes
    from utils.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="2 ranks but this run has 1"):
        _run(_overrides(tiny, out, max_steps=3, batch_size=2))


def test_nonfinite_steps_stop_as_in_stage_2(tiny, tmp_path, monkeypatch):
    """The shared guard (utils/run/scaffold.py): a non-finite loss skips the update on every rank; max_nonfinite_steps in a
    row stop the run with stage 2's message (step, the bad loss, the last good checkpoint)."""
    import train_generator

    monkeypatch.setattr(train_generator, "identity_loss", lambda *args: torch.tensor(float("nan")))
    with pytest.raises(RuntimeError, match=r"1 consecutive non-finite steps \(max_nonfinite_steps=1\) at step 1, "
                                           r"loss nan; last good checkpoint: none"):
        _run(_overrides(tiny, tmp_path / "nan", max_steps=4, max_nonfinite_steps=1))
    assert "step 1: non-finite loss D" in (tmp_path / "nan" / "train.log").read_text()


def test_start_up_line_as_in_stage_2(tiny, tmp_path):
    """train_generator.py's first line: the same fields as train.py's (utils.run.scaffold.startup_line), stage 1's networks
    and objectives."""
    cmd = [sys.executable, "train_generator.py", "configs/cfsm_toy", *_overrides(tiny, tmp_path / "o", max_steps=1)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=headroom(120))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in (proc.stdout + proc.stderr).splitlines() if "network " in line]
    text = line.split("] ", 1)[1]
    assert text.startswith("cfsm_toy: network CFSM generator (G ") and "; identity net r_tiny), loss lsgan+identity+rec" \
        in text, text
    assert ", world size 1, device cpu, precision fp32, effective batch 4 (4 per rank x 1 rank x 1 micro-batch); " \
        in text, text


def test_a_run_shorter_than_image_every_still_shows_its_samples(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(_overrides(tiny, tmp_path / "o", max_steps=2, tensorboard=True, image_every=500))
    events = EventAccumulator(str(tmp_path / "o" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("stage1/source_synth_target")] == [2]


def test_stage_1_logs_to_train_log_and_continues_an_old_cfsm_train_log(tiny, tmp_path):
    """Both stages name their log train.log; a folder of an older stage-1 run (cfsm_train.log) continues its log
    under the new name. A finished run leaves no .lock."""
    out = tmp_path / "o"
    _run(_overrides(tiny, out, max_steps=1, save_every=1))
    assert not (out / "cfsm_train.log").exists() and not (out / ".lock").exists()
    (out / "train.log").rename(out / "cfsm_train.log")  # as an older version left it
    _run(_overrides(tiny, out, max_steps=2))
    log = (out / "train.log").read_text()
    assert "finished at step 1" in log and "resumed from" in log and "finished at step 2" in log
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".log", ".lock")) == ["train.log"]
