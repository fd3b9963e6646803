"""Stage-1 objectives as pure functions (no data, no files, no process group): what `train_generator.py` optimises.

* synthesis iteration: ``L_G = LSGAN(D(G(x, o)) -> 1) + lambda_id * mean((1 - cos(f(x), f(G(x, o))) - d*)^2) + regu``
  with ``d* = lm + (|o| - la) (um - lm) / (ua - la)``;
  (+ the non-paper terms of `ExtraTerms`, off by default: ``lambda_mode_seeking * mode_seeking_loss``, half the batch
  the other half's faces with other styles; ``lambda_basis * basis_distinctness_loss``, one face decoded at o = 0 and
  at c e_i for a few basis vectors);
* reconstruction iteration (o = 0): ``L_G = mean|x - G(x, 0)| + regu``;
* discriminator (every iteration): ``LSGAN(D(target) -> 1) + LSGAN(D(G(.).detach()) -> 0)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["lambda_id_at", "check_lambda_schedule", "target_distance", "identity_loss", "lsgan_loss",
           "mode_seeking_loss", "append_basis_probes", "basis_distinctness_loss", "BASIS_COEFFICIENT",
           "BASIS_DIRECTIONS", "ExtraTerms", "ExtraBatch", "split_outputs", "is_synthesis_step", "sample_style",
           "STYLE_SAMPLINGS", "lr_at"]

STYLE_SAMPLINGS = ("gaussian", "uniform_magnitude")
BASIS_COEFFICIENT = 3.0  # c of the basis probes: the style report measures each direction e_i at the same c * e_i
BASIS_DIRECTIONS = 4     # basis vectors probed per synthesis iteration (6 pairs; all 45 pairs of 10 are met in ~40)


def check_lambda_schedule(schedule: Sequence, key: str = "lambda_id_schedule") -> list[tuple[int, float]]:
    """Validate ``[(start_epoch, lambda_id), ...]``: first start 0, strictly increasing starts, values >= 0."""
    try:
        steps = [(int(e), float(v)) for e, v in schedule]
    except (TypeError, ValueError):
        raise ValueError(f"config key '{key}' = {schedule!r}: expected a list of (start_epoch, lambda_id) pairs") \
            from None
    if not steps or steps[0][0] != 0:
        raise ValueError(f"config key '{key}' = {schedule!r}: the first entry must start at epoch 0")
    if any(b[0] <= a[0] for a, b in zip(steps, steps[1:])):
        raise ValueError(f"config key '{key}' = {schedule!r}: start epochs must increase strictly")
    if any(v < 0 for _, v in steps):
        raise ValueError(f"config key '{key}' = {schedule!r}: lambda_id values must be >= 0")
    return steps


def lambda_id_at(schedule: Sequence, epoch: int) -> float:
    """The identity-loss weight in force at ``epoch`` (0-based) under a step schedule."""
    value = None
    for start, lam in check_lambda_schedule(schedule):
        if epoch >= start:
            value = lam
    return float(value)  # epoch >= 0 always matches the first entry


def lr_at(step: int, stop_step: int, base_lr: float, decay: float) -> float:
    """The G and D learning rate of iteration ``step`` (0-based) in a run that stops at ``stop_step``: ``base_lr``,
    then falling linearly to 0 over the last ``decay`` share of the steps (``gen_lr_decay``; 0 = constant, as CFSM).
    Why: the generator a short run writes is a snapshot of a noisy GAN trajectory (batch 8 on the toy); letting the
    steps shrink at the end settles it instead of leaving it wherever the last few batches pushed it."""
    if decay <= 0 or stop_step <= 0:
        return float(base_lr)
    start = stop_step * (1.0 - float(decay))
    if step < start:
        return float(base_lr)
    return float(base_lr) * max(0.0, (stop_step - step) / (stop_step - start))


def target_distance(style: torch.Tensor, distance_range: Sequence[float]) -> torch.Tensor:
    """d*(|o|) = lm + (|o| - la) (um - lm) / (ua - la): larger styles are allowed to move the identity further."""
    la, ua, lm, um = (float(v) for v in distance_range)
    if ua == la:
        raise ValueError(f"id_distance_range = {tuple(distance_range)}: la and ua must differ")
    return lm + (style.float().norm(dim=1) - la) * (um - lm) / (ua - la)


def identity_loss(emb_source: torch.Tensor, emb_synth: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((1 - cos(f(x), f(G(x, o))) - d*)^2) in fp32 (embeddings need not be normalised)."""
    cos = F.cosine_similarity(emb_source.float(), emb_synth.float(), dim=1)
    return ((1.0 - cos) - target.float()).pow(2).mean()


