"""Margin heads on cosine logits (ArcFace, CosFace, arcface_torch CombinedMarginLoss, AdaFace).

Every head takes cosine logits [N, C_local] (already clamped to [-1, 1]) and labels [N] or [N, 1] whose value is the
local class index or -1 ("this row's class lives on another rank / is not sampled"), and returns the scaled logits as
a **new tensor**. Unlike the reference code, the caller's tensor is never modified in place: this keeps autograd
safe (the logits can be reused, e.g. by a second forward in the CFSM attack) while giving the same values and
gradients (checked against tests/fixtures/compat/margin_losses.npz).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Mapping, TypeVar

import torch
from torch import nn

__all__ = ["MarginLoss", "ArcFace", "CosFace", "CombinedMarginLoss", "AdaFace", "MARGIN_LOSSES", "register_margin_loss",
           "build_margin_loss", "margin_loss_from_config"]

# The registry of margin heads: name -> class. Each class declares the config keys it reads (`config_keys`) and how
# they map to its constructor (`options_from_config`); config validation and train.py derive from this table, so a
# new head is one class with `@register_margin_loss("name")` plus its tests.
MARGIN_LOSSES: dict[str, type["MarginLoss"]] = {}
_Loss = TypeVar("_Loss", bound=type["MarginLoss"])


def register_margin_loss(name: str) -> Callable[[_Loss], _Loss]:
    """Class decorator: make the head available as config `loss = name`."""
    def add(cls: _Loss) -> _Loss:
        if name in MARGIN_LOSSES:
            raise ValueError(f"margin loss {name!r} is registered twice ({MARGIN_LOSSES[name].__name__}, {cls.__name__})")
        MARGIN_LOSSES[name] = cls
        return cls
    return add


def _targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, column indices) of the target entries of labelled rows."""
    labels = labels.reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} rows but logits have {logits.shape[0]}")
    rows = torch.nonzero(labels != -1, as_tuple=True)[0]
    return rows, labels[rows].long()


