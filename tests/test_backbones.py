"""Backbones: state-dict layout equals the released manifests; rule-weight outputs equal the reference fixtures."""
import numpy as np
import pytest
import torch

from backbones import BACKBONE_NAMES, get_model
from tests._rule_weights import (check_digests, fixture, input_x, layout, manifest, manifest_layout, rel_err,
                                 rule_state_dict)

EVAL_CASES = [("r18", "iresnet18", "iresnet18_eval"), ("r50", "iresnet50", "iresnet50_eval"),
              ("mbf", "mobilefacenet", "mobilefacenet_eval")]


@pytest.fixture(scope="module")
def fx():
    return fixture("backbones")


def test_input_matches_fixture_digest():
    first8 = fixture("inputs_small")["in_x_first8"]
    np.testing.assert_array_equal(input_x().numpy().reshape(-1)[:8], first8)


@pytest.mark.parametrize("name,man,key", EVAL_CASES)
def test_eval_output_matches_fixture(name, man, key, fx):
    model = get_model(name)
    assert layout(model) == manifest_layout(man)
    m = manifest(man)
    assert sum(p.numel() for p in model.parameters()) == m["parameter_count"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == m["trainable_parameter_count"]
    sd = rule_state_dict(model)
    check_digests(sd, man)
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        assert rel_err(model(input_x()), fx[key]) < 1e-4
        if name == "r18":  # channels_last gives the same embeddings
            cl = model.to(memory_format=torch.channels_last)
            y = cl(input_x().contiguous(memory_format=torch.channels_last))
            assert rel_err(y, fx[key]) < 1e-4


@pytest.mark.parametrize("name,man", [("r34", "iresnet34"), ("r100", "iresnet100"), ("r200", "iresnet200")])
def test_large_layouts_match_manifest(name, man):
    with torch.device("meta"):  # shapes only, no memory or init cost
        model = get_model(name)
    assert layout(model) == manifest_layout(man)
    assert sum(p.numel() for p in model.parameters()) == manifest(man)["parameter_count"]


def test_r18_train_mode_forward_and_running_stats(fx):
    model = get_model("r18")
    model.load_state_dict(rule_state_dict(model))
    model.train()
    with torch.no_grad():
        y = model(input_x())
    assert rel_err(y, fx["iresnet18_train"]) < 3e-3
    sd = model.state_dict()
    for k in ("bn1.running_mean", "bn1.running_var", "features.running_mean", "features.running_var"):
        assert rel_err(sd[k], fx[f"iresnet18_train_after__{k}"]) < 1e-5, k
    assert int(sd["bn1.num_batches_tracked"]) == int(fx["iresnet18_train_after__bn1.num_batches_tracked"])


def test_factory_names_and_errors():
    for n in ("r18", "r34", "r50", "r100", "r200", "mbf", "r_tiny", "mbf_tiny"):
        assert n in BACKBONE_NAMES
    with pytest.raises(ValueError, match="r_tiny"):
        get_model("resnet9000")


@pytest.mark.parametrize("name", ["r_tiny", "mbf_tiny"])
def test_toy_nets_train_step(name):
    model = get_model(name, num_features=64)
    x = torch.randn(4, 3, 112, 112)
    out = model(x)
    assert out.shape == (4, 64) and out.dtype == torch.float32
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = get_model("r_tiny", num_features=32)
    b = get_model("r_tiny", num_features=32, use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 3, 112, 112)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["r_tiny", "mbf_tiny"])
def test_fp16_autocast_region_keeps_fp32_head(name):
    """fp16=True autocasts the trunk (bfloat16 on CPU) but fc/features and the output stay float32."""
    torch.manual_seed(0)
    ref = get_model(name, num_features=32).eval()
    amp = get_model(name, num_features=32, fp16=True).eval()
    amp.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        y, y_amp = ref(x), amp(x)
    assert y_amp.dtype == torch.float32
    assert rel_err(y_amp, y.numpy()) < 0.1  # bf16 trunk: a few % at most
    assert all(p.dtype == torch.float32 for p in amp.state_dict().values() if p.is_floating_point())


def test_channels_last_training_step():
    """train.py's channels_last option: the same outputs and gradients as the default memory format."""
    torch.manual_seed(0)
    plain = get_model("r_tiny", num_features=16)
    last = get_model("r_tiny", num_features=16)
    last.load_state_dict(plain.state_dict())
    last = last.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 112, 112)
    y_plain, y_last = plain(x), last(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_last, y_plain, rtol=1e-4, atol=1e-5)
    y_plain.sum().backward()
    y_last.sum().backward()
    for (name, a), b in zip(plain.named_parameters(), last.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["r_tiny", "mbf_tiny"])
def test_caller_autocast_is_kept_when_fp16_false(name):
    """train.py autocasts around the model; the backbone's own fp16 flag must not switch that off."""
    model = get_model(name, num_features=32)
    seen = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 112, 112))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
