"""Is a stage-1 generator's style space controllable? Its measures, as one pure function.

On clean faces x and an identity network f (the stage-1 identity network):

* ``id_distance_by_magnitude``: mean of ``1 - cos(f(x), f(G(x, o)))`` at ``|o|`` in ``magnitudes`` (random unit
  directions), against ``d*(|o|)``, the stage-1 target (``id_distance_range``);
* ``magnitude_spearman``: Spearman correlation of ``|o|`` and identity distance over faces x magnitudes x directions;
* ``recon_l1``: mean ``|G(x, 0) - x|`` on the [-1, 1] scale;
* ``direction_effect``: mean over basis vectors e_i of mean ``|G(x, c e_i) - G(x, 0)|`` (c = 3);
* ``direction_distinctness``: mean over pairs i<j of mean ``|d_i - d_j|`` / mean_i mean ``|d_i|``,
  d_i = ``G(x, c e_i) - G(x, 0)``;
* ``direction_abs_cos`` (reported, not a goal): mean over faces and pairs i<j of ``|cos(d_i, d_j)|``. Distinctness
  also counts directions that make one change at different strengths; near 1 here means they do;
* ``sharpness``: mean log variance of the Laplacian of the grey image (0..255) of clean faces, real target faces
  and ``G(x, o ~ N(0, I))``.

`style_report` returns plain numbers (JSON-ready) plus a ``goals`` block: each goal's value, threshold and whether it
is met. Nothing here reads files or needs a process group; the stage-1 trainer and ``tools/style_report.py`` share it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cfsm.stage1 import BASIS_COEFFICIENT
from utils.checkpoint import write_json

__all__ = ["style_report", "write_style_report", "report_from_datasets", "evenly_spaced", "spearman", "sharpness", "REPORT_MAGNITUDES", "GOALS", "report_scalars",
           "style_report_figure"]

REPORT_MAGNITUDES: tuple[float, ...] = (0.0, 1.5, 3.0, 4.5, 6.0)
# the goals: a toy generator that meets these has a style space the attack can exploit
GOALS = {"id_distance_o0_max": 0.15, "distance_vs_target_max": 0.1, "magnitude_spearman_min": 0.7,
         "recon_l1_max": 0.12, "direction_effect_min": 0.03, "direction_distinctness_min": 0.5,
         "sharpness_gap_fraction_max": 0.5}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation with tied values given their average rank (NaN when either side is constant)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(np.asarray(x, dtype=np.float64)), rankdata(np.asarray(y, dtype=np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def sharpness(images: torch.Tensor) -> float:
    """Mean over images of log(var(Laplacian(grey))), grey on the 0..255 scale; images [-1, 1] [N, 3, H, W]."""
    import cv2

    from cfsm.visualize import to_uint8

    values = []
    for rgb in to_uint8(images):
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64)
        values.append(math.log(max(float(cv2.Laplacian(grey, cv2.CV_64F).var()), 1e-12)))
    return float(np.mean(values))


def _target_distance(magnitude: float, distance_range: Sequence[float]) -> float:
    from cfsm.stage1 import target_distance

    return float(target_distance(torch.tensor([[magnitude]]), distance_range)[0])


@torch.no_grad()
def style_report(generator, id_net: Callable[[torch.Tensor], torch.Tensor], faces: torch.Tensor,
                 target_faces: torch.Tensor, distance_range: Sequence[float] = (0.0, 6.0, 0.05, 0.65),
                 magnitudes: Sequence[float] = REPORT_MAGNITUDES, directions: int = 3, coefficient: float = BASIS_COEFFICIENT,
                 batch_size: int = 32, seed: int = 0) -> dict:
    """All measures of the module docstring for ``generator`` (``encode``/``decode``/``style_dim``) on ``faces``.

    ``id_net`` maps a [-1, 1] batch to embeddings and must be in eval mode; ``faces`` are clean source faces and
    ``target_faces`` real target-domain faces (only their sharpness is used). Random directions and styles come
    from ``seed``, so two reports of one generator agree exactly.
    """
    if faces.dim() != 4 or faces.shape[0] < 2:
        raise ValueError(f"style_report: need a batch of >= 2 faces [N, 3, H, W], got {list(faces.shape)}")
    if target_faces.dim() != 4 or target_faces.shape[0] < 1:
        raise ValueError(f"style_report: need >= 1 target face [N, 3, H, W], got {list(target_faces.shape)}")
    if directions < 1:
        raise ValueError(f"style_report: directions must be >= 1, got {directions}")
    param = next(iter(generator.parameters()), None)
    device = param.device if param is not None else faces.device
    dim = int(generator.style_dim)
    rng = torch.Generator().manual_seed(seed)
    n = faces.shape[0]
    unit = torch.randn(n, directions, dim, generator=rng)
    unit = unit / unit.norm(dim=2, keepdim=True).clamp_min(1e-12)
    random_styles = torch.randn(n, dim, generator=rng)

    dist = torch.zeros(n, len(magnitudes), directions)
    recon_err, effects, pair_diffs, pair_cos = [], torch.zeros(dim), torch.zeros(dim, dim), torch.zeros(dim, dim)
    synth_random = []
    for lo in range(0, n, batch_size):
        x = faces[lo:lo + batch_size].to(device).float()
        b = x.shape[0]
        content = generator.encode(x)
        emb_x = id_net(x).float()
        base = generator.decode(content, torch.zeros(b, dim, device=device)).float()
        recon_err.append((base - x).abs().mean(dim=(1, 2, 3)).cpu())
        for j, m in enumerate(magnitudes):
            for r in range(directions):
                o = (unit[lo:lo + b, r] * float(m)).to(device)
                emb = id_net(generator.decode(content, o)).float()
                dist[lo:lo + b, j, r] = (1.0 - F.cosine_similarity(emb_x, emb, dim=1)).cpu()
        deltas = []
        for i in range(dim):
            o = torch.zeros(b, dim, device=device)
            o[:, i] = coefficient
            deltas.append((generator.decode(content, o).float() - base).cpu())
        for i in range(dim):
            effects[i] += deltas[i].abs().mean(dim=(1, 2, 3)).sum()
            for k in range(i + 1, dim):
                pair_diffs[i, k] += (deltas[i] - deltas[k]).abs().mean(dim=(1, 2, 3)).sum()
                pair_cos[i, k] += F.cosine_similarity(deltas[i].flatten(1), deltas[k].flatten(1), dim=1).abs().sum()
        synth_random.append(generator.decode(content, random_styles[lo:lo + b].to(device)).float().cpu())

    effects /= n
    pair_diffs /= n
    pair_cos /= n
    mean_effect = float(effects.mean())
    upper = tuple(torch.triu_indices(dim, dim, offset=1))  # the pairs i < k
    pairs, pair_abs_cos = pair_diffs[upper].tolist(), pair_cos[upper].tolist()
    distinct = float(np.mean(pairs)) / mean_effect if pairs and mean_effect > 0 else float("nan")
    by_mag = dist.mean(dim=(0, 2))
    targets = [_target_distance(float(m), distance_range) for m in magnitudes]
    mags_flat = torch.tensor([float(m) for m in magnitudes])[None, :, None].expand_as(dist)
    rho = spearman(mags_flat.flatten().tolist(), dist.flatten().tolist())
    sharp = {"clean": sharpness(faces), "target": sharpness(target_faces),
             "synth": sharpness(torch.cat(synth_random))}
    report = {
        "num_faces": n, "directions_per_magnitude": directions, "coefficient": coefficient,
        "magnitudes": [float(m) for m in magnitudes],
        "id_distance_by_magnitude": [float(v) for v in by_mag],
        "id_distance_std_by_magnitude": [float(v) for v in dist.transpose(0, 1).reshape(len(magnitudes), -1)
                                         .std(dim=1)],
        "target_distance_by_magnitude": targets,
        "id_distance_o0": float(by_mag[0]) if float(magnitudes[0]) == 0.0 else float("nan"),
        "distance_vs_target": float(np.mean([abs(float(a) - t) for a, t in zip(by_mag, targets)])),
        "distance_rising": bool(all(float(b) > float(a) for a, b in zip(by_mag, by_mag[1:]))),
        "magnitude_spearman": rho,
        "recon_l1": float(torch.cat(recon_err).mean()),
        "direction_effect": mean_effect,
        "direction_effect_by_basis": [float(v) for v in effects],
        "direction_distinctness": distinct,
        "direction_abs_cos": float(np.mean(pair_abs_cos)) if pair_abs_cos else float("nan"),
        "sharpness": sharp,
    }
    gap = abs(sharp["clean"] - sharp["target"])
    report["sharpness_gap_fraction"] = abs(sharp["synth"] - sharp["target"]) / gap if gap > 0 else float("nan")
    report["goals"] = _goals(report)
    report["goals_met"] = all(g["met"] for g in report["goals"].values())
    return report


def _goals(r: dict) -> dict:
    def goal(value, threshold, met) -> dict:
        return {"value": value, "threshold": threshold, "met": bool(met) and not _nan(value)}

    g = GOALS
    return {
        "id_distance_o0": goal(r["id_distance_o0"], g["id_distance_o0_max"],
                               r["id_distance_o0"] <= g["id_distance_o0_max"]),
        "distance_vs_target": goal(r["distance_vs_target"], g["distance_vs_target_max"],
                                   r["distance_rising"] and r["distance_vs_target"] <= g["distance_vs_target_max"]),
        "magnitude_spearman": goal(r["magnitude_spearman"], g["magnitude_spearman_min"],
                                   r["magnitude_spearman"] >= g["magnitude_spearman_min"]),
        "recon_l1": goal(r["recon_l1"], g["recon_l1_max"], r["recon_l1"] <= g["recon_l1_max"]),
        "direction_effect": goal(r["direction_effect"], g["direction_effect_min"],
                                 r["direction_effect"] >= g["direction_effect_min"]),
        "direction_distinctness": goal(r["direction_distinctness"], g["direction_distinctness_min"],
                                       r["direction_effect"] >= g["direction_effect_min"]
                                       and r["direction_distinctness"] >= g["direction_distinctness_min"]),
        "sharpness": goal(r["sharpness_gap_fraction"], g["sharpness_gap_fraction_max"],
                          r["sharpness_gap_fraction"] <= g["sharpness_gap_fraction_max"]),
    }


def _nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def report_scalars(report: dict) -> dict[str, float]:
    """The report's headline numbers as flat ``name -> float`` (for TensorBoard / summaries)."""
    out = {k: float(report[k]) for k in ("id_distance_o0", "distance_vs_target", "magnitude_spearman", "recon_l1",
                                          "direction_effect", "direction_distinctness", "direction_abs_cos",
                                          "sharpness_gap_fraction")}
    out.update({f"sharpness_{k}": float(v) for k, v in report["sharpness"].items()})
    out["goals_met"] = float(sum(g["met"] for g in report["goals"].values()))
    if "domain_gap" in report:
        out["domain_gap"] = float(report["domain_gap"]["relative_gap"])
    return out


