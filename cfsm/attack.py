"""The CFSM stage-2 step: adversarial style search in the generator's style space, then the clean/synthetic mix.

`adversarial_mix` is pure with respect to everything it is handed: it never updates model weights, BatchNorm
statistics, margin-loss buffers or optimizer state (the caller's `loss_fn` must honour the same contract; see
`train.py`). All randomness comes from the explicit `rng`, so a run is reproducible and resumable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Agree = Callable[[torch.Tensor], torch.Tensor]  # int flags of this rank -> the flags OR-ed (MAX) over all ranks
# how the k steps choose their direction: the paper's gradient sign, or a random sign (the control in docs/research/ablation.md: the
# same displacement per coordinate, so "farther from o0" is separated from "harder for the model")
STYLE_SEARCHES = ("adversarial", "random_sign")


@dataclass
class StyleMix:
    images: torch.Tensor        # the training batch: synthesized images written back at their original positions
    synth_index: torch.Tensor   # positions (into the batch) of the synthesized images, int64
    style0: torch.Tensor        # starting style codes o0 of those images, [n_synth, style_dim], fp32
    style: torch.Tensor         # final style codes o*, [n_synth, style_dim], fp32
    grad_scale_used: float      # loss scale of the last attack gradient; 0.0 = it fell back to fp32
    attack_gain: torch.Tensor   # 0-dim: loss_fn on the synthesized share at o* minus at o0 (0 when k == 0)
    style_norm: torch.Tensor    # 0-dim: mean |o*| over the synthesized share (0 when nothing is synthesized)


def split_counts(batch_size: int, rs_ratio: float) -> tuple[int, int]:
    """(n_clean, n_synth) with n_clean = round-half-up(rs_ratio * B): every image is used exactly once."""
    if not 0.0 <= rs_ratio <= 1.0:
        raise ValueError(f"rs_ratio must be in [0, 1], got {rs_ratio}")
    n_clean = min(batch_size, int(math.floor(rs_ratio * batch_size + 0.5)))
    return n_clean, batch_size - n_clean


def local_agreement(flags: torch.Tensor) -> torch.Tensor:
    """The single-process `agree`: this process's flags are everyone's."""
    return flags


def _attack_grad(generator, content, o, labels, loss_fn, autocast_dtype, device_type, grad_scale, agree):
    """(d loss / d o, the loss at o, loss scale used), computed so that fp16 cannot silently zero the gradient.

    Under fp16 the loss is scaled (a positive scale does not change sign()). If the scaled gradient overflows we
    retry with a smaller scale; if any coordinate is exactly zero (underflow: sign(0) would leave it unmoved) or
    nothing finite comes out, the step is recomputed in fp32 (scale reported as 0.0).

    Each attempt runs `loss_fn`, whose Partial FC issues collectives, so the choice of the next attempt must be the
    same on every rank: the flags (non-finite, underflow) of each attempt go through `agree` (an all-reduce MAX in
    a distributed run) and every rank follows the worst rank.
    """
    def grad_of(dtype, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            o_var = o.detach().requires_grad_(True)
            with torch.autocast(device_type=device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = loss_fn(generator.decode(content if dtype else content.float(), o_var), labels)
            return torch.autograd.grad(loss.float() * scale, o_var)[0], loss.detach().float()

    attempts = [(autocast_dtype, grad_scale), (autocast_dtype, grad_scale / 2**8)] \
        if autocast_dtype == torch.float16 else [(autocast_dtype, 1.0)] if autocast_dtype is not None else []
    for dtype, scale in attempts:
        grad, loss = grad_of(dtype, scale)
        underflow = (grad == 0).any() if dtype == torch.float16 else torch.zeros((), dtype=torch.bool,
                                                                                  device=grad.device)
        flags = torch.stack([~torch.isfinite(grad).all(), underflow]).to(torch.int32)
        nonfinite_anywhere, underflow_anywhere = (bool(v) for v in agree(flags).tolist())
        if nonfinite_anywhere:
            continue
        if underflow_anywhere:
            break  # underflow: go straight to fp32
        return grad, loss, scale
    grad, loss = grad_of(None, 1.0)  # fp32; non-finite coordinates are not moved (the caller's loss will show it)
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0), loss, 1.0 if autocast_dtype is None else 0.0


def adversarial_mix(images: torch.Tensor, labels: torch.Tensor, generator: torch.nn.Module, loss_fn: LossFn, *,
                    rs_ratio: float, epsilon: float, alpha: float, k: int, rng: torch.Generator,
                    autocast_dtype: Optional[torch.dtype] = None, grad_scale: float = 2.0 ** 16,
                    agree: Agree = local_agreement, measure_gain: bool = True,
                    search: str = "adversarial") -> StyleMix:
    """Replace a (1 - rs_ratio) share of the batch by faces restyled with an adversarial style code.

    One permutation (from `rng`, a CPU generator) picks the images to synthesize. For them: o0 ~ N(0, I),
    o = o0; `k` times: o <- clip(o + alpha * sign(d loss_fn(G(x_s, o), y_s) / d o), o0 - epsilon, o0 + epsilon);
    then x_syn = G(x_s, o) without a graph. The content code G.encode(x_s) is computed once and reused.

    `generator` must be frozen (no trainable parameters) and provide `encode(x)` and `decode(content, o)` and
    `style_dim`. `loss_fn(images, labels)` is the recognition loss of the *attack* forward: it must not update
    BatchNorm statistics or margin buffers, nor couple samples, and must not run through DDP. It runs inside the
    attack's autocast context and must not open its own (that would turn the fp32 fallback back into fp16).

    `agree(flags)` combines per-rank int flags over ranks (MAX); pass an all-reduce in a distributed run so that the
    precision retries, each of which runs `loss_fn`'s collectives, are chosen by all ranks together. The default is
    the single-process identity.

    `search="random_sign"` replaces the gradient sign by a random sign per coordinate and step (drawn from `rng`):
    o moves exactly as far from o0 as under the attack, in a direction the model did not choose; no gradient runs.

    Diagnostics: `attack_gain` = loss_fn(G(x_s, o*)) - loss_fn(G(x_s, o0)). The o0 term is the first attack
    iteration's loss (already computed); the o* term costs one extra no-grad forward of the synthesized share
    (`measure_gain=False` skips it and reports 0). With k == 0 nothing extra runs (o* = o0, gain 0). Under
    `random_sign` both terms are no-grad forwards (two, when `measure_gain`).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if search not in STYLE_SEARCHES:
        raise ValueError(f"style search must be one of {', '.join(STYLE_SEARCHES)}, got {search!r}")
    batch = images.shape[0]
    n_clean, n_synth = split_counts(batch, rs_ratio)
    device = images.device
    style_dim = int(generator.style_dim)
    if n_synth == 0:  # plain training: no generator call, no random draw
        empty, zero = torch.zeros(0, style_dim, device=device), torch.zeros((), device=device)
        return StyleMix(images, torch.zeros(0, dtype=torch.long, device=device), empty, empty, 1.0, zero, zero)
    if any(p.requires_grad for p in generator.parameters()):
        raise ValueError("adversarial_mix: the generator must be frozen (requires_grad_(False)); "
                         "use cfsm.load_generator, which freezes it")

    perm = torch.randperm(batch, generator=rng)
    synth_index = perm[n_clean:].sort().values.to(device)
    o0 = torch.randn(n_synth, style_dim, generator=rng).to(device)
    x_s, y_s = images.index_select(0, synth_index), labels.index_select(0, synth_index)

    amp = dict(device_type=device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    with torch.no_grad(), torch.autocast(**amp):
        content = generator.encode(x_s)  # independent of o: once per step

    o, used_scale, loss_at_o0 = o0.clone(), 1.0, None
    if search == "random_sign" and k > 0 and measure_gain:
        with torch.no_grad(), torch.autocast(**amp):
            loss_at_o0 = loss_fn(generator.decode(content, o0), y_s).detach().float()
    for _ in range(k):
        if search == "random_sign":
            step = torch.randint(0, 2, o0.shape, generator=rng).to(device=device, dtype=o0.dtype) * 2 - 1
        else:
            grad, loss, used_scale = _attack_grad(generator, content, o, y_s, loss_fn, autocast_dtype, device.type,
                                                  grad_scale, agree)
            loss_at_o0 = loss if loss_at_o0 is None else loss_at_o0
            step = grad.sign()
        o = torch.maximum(torch.minimum(o + alpha * step, o0 + epsilon), o0 - epsilon)

    gain = torch.zeros((), device=device)
    with torch.no_grad(), torch.autocast(**amp):
        x_syn = generator.decode(content, o)
        if loss_at_o0 is not None and measure_gain:  # the one extra forward: the synthesized share at o*
            gain = loss_fn(x_syn, y_s).detach().float() - loss_at_o0
    mixed = images.clone()
    mixed[synth_index] = x_syn.to(images.dtype)
    return StyleMix(mixed, synth_index, o0, o, used_scale, gain, o.norm(dim=1).mean())


class frozen_stats:
    """Context: put BatchNorm/Dropout (all modules) in eval mode, restore each module's mode afterwards.

    The attack forward must neither update running statistics nor couple samples through batch statistics.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.modes: list[tuple[torch.nn.Module, bool]] = []

    def __enter__(self) -> torch.nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc) -> None:
        for m, mode in self.modes:
            m.training = mode


class AttackStats:
    """Running means of the attack diagnostics (`attack_gain`, `style_norm`) over steps. Values stay device
    tensors until read, so adding one per step costs no host sync; `window()` (for TensorBoard) and `means()` (for
    summary.json) read them."""

    NAMES = ("attack_gain", "style_norm")

    def __init__(self) -> None:
        self._total: Optional[torch.Tensor] = None
        self._window: Optional[torch.Tensor] = None
        self._total_count = self._window_count = 0

    def add(self, mix: StyleMix) -> None:
        if mix.synth_index.numel() == 0:
            return  # nothing synthesized: no style, no gain
        values = torch.stack([mix.attack_gain.detach().float(), mix.style_norm.detach().float()])
        self._total = values if self._total is None else self._total + values
        self._window = values if self._window is None else self._window + values
        self._total_count += 1
        self._window_count += 1

    def window(self) -> dict[str, float]:
        """Means since the previous call ({} when no step synthesized anything), then start a new window."""
        if self._window is None:
            return {}
        means = dict(zip(self.NAMES, (self._window / self._window_count).tolist()))
        self._window, self._window_count = None, 0
        return means

    def means(self) -> dict[str, float]:
        """Means over every step added: {'attack_gain_mean': ..., 'style_norm_mean': ...}, {} when none."""
        if self._total is None:
            return {}
        return {f"{name}_mean": v for name, v in zip(self.NAMES, (self._total / self._total_count).tolist())}
