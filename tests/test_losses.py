"""Margin heads equal tests/fixtures/compat/margin_losses.npz (outputs and gradients), never mutate inputs."""
import numpy as np
import pytest
import torch

from losses import AdaFace, ArcFace, CombinedMarginLoss, CosFace, build_margin_loss
from tests._rule_weights import fixture, rel_err

TAGS = {
    "cfsm_arcface": lambda: ArcFace(64.0, 0.5),
    "cfsm_cosface": lambda: CosFace(64.0, 0.4),
    "if_combined_arc": lambda: CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0),
    "if_combined_cos": lambda: CombinedMarginLoss(64, 1.0, 0.0, 0.4, 0),
    "if_arcface": lambda: CombinedMarginLoss(64, 1.0, 0.5, 0.0),
    "if_cosface": lambda: CosFace(64.0, 0.4),
}
EXACT_GRAD = {"cfsm_cosface", "if_combined_arc", "if_combined_cos", "if_arcface", "if_cosface"}


@pytest.fixture(scope="module")
def fx():
    return fixture("margin_losses")


@pytest.mark.parametrize("suffix,inp", [("", "in_cos"), ("_edge", "in_cos_edge")])
@pytest.mark.parametrize("tag", list(TAGS))
@pytest.mark.parametrize("label_shape", ["1d", "2d"])
def test_margin_matches_fixture(tag, suffix, inp, label_shape, fx):
    leaf = torch.from_numpy(fx[inp]).clone().requires_grad_()
    logits = leaf.clone()
    before = logits.detach().clone()
    labels = torch.from_numpy(fx["in_labels"])
    if label_shape == "2d":
        labels = labels[:, None]
    out = TAGS[tag]()(logits, labels)
    (out * torch.from_numpy(fx["in_gout"])).sum().backward()
    name = tag + suffix
    assert rel_err(out, fx[name + "_out"]) < 1e-5
    # the reference writes out/s into its input; we return it instead and leave the input alone
    assert rel_err(out.detach() / 64.0, fx[name + "_input_after"]) < 1e-5
    assert torch.equal(logits.detach(), before)
    if tag in EXACT_GRAD:
        np.testing.assert_array_equal(leaf.grad.numpy(), fx[name + "_grad"])
    else:
        assert rel_err(leaf.grad, fx[name + "_grad"]) < 1e-5


def _ada_call(module, fx, update_stats=True):
    leaf = torch.from_numpy(fx["in_cos"]).clone().requires_grad_()
    out = module(leaf.clone(), torch.from_numpy(fx["in_labels"]), torch.from_numpy(fx["in_norms"]),
                 update_stats=update_stats)
    return leaf, out


def _buffers_match(module, fx, tag):
    for b in ("t", "batch_mean", "batch_std"):
        assert rel_err(getattr(module, b), fx[f"adaface_buffers_{tag}__{b}"]) < 1e-5, (tag, b)


def test_adaface_two_calls_and_gradient(fx):
    ada = AdaFace(m=0.4, h=0.333, s=64.0, t_alpha=0.01)
    _buffers_match(ada, fx, "init")
    leaf, out = _ada_call(ada, fx)
    assert rel_err(out, fx["adaface_call1_out"]) < 1e-5
    assert rel_err(out.detach() / 64, fx["adaface_call1_input_after"]) < 1e-5
    _buffers_match(ada, fx, "after_call1")
    (out * torch.from_numpy(fx["in_gout"])).sum().backward()
    assert rel_err(leaf.grad, fx["adaface_call1_grad"]) < 1e-5
    _, out2 = _ada_call(ada, fx)
    assert rel_err(out2, fx["adaface_call2_out"]) < 1e-5
    _buffers_match(ada, fx, "after_call2")


def test_adaface_preset_hits_clip(fx):
    ada = AdaFace()
    ada.batch_std.fill_(3.0)
    _, out = _ada_call(ada, fx)
    assert rel_err(out, fx["adaface_preset_out"]) < 1e-5
    _buffers_match(ada, fx, "after_preset")