def write_style_report(generator, id_net, faces: torch.Tensor, target_faces: torch.Tensor, out: str | Path,
                       distance_range: Sequence[float] = (0.0, 6.0, 0.05, 0.65), directions: int = 3,
                       seed: int = 0, gap_faces: torch.Tensor | None = None,
                       gap_target_faces: torch.Tensor | None = None) -> dict:
    """`style_report`, written as OUT/style_report.json and OUT/style_report.png (curve, bars, samples); with
    ``gap_faces`` / ``gap_target_faces`` (larger sets: means and covariances) also the generator's domain gap
    (cfsm/domain_gap.py) as ``report["domain_gap"]``: the usefulness measure, not one of the goals."""
    from cfsm.domain_gap import domain_gap
    from cfsm.visualize import training_samples_grid

    out = Path(out)
    report = style_report(generator, id_net, faces, target_faces, distance_range, directions=directions, seed=seed)
    if gap_faces is not None and gap_target_faces is not None:
        report["domain_gap"] = domain_gap(generator, id_net, gap_faces, gap_target_faces, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "style_report.json")
    param = next(iter(generator.parameters()), None)
    device = param.device if param is not None else faces.device
    samples = training_samples_grid(generator, faces.to(device), target_faces.to(device),
                                    magnitudes=REPORT_MAGNITUDES, max_rows=4,
                                    rng=torch.Generator().manual_seed(seed))
    style_report_figure(report, samples, out / "style_report.png")
    return report