class MarginLoss(nn.Module):
    """Base class: `forward(logits, labels, norms=None, update_stats=True) -> scaled logits`.

    Subclasses declare `config_keys` (the config keys they read) and `options_from_config` (keys -> constructor
    keywords); the mapping passed in is any `key -> value` lookup, so the head itself knows no config files.
    """

    needs_norms: bool = False
    config_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def options_from_config(cls, values: Mapping[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None,
                update_stats: bool = True) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@register_margin_loss("arcface")
class ArcFace(MarginLoss):
    """CFSM ArcFace: target t = cos θ becomes cos(θ + m) when t > cos(π − m), else the fallback t − m·sin(π − m)
    (keeps the target logit monotonic in θ). Gradients flow through the formula (no straight-through)."""

    config_keys = ("s", "m")

    @classmethod
    def options_from_config(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        return dict(s=values["s"], margin=values["m"])

    def __init__(self, s: float = 64.0, margin: float = 0.5) -> None:
        super().__init__()
        self.s, self.margin = s, margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.theta = math.cos(math.pi - margin)
        self.sinmm = math.sin(math.pi - margin) * margin

    def forward(self, logits, labels, norms=None, update_stats=True):
        rows, cols = _targets(logits, labels)
        t = logits[rows, cols]
        sin_t = torch.sqrt(1.000001 - t * t)  # the 1e-6 keeps the sqrt's gradient finite at |t| = 1
        cos_tm = t * self.cos_m - sin_t * self.sin_m
        final = torch.where(t > self.theta, cos_tm, t - self.sinmm)
        return logits.index_put((rows, cols), final) * self.s


@register_margin_loss("cosface")
class CosFace(MarginLoss):
    """CosFace: target logit − m, then × s (gradient is exactly s·upstream)."""

    config_keys = ("s", "m")

    @classmethod
    def options_from_config(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        return dict(s=values["s"], m=values["m"])

    def __init__(self, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__()
        self.s, self.m = s, m

    def forward(self, logits, labels, norms=None, update_stats=True):
        rows, cols = _targets(logits, labels)
        return logits.index_put((rows, cols), logits[rows, cols] - self.m) * self.s


class _StraightThroughScale(torch.autograd.Function):
    """Returns `values * s` but back-propagates as if it were `logits * s` (arcface_torch's no_grad margin)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, values: torch.Tensor, s: float) -> torch.Tensor:
        ctx.s = s
        return values * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.s, None, None


@register_margin_loss("combined")
class CombinedMarginLoss(MarginLoss):
    """arcface_torch CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold).

    m1 == 1 and m3 == 0: ArcFace branch, target cos(arccos t + m2) without threshold; the margin is applied outside
    autograd, so the gradient is straight-through (d out / d logits = s). m3 > 0: CosFace branch (target − m3).
    interclass_filtering_threshold > 0: non-target logits above it are zeroed first.
    """

    config_keys = ("s", "margin_list")

    @classmethod
    def options_from_config(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        m1, m2, m3 = values["margin_list"]
        return dict(s=values["s"], m1=m1, m2=m2, m3=m3)

    def __init__(self, s: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float = 0) -> None:
        super().__init__()
        if not (m1 == 1.0 and m3 == 0.0) and not m3 > 0:
            raise ValueError(f"CombinedMarginLoss supports (m1=1, m3=0) ArcFace or m3>0 CosFace; got m1={m1} m3={m3}")
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def forward(self, logits, labels, norms=None, update_stats=True):
        rows, cols = _targets(logits, labels)
        thr = self.interclass_filtering_threshold
        if thr > 0:
            with torch.no_grad():
                dirty = logits > thr
                dirty[rows, cols] = False  # never filter a labelled row's own target
            logits = logits * (~dirty).to(logits.dtype)
        if self.m1 == 1.0 and self.m3 == 0.0:
            with torch.no_grad():
                theta = torch.arccos(logits)
                theta[rows, cols] += self.m2
                values = torch.cos(theta)
            return _StraightThroughScale.apply(logits, values, self.s)
        return logits.index_put((rows, cols), logits[rows, cols] - self.m3) * self.s


@register_margin_loss("adaface")
class AdaFace(MarginLoss):
    """CFSM AdaFace(m, h, s, t_alpha): a margin adapted to the feature norm (image quality proxy).

    Buffers `t` (unused, kept for checkpoint compatibility), `batch_mean` (20) and `batch_std` (100) are EMAs of the
    clipped feature norms. They are updated **before** use, with the unbiased std, and only when
    `update_stats=True` (pass False for auxiliary forwards such as the CFSM attack). A batch with fewer than 2 rows
    leaves `batch_std` unchanged (the unbiased std is undefined there).

    Numerical safety (as the AdaFace authors' code; the CFSM port dropped both): cosines are clamped to
    [−1 + eps, 1 − eps] (eps = 1e-3) before acos, whose gradient is infinite at ±1, and the margin-adjusted target
    angle is clipped to [eps, π − eps]. This differs from the CFSM reference only for |cos| > 0.999 or when the
    adjusted angle leaves [eps, π − eps]; the reference fixture's inputs stay inside both.
    """

    needs_norms = True
    config_keys = ("m", "adaface_h", "s", "adaface_t_alpha")

    @classmethod
    def options_from_config(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        return dict(m=values["m"], h=values["adaface_h"], s=values["s"], t_alpha=values["adaface_t_alpha"])

    def __init__(self, m: float = 0.4, h: float = 0.333, s: float = 64.0, t_alpha: float = 0.01,
                 eps: float = 1e-3) -> None:
        super().__init__()
        self.m, self.h, self.s, self.t_alpha, self.eps = m, h, s, t_alpha, eps
        self.register_buffer("t", torch.zeros(1))
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def forward(self, logits, labels, norms=None, update_stats=True):
        if norms is None:
            raise TypeError("AdaFace needs the feature norms: call forward(logits, labels, norms=[N, 1])")
        rows, cols = _targets(logits, labels)
        safe = norms.detach().reshape(-1, 1).float().clamp(0.001, 100)
        if safe.shape[0] != logits.shape[0]:
            raise ValueError(f"norms have {safe.shape[0]} rows but logits have {logits.shape[0]}")
        if update_stats:
            with torch.no_grad():
                a = self.t_alpha
                self.batch_mean.copy_(a * safe.mean() + (1 - a) * self.batch_mean)
                if safe.shape[0] > 1:
                    self.batch_std.copy_(a * safe.std() + (1 - a) * self.batch_std)
        ms = ((safe - self.batch_mean) / (self.batch_std + 1e-3) * self.h).clamp(-1, 1).to(logits.dtype)
        g_ang = -self.m * ms[rows, 0]
        g_add = self.m + self.m * ms[rows, 0]
        theta = torch.acos(logits.clamp(-1 + self.eps, 1 - self.eps))
        # clip the adjusted target angle to [eps, pi - eps] as the AdaFace authors' code does: beyond it cos() is
        # no longer monotonic in the angle (a margin that rewards), and at the ends its gradient vanishes
        target = (theta[rows, cols] + g_ang).clamp(self.eps, math.pi - self.eps)
        theta = theta.index_put((rows, cols), target)
        cosine = torch.cos(theta)
        cosine = cosine.index_put((rows, cols), cosine[rows, cols] - g_add)
        return cosine * self.s


def _lookup(name: str) -> type[MarginLoss]:
    if name not in MARGIN_LOSSES:
        raise ValueError(f"unknown margin loss {name!r}; choices: {', '.join(MARGIN_LOSSES)}")
    return MARGIN_LOSSES[name]


def build_margin_loss(name: str, **params: Any) -> MarginLoss:
    """Build a registered margin head by name with its constructor keywords."""
    cls = _lookup(name)
    try:
        return cls(**params)
    except TypeError as e:
        raise TypeError(f"bad parameters {params} for margin loss {name!r}: {e}") from None


def margin_loss_from_config(name: str, values: Mapping[str, Any]) -> MarginLoss:
    """Build head `name` from a `key -> value` mapping (a loaded config): it reads only its declared `config_keys`."""
    cls = _lookup(name)
    return cls(**cls.options_from_config(values))
