"""Validate the dataset-similarity measure on toy data (slow-ish: several stage-1 runs; not part of CI).

    python -m tools.similarity_toy_study --out work_dirs/similarity_study --id-model work_dirs/toy/model.pt

1. Renders three unlabelled target sets from fresh toy identities: `night_a` and `night_b` (dark, blue cast, sensor
   noise, blur; B with slightly different parameters and other identities: a *similar* domain) and `sunny`
   (over-exposed, warm, low contrast, sharp: a *different* domain).
2. Trains (or reuses, `--base-generator`) one shared stage-1 generator on the toy target faces (configs/cfsm_toy).
3. Fine-tunes one generator per target set from that shared generator (`init_generator`), each with its own seed.
4. Compares their style bases with `tools/dataset_similarity` and checks that the similar pair scores highest.

Writes DIR/targets/<style>/, DIR/base/, DIR/<style>/generator.pth, DIR/similarity.{json,png} and DIR/study.json.

Observed with the controllable toy generator (docs/research/toy_record.md "Dataset similarity with the controllable
generators"; base = the pipeline's generator, `--control --steps 200 --gen-lr 1e-3`): the subspace similarity does
not separate the domains (all pairs 0.9886-0.9908, seed-noise pair among them); the offset ||mu_a - mu_b|| ranks
them (similar 0.090 < different 0.136-0.138) but the same-domain seed-noise offset (0.112) lies between.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from utils.checkpoint import json_safe, write_json
from utils.cli import ArgumentParser, run_command

REPO = Path(__file__).resolve().parents[1]

# name -> (gain, offset, RGB cast, contrast, noise sigma range, blur sigma range)
STYLES: dict[str, dict] = {
    "night_a": dict(gain=(0.40, 0.55), offset=(0, 10), cast=(0.70, 0.85, 1.30), contrast=(0.8, 1.0),
                    noise=(6, 12), blur=(0.8, 1.4)),
    "night_b": dict(gain=(0.45, 0.60), offset=(0, 15), cast=(0.75, 0.90, 1.25), contrast=(0.8, 1.0),
                    noise=(5, 10), blur=(0.6, 1.2)),
    "sunny": dict(gain=(1.15, 1.35), offset=(35, 55), cast=(1.20, 1.05, 0.70), contrast=(0.55, 0.7),
                  noise=(0, 1), blur=(0.0, 0.0)),
}
_SEEDS = {"night_a": 11, "night_b": 22, "sunny": 33}


def apply_style(rgb: np.ndarray, style: dict, rng: np.random.Generator) -> np.ndarray:
    """A global photometric domain shift of one uint8 RGB face (per-image parameters drawn from the ranges)."""
    import cv2

    x = rgb.astype(np.float32)
    contrast = rng.uniform(*style["contrast"])
    x = (x - 128.0) * contrast + 128.0
    x = x * rng.uniform(*style["gain"]) + rng.uniform(*style["offset"])
    x = x * (np.array(style["cast"], np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32))
    if style["blur"][1] > 0:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(*style["blur"]))
    x = x + rng.standard_normal(x.shape).astype(np.float32) * rng.uniform(*style["noise"])
    return np.clip(x, 0, 255).astype(np.uint8)


def render_targets(folder: Path, style_name: str, count: int) -> Path:
    """``count`` faces of fresh identities (not in the toy .rec) in one style, as JPEGs; skipped when present."""
    import cv2
    from utils.data.toyface import identity_params, render_face

    done = folder / ".done"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    seed = _SEEDS[style_name]
    rng = np.random.default_rng(seed)
    for i in range(count):
        params = identity_params(10_000 + seed, i)  # identity universe disjoint from the toy data (seed 0)
        rgb, _ = render_face(params, rng, style="clean")
        out = apply_style(rgb, STYLES[style_name], rng)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), out[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    done.write_text(str(count))
    return folder


def _stage1(config: str, overrides: dict) -> dict:
    import train_generator

    return train_generator.main([config] + [f"{k}={v}" for k, v in overrides.items()])


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="study folder (runs are reused when complete)")
    p.add_argument("--id-model", default=str(REPO / "work_dirs" / "toy" / "model.pt"),
                   help="identity network (r_tiny, 128-d) e.g. the toy baseline's model.pt")
    p.add_argument("--base-generator", default=None, help="shared stage-1 generator (default: train one)")
    p.add_argument("--base-steps", type=int, default=240, help="stage-1 steps of the shared generator")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps per target domain")
    p.add_argument("--gen-lr", type=float, default=2e-4, help="fine-tuning Adam lr")
    p.add_argument("--num-targets", type=int, default=400, help="target faces rendered per style")
    p.add_argument("--control", action="store_true",
                   help="also fine-tune on night_a's faces with another seed (night_a_seed2): the seed-noise floor")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from tools.dataset_similarity import compare_files, format_matrix, read_basis, write_heatmap

    args = parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    common = {"id_model": args.id_model, "num_workers": 0, "image_every": 0, "frequent": 50, "save_every": 0}
    base = Path(args.base_generator) if args.base_generator else out / "base" / "generator.pth"
    if not base.is_file():
        _stage1("configs/cfsm_toy", {**common, "output": base.parent, "max_steps": args.base_steps})
    timings = {"base_s": round(time.time() - t0, 1)}
    runs = [(name, name, _SEEDS[name]) for name in STYLES]
    if args.control:
        runs.append(("night_a_seed2", "night_a", 44))
    generators = {}
    for run, style, seed in runs:
        folder = render_targets(out / "targets" / style, style, args.num_targets)
        gen = out / run / "generator.pth"
        if not gen.is_file():
            t1 = time.time()
            _stage1("configs/cfsm_toy", {**common, "output": gen.parent, "target": folder, "init_generator": base,
                                         "max_steps": args.steps, "gen_lr": args.gen_lr, "seed": seed,
                                         "image_every": args.steps})
            timings[f"{run}_s"] = round(time.time() - t1, 1)
        generators[run] = str(gen)
    generators["base"] = str(base)
    result = compare_files(generators)
    print(format_matrix(result.names, result.similarity, "subspace similarity (mean cos^2 of principal angles):"))
    print(format_matrix(result.names, result.mean_angle_deg, "mean principal angle (degrees):", "{:8.1f}"))
    print(format_matrix(result.names, result.offset, "offset ||mu_a - mu_b||:"))
    idx = {n: i for i, n in enumerate(result.names)}
    sim = lambda a, b: float(result.similarity[idx[a], idx[b]])  # noqa: E731
    off = lambda a, b: float(result.offset[idx[a], idx[b]])  # noqa: E731
    verdict = {
        "similar_pair_similarity": sim("night_a", "night_b"),
        "different_pairs_similarity": [sim("night_a", "sunny"), sim("night_b", "sunny")],
        "similar_pair_offset": off("night_a", "night_b"),
        "different_pairs_offset": [off("night_a", "sunny"), off("night_b", "sunny")],
    }
    verdict["subspace_passes"] = verdict["similar_pair_similarity"] > max(verdict["different_pairs_similarity"])
    verdict["offset_passes"] = verdict["similar_pair_offset"] < min(verdict["different_pairs_offset"])
    if "night_a_seed2" in idx:
        verdict["same_domain_other_seed_similarity"] = sim("night_a", "night_a_seed2")
        verdict["same_domain_other_seed_offset"] = off("night_a", "night_a_seed2")
    # Diagnostic only (not basis-invariant): with a shared origin the style coordinates start aligned, so the
    # directions in which fine-tuning moved U and mu can be compared directly.
    bases = {n: read_basis(p) for n, p in generators.items()}
    moved = {n: (bases[n][0] - bases["base"][0], bases[n][1] - bases["base"][1]) for n in generators if n != "base"}
    cos = lambda a, b: float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))  # noqa: E731
    names = list(moved)
    report_moves = {"names": names,
                    "cos_delta_U": [[cos(moved[a][0], moved[b][0]) for b in names] for a in names],
                    "cos_delta_mu": [[cos(moved[a][1], moved[b][1]) for b in names] for a in names]}
    print(format_matrix(names, np.array(report_moves["cos_delta_U"]), "diagnostic: cos(U - U_base) between runs:"))
    print(format_matrix(names, np.array(report_moves["cos_delta_mu"]), "diagnostic: cos(mu - mu_base) between runs:"))
    report = {**result.as_dict(), "files": generators, "verdict": verdict, "timings": timings,
              "displacement_from_shared_origin": report_moves,
              "settings": vars(args), "wall_s": round(time.time() - t0, 1)}
    write_json(report, out / "study.json")
    write_heatmap(result, out / "similarity.png")
    print(json.dumps(json_safe(verdict), indent=1, allow_nan=False))
    return report


if __name__ == "__main__":
    run_command(main)
