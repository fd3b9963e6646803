"""Which part of CFSM helps on the toy? Equal-step recognition runs of five methods over several seeds.

    python -m tools.ablation --out runs/ablation --generator runs/toy/generator/generator.pth \\
        --data data/toy [--seeds 0 1 2] [--steps 560] [--methods baseline random adv_k1 adv_k3 handcrafted]

Methods (every run: `train.py` with the toy schedule, same steps, same seed list):
  baseline     configs/toy (clean images only)
  random       configs/toy_ours with k=0: a quarter of each batch restyled with a random style o0 ~ N(0, I)
  adv_k1       configs/toy_ours, k=1: the style attacked once (the paper's setting)
  adv_k3       configs/toy_ours, k=3: three attack steps
  handcrafted  configs/toy plus AdaFace-style degradations (utils/degrade.py) on the same share of images
Prints and writes OUT/ablation.json: mean +- std (population, over seeds) of 10-fold verification accuracy on
toy_clean and toy_target, the mean attack gain of the CFSM runs (when train.py records it), and the generator's style
report (its stage-1 summary.json's, or --style-report FILE).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from utils.checkpoint import write_json
from utils.cli import ArgumentParser, run_command

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("toy_clean", "toy_target")
# the degradation share matches CFSM's synthesized share (1 - rs_ratio = 0.25): each op fires with this probability
HANDCRAFTED = ["degrade_resize_prob=0.25", "degrade_blur_prob=0.25", "degrade_color_prob=0.25",
               "degrade_noise_prob=0.25", "degrade_jpeg_prob=0.25"]
METHODS = {
    "baseline": ("configs/toy", []),
    "random": ("configs/toy_ours", ["k=0"]),
    "adv_k1": ("configs/toy_ours", ["k=1"]),
    "adv_k3": ("configs/toy_ours", ["k=3"]),
    "handcrafted": ("configs/toy", HANDCRAFTED),
}


def find_number(summary, names: tuple[str, ...]) -> float | None:
    """The first numeric value whose key is one of ``names``, searching nested dicts (summary layouts vary)."""
    if isinstance(summary, dict):
        for key, value in summary.items():
            if key in names and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        for value in summary.values():
            found = find_number(value, names)
            if found is not None:
                return found
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output folder (runs already finished there are reused)")
    p.add_argument("--generator", required=True, help="stage-1 generator file used by the CFSM methods")
    p.add_argument("--data", default=str(REPO / "data" / "toy"), help="toy data folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds; each method runs once per seed")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps of every run (0 = the toy config's)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    p.add_argument("--style-report", default=None, help="style_report.json of the generator (default: the "
                   "style_report in the summary.json next to the generator, when present)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from tools.pipeline import evaluate

    args = parse_args(argv)
    out, data, gen = Path(args.out).resolve(), Path(args.data).resolve(), Path(args.generator).resolve()
    if not gen.is_file():
        raise SystemExit(f"--generator {gen}: file not found (train one: python -m tools.pipeline --out runs/toy)")
    if not (data / "train.rec").is_file():
        raise SystemExit(f"--data {data}: no train.rec (python -m tools.make_toy_data --out {data})")
    runs: dict[str, dict[int, dict]] = {}
    for method in args.methods:
        config, extra = METHODS[method]
        for seed in args.seeds:
            run = out / method / f"seed_{seed}"
            if not (run / "summary.json").is_file():
                cmd = [sys.executable, "train.py", config, f"output={run}", f"rec={data}", f"seed={seed}",
                       "resume=auto", *extra, *args.set]
                if config.endswith("_ours"):
                    cmd.append(f"pretrained_synthesis_model={gen}")
                if args.steps:
                    cmd.append(f"max_steps={args.steps}")
                print("$", " ".join(cmd), flush=True)
                code = subprocess.run(cmd, cwd=REPO).returncode
                if code != 0:  # the run printed its own error above; name the run and where its log is
                    raise SystemExit(f"ablation run {method} seed {seed} failed (exit {code}); log: {run / 'train.log'}"
                                     f"; finished runs in {out} are reused when you start the command again")
            summary = json.loads((run / "summary.json").read_text())
            cfg = summary["config"]
            accuracy = evaluate(run / "model.pt", cfg["network"], cfg["embedding_size"], data)
            runs.setdefault(method, {})[seed] = {
                **accuracy, "steps": summary.get("steps"),
                "attack_gain": find_number(summary, ("attack_gain", "attack_gain_mean", "mean_attack_gain")),
                "style_norm": find_number(summary, ("style_norm", "style_norm_mean", "mean_style_norm"))}

    report_path = Path(args.style_report) if args.style_report else gen.parent / "summary.json"
    style_report = None
    if report_path.is_file():
        loaded = json.loads(report_path.read_text())
        style_report = loaded.get("style_report", loaded if "goals" in loaded else None)
    table: dict = {"seeds": args.seeds, "steps": args.steps or "config", "generator": str(gen), "methods": {}}
    for method, per_seed in runs.items():
        row = {"per_seed": per_seed}
        for target in TARGETS:
            row[target] = mean_std([r[target] for r in per_seed.values()])
        gains = [r["attack_gain"] for r in per_seed.values() if r["attack_gain"] is not None]
        row["attack_gain"] = mean_std(gains) if gains else None
        table["methods"][method] = row
    if style_report is not None:
        table["style_report"] = {k: style_report[k] for k in (
            "id_distance_o0", "id_distance_by_magnitude", "magnitude_spearman", "recon_l1", "direction_effect",
            "direction_distinctness", "sharpness", "goals_met") if k in style_report}
    write_json(table, out / "ablation.json")  # atomic: a stopped run never leaves half a table
    lines = [f"{'method':<12}" + "".join(f"{t:>18}" for t in TARGETS) + f"{'attack gain':>18}"]
    for method, row in table["methods"].items():
        gain = row["attack_gain"]
        lines.append(f"{method:<12}" + "".join(f"{100 * row[t][0]:>10.2f} +- {100 * row[t][1]:.2f}" for t in TARGETS)
                     + (f"{gain[0]:>11.4f} +- {gain[1]:.4f}" if gain else f"{'-':>18}"))
    if style_report is not None:
        r = style_report
        lines.append(f"generator: recon_l1 {r['recon_l1']:.3f}, id distance at o=0 {r['id_distance_o0']:.3f}, "
                     f"Spearman {r['magnitude_spearman']:.2f}, direction effect {r['direction_effect']:.3f}, "
                     f"distinctness {r['direction_distinctness']:.2f}")
    print("\n".join(lines), flush=True)
    return table


if __name__ == "__main__":
    run_command(main)
