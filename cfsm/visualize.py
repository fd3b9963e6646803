"""Image grids of a CFSM generator's style space (shared by stage-1 training and `tools/style_grid.py`).

All grids are uint8 RGB HWC numpy arrays; inputs are [-1, 1] CHW image batches. Generators are duck-typed: they
need ``encode(x)``, ``decode(content, o)`` and ``style_dim``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["to_uint8", "label_tile", "tile_rows", "direction_grid", "random_style_row", "style_grid_image",
           "training_samples_grid", "clean_vs_synth_grid", "mix_grid", "save_png", "DEFAULT_COEFFICIENTS",
           "DEFAULT_MAGNITUDES"]

DEFAULT_COEFFICIENTS: tuple[float, ...] = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
DEFAULT_MAGNITUDES: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] [N,3,H,W] (or [3,H,W]) -> uint8 [N,H,W,3]."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def label_tile(tile: np.ndarray, text: str) -> np.ndarray:
    """A copy of ``tile`` with a small readable label in the top-left corner."""
    import cv2  # lazy: only grids need it

    out = np.ascontiguousarray(tile.copy())
    scale = max(0.3, tile.shape[0] / 112 * 0.35)
    # dark outline first so the label reads on light and dark faces alike
    cv2.putText(out, text, (2, int(12 * scale / 0.35)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 2, cv2.LINE_AA)
    cv2.putText(out, text, (2, int(12 * scale / 0.35)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1,
                cv2.LINE_AA)
    return out


def tile_rows(rows: Sequence[Sequence[np.ndarray | None]], pad: int = 2) -> np.ndarray:
    """Rows of equally sized HWC tiles -> one image; ``None`` is a blank tile; short rows are padded blank."""
    tiles = [t for row in rows for t in row if t is not None]
    if not tiles:
        raise ValueError("tile_rows: no tiles")
    h, w, c = tiles[0].shape
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) - pad, ncol * (w + pad) - pad, c), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if t is None:
                continue
            if t.shape != (h, w, c):
                raise ValueError(f"tile_rows: tile ({i}, {j}) has shape {t.shape}, expected {(h, w, c)}")
            canvas[i * (h + pad): i * (h + pad) + h, j * (w + pad): j * (w + pad) + w] = t
    return canvas


def _decode(generator, content: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    # one content code, many styles: expand rather than re-encode the face for every tile
    expanded = content.expand(styles.shape[0], *content.shape[1:])
    return generator.decode(expanded, styles)


@torch.no_grad()
def direction_grid(generator, face: torch.Tensor,
                   coefficients: Sequence[float] = DEFAULT_COEFFICIENTS) -> list[list[np.ndarray]]:
    """Rows = basis direction i (o = c * e_i), columns = coefficient c; tiles labelled ``e<i> <c>``."""
    face = face.unsqueeze(0) if face.dim() == 3 else face[:1]
    dim = int(generator.style_dim)
    param = next(iter(generator.parameters()), None)
    device = param.device if param is not None else face.device
    content = generator.encode(face.to(device))
    coeffs = torch.tensor(list(coefficients), dtype=torch.float32, device=device)
    rows = []
    for i in range(dim):
        styles = torch.zeros(len(coeffs), dim, device=device)
        styles[:, i] = coeffs
        imgs = to_uint8(_decode(generator, content, styles))
        rows.append([label_tile(t, f"e{i + 1} {c:+g}") for t, c in zip(imgs, coefficients)])
    return rows


@torch.no_grad()
def random_style_row(generator, face: torch.Tensor, magnitudes: Sequence[float] = DEFAULT_MAGNITUDES,
                     rng: torch.Generator | None = None) -> list[np.ndarray]:
    """One random unit direction per tile, scaled to |o| = magnitude; tiles labelled ``|o|=m``."""
    face = face.unsqueeze(0) if face.dim() == 3 else face[:1]
    dim = int(generator.style_dim)
    param = next(iter(generator.parameters()), None)
    device = param.device if param is not None else face.device
    content = generator.encode(face.to(device))
    directions = torch.randn(len(magnitudes), dim, generator=rng)
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    styles = (directions * torch.tensor(list(magnitudes), dtype=torch.float32)[:, None]).to(device)
    imgs = to_uint8(_decode(generator, content, styles))
    return [label_tile(t, f"|o|={m:g}") for t, m in zip(imgs, magnitudes)]


def style_grid_image(generator, face: torch.Tensor, coefficients: Sequence[float] = DEFAULT_COEFFICIENTS,
                     magnitudes: Sequence[float] = DEFAULT_MAGNITUDES, rng: torch.Generator | None = None
                     ) -> np.ndarray:
    """The style-control figure of one face: input tile, then direction rows (-3..3), then a random-style row."""
    src = label_tile(to_uint8(face)[0], "input")
    rows: list[list[np.ndarray | None]] = [[src]]
    rows += [[None] + r for r in direction_grid(generator, face, coefficients)]
    rows.append([None] + random_style_row(generator, face, magnitudes, rng))
    return tile_rows(rows)


@torch.no_grad()
def training_samples_grid(generator, sources: torch.Tensor, targets: torch.Tensor,
                          magnitudes: Sequence[float] = (0.0, 2.0, 4.0, 6.0), max_rows: int = 4,
                          rng: torch.Generator | None = None) -> np.ndarray:
    """Stage-1 monitor: each row = source | G(source, o) at |o| = each magnitude | a target-domain face."""
    n = min(max_rows, sources.shape[0], targets.shape[0])
    if n == 0:
        raise ValueError("training_samples_grid: need at least one source and one target image")
    rows = []
    for i in range(n):
        synth = random_style_row(generator, sources[i], magnitudes, rng)
        rows.append([label_tile(to_uint8(sources[i])[0], "source")] + synth
                    + [label_tile(to_uint8(targets[i])[0], "target")])
    return tile_rows(rows)


def clean_vs_synth_grid(clean: torch.Tensor, synth: torch.Tensor, magnitudes: torch.Tensor,
                        max_faces: int = 8) -> np.ndarray:
    """Stage-2 monitor: the same faces clean (top row) and synthesized (bottom row), each labelled with |o|."""
    n = min(max_faces, clean.shape[0])
    top = list(to_uint8(clean[:n]))
    bottom = [label_tile(t, f"|o|={float(m):.2f}") for t, m in zip(to_uint8(synth[:n]), magnitudes[:n])]
    return tile_rows([top, bottom])


def mix_grid(clean: torch.Tensor, mix) -> np.ndarray | None:
    """`clean_vs_synth_grid` of a step's CFSM mix (`cfsm.attack.adversarial_mix`'s result) and the step's clean
    images; None when the step synthesized nothing."""
    if mix is None or not mix.synth_index.numel():
        return None
    return clean_vs_synth_grid(clean[mix.synth_index], mix.images[mix.synth_index], mix.style.norm(dim=1))


def save_png(grid: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 grid as PNG (creates the folder); raises naming the path when writing fails."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(grid[:, :, ::-1])):
        raise OSError(f"could not write PNG {path}")
    return path
