"""cfsm/domain_gap.py: the Fréchet distance against closed forms, and the relative gap at its two ends."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cfsm.domain_gap import domain_gap, frechet_distance


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form() -> None:
    # diagonal covariances: FD = |m_a - m_b|^2 + sum_i (s_a,i - s_b,i)^2 (s = standard deviations)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20000, 3))
    z = (z - z.mean(0)) / z.std(0, ddof=1)  # exactly zero mean, unit sample variance
    a = z * np.array([1.0, 2.0, 0.5]) + np.array([0.0, 1.0, 0.0])
    b = z[::-1] * np.array([3.0, 2.0, 0.5])
    want = 1.0 + (1 - 3) ** 2 + 0 + 0
    assert frechet_distance(a, b) == pytest.approx(want, rel=2e-2)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + np.array([0.3, -0.4, 0.0])) == pytest.approx(0.25, rel=1e-6)


def test_frechet_distance_refuses_mismatched_sets() -> None:
    with pytest.raises(ValueError, match="frechet_distance"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="frechet_distance"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


class _StubGenerator(torch.nn.Module):
    """decode(content, o) returns `fixed` when given, else the input itself (content = the input)."""

    style_dim = 10

    def __init__(self, fixed: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fixed = fixed

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, content: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        if self.fixed is None:
            return content
        self.calls = getattr(self, "calls", 0)
        out = self.fixed[self.calls:self.calls + content.shape[0]]
        self.calls += content.shape[0]
        return out


def _faces(seed: int, shift: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(48, 3, 8, 8, generator=g) * 0.5 + shift).clamp(-1, 1)


def test_relative_gap_is_one_for_an_identity_generator_and_zero_for_one_that_gives_the_target() -> None:
    id_net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 6))
    torch.manual_seed(0)
    clean, target = _faces(1, -0.5), _faces(2, 0.3)
    same = domain_gap(_StubGenerator(), id_net, clean, target, batch_size=16)
    assert same["relative_gap"] == pytest.approx(1.0, abs=1e-9)
    assert same["fd_clean_target"] > 0.01
    hit = domain_gap(_StubGenerator(fixed=target), id_net, clean, target, batch_size=16)
    assert hit["relative_gap"] == pytest.approx(0.0, abs=1e-6)
    half = domain_gap(_StubGenerator(fixed=(clean + target) / 2), id_net, clean, target, batch_size=16)
    assert 0.0 < half["relative_gap"] < 1.0


def test_domain_gap_refuses_single_faces() -> None:
    with pytest.raises(ValueError, match="domain_gap"):
        domain_gap(_StubGenerator(), torch.nn.Flatten(), torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 4, 4))
