"""Compare the target domains of several CFSM generators through their learned style bases (pca.U, pca.mu).

    python -m tools.dataset_similarity A=work_dirs/gen_a/generator.pth B=work_dirs/gen_b/generator.pth \
        C=work_dirs/gen_c/generator.pth --out work_dirs/similarity

Prints the similarity matrix (mean cos^2 of the principal angles between the row spaces of U: 1 = same subspace,
0 = orthogonal; a random 10-dim subspace of a 128-dim latent space scores about 10/128 = 0.08), the mean
principal angle and the offset ||mu_a - mu_b||, and writes `similarity.json` and `similarity.png` (heatmaps).

ASSUMPTION: the generators must share their latent space, i.e. be fine-tuned from ONE stage-1 model
(`train_generator.py ... init_generator=<shared generator.pth>`). The latent z = o @ U + mu only means something
through the MLP/decoder that reads it; independently initialised generators have unrelated latent spaces and their
angles say nothing about the datasets (this tool warns when the bases look independent).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from utils.checkpoint import write_json
from utils.cli import ArgumentParser, run_command


def read_basis(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(U [style_dim, latent_dim], mu [latent_dim])`` from a generator file (released format or a bare G state
    dict); errors name the file and the missing key."""
    from utils.checkpoint import CheckpointError, safe_load

    obj = safe_load(path)
    state = obj.get("G_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a generator file (expected a dict with 'G_state_dict')")
    for key in ("pca.U", "pca.mu"):
        if key not in state:
            raise CheckpointError(f"{path}: generator state has no '{key}' (keys: {list(state)[:5]} ...)")
    return state["pca.U"].double().numpy(), state["pca.mu"].double().numpy()


def _parse_named(items: list[str]) -> dict[str, str]:
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).parent.name or Path(item).stem, item
        if not name or not path:
            raise ValueError(f"generator argument {item!r}: expected NAME=PATH or PATH")
        if name in named:
            raise ValueError(f"generator name {name!r} given twice ({named[name]} and {path}); use NAME=PATH")
        named[name] = path
    return named


def format_matrix(names: list[str], matrix: np.ndarray, title: str, fmt: str = "{:8.3f}") -> str:
    width = max(8, max(len(n) for n in names))
    lines = [title, " " * width + " " + " ".join(f"{n[:8]:>8}" for n in names)]
    for name, row in zip(names, matrix):
        lines.append(f"{name:>{width}} " + " ".join(fmt.format(v) for v in row))
    return "\n".join(lines)


def write_heatmap(result, path: Path) -> Path:
    """Two heatmaps side by side: subspace similarity and mu offset."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    n = len(result.names)
    fig, axes = plt.subplots(1, 2, figsize=(4.5 * 2 + 1, 0.5 * n + 3.5))
    panels = ((result.similarity, "subspace similarity (mean cos$^2$)", "viridis", 0.0, 1.0),
              (result.offset, "offset $\\|\\mu_a - \\mu_b\\|$", "magma_r", 0.0, None))
    for ax, (mat, title, cmap, vmin, vmax) in zip(axes, panels):
        im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(n), result.names, rotation=45, ha="right")
        ax.set_yticks(range(n), result.names)
        ax.set_title(title)
        hi = vmax if vmax is not None else max(float(mat.max()), 1e-12)
        for i in range(n):
            for j in range(n):
                dark = (mat[i, j] / hi < 0.5) == (cmap == "viridis")  # viridis is dark at low, magma_r at high
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", color="white" if dark else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_files(generators: dict[str, str]):
    """SimilarityResult over named generator files."""
    from cfsm.similarity import compare_bases

    return compare_bases({name: read_basis(path) for name, path in generators.items()})


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("generators", nargs="+", help="NAME=PATH (or PATH: named by its folder) of generator files")
    p.add_argument("--out", default=None,
                   help="folder for similarity.json and similarity.png (default: print only, write nothing)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    named = _parse_named(args.generators)
    if len(named) < 2:
        raise ValueError(f"give at least two generators to compare, got {len(named)}: {list(named.values())}")
    if args.out:
        from eval.common import check_output_folder

        check_output_folder(args.out)  # before reading any generator
    result = compare_files(named)
    print(format_matrix(result.names, result.similarity, "subspace similarity (mean cos^2 of principal angles):"))
    print(format_matrix(result.names, result.mean_angle_deg, "mean principal angle (degrees):", "{:8.1f}"))
    print(format_matrix(result.names, result.offset, "offset ||mu_a - mu_b||:"))
    off_diag = result.similarity[~np.eye(len(result.names), dtype=bool)]
    style_dim, latent_dim = read_basis(next(iter(named.values())))[0].shape
    if off_diag.size and off_diag.max() < 2.0 * style_dim / latent_dim:
        print(f"warning: every pair scores near the chance level of independent subspaces "
              f"({style_dim}/{latent_dim} = {style_dim / latent_dim:.2f}); were these generators fine-tuned from "
              f"one shared stage-1 model (init_generator)? Otherwise their bases are not comparable.")
    out = result.as_dict()
    out["files"] = named
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(out, folder / "similarity.json")
        write_heatmap(result, folder / "similarity.png")
        print(f"wrote {folder / 'similarity.json'} and {folder / 'similarity.png'}")
    return out


if __name__ == "__main__":
    run_command(main)
