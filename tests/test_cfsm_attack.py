"""The CFSM stage-2 step (`cfsm.attack.adversarial_mix`): each requirement of the method as its own test."""
import os

import pytest
import torch
import torch.distributed as dist

from backbones import get_model
from cfsm import Generator
from cfsm.attack import adversarial_mix, frozen_stats, split_counts
from losses import AdaFace, ArcFace
from partial_fc import PartialFC

NUM_CLASSES = 12


def tiny_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    g = Generator(dim=8, n_residual=1, n_downsample=2, latent_dim=16, style_dim=10)
    return g.eval().requires_grad_(False)


def tiny_setup(margin=None, sample_rate=1.0, seed=0):
    torch.manual_seed(seed)
    backbone = get_model("r_tiny", num_features=32)
    pfc = PartialFC(margin or ArcFace(s=16.0, margin=0.3), 32, NUM_CLASSES, sample_rate=sample_rate)
    images = torch.rand(8, 3, 112, 112) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    return backbone, pfc, images, labels


def attack_loss_fn(backbone, pfc, class_sample=None):
    """What train.py hands to the attack: eval-mode BN, no margin-buffer updates, the step's negatives."""
    def loss_fn(x, y):
        with frozen_stats(backbone):
            emb = backbone(x)
        return pfc(emb.float(), y, class_sample=class_sample, update_stats=False)
    return loss_fn


@pytest.mark.parametrize("batch", [1, 7, 8, 256])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.75, 0.9, 1.0])
def test_split_uses_every_image_once(batch, ratio):
    n_clean, n_synth = split_counts(batch, ratio)
    assert n_clean + n_synth == batch and n_clean == int(ratio * batch + 0.5)
    backbone, pfc, _, _ = tiny_setup()
    gen = tiny_generator()
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, 112, 112).contiguous()
    mix = adversarial_mix(images, torch.zeros(batch, dtype=torch.long), gen, lambda x, y: x.mean(), rs_ratio=ratio,
                          epsilon=0.3, alpha=0.3, k=0, rng=torch.Generator().manual_seed(0))
    assert mix.synth_index.numel() == n_synth and mix.synth_index.unique().numel() == n_synth
    untouched = torch.ones(batch, dtype=torch.bool)
    untouched[mix.synth_index] = False
    assert torch.equal(mix.images[untouched], images[untouched])  # clean share unchanged, in place


def test_rs_ratio_one_is_plain_training_and_costs_nothing():
    gen = tiny_generator()
    calls = []
    gen.encode = lambda x: calls.append("encode")  # would break if called
    rng = torch.Generator().manual_seed(3)
    before = rng.get_state()
    images = torch.rand(4, 3, 112, 112)
    mix = adversarial_mix(images, torch.zeros(4, dtype=torch.long), gen, lambda x, y: x.sum(), rs_ratio=1.0,
                          epsilon=0.3, alpha=0.3, k=1, rng=rng)
    assert mix.images is images and not calls and torch.equal(rng.get_state(), before)


def test_k0_is_random_style_synthesis():
    gen = tiny_generator()
    backbone, pfc, images, labels = tiny_setup()
    mix = adversarial_mix(images, labels, gen, attack_loss_fn(backbone, pfc), rs_ratio=0.5, epsilon=0.3, alpha=0.3,
                          k=0, rng=torch.Generator().manual_seed(1))
    assert torch.equal(mix.style, mix.style0)
    expected = gen.decode(gen.encode(images[mix.synth_index]), mix.style0)
    torch.testing.assert_close(mix.images[mix.synth_index], expected)
    # o0 ~ N(0, I) from the given generator: same seed, same draw
    rng = torch.Generator().manual_seed(1)
    torch.randperm(8, generator=rng)
    assert torch.equal(mix.style0, torch.randn(4, 10, generator=rng))


