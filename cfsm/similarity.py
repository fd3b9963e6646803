"""Dataset similarity from CFSM generators' learned style bases (pure numpy math, no files, no torch).

A generator maps a style code ``o`` (style_dim) to a latent ``z = o @ U + mu`` (latent_dim) that the decoder's MLP
turns into AdaIN parameters. The row space of ``U`` is the set of latent directions the generator uses to express
its target domain's variations, and ``mu`` is the domain's centre. Two generators are compared by

* the principal angles between the row spaces of their ``U`` (basis-independent: any rotation/reflection of the
  style coordinates, ``U -> R U``, leaves them unchanged);
* ``similarity = mean(cos^2(theta_i))`` in [0, 1]: 1 for the same subspace, 0 for orthogonal subspaces;
* ``offset = ||mu_a - mu_b||``, the distance between the domain centres.

Comparability assumption: a latent direction means the same image change in two generators only if they share
the latent-to-AdaIN mapping (MLP and decoder). That holds (approximately) for generators fine-tuned from ONE shared
stage-1 model (`init_generator`); bases of independently initialised generators live in unrelated latent spaces
and their angles carry no information about the datasets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["principal_angles", "subspace_similarity", "mu_offset", "SimilarityResult", "compare_bases"]


def _orthonormal_rows(u: np.ndarray, name: str) -> np.ndarray:
    """Orthonormal basis (as columns, latent_dim x rank) of the row space of ``u``; errors on rank deficiency."""
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 2 or u.shape[0] == 0 or u.shape[0] > u.shape[1]:
        raise ValueError(f"{name}: expected a style basis U of shape [style_dim, latent_dim] with "
                         f"0 < style_dim <= latent_dim, got shape {tuple(u.shape)}")
    if not np.isfinite(u).all():
        raise ValueError(f"{name}: basis U contains non-finite values")
    # SVD rather than QR: it also reveals a (near) rank-deficient basis, where the angles would be ill-defined.
    left, s, _ = np.linalg.svd(u.T, full_matrices=False)
    if s[-1] <= 1e-8 * max(s[0], 1e-30):
        raise ValueError(f"{name}: basis U of shape {tuple(u.shape)} is rank deficient "
                         f"(singular values {s.min():.3g} .. {s.max():.3g})")
    return left


def principal_angles(u_a: np.ndarray, u_b: np.ndarray, names: tuple[str, str] = ("U_a", "U_b")) -> np.ndarray:
    """Principal angles (radians, ascending) between the row spaces of two bases [k_a, d] and [k_b, d]."""
    qa = _orthonormal_rows(u_a, names[0])
    qb = _orthonormal_rows(u_b, names[1])
    if qa.shape[0] != qb.shape[0]:
        raise ValueError(f"{names[0]} has latent_dim {qa.shape[0]} but {names[1]} has {qb.shape[0]}: "
                         f"bases of different latent spaces cannot be compared")
    cosines = np.linalg.svd(qa.T @ qb, compute_uv=False)
    # rounding can push cosines marginally above 1
    return np.sort(np.arccos(np.clip(cosines, 0.0, 1.0)))


def subspace_similarity(u_a: np.ndarray, u_b: np.ndarray, names: tuple[str, str] = ("U_a", "U_b")) -> float:
    """mean(cos^2) of the principal angles: 1 = same subspace, 0 = orthogonal subspaces.

    With unequal dimensions the mean runs over the min(k_a, k_b) angles, so a subspace contained in the other
    scores 1.
    """
    return float(np.mean(np.cos(principal_angles(u_a, u_b, names)) ** 2))


def mu_offset(mu_a: np.ndarray, mu_b: np.ndarray, names: tuple[str, str] = ("mu_a", "mu_b")) -> float:
    """Euclidean distance between two domain centres ``mu`` [latent_dim]."""
    a = np.asarray(mu_a, dtype=np.float64).reshape(-1)
    b = np.asarray(mu_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} has shape {a.shape} but {names[1]} has {b.shape}")
    return float(np.linalg.norm(a - b))


@dataclass
class SimilarityResult:
    names: list[str]
    similarity: np.ndarray       # [n, n] mean cos^2 of principal angles
    mean_angle_deg: np.ndarray   # [n, n] mean principal angle in degrees
    max_angle_deg: np.ndarray    # [n, n] largest principal angle in degrees
    offset: np.ndarray           # [n, n] ||mu_i - mu_j||

    def as_dict(self) -> dict:
        return {"names": self.names, "similarity": self.similarity.tolist(),
                "mean_angle_deg": self.mean_angle_deg.tolist(), "max_angle_deg": self.max_angle_deg.tolist(),
                "offset": self.offset.tolist()}


def compare_bases(bases: dict[str, tuple[np.ndarray, np.ndarray]]) -> SimilarityResult:
    """All pairwise comparisons of named ``(U, mu)`` bases."""
    if len(bases) < 1:
        raise ValueError("compare_bases: no bases given")
    names = list(bases)
    n = len(names)
    sim, mean_ang, max_ang, off = (np.zeros((n, n)) for _ in range(4))
    for i in range(n):
        for j in range(i, n):
            (ua, ma), (ub, mb) = bases[names[i]], bases[names[j]]
            angles = principal_angles(ua, ub, (f"{names[i]}: U", f"{names[j]}: U"))
            sim[i, j] = sim[j, i] = float(np.mean(np.cos(angles) ** 2))
            mean_ang[i, j] = mean_ang[j, i] = float(np.degrees(angles.mean()))
            max_ang[i, j] = max_ang[j, i] = float(np.degrees(angles.max()))
            off[i, j] = off[j, i] = mu_offset(ma, mb, (f"{names[i]}: mu", f"{names[j]}: mu"))
    return SimilarityResult(names, sim, mean_ang, max_ang, off)
