"""The colour-channel order a network is fed in training (backbones/channel_order.py; config keys `channel_order`,
`id_channel_order`): AdaFace's IR networks see BGR, flipped from the project's RGB images right before the network
(after CFSM synthesis), a contradicting explicit order is one `error:` line, and the order a run used reaches the
eval commands through its summary.json.

How the backbone's input is observed: a forward pre-hook *prepended* to the network records what its callers pass
(RGB: the loader's batch, the generator's output), and a pre-hook on its first conv records what the network
computes on; the file's network applied to the flipped batch must give the recorded embedding."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones import get_model
from backbones.channel_order import expected_order, feed_in_order, training_order
from tests.helpers import REPO, headroom, launch_env, tiny_args
from tests.test_checkpoint_lightning import write_adaface_ckpt
from utils.errors import ConfigError


def colour_asymmetric_ir_tiny(seed: int = 3, num_features: int = 32) -> dict[str, torch.Tensor]:
    """An ir_tiny state dict whose first conv reads the red channel only (blue and green weights 0): fed RGB or BGR
    it computes clearly different embeddings."""
    torch.manual_seed(seed)
    state = get_model("ir_tiny", num_features=num_features).state_dict()
    state["input_layer.0.weight"][:, 1:] = 0.0
    return state


class Spy:
    """Records, per call of `net`, what its callers passed (`given`), what its first conv received (`seen`) and the
    output (`out`). The caller-side hook is prepended, so it runs before any flip hook of the trainer."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.given: list[torch.Tensor] = []
        self.seen: list[torch.Tensor] = []
        self.out: list[torch.Tensor] = []
        net.register_forward_pre_hook(lambda m, a: self.given.append(a[0].detach().clone()), prepend=True)
        net.input_layer[0].register_forward_pre_hook(lambda m, a: self.seen.append(a[0].detach().clone()))
        net.register_forward_hook(lambda m, a, y: self.out.append(y.detach().clone()))


def spy_on_get_model(monkeypatch: pytest.MonkeyPatch, module, spies: list[Spy]) -> None:
    """`module.get_model` builds the network as before and puts a Spy on every ir_tiny."""
    real = module.get_model

    def get_model_with_spy(name: str, *args, **kwargs):
        net = real(name, *args, **kwargs)
        if name == "ir_tiny":
            spies.append(Spy(net))
        return net

    monkeypatch.setattr(module, "get_model", get_model_with_spy)


# ---- the rule -------------------------------------------------------------------------------------------------------

def test_auto_is_the_files_order_else_the_networks(tmp_path: Path) -> None:
    ckpt = write_adaface_ckpt(tmp_path / "ada.ckpt", colour_asymmetric_ir_tiny())
    assert training_order("auto", "ir_tiny", None, "channel_order", "pretrained_backbone_model").order == "bgr"
    assert training_order("auto", "r_tiny", None, "channel_order", "pretrained_backbone_model").order == "rgb"
    told = training_order("auto", "ir_tiny", ckpt, "channel_order", "pretrained_backbone_model")
    assert (told.order, told.told, told.reason) == ("bgr", True, "AdaFace networks are trained on BGR")
    # without a file an explicit order is the user's choice (training an AdaFace network from scratch on RGB)
    assert training_order("rgb", "ir_tiny", None, "channel_order", "pretrained_backbone_model").order == "rgb"
    # an InsightFace-layout file tells nothing: RGB is a convention, a BGR-trained one may say bgr
    plain = tmp_path / "backbone.pth"
    torch.save(get_model("r_tiny", num_features=32).state_dict(), plain)
    assert not expected_order("r_tiny", plain).told
    assert training_order("bgr", "r_tiny", plain, "channel_order", "pretrained_backbone_model").order == "bgr"


def test_an_explicit_order_against_the_file_is_one_error_naming_key_file_and_fix(tmp_path: Path) -> None:
    ckpt = write_adaface_ckpt(tmp_path / "ada.ckpt", colour_asymmetric_ir_tiny())
    with pytest.raises(ConfigError) as err:
        training_order("rgb", "ir_tiny", ckpt, "channel_order", "pretrained_backbone_model")
    assert str(err.value) == (
        f"config key 'channel_order' = 'rgb' contradicts pretrained_backbone_model={ckpt}: it expects BGR input "
        "(AdaFace networks are trained on BGR); leave channel_order out (auto reads the order from the file) or set "
        "channel_order=bgr")