def test_content_code_computed_once_and_projection_holds():
    gen = tiny_generator()
    backbone, pfc, images, labels = tiny_setup()
    counts = {"encode": 0, "decode": 0}
    encode, decode = gen.encode, gen.decode

    def counting_encode(x):
        counts["encode"] += 1
        return encode(x)

    def counting_decode(c, o):
        counts["decode"] += 1
        return decode(c, o)

    gen.encode, gen.decode = counting_encode, counting_decode
    mix = adversarial_mix(images, labels, gen, attack_loss_fn(backbone, pfc), rs_ratio=0.25, epsilon=0.5,
                          alpha=0.2, k=3, rng=torch.Generator().manual_seed(2))
    assert counts == {"encode": 1, "decode": 4}  # k attack decodes + 1 final synthesis
    delta = (mix.style - mix.style0).abs()
    assert delta.max() <= 0.5 + 1e-6 and delta.min() > 0  # projected to the ball, every coordinate moved


def test_one_step_is_sign_ascent_of_alpha():
    gen = tiny_generator()
    backbone, pfc, images, labels = tiny_setup()
    loss_fn = attack_loss_fn(backbone, pfc)
    mix = adversarial_mix(images, labels, gen, loss_fn, rs_ratio=0.5, epsilon=0.314, alpha=0.314, k=1,
                          rng=torch.Generator().manual_seed(4))
    idx = mix.synth_index
    o = mix.style0.clone().requires_grad_(True)
    loss = loss_fn(gen.decode(gen.encode(images[idx]), o), labels[idx])
    (grad,) = torch.autograd.grad(loss, o)
    torch.testing.assert_close(mix.style, mix.style0 + 0.314 * grad.sign())
    # ascent: the attacked style has a higher loss than the start
    with torch.no_grad():
        assert loss_fn(mix.images[idx], labels[idx]) > loss.detach()


def test_subset_attack_equals_whole_batch_attack():
    """sign() ignores the 1/N scale of the mean loss, so attacking only the synthesized images gives the same o
    as attacking the whole mixed batch when the attack forward does not couple samples (eval-mode BN)."""
    gen = tiny_generator()
    backbone, pfc, images, labels = tiny_setup()
    rng_seed = 5
    mix = adversarial_mix(images, labels, gen, attack_loss_fn(backbone, pfc), rs_ratio=0.5, epsilon=0.314,
                          alpha=0.314, k=1, rng=torch.Generator().manual_seed(rng_seed))
    idx = mix.synth_index
    o = mix.style0.clone().requires_grad_(True)
    whole = images.clone()
    whole[idx] = gen.decode(gen.encode(images[idx]), o)
    loss = attack_loss_fn(backbone, pfc)(whole, labels)  # loss over all B images
    (grad,) = torch.autograd.grad(loss, o)
    torch.testing.assert_close(mix.style, torch.clamp(mix.style0 + 0.314 * grad.sign(), mix.style0 - 0.314,
                                                      mix.style0 + 0.314))


def test_attack_changes_no_state():
    """No BatchNorm running statistic, no AdaFace EMA buffer, no parameter gradient, no optimizer state."""
    gen = tiny_generator()
    backbone, pfc, images, labels = tiny_setup(margin=AdaFace(m=0.4, h=0.333, s=16.0, t_alpha=0.5))
    backbone.train()
    optimizer = torch.optim.SGD(list(backbone.parameters()) + list(pfc.parameters()), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in {**backbone.state_dict(), **pfc.state_dict()}.items()
              if isinstance(v, torch.Tensor)}
    gen_before = {k: v.clone() for k, v in gen.state_dict().items()}
    adversarial_mix(images, labels, gen, attack_loss_fn(backbone, pfc), rs_ratio=0.25, epsilon=0.3, alpha=0.3, k=2,
                    rng=torch.Generator().manual_seed(6))
    after = {**backbone.state_dict(), **pfc.state_dict()}
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"attack changed {key}"
    for key, value in gen_before.items():
        assert torch.equal(value, gen.state_dict()[key]), f"attack changed generator {key}"
    assert all(p.grad is None for p in list(backbone.parameters()) + list(pfc.parameters()))
    assert optimizer.state_dict()["state"] == {}
    assert backbone.training and all(m.training for m in backbone.modules())  # modes restored