def mode_seeking_loss(fake_a: torch.Tensor, fake_b: torch.Tensor, style_a: torch.Tensor, style_b: torch.Tensor,
                      eps: float = 1e-5) -> torch.Tensor:
    """1 / (mean|G(x, a) - G(x, b)| / mean|a - b| + eps): small when two styles of the same faces differ as much
    as their codes do (mode seeking, Mao et al., CVPR 2019). Without it an LSGAN generator drifts every style
    towards one average target look and the basis directions stop being distinct variations."""
    image_change = (fake_a.float() - fake_b.float()).abs().mean()
    style_change = (style_a.float() - style_b.float()).abs().mean()
    return 1.0 / (image_change / style_change.clamp_min(eps) + eps)


def append_basis_probes(sources: torch.Tensor, style: torch.Tensor, rng: torch.Generator,
                        directions: int = BASIS_DIRECTIONS,
                        coefficient: float = BASIS_COEFFICIENT) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sources, style)`` with ``1 + directions`` rows appended: the first face with o = 0, then with o = c e_i for
    ``directions`` basis vectors i drawn from ``rng`` (a CPU generator) without replacement. The probes are ordinary
    synthesis samples for the other terms (|o| = 0 and c); `basis_distinctness_loss` reads the last rows."""
    dim = style.shape[1]
    chosen = torch.randperm(dim, generator=rng)[:directions]
    probe = torch.zeros(1 + chosen.numel(), dim)
    probe[torch.arange(1, 1 + chosen.numel()), chosen] = float(coefficient)
    faces = sources[:1].expand(1 + chosen.numel(), *sources.shape[1:])
    return torch.cat([sources, faces]), torch.cat([style, probe.to(style)])


def basis_distinctness_loss(probes: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over pairs i != j of max(0, cos^2(d_i, d_j) - margin^2), d_i = G(x, c e_i) - G(x, 0); ``probes`` =
    [G(x, 0), G(x, c e_i), ...] (the rows `append_basis_probes` added); ``margin`` = ``basis_cos_margin``. Zero
    once every two basis vectors change the face in ways at most ``margin`` alike (|cos| <= margin). Unlike mode
    seeking (random pairs of styles), it acts on the basis itself, which is what collapses: the ten directions
    drifting to one look. A floor, not a maximum: pushing all the way to orthogonal cost the identity-distance goal
    (docs/research/toy_record.md). Scale-free: it cannot be met by shrinking the changes."""
    changes = F.normalize((probes[1:] - probes[:1]).flatten(1).float(), dim=1)
    if changes.shape[0] < 2:  # a one-dimensional style space has no pair of directions
        return changes.sum() * 0.0
    gram = changes @ changes.t()
    off_diagonal = ~torch.eye(gram.shape[0], dtype=torch.bool, device=gram.device)
    return (gram[off_diagonal].pow(2) - float(margin) ** 2).clamp_min(0).mean()


