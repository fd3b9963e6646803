"""Will a generator help stage 2? How close its faces come to the real target faces, as the identity network sees them.

CFSM trains the recognition model on synthesized faces G(x, o) in place of target-domain faces it has no labels for;
what that can teach depends on how much those faces look like the target *to a face recogniser*. This module
measures it on embeddings of the stage-1 identity network f (L2-normalised, as verification uses them):

* ``fd_clean_target``: Fréchet distance between the embeddings of clean faces x and of real target faces;
* ``fd_synth_target``: the same between G(x, o), o ~ N(0, I) (stage 2's starting styles), and real target faces;
* ``relative_gap = fd_synth_target / fd_clean_target``: 0 when the synthesized faces are distributed like the
  target's, 1 when they are no closer than the clean faces they came from, above 1 when they lead elsewhere.

The Fréchet distance (Heusel et al., 2017, as in FID) of two sets with means m_a, m_b and covariances C_a, C_b is
``|m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``. Dividing by the clean-target distance makes the number
comparable across identity networks and target domains. Whether it predicts the stage-2 gain is an empirical
question, answered on the toy in docs/generator_check.md; the stage-2 comparison (tools/ablation.py) settles it.
Pure functions: no files, no process group.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["frechet_distance", "embed", "domain_gap", "GAP_FACES"]

GAP_FACES = 256  # faces per set: enough for stable means/covariances of 128-512-d embeddings at a few seconds' cost


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to the rows of ``a`` [N, D] and ``b`` [M, D] (N, M >= 2)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: need two [N >= 2, D] arrays of one D, got {a.shape} and {b.shape}")
    mean_diff = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    root = np.real(root)  # rounding leaves tiny imaginary parts on rank-deficient covariances
    value = float(mean_diff @ mean_diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))
    return max(value, 0.0)


@torch.no_grad()
def embed(id_net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 64,
          device: torch.device | str = "cpu") -> np.ndarray:
    """L2-normalised embeddings of ``images`` ([-1, 1], [N, 3, H, W]) by ``id_net`` (in eval mode)."""
    out = [F.normalize(id_net(images[i:i + batch_size].to(device).float()).float(), dim=1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def domain_gap(generator, id_net: Callable[[torch.Tensor], torch.Tensor], faces: torch.Tensor,
               target_faces: torch.Tensor, batch_size: int = 64, seed: int = 0) -> dict:
    """The measures of the module docstring for ``generator`` (``encode``/``decode``/``style_dim``, eval mode) on
    clean ``faces`` and real ``target_faces`` (both [-1, 1]); styles o ~ N(0, I) drawn from ``seed``."""
    if faces.dim() != 4 or faces.shape[0] < 2 or target_faces.dim() != 4 or target_faces.shape[0] < 2:
        raise ValueError(f"domain_gap: need >= 2 clean and >= 2 target faces [N, 3, H, W], got "
                         f"{list(faces.shape)} and {list(target_faces.shape)}")
    param = next(iter(generator.parameters()), None)
    device = param.device if param is not None else faces.device
    styles = torch.randn(faces.shape[0], int(generator.style_dim), generator=torch.Generator().manual_seed(seed))
    synth = torch.cat([generator.decode(generator.encode(faces[i:i + batch_size].to(device).float()),
                                        styles[i:i + batch_size].to(device)).float().cpu()
                       for i in range(0, faces.shape[0], batch_size)])
    e_clean, e_synth, e_target = (embed(id_net, x, batch_size, device) for x in (faces, synth, target_faces))
    fd_clean, fd_synth = frechet_distance(e_clean, e_target), frechet_distance(e_synth, e_target)
    return {"num_faces": int(faces.shape[0]), "num_target_faces": int(target_faces.shape[0]),
            "fd_clean_target": fd_clean, "fd_synth_target": fd_synth,
            "relative_gap": fd_synth / fd_clean if fd_clean > 0 else float("nan")}