def test_unfrozen_generator_is_refused():
    gen = Generator(dim=8, n_residual=1, n_downsample=2, latent_dim=16, style_dim=10)
    with pytest.raises(ValueError, match="frozen"):
        adversarial_mix(torch.rand(4, 3, 112, 112), torch.zeros(4, dtype=torch.long), gen, lambda x, y: x.sum(),
                        rs_ratio=0.5, epsilon=0.3, alpha=0.3, k=1, rng=torch.Generator())


def test_negative_k_is_refused():
    with pytest.raises(ValueError, match="k must be"):
        adversarial_mix(torch.rand(4, 3, 112, 112), torch.zeros(4, dtype=torch.long), tiny_generator(),
                        lambda x, y: x.sum(), rs_ratio=0.5, epsilon=0.3, alpha=0.3, k=-1, rng=torch.Generator())


def test_fp16_attack_gradient_does_not_underflow():
    """A small loss gives fp16 activation gradients below fp16's smallest subnormal: unscaled, sign() = 0 for
    many coordinates. The attack scales the loss (or falls back to fp32) so every coordinate moves by alpha."""
    gen = tiny_generator()
    images = torch.rand(4, 3, 112, 112) * 2 - 1
    labels = torch.zeros(4, dtype=torch.long)
    loss_fn = lambda x, y: 1e-3 * x.float().mean()  # noqa: E731
    # the failure the test guards against: a plain fp16 gradient (torch >= 2.13 has CPU fp16 kernels: no skip)
    with torch.autocast("cpu", dtype=torch.float16):
        content = gen.encode(images)
        o = torch.randn(4, 10, requires_grad=True)
        (raw,) = torch.autograd.grad(loss_fn(gen.decode(content, o), labels), o)
    assert (raw == 0).float().mean() > 0, "the check is meaningless if fp16 does not underflow here"

    for scale, expected_used in ((2.0 ** 16, 2.0 ** 16), (1.0, 0.0)):  # scaled; unscaled -> fp32 fallback
        mix = adversarial_mix(images, labels, gen, loss_fn, rs_ratio=0.0, epsilon=0.3, alpha=0.3, k=1,
                              rng=torch.Generator().manual_seed(7), autocast_dtype=torch.float16, grad_scale=scale)
        assert ((mix.style - mix.style0).abs() > 0.29).all(), "every style coordinate must move by alpha"
        assert mix.grad_scale_used == expected_used