def evenly_spaced(dataset, count: int) -> torch.Tensor:
    """``count`` un-flipped items picked evenly over ``dataset`` (items ``ds[(i, False)]``: a tensor or (tensor, label))."""
    n = len(dataset)
    picks = np.linspace(0, n - 1, min(count, n)).round().astype(int)
    items = [dataset[(int(i), False)] for i in picks]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])


def report_from_datasets(generator, id_net, source, target, num_faces: int, out: str | Path,
                         distance_range: Sequence[float]) -> dict:
    """Stage 1's end-of-run report: ``num_faces`` source and target faces, written under ``out``, and the domain
    gap on ``GAP_FACES`` of each."""
    from cfsm.domain_gap import GAP_FACES

    was_training = generator.training
    generator.eval()
    try:
        return write_style_report(generator, id_net, evenly_spaced(source, num_faces),
                                  evenly_spaced(target, num_faces), out, distance_range,
                                  gap_faces=evenly_spaced(source, GAP_FACES),
                                  gap_target_faces=evenly_spaced(target, GAP_FACES))
    finally:
        generator.train(was_training)


def style_report_figure(report: dict, samples: np.ndarray, path: str | Path) -> Path:
    """The style report as one PNG: identity distance vs |o| against d*(|o|), per-direction effect bars (with the
    goal line), and a samples grid (uint8 HWC, e.g. `training_samples_grid`). ``report`` is `cfsm.style_report`'s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=(11, 7.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.3])
    ax = fig.add_subplot(grid[0, 0])
    mags = report["magnitudes"]
    ax.errorbar(mags, report["id_distance_by_magnitude"], yerr=report["id_distance_std_by_magnitude"], marker="o",
                capsize=3, label="measured 1 - cos(f(x), f(G(x, o)))")
    ax.plot(mags, report["target_distance_by_magnitude"], "k--", label="stage-1 target d*(|o|)")
    ax.set_xlabel("|o|")
    ax.set_ylabel("identity distance")
    ax.set_title(f"Spearman {report['magnitude_spearman']:.2f}, recon L1 {report['recon_l1']:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[0, 1])
    effects = report["direction_effect_by_basis"]
    ax.bar([f"e{i + 1}" for i in range(len(effects))], effects)
    ax.axhline(GOALS["direction_effect_min"], color="k", ls="--", lw=1, label="goal")
    ax.set_ylabel(f"mean |G(x, {report['coefficient']:g} e_i) - G(x, 0)|")
    s = report["sharpness"]
    ax.set_title(f"distinctness {report['direction_distinctness']:.2f} (|cos| {report['direction_abs_cos']:.2f}); "
                 f"sharpness clean {s['clean']:.2f} target {s['target']:.2f} synth {s['synth']:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, :])
    ax.imshow(samples)
    ax.set_axis_off()
    met = sum(g["met"] for g in report["goals"].values())
    fig.suptitle(f"style report: {met}/{len(report['goals'])} goals met")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
