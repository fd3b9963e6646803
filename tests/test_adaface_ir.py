"""AdaFace's IR networks (backbones/adaface_ir.py) against AdaFace's own net.py.

How tests/fixtures/adaface/ was made: AdaFace's `net.py` (github.com/mk-minchul/AdaFace at c60eaa7) was run outside
this repository, torch 2.14.1 on CPU, float32, 1 thread. For each of IR_18, IR_34, IR_50, IR_101, IR_152, IR_200,
IR_SE_50, IR_SE_101, IR_SE_152, IR_SE_200 at 112x112 it recorded the state-dict layout (`adaface_manifest.json`:
the sha256 of `json.dumps([[key, shape, dtype], ...])`, the entry count, parameter count, the first 12 and last 8
entries). IR_18 and IR_SE_50 were loaded with the rule weights of tests/_rule_weights.py (`rule_state_dict`) and run
on `input_x()` in eval mode (their `(output, norm)`); IR_18 also in train mode after `torch.manual_seed(5)` under
no_grad (`output * norm` and the final BatchNorm's running mean: Dropout(0.4) draws from the global generator).
Single blocks — BottleneckIR(64, 256, 2), BottleneckIRSE(64, 256, 2), BottleneckIRSE(256, 256, 1),
BasicBlockIRSE(64, 128, 2) — were run under the rule weights (keys relative to the block) on fixed uniform inputs
(numpy default_rng(3): 2x64x14x14; default_rng(4): 2x256x7x7), which checks the bottleneck and SE blocks of the
depths too large to run here.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from backbones import BACKBONES, channel_order_of, get_model
from backbones.adaface_ir import ADAFACE_IR_CONFIGS, BasicBlockIR, BottleneckIR
from tests._rule_weights import input_x, layout, rel_err, rule_state_dict

from .conftest import FIXTURES

REF_DIR = FIXTURES / "adaface"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REF_DIR / "adaface_reference.npz") as d:
        return {k: d[k] for k in d.files}


def _manifest() -> dict:
    return json.loads((REF_DIR / "adaface_manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(ADAFACE_IR_CONFIGS))
def test_layout_equals_adaface(name: str) -> None:
    want = _manifest()["networks"][name]
    with torch.device("meta"):
        model = get_model(name)
    got = [[k, list(shape), dtype] for k, shape, dtype in layout(model)]
    assert len(got) == want["num_entries"]
    assert got[:12] == want["entries_head"] and got[-8:] == want["entries_tail"]
    assert hashlib.sha256(json.dumps(got).encode()).hexdigest() == want["layout_sha256"]
    assert sum(p.numel() for p in model.parameters()) == want["parameter_count"]
    assert channel_order_of(name) == "bgr" and BACKBONES[name].family == "AdaFace"


def _rule_model(name: str, **kw) -> torch.nn.Module:
    model = get_model(name, **kw)
    model.load_state_dict(rule_state_dict(model), strict=True)
    return model


@pytest.mark.parametrize("name", ["ir_18", "ir_se_50"])
def test_eval_output_equals_adaface(name: str, ref: dict[str, np.ndarray]) -> None:
    """AdaFace returns (x/|x|, |x|); ours returns x: its norm and direction equal theirs."""
    model = _rule_model(name).eval()
    with torch.no_grad():
        y = model(input_x())
    norm = y.norm(dim=1, keepdim=True)
    assert rel_err(norm, ref[f"{name}_eval_norm"]) < 1e-5
    assert rel_err(y / norm, ref[f"{name}_eval_output"]) < 1e-5
    assert rel_err(y, ref[f"{name}_eval_output"] * ref[f"{name}_eval_norm"]) < 1e-5


def test_train_mode_with_dropout_equals_adaface(ref: dict[str, np.ndarray]) -> None:
    """dropout=0.4 as AdaFace trains: the same mask from the same seed, batch statistics, running-mean update."""
    model = _rule_model("ir_18", dropout=0.4).train()
    torch.manual_seed(5)
    with torch.no_grad():
        y = model(input_x())
    assert rel_err(y, ref["ir_18_train_seed5_raw"]) < 1e-4
    assert rel_err(model.output_layer[4].running_mean, ref["ir_18_train_seed5_bn1d_running_mean"]) < 1e-4


@pytest.mark.parametrize("label, block, seed, shape", [
    ("bottleneck_ir_64_256_s2", lambda: BottleneckIR(64, 256, 2), 3, (2, 64, 14, 14)),
    ("bottleneck_irse_64_256_s2", lambda: BottleneckIR(64, 256, 2, se=True), 3, (2, 64, 14, 14)),
    ("bottleneck_irse_256_256_s1", lambda: BottleneckIR(256, 256, 1, se=True), 4, (2, 256, 7, 7)),
    ("basic_irse_64_128_s2", lambda: BasicBlockIR(64, 128, 2, se=True), 3, (2, 64, 14, 14)),
])
def test_blocks_equal_adaface(label, block, seed, shape, ref: dict[str, np.ndarray]) -> None:
    blk = block()
    assert [[k, list(v.shape)] for k, v in blk.state_dict().items()] == _manifest()["blocks"][label]
    blk.load_state_dict(rule_state_dict(blk), strict=True)
    x = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))
    with torch.no_grad():
        assert rel_err(blk.eval()(x), ref[f"block_{label}"]) < 1e-5


def test_toy_variant_trains_a_step_with_checkpointing_and_fp16() -> None:
    """ir_tiny: same classes, small widths; activation checkpointing gives the same gradients; bf16 runs on CPU."""
    torch.manual_seed(0)
    plain = get_model("ir_tiny", num_features=16)
    ckpt = get_model("ir_tiny", num_features=16, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 112, 112)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(x).square().sum().backward()
        grads.append(model.input_layer[0].weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    half = get_model("ir_tiny", num_features=16, fp16=True).eval()
    assert half(x).dtype == torch.float32


@pytest.mark.parametrize("loss", ["arcface", "cosface", "combined", "adaface"])
def test_train_py_trains_adaface_ir_with_every_loss_and_partial_fc(mini_toy, tmp_path, loss: str) -> None:
    """train.py, network=ir_tiny (AdaFace's IR classes), each margin loss with Partial FC sampling half the
    centres and AdaFace's dropout 0.4: the run ends with a model.pt of AdaFace's layout."""
    import train
    from tests.helpers import tiny_args

    out = tmp_path / loss
    summary = train.main(tiny_args(mini_toy, out, "network=ir_tiny", f"loss={loss}", "sample_rate=0.5",
                                   "dropout=0.4", "max_steps=2", "val_targets=[]", "image_every=0"))
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    state = torch.load(out / "model.pt", weights_only=True)
    assert next(iter(state)) == "input_layer.0.weight" and "output_layer.4.running_var" in state
    get_model("ir_tiny", num_features=32).load_state_dict(state, strict=True)


def test_train_py_fine_tunes_from_an_adaface_ckpt(mini_toy, tmp_path, capfd) -> None:
    """pretrained_backbone_model= an AdaFace-shaped Lightning .ckpt: the backbone starts from its `model.` weights
    and a note says the head was dropped."""
    import train
    from tests.helpers import tiny_args
    from tests.test_checkpoint_lightning import write_adaface_ckpt

    torch.manual_seed(3)
    init = get_model("ir_tiny", num_features=32).state_dict()
    path = write_adaface_ckpt(tmp_path / "adaface.ckpt", init)
    train.main(tiny_args(mini_toy, tmp_path / "ft", "network=ir_tiny", "loss=adaface", "max_steps=1", "lr=1e-8",
                         "val_targets=[]", "image_every=0", f"pretrained_backbone_model={path}"))
    assert f"note: {path}: Lightning checkpoint (pytorch-lightning 1.8.6); dropped 4 tensors outside 'model.'" \
        in capfd.readouterr().err
    final = torch.load(tmp_path / "ft" / "model.pt", weights_only=True)
    assert torch.allclose(final["body.0.res_layer.1.weight"], init["body.0.res_layer.1.weight"], atol=1e-5)