def test_attack_through_unwrapped_backbone_does_not_touch_ddp(tmp_path):
    """The attack uses `ddp.module`: no gradient reduction, no .grad on any parameter."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gen = tiny_generator()
        backbone, pfc, images, labels = tiny_setup()
        ddp = torch.nn.parallel.DistributedDataParallel(backbone)
        adversarial_mix(images, labels, gen, attack_loss_fn(ddp.module, pfc), rs_ratio=0.5, epsilon=0.3,
                        alpha=0.3, k=1, rng=torch.Generator().manual_seed(8))
        assert all(p.grad is None for p in ddp.parameters())
        pfc(ddp(images).float(), labels).backward()  # the real step still reduces and fills .grad
        assert all(p.grad is not None for p in ddp.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


# ---- diagnostics: gain and |o*| -------------------------------------------------------------------------------

def test_attack_gain_is_positive_on_average_and_matches_a_recomputation():
    """gain = loss of the synthesized share at o* minus at o0; sign ascent makes it positive on average (k >= 1);
    mean |o*| is reported alongside."""
    gen = tiny_generator()
    backbone, pfc, images, labels = tiny_setup()
    loss_fn = attack_loss_fn(backbone, pfc)
    gains = []
    for k in (1, 3):
        for seed in range(4):
            mix = adversarial_mix(images, labels, gen, loss_fn, rs_ratio=0.5, epsilon=0.6, alpha=0.3, k=k,
                                  rng=torch.Generator().manual_seed(seed))
            idx = mix.synth_index
            with torch.no_grad():
                at_o0 = loss_fn(gen.decode(gen.encode(images[idx]), mix.style0), labels[idx])
                at_star = loss_fn(mix.images[idx], labels[idx])
            torch.testing.assert_close(mix.attack_gain, at_star - at_o0, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mix.style_norm, mix.style.norm(dim=1).mean())
            gains.append(float(mix.attack_gain))
    assert sum(gains) / len(gains) > 0, gains


def test_attack_gain_uses_the_steps_negatives():
    """With sample_rate < 1 the gain is measured with the step's class sample (the one the attack used): no new
    negatives are drawn, and a recomputation with that sample gives the same number while another sample does not."""
    gen = tiny_generator()
    backbone, _, images, labels = tiny_setup()
    pfc = PartialFC(ArcFace(s=16.0, margin=0.3), 32, 40, sample_rate=0.5)  # 8 positives + 12 random negatives
    sample = pfc.sample_negatives(labels)
    counter = pfc.sample_step
    loss_fn = attack_loss_fn(backbone, pfc, class_sample=sample)
    mix = adversarial_mix(images, labels, gen, loss_fn, rs_ratio=0.5, epsilon=0.6, alpha=0.3, k=2,
                          rng=torch.Generator().manual_seed(3))
    assert pfc.sample_step == counter  # the attack and its gain forward drew nothing
    idx = mix.synth_index
    with torch.no_grad():
        x0 = gen.decode(gen.encode(images[idx]), mix.style0)
        same = loss_fn(mix.images[idx], labels[idx]) - loss_fn(x0, labels[idx])
        other_fn = attack_loss_fn(backbone, pfc, class_sample=pfc.sample_negatives(labels))
        other = other_fn(mix.images[idx], labels[idx]) - other_fn(x0, labels[idx])
    torch.testing.assert_close(mix.attack_gain, same, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mix.attack_gain, other)


def test_k0_reports_zero_gain_without_an_extra_forward():
    gen = tiny_generator()
    backbone, pfc, images, labels = tiny_setup()
    calls = []
    loss_fn = attack_loss_fn(backbone, pfc)
    mix = adversarial_mix(images, labels, gen, lambda x, y: calls.append(1) or loss_fn(x, y), rs_ratio=0.5,
                          epsilon=0.3, alpha=0.3, k=0, rng=torch.Generator().manual_seed(1))
    assert not calls and float(mix.attack_gain) == 0.0
    torch.testing.assert_close(mix.style_norm, mix.style0.norm(dim=1).mean())
    # k = 2: two attack forwards (one per step, fp32) plus exactly one no-grad gain forward
    adversarial_mix(images, labels, gen, lambda x, y: calls.append(torch.is_grad_enabled()) or loss_fn(x, y),
                    rs_ratio=0.5, epsilon=0.3, alpha=0.3, k=2, rng=torch.Generator().manual_seed(1))
    assert calls == [True, True, False]


# ---- precision retries: decided by `agree` (all ranks), not by this rank's gradient alone ------------------------

@pytest.mark.parametrize("other_rank,expected_scale,expected_calls", [
    ((1, 0), 2.0 ** 8, 2),   # another rank overflowed at 2^16: retry at 2^8 although this rank's gradient was fine
    ((0, 1), 0.0, 2),        # another rank underflowed: fp32 although this rank's gradient was fine
    ((1, 1), 0.0, 3),        # another rank non-finite at every scale: every attempt, then fp32
])
def test_precision_attempts_follow_the_agreed_flags(other_rank, expected_scale, expected_calls):
    """`agree` combines this rank's (non-finite, underflow) flags with the other ranks' (here a stand-in for the
    all-reduce): the attempt sequence follows the combined flags."""
    gen = tiny_generator()
    images = torch.rand(4, 3, 112, 112) * 2 - 1
    labels = torch.zeros(4, dtype=torch.long)
    calls, seen = [], []

    def loss_fn(x, y):
        calls.append(1)
        return x.float().mean() * 10.0  # large enough: no fp16 underflow at these scales on this rank

    def agree(flags):
        seen.append(flags.tolist())
        other = torch.tensor(other_rank if len(seen) == 1 or other_rank == (1, 1) else (0, 0), dtype=flags.dtype)
        return torch.maximum(flags, other)

    mix = adversarial_mix(images, labels, gen, loss_fn, rs_ratio=0.0, epsilon=0.3, alpha=0.3, k=1,
                          rng=torch.Generator().manual_seed(7), autocast_dtype=torch.float16,
                          grad_scale=2.0 ** 16, agree=agree, measure_gain=False)
    assert seen[0] == [0, 0], "this rank's own first attempt must be clean for the test to mean anything"
    assert mix.grad_scale_used == expected_scale and len(calls) == expected_calls


def test_attack_stats_window_and_run_means():
    from cfsm.attack import AttackStats, StyleMix

    def mix(gain: float, norm: float, n_synth: int = 2) -> StyleMix:
        empty = torch.zeros(n_synth, 3)
        return StyleMix(torch.zeros(1), torch.arange(n_synth), empty, empty, 1.0, torch.tensor(gain),
                        torch.tensor(norm))

    stats = AttackStats()
    assert stats.window() == {} and stats.means() == {}
    stats.add(mix(1.0, 4.0))
    stats.add(mix(3.0, 6.0))
    stats.add(mix(100.0, 100.0, n_synth=0))  # nothing synthesized: not counted
    assert stats.window() == {"attack_gain": 2.0, "style_norm": 5.0}
    stats.add(mix(-1.0, 2.0))
    assert stats.window() == {"attack_gain": -1.0, "style_norm": 2.0}
    assert stats.means() == {"attack_gain_mean": 1.0, "style_norm_mean": 4.0}


def test_random_sign_search_moves_as_far_as_the_attack_without_a_gradient():
    """style_search=random_sign (issue 22's control): every coordinate moves by alpha per step in a random sign,
    clipped to o0 +- epsilon like the attack; the model is never differentiated; the gain is still measured."""
    gen = tiny_generator()
    backbone, pfc, images, labels = tiny_setup()
    loss_fn = attack_loss_fn(backbone, pfc)
    grad_calls = []

    def counting_loss(x, y):
        grad_calls.append(torch.is_grad_enabled())
        return loss_fn(x, y)

    mix = adversarial_mix(images, labels, gen, counting_loss, rs_ratio=0.5, epsilon=0.5, alpha=0.5, k=1,
                          rng=torch.Generator().manual_seed(3), search="random_sign")
    torch.testing.assert_close((mix.style - mix.style0).abs(), torch.full_like(mix.style, 0.5))
    assert grad_calls == [False, False]  # loss at o0 and at o*, both without a graph
    idx = mix.synth_index
    with torch.no_grad():
        at_o0 = loss_fn(gen.decode(gen.encode(images[idx]), mix.style0), labels[idx])
        at_star = loss_fn(mix.images[idx], labels[idx])
    torch.testing.assert_close(mix.attack_gain, at_star - at_o0, rtol=1e-5, atol=1e-6)
    signs = torch.sign(mix.style - mix.style0)
    assert (signs > 0).any() and (signs < 0).any()  # random, not one fixed direction
    # three steps of epsilon / 3: inside the box, each coordinate an odd multiple of alpha away from o0
    mix3 = adversarial_mix(images, labels, gen, loss_fn, rs_ratio=0.5, epsilon=0.9, alpha=0.3, k=3,
                           rng=torch.Generator().manual_seed(3), search="random_sign")
    moved = (mix3.style - mix3.style0).abs()
    assert (moved <= 0.9 + 1e-6).all() and torch.allclose(moved[(moved - 0.3).abs() > 1e-5], torch.tensor(0.9))
    with pytest.raises(ValueError, match="style search"):
        adversarial_mix(images, labels, gen, loss_fn, rs_ratio=0.5, epsilon=0.5, alpha=0.5, k=1,
                        rng=torch.Generator().manual_seed(3), search="gradient")