def test_the_flip_is_a_hook_that_leaves_the_state_dict_alone() -> None:
    torch.manual_seed(0)
    plain = get_model("ir_tiny", num_features=16).eval()
    flipped = feed_in_order(get_model("ir_tiny", num_features=16), "bgr").eval()
    flipped.load_state_dict(plain.state_dict())
    assert list(flipped.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(flipped(x), plain(x.flip(1)))
    assert feed_in_order(plain, "rgb") is plain and not plain._forward_pre_hooks
    with pytest.raises(ValueError, match="'auto'"):
        feed_in_order(plain, "auto")


# ---- stage 2: train.py ----------------------------------------------------------------------------------------------

def test_fine_tuning_an_adaface_ckpt_feeds_the_backbone_bgr(mini_toy: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py, pretrained_backbone_model = an AdaFace-style .ckpt, no channel key: the network computes on the
    flipped batch, and its first embedding equals the file's network applied to the BGR batch (not the RGB one)."""
    import train

    state = colour_asymmetric_ir_tiny()
    ckpt = write_adaface_ckpt(tmp_path / "adaface.ckpt", state)
    spies: list[Spy] = []
    spy_on_get_model(monkeypatch, train, spies)
    summary = train.main(tiny_args(mini_toy, tmp_path / "ft", "network=ir_tiny", "max_steps=1", "val_targets=[]",
                                   "image_every=0", f"pretrained_backbone_model={ckpt}"))
    (spy,) = spies
    assert torch.equal(spy.seen[0], spy.given[0].flip(1))
    net = get_model("ir_tiny", num_features=32).train()  # the step's forward: train mode, batch statistics
    net.load_state_dict(state)
    with torch.no_grad():
        want, rgb = net(spy.given[0].flip(1)), net(spy.given[0])
    assert torch.allclose(spy.out[0], want, atol=1e-4) and not torch.allclose(spy.out[0], rgb, atol=1e-2)
    assert summary["channel_order"] == "bgr" and summary["config"]["channel_order"] == "auto"


def test_with_cfsm_the_flip_comes_after_synthesis_in_the_attack_and_the_update(
        mini_toy: Path, tmp_path: Path, tiny_generator_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rs_ratio < 1: the generator restyles RGB images; every backbone call (the attack's loss, the update's
    forward, verification) is given the RGB (mixed) batch and computes on its BGR flip."""
    import train

    spies: list[Spy] = []
    spy_on_get_model(monkeypatch, train, spies)
    train.main(tiny_args(mini_toy, tmp_path / "cfsm", "network=ir_tiny", "max_steps=1", "image_every=0",
                         f"pretrained_synthesis_model={tiny_generator_file}", "rs_ratio=0.5", "k=1"))
    (spy,) = spies
    assert len(spy.given) >= 4  # attack at o0, attack step, update forward, verification batches
    assert all(torch.equal(seen, given.flip(1)) for seen, given in zip(spy.seen, spy.given, strict=True))


def test_an_explicit_order_against_the_file_stops_train_py_with_one_line(mini_toy: Path, tmp_path: Path) -> None:
    ckpt = write_adaface_ckpt(tmp_path / "adaface.ckpt", colour_asymmetric_ir_tiny())
    out = tmp_path / "refused"
    done = subprocess.run([sys.executable, "train.py", *tiny_args(
        mini_toy, out, "network=ir_tiny", "max_steps=1", "val_targets=[]", f"pretrained_backbone_model={ckpt}",
        "channel_order=rgb")], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=headroom(120))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: config key 'channel_order' = 'rgb' contradicts pretrained_backbone_model={ckpt}: it expects BGR "
        "input (AdaFace networks are trained on BGR); leave channel_order out (auto reads the order from the file) or "
        "set channel_order=bgr")
    assert not (out / "checkpoints").exists()


def test_the_order_a_run_used_is_what_eval_feeds(mini_toy: Path, tmp_path: Path) -> None:
    """A trained ir_tiny run: auto fed BGR, recorded in summary.json, and the eval side loads its model.pt as BGR
    (--rgb an error); an ir_tiny run told channel_order=rgb is read as RGB although the family is BGR."""
    import train
    from eval.common import load_backbone_choice
    from utils.cli import UsageError

    for order, extra in (("bgr", ()), ("rgb", ("channel_order=rgb",))):
        out = tmp_path / order
        summary = train.main(tiny_args(mini_toy, out, "network=ir_tiny", "max_steps=1", "val_targets=[]",
                                       "image_every=0", *extra))
        assert json.loads((out / "summary.json").read_text())["channel_order"] == summary["channel_order"] == order
        _, choice = load_backbone_choice(out / "model.pt")
        assert (choice.network, choice.channel_order, choice.channel_told) == ("ir_tiny", order, True)
        assert choice.line(out / "model.pt").endswith(
            f"{order.upper()} input (a train.py run fed {order.upper()}, as its summary.json records)")
        other = "rgb" if order == "bgr" else "bgr"
        with pytest.raises(UsageError, match=f"--{other} contradicts"):
            choice.channels(**{other: True}, model_path=out / "model.pt")
    # fine-tuning from such a run takes its order too (and refuses the other one)
    assert expected_order("ir_tiny", tmp_path / "rgb" / "model.pt").order == "rgb"
    with pytest.raises(ConfigError, match="a train.py run fed RGB, as its summary.json records"):
        training_order("bgr", "ir_tiny", tmp_path / "rgb" / "model.pt", "channel_order", "pretrained_backbone_model")


def start_up_line(output: Path) -> str:
    (line,) = [line for line in (output / "train.log").read_text().splitlines() if "effective batch" in line]
    return line


def test_explicit_bgr_on_an_insightface_network_is_said_in_the_start_up_line(mini_toy: Path, tmp_path: Path) -> None:
    import train

    summary = train.main(tiny_args(mini_toy, tmp_path / "bgr", "max_steps=1", "val_targets=[]", "image_every=0",
                                   "channel_order=bgr"))
    assert summary["channel_order"] == "bgr"
    line = start_up_line(tmp_path / "bgr")
    assert "precision fp32, backbone fed BGR (channel_order=bgr), effective batch" in line


# ---- stage 1: train_generator.py ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage1_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from utils.data.toyface import ensure_toy_data

    root = tmp_path_factory.mktemp("stage1_bgr")
    return ensure_toy_data(root / "toy", num_identities=4, images_per_identity=4, num_eval_identities=2,
                           num_pairs=2, num_target_faces=12, workers=1)


def _stage1_args(data: Path, output: Path, id_model: Path, *extra: str) -> list[str]:
    keys = dict(rec=data, target=data / "target_faces", generate_toy_data=False, id_model=id_model,
                id_network="ir_tiny", id_embedding_size=32, gen_dim=4, gen_latent_dim=16, gen_style_dim=4,
                batch_size=4, num_epoch=1, max_steps=2, num_workers=0, tensorboard=False, image_every=0,
                save_every=0, frequent=1, output=output, seed=3, style_report_faces=0)
    return ["configs/cfsm_toy", *(f"{k}={v}" for k, v in keys.items()), *extra]


def test_stage1_feeds_an_adaface_identity_network_bgr(stage1_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """id_model = an AdaFace-style .ckpt: the identity network is given G's RGB sources and outputs and computes on
    their BGR flip; the start-up line says so and the summary records it."""
    import backbones
    import train_generator

    ckpt = write_adaface_ckpt(tmp_path / "id.ckpt", colour_asymmetric_ir_tiny())
    spies: list[Spy] = []
    spy_on_get_model(monkeypatch, backbones, spies)
    summary = train_generator.main(_stage1_args(stage1_data, tmp_path / "s1", ckpt))
    (spy,) = [spy for spy in spies if spy.given]  # the others: layouts built on the meta device by the file check
    assert len(spy.given) == 2  # step 0 synthesises: the sources and G's output; step 1 reconstructs
    assert all(torch.equal(seen, given.flip(1)) for seen, given in zip(spy.seen, spy.given, strict=True))
    assert summary["id_channel_order"] == "bgr"
    assert "identity net fed BGR (AdaFace networks are trained on BGR), effective batch" in start_up_line(
        tmp_path / "s1")


def test_stage1_refuses_an_id_channel_order_against_the_file(stage1_data: Path, tmp_path: Path) -> None:
    import train_generator

    ckpt = write_adaface_ckpt(tmp_path / "id.ckpt", colour_asymmetric_ir_tiny())
    with pytest.raises(ConfigError, match=r"^config key 'id_channel_order' = 'rgb' contradicts id_model="):
        train_generator.main(_stage1_args(stage1_data, tmp_path / "s1", ckpt, "id_channel_order=rgb"))
    assert not (tmp_path / "s1").exists()