@dataclass(frozen=True)
class ExtraTerms:
    """Stage 1's generator terms beyond the paper (each off at weight 0, as CFSM), and the batch rows they read.

    * mode seeking (weight ``lambda_mode_seeking``): rows [h, 2h) repeat the faces of rows [0, h), h = B // 2, each
      with another style (the batch keeps B rows: the faces of rows [h, 2h) are left out this iteration);
    * basis distinctness (weight ``lambda_basis``): the first face at o = 0 and at c e_i, appended
      (`append_basis_probes`).
    The added rows are ordinary synthesis samples for the paper's terms too."""
    mode_seeking: float = 0.0      # lambda_mode_seeking
    basis: float = 0.0             # lambda_basis
    basis_cos_margin: float = 0.5  # basis_cos_margin

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ExtraTerms":
        return cls(cfg["lambda_mode_seeking"], cfg["lambda_basis"], cfg["basis_cos_margin"])

    @property
    def names(self) -> list[str]:
        """The logged names of the terms in use."""
        return ["mode_seeking"] * (self.mode_seeking > 0) + ["basis_distinctness"] * (self.basis > 0)

    def batch(self, sources: torch.Tensor, sample_style: Callable[[int], torch.Tensor],
              rng: torch.Generator) -> "ExtraBatch":
        """A synthesis iteration's rows: ``sources`` laid out for the terms in use, their styles
        ``sample_style(rows)`` (drawn after the layout, for every row), then the basis probes (drawn from ``rng``,
        a CPU generator). The styles end on the sources' device."""
        half = sources.shape[0] // 2 if self.mode_seeking > 0 and sources.shape[0] >= 2 else 0
        if half:
            sources = torch.cat([sources[:half], sources[:half], sources[2 * half:]])
        style = sample_style(sources.shape[0]).cpu()
        first_probe = sources.shape[0] if self.basis > 0 else None
        if first_probe is not None:
            sources, style = append_basis_probes(sources, style, rng)
        return ExtraBatch(self, sources, style.to(sources.device), half, first_probe)


@dataclass(frozen=True)
class ExtraBatch:
    """The rows of one synthesis iteration (`ExtraTerms.batch`) and where each extra term reads them."""
    terms: ExtraTerms
    sources: torch.Tensor
    style: torch.Tensor
    half: int                 # mode seeking: rows [half, 2 half) are rows [0, half)'s faces (0: term off)
    first_probe: int | None   # basis distinctness: the probes are rows [first_probe:] (None: term off)

    def added_to(self, loss_g: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss_g`` plus each term in use times its weight (added in turn), and the terms' detached values."""
        logged = {}
        if self.half:
            h = self.half
            term = mode_seeking_loss(fake[:h], fake[h:2 * h], self.style[:h], self.style[h:2 * h])
            loss_g = loss_g + self.terms.mode_seeking * term
            logged["mode_seeking"] = term.detach()
        if self.first_probe is not None:
            term = basis_distinctness_loss(fake[self.first_probe:], self.terms.basis_cos_margin)
            loss_g = loss_g + self.terms.basis * term
            logged["basis_distinctness"] = term.detach()
        return loss_g, logged


def split_outputs(outputs) -> list[torch.Tensor]:
    """A discriminator's per-scale outputs as a list (a bare tensor counts as one scale)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return list(outputs)
    raise TypeError(f"discriminator returned {type(outputs).__name__}; expected a tensor or a list of tensors")


def lsgan_loss(outputs, label: float) -> torch.Tensor:
    """Sum over scales of mean((D_k - label)^2), in fp32."""
    return sum(((o.float() - label) ** 2).mean() for o in split_outputs(outputs))


def is_synthesis_step(step: int) -> bool:
    """Even global iterations synthesise with a random style, odd ones reconstruct at o = 0.

    Parity of the global step (not of epoch + i as in the original) keeps the alternation right across epochs and
    resumes.
    """
    return step % 2 == 0


def sample_style(batch: int, style_dim: int, rng: torch.Generator, sampling: str = "gaussian",
                 max_magnitude: float = 6.0) -> torch.Tensor:
    """Style codes of a synthesis iteration, on the CPU (``rng`` is a CPU generator: same draws on any device).

    * ``"gaussian"`` (the paper): o ~ N(0, I). In ``style_dim`` = 10 dimensions |o| concentrates at 3.1 +- 0.7, so
      the identity target d*(|o|) hardly varies within a batch and nothing asks the generator to make |o| matter
      outside that shell.
    * ``"uniform_magnitude"``: a uniform random direction scaled to |o| ~ U(0, max_magnitude) (max_magnitude = ua of
      ``id_distance_range``): d* spans its whole range every batch, so the identity term has to teach a distance
      that grows with |o|, and small-|o| samples also train identity preservation near o = 0.
    """
    if sampling not in STYLE_SAMPLINGS:
        raise ValueError(f"config key 'style_sampling' = {sampling!r}: expected one of {STYLE_SAMPLINGS}")
    o = torch.randn(batch, style_dim, generator=rng)
    if sampling == "gaussian":
        return o
    unit = o / o.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit * (torch.rand(batch, 1, generator=rng) * float(max_magnitude))