def test_adaface_update_stats_false_freezes_ema(fx):
    ada = AdaFace()
    _, out = _ada_call(ada, fx, update_stats=False)
    _buffers_match(ada, fx, "init")
    _ada_call(ada, fx, update_stats=True)
    _buffers_match(ada, fx, "after_call1")
    # a non-updating call after that uses the current EMA without moving it
    _, out_frozen = _ada_call(ada, fx, update_stats=False)
    _buffers_match(ada, fx, "after_call1")
    _, out_again = _ada_call(ada, fx, update_stats=False)
    assert torch.equal(out_again, out_frozen)  # nothing moved between two frozen calls
    # the frozen calls used the EMA they found: init's, then call 1's (the updating call 1 used its own update)
    assert not torch.allclose(out, out_frozen)
    assert rel_err(out_frozen, fx["adaface_call1_out"]) < 1e-5


def test_adaface_needs_norms_and_is_safe_at_pm1():
    assert AdaFace.needs_norms and not ArcFace.needs_norms and not CosFace.needs_norms
    with pytest.raises(TypeError, match="norms"):
        AdaFace()(torch.zeros(2, 3), torch.tensor([0, 1]))
    leaf = torch.tensor([[1.0, -1.0, 0.2], [0.5, 1.0, -1.0]], requires_grad=True)
    out = AdaFace()(leaf.clone(), torch.tensor([0, 2]), torch.tensor([[10.0], [30.0]]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(leaf.grad).all()


def test_combined_margin_errors_and_filtering():
    with pytest.raises(ValueError, match="m1=0.9"):
        CombinedMarginLoss(64, 0.9, 0.5, 0.0)
    loss = CombinedMarginLoss(64, 1.0, 0.0, 0.4, interclass_filtering_threshold=0.5)
    logits = torch.tensor([[0.9, 0.6, 0.1], [0.7, 0.2, 0.8]])
    out = loss(logits, torch.tensor([0, -1]))
    expected = torch.tensor([[0.9 - 0.4, 0.0, 0.1], [0.0, 0.2, 0.0]]) * 64
    torch.testing.assert_close(out, expected)


def test_build_margin_loss():
    assert isinstance(build_margin_loss("arcface", s=32.0, margin=0.3), ArcFace)
    assert isinstance(build_margin_loss("combined", s=64, m1=1.0, m2=0.5, m3=0.0), CombinedMarginLoss)
    with pytest.raises(ValueError, match="adaface"):
        build_margin_loss("sphereface")
    with pytest.raises(TypeError, match="cosface"):
        build_margin_loss("cosface", margin=0.3)


@pytest.mark.parametrize("target_cos,norm", [(1.0, 100.0), (-1.0, 0.001), (0.999, 100.0), (-0.999, 0.001)])
def test_adaface_clips_adjusted_angle_at_extreme_cosines(target_cos, norm):
    """The margin-adjusted target angle stays in [eps, pi - eps] (AdaFace authors' clip): a high-quality face at
    cos = 1 (angle - m < 0) or a low-quality one at cos = -1 (angle + m > pi) gets the clipped angle, and loss and
    gradients stay finite."""
    ada = AdaFace(m=0.4, h=0.333, s=64.0, t_alpha=0.01)
    ada.batch_std.fill_(1.0)  # |ms| = 1: the largest angular margin, in either direction
    leaf = torch.tensor([[target_cos, 0.3, -0.2], [0.1, target_cos, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    norms = torch.full((2, 1), norm)
    out = ada(leaf.clone(), labels, norms, update_stats=False)
    ms = ((norms.clamp(0.001, 100) - ada.batch_mean) / (ada.batch_std + 1e-3) * ada.h).clamp(-1, 1)[:, 0]
    theta = torch.acos(torch.tensor(target_cos).clamp(-1 + ada.eps, 1 - ada.eps)) - ada.m * ms
    clipped = theta.clamp(ada.eps, torch.pi - ada.eps)
    assert not torch.allclose(theta, clipped)  # the case does leave [eps, pi - eps]
    expected = (torch.cos(clipped) - (ada.m + ada.m * ms)) * 64.0
    torch.testing.assert_close(out[[0, 1], [0, 1]], expected)
    loss = torch.nn.functional.cross_entropy(out, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
