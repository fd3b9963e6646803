"""train.py end to end on the miniature toy data: overrides, CFSM wiring, resume equality, launchers, bad inputs."""
import json

import pytest
import torch

import train
from backbones import get_model
from configs.loader import ConfigError
from partial_fc import PartialFC
from tests.helpers import load_model, run, tiny_args, torchrun
from utils.checkpoint import CheckpointError


def test_plain_run_writes_model_summary_and_uses_overrides(mini_toy, tmp_path):
    out = tmp_path / "plain"
    summary = train.main(tiny_args(mini_toy, out, "max_steps=3", "lr=0.05", "optimizer=adamw"))
    assert summary["steps"] == 3 and summary["config"]["lr"] == 0.05 and summary["config"]["optimizer"] == "adamw"
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("config", "steps", "epochs", "final_loss", "samples_per_sec", "val", "wall_s"):
        assert key in on_disk
    assert set(on_disk["val"]) == {"toy_clean"} and 0.0 <= on_disk["val"]["toy_clean"] <= 1.0
    load_model(out / "model.pt")
    assert any((out / "tensorboard").iterdir())


def test_cfsm_wiring_generator_frozen_shared_negatives(mini_toy, tmp_path, tiny_generator_file, monkeypatch):
    """Generator never in the optimizer or DDP; the attack and the update of a step share the PFC negatives."""
    captured = {}
    real_build = train.build_optimizer
    real_load = train.load_generator

    def spy_build(name, groups, *args, **kw):
        groups = list(groups)
        captured["params"] = {id(p) for g in groups for p in g["params"]}
        return real_build(name, groups, *args, **kw)

    def spy_load(path):
        captured["generator"] = real_load(path)
        return captured["generator"]

    calls = []
    real_sample, real_forward = PartialFC.sample_negatives, PartialFC.forward

    def spy_sample(self, labels):
        cs = real_sample(self, labels)
        calls.append(("sample", cs))
        return cs

    def spy_forward(self, emb, labels, class_sample=None, update_stats=True):
        calls.append(("forward", class_sample, update_stats, emb.shape[0]))
        return real_forward(self, emb, labels, class_sample=class_sample, update_stats=update_stats)

    monkeypatch.setattr(train, "build_optimizer", spy_build)
    monkeypatch.setattr(train, "load_generator", spy_load)
    monkeypatch.setattr(PartialFC, "sample_negatives", spy_sample)
    monkeypatch.setattr(PartialFC, "forward", spy_forward)
    train.main(tiny_args(mini_toy, tmp_path / "ours", "max_steps=2", f"pretrained_synthesis_model={tiny_generator_file}",
                         "rs_ratio=0.75", "k=2", "sample_rate=0.5", "loss=adaface", "m=0.4"))
    gen = captured["generator"]
    assert not any(p.requires_grad for p in gen.parameters()) and not gen.training
    assert (tmp_path / "ours" / "clean_vs_synth.png").is_file()  # a first look at what the generator made
    assert not ({id(p) for p in gen.parameters()} & captured["params"])
    # per step: one sample, k=2 attack forwards on the synthesized quarter (4 of 16), the attack-gain forward at o*
    # (4), one update forward of 16
    steps = [calls[i:i + 5] for i in range(0, 10, 5)]
    for sample, attack1, attack2, gain, update in steps:
        assert sample[0] == "sample" and sample[1] is not None
        assert attack1[1] is sample[1] and attack2[1] is sample[1] and update[1] is sample[1]
        assert gain[1] is sample[1] and (gain[2], gain[3]) == (False, 4)
        assert (attack1[2], attack1[3]) == (False, 4) and (attack2[2], attack2[3]) == (False, 4)
        assert (update[2], update[3]) == (True, 16)


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(mini_toy, tmp_path, tiny_generator_file):
    """Stop after 4 steps, resume to 9 (crossing an epoch boundary): same weights as 9 steps in one go."""
    common = (f"pretrained_synthesis_model={tiny_generator_file}", "rs_ratio=0.5", "sample_rate=0.5",
              "num_epoch=3", "warmup_epoch=1")
    train.main(tiny_args(mini_toy, tmp_path / "a", "max_steps=9", "save_every=4", *common))
    train.main(tiny_args(mini_toy, tmp_path / "b", "max_steps=4", *common))
    train.main(tiny_args(mini_toy, tmp_path / "b", "max_steps=9", "resume=True", *common))
    a, b = load_model(tmp_path / "a" / "model.pt"), load_model(tmp_path / "b" / "model.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), f"resumed run differs at {key}"
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == 9
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text()  # not a silent restart from scratch


def test_pretrained_backbone_of_another_architecture_is_refused(mini_toy, tmp_path):
    other = tmp_path / "mbf.pt"
    torch.save(get_model("mbf_tiny", num_features=32).state_dict(), other)
    with pytest.raises(CheckpointError, match=r"mbf\.pt.*first mismatching key"):
        train.main(tiny_args(mini_toy, tmp_path / "x", "max_steps=1", f"pretrained_backbone_model={other}"))


def test_pretrained_backbone_fine_tunes(mini_toy, tmp_path):
    init = tmp_path / "init.pt"
    torch.save(get_model("r_tiny", num_features=32).state_dict(), init)
    summary = train.main(tiny_args(mini_toy, tmp_path / "ft", "max_steps=1", f"pretrained_backbone_model={init}"))
    assert summary["steps"] == 1


def test_pretrained_backbone_weights_are_the_starting_point(mini_toy, tmp_path):
    """Fine-tuning starts from the file's weights: with lr 1e-8 one step cannot move them, so the saved model equals
    the file (parameters; BatchNorm statistics do move in a training forward). A run that dropped the file would
    end at its own seeded initialisation, which differs from this file's (another seed) by ~0.1 per weight."""
    torch.manual_seed(12345)
    init_state = get_model("r_tiny", num_features=32).state_dict()
    init = tmp_path / "init.pt"
    torch.save(init_state, init)
    train.main(tiny_args(mini_toy, tmp_path / "ft", "max_steps=1", "lr=1e-8", "val_targets=[]", "verbose=0",
                         f"pretrained_backbone_model={init}"))
    final = load_model(tmp_path / "ft" / "model.pt")
    params = [name for name, _ in get_model("r_tiny", num_features=32).named_parameters()]
    assert len(params) > 10
    for name in params:
        assert torch.allclose(final[name], init_state[name], atol=1e-5), f"{name} did not start from the file"
    assert max((final[n] - init_state[n]).abs().max().item() for n in params) < 1e-5 < \
        min(init_state[n].abs().max().item() for n in params if init_state[n].dim() > 1)  # weights are not ~0


@pytest.mark.parametrize("extra, error, pattern", [
    (["rec=/no/such/folder"], Exception, "/no/such/folder"),
    (["rs_ratio=0.5", "pretrained_synthesis_model=/no/such/gen.pth"], FileNotFoundError, r"gen\.pth.*cfsm"),
    (["rs_ratio=1.5"], ConfigError, "rs_ratio"),
    (["k=-1"], ConfigError, "'k'"),
    (["num_classes=17"], Exception, "17.*16|16.*17"),
    (["resume=True"], CheckpointError, "no complete checkpoint"),
    (["loss=sphereface"], ConfigError, "loss"),
])
def test_bad_inputs_stop_before_work(mini_toy, tmp_path, extra, error, pattern):
    with pytest.raises(error, match=pattern):  # later overrides win, so `rec=` here replaces the good one
        train.main(tiny_args(mini_toy, tmp_path / "bad", "max_steps=1") + extra)


def test_generator_file_of_wrong_format(mini_toy, tmp_path):
    bad = tmp_path / "not_a_generator.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, bad)
    with pytest.raises(KeyError, match="G_state_dict"):
        train.main(tiny_args(mini_toy, tmp_path / "x", "max_steps=1", "rs_ratio=0.5",
                             f"pretrained_synthesis_model={bad}"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torch.distributed.run", "torch.distributed.launch"])
def test_two_process_gloo_launchers(mini_toy, tmp_path, tiny_generator_file, launcher):
    out = tmp_path / launcher.split(".")[-1]
    proc = run(torchrun(["train.py", *tiny_args(mini_toy, out, "max_steps=2", "rs_ratio=0.75",
                                                f"pretrained_synthesis_model={tiny_generator_file}")],
                        launcher=launcher))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "world size 2" in (out / "train.log").read_text()
    ckpts = sorted((out / "checkpoints").glob("step_*/rank_*.pt"))
    assert [p.name for p in ckpts] == ["rank_0.pt", "rank_1.pt"]


def test_attack_diagnostics_in_tensorboard_and_summary(mini_toy, tmp_path, tiny_generator_file):
    """CFSM runs log the attack gain and mean |o*| as TensorBoard scalars cfsm/attack_gain, cfsm/style_norm and put
    their means in summary.json."""
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "diag"
    summary = train.main(tiny_args(mini_toy, out, "max_steps=3", f"pretrained_synthesis_model={tiny_generator_file}",
                                   "rs_ratio=0.5", "k=1", "tensorboard=True", "val_targets=[]", "image_every=0"))
    saved = json.loads((out / "summary.json").read_text())
    for key in ("attack_gain_mean", "style_norm_mean"):
        assert key in summary and saved[key] == pytest.approx(summary[key]) and math.isfinite(saved[key])
    assert saved["style_norm_mean"] > 0
    events = EventAccumulator(str(next(out.glob("tensorboard*")))).Reload()
    for tag in ("cfsm/attack_gain", "cfsm/style_norm"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3]
    means = sum(e.value for e in events.Scalars("cfsm/style_norm")) / 3
    assert means == pytest.approx(saved["style_norm_mean"], rel=1e-3)  # summary.json: 4 significant digits


def test_toy_vit_trains_with_adamw_and_decay_exclusions(mini_toy, tmp_path):
    """The toy ViT through train.py with the ViT recipe's pieces: AdamW, weight decay with the exclusions (a
    weight_decay 0 group of biases, norms, pos_embed, mask_token; Partial FC last), checkpointing, bf16 on CPU."""
    out = tmp_path / "vit"
    summary = train.main(tiny_args(mini_toy, out, "network=vit_toy", "max_steps=3", "save_every=3", "lr=1e-3",
                                   "optimizer=adamw", "weight_decay=0.1", "weight_decay_exclude=True",
                                   "use_checkpoint=True", "fp16=True"))
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))
    model = get_model("vit_toy", num_features=32)
    state = torch.load(out / "model.pt", weights_only=True)
    model.load_state_dict(state, strict=True)
    saved = torch.load(next((out / "checkpoints").glob("step_*/rank_0.pt")), weights_only=True)["optimizer"]
    groups = saved["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1]
    assert all(float(s["step"]) == 3 for s in saved["state"].values())  # every parameter took the 3 AdamW steps
    assert len(saved["state"]) == sum(len(g["params"]) for g in groups)
    assert len(groups[1]["params"]) == len(model.no_weight_decay_names())
    with pytest.raises(CheckpointError, match="weight_decay_exclude: True -> False"):  # the groups would differ
        train.main(tiny_args(mini_toy, out, "network=vit_toy", "max_steps=4", "resume=True", "optimizer=adamw",
                             "weight_decay_exclude=False", "fp16=True"))


def test_start_up_line_names_network_loss_world_size_device_precision_and_effective_batch(mini_toy, tmp_path):
    """What the user reads first (console and train.log): one line, formatted by utils.run.scaffold.startup_line."""
    import sys

    proc = run([sys.executable, "train.py", *tiny_args(mini_toy, tmp_path / "o", "max_steps=1", "gradient_acc=2",
                                                        "fp16=True", "val_targets=[]")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in (proc.stdout + proc.stderr).splitlines() if "network " in line]
    assert line.split("] ", 1)[1].startswith(
        "toy: network r_tiny, loss arcface, world size 1, device cpu, precision bf16 autocast (fp16=True on cpu), "
        "effective batch 32 (16 per rank x 1 rank x 2 micro-batches); "), line
    assert line.split("] ", 1)[1] in (tmp_path / "o" / "train.log").read_text()


def test_a_run_shorter_than_image_every_still_shows_its_synthesized_faces(mini_toy, tmp_path, tiny_generator_file):
    """TensorBoard gets one clean-vs-synthesized grid at the run's end, image_every=500 notwithstanding."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "short"
    train.main(tiny_args(mini_toy, out, "max_steps=3", f"pretrained_synthesis_model={tiny_generator_file}",
                         "rs_ratio=0.5", "k=1", "tensorboard=True", "val_targets=[]", "image_every=500"))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("cfsm/clean_vs_synth")] == [3]


def test_a_finished_run_folder_is_tidy_and_its_speed_is_training_only(mini_toy, tmp_path):
    """train.py as a user runs it: no .lock left behind; summary.json's samples_per_sec leaves verification out (each
    verification here sleeps 4 s: two of them, at step 1 and at the end, would dominate a 2-step run); floats in
    the summary and the last log line carry 4 significant digits."""
    import re
    import sys
    import textwrap

    out = tmp_path / "o"
    script = textwrap.dedent(f"""
        import sys, time
        import eval.verification_callback as cb
        real = cb.verification_for_run
        def slow(*args, **kwargs):
            verify = real(*args, **kwargs)
            def call(*a, **k):
                time.sleep(4)
                return verify(*a, **k)
            return call
        import train
        train.verification_for_run = slow
        from utils.cli import run_command
        run_command(train.main, sys.argv[1:])
    """)
    proc = run([sys.executable, "-c", script, *tiny_args(mini_toy, out, "max_steps=2", "verbose=1")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / ".lock").exists()
    summary = json.loads((out / "summary.json").read_text())
    training_s = 2 * 16 / summary["samples_per_sec"]
    assert training_s < 4 and summary["wall_s"] > 8, summary  # 8 s of verification happened, none of it counted
    floats = [v for k, v in summary.items() if isinstance(v, float)] + list(summary["val"].values())
    assert floats and all(v == float(f"{v:.4g}") for v in floats), summary
    (done,) = [line for line in proc.stdout.splitlines() if "] done: " in line]
    assert all(len(digits.replace(".", "").lstrip("0")) <= 4 for digits in re.findall(r"\d+\.\d+", done)), done
