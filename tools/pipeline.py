"""The whole paper pipeline on the embedded toy data, one command, CPU only, no downloads.

    python -m tools.pipeline --out runs/toy

Stages (each skipped when its output already exists, so an interrupted pipeline continues where it stopped):
  1. data       toy faces: training .rec, toy_clean/toy_target .bin pairs, unlabelled target faces
  2. baseline   `train.py configs/toy`: a plain ArcFace model (also stage 1's identity network)
  3. generator  `train_generator.py configs/cfsm_toy`: a CFSM generator for the toy target style
  4. cfsm       `train.py configs/toy_ours`: guided training with the generator, same schedule as the baseline
  5. evaluate   10-fold verification of both models on toy_clean and toy_target; results.json, bar chart PNG,
                style grid of the generator

Every stage runs the user-facing command in a subprocess (exactly what a user would type), so the pipeline is also
an end-to-end check of those commands.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tqdm import tqdm

from utils.checkpoint import write_json
from utils.data.toyface import VERIFICATION_SETS as TARGETS
from utils.cli import ArgumentParser, non_negative_int, run_command

REPO = Path(__file__).resolve().parents[1]


def run_stage(name: str, cmd: list[str], log_path: Path, bar: tqdm) -> None:
    """Run one stage's command, echo its output through tqdm (keeps the stage bar intact), keep a log file."""
    bar.set_description(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            tqdm.write(f"[{name}] {line.rstrip()}")
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"stage '{name}' failed (exit {proc.returncode}); full log: {log_path}")


def evaluate(model_path: Path, network: str, embedding_size: int, data: Path) -> dict[str, float]:
    from eval.common import load_rgb_backbone
    from eval.verification import evaluate_verification, load_bin

    backbone, _ = load_rgb_backbone(model_path, network, embedding_size=embedding_size)  # the .bin images are RGB
    results = {}
    for target in TARGETS:
        images, issame = load_bin(data / f"{target}.bin")
        results[target] = evaluate_verification(backbone, images, issame, batch_size=128)["accuracy"]
    return results


def generator_style_report(out: Path, data: Path, network: str, embedding_size: int) -> dict:
    """The generator's style report: stage 1's (generator/summary.json) or, for a generator trained elsewhere,
    measured now with the baseline as identity network (cfsm/style_report.py; written under out/style_report)."""
    summary = out / "generator" / "summary.json"
    if summary.is_file():
        report = json.loads(summary.read_text()).get("style_report")
        if report is not None:
            return report
    from cfsm import load_generator
    from cfsm.domain_gap import GAP_FACES
    from cfsm.style_report import evenly_spaced, write_style_report
    from cfsm.target_data import TargetFaceDataset
    from dataset import build_dataset
    from eval.common import load_rgb_backbone

    id_net, _ = load_rgb_backbone(out / "baseline" / "model.pt", network, embedding_size=embedding_size)  # G: RGB
    stage1 = json.loads(summary.read_text())["config"] if summary.is_file() else {}
    source, target = build_dataset(data, augment=False), TargetFaceDataset(data / "target_faces")
    return write_style_report(load_generator(out / "generator" / "generator.pth"), id_net,
                              evenly_spaced(source, 32), evenly_spaced(target, 32), out / "style_report",
                              stage1.get("id_distance_range", (0.0, 6.0, 0.05, 0.65)),
                              gap_faces=evenly_spaced(source, GAP_FACES),
                              gap_target_faces=evenly_spaced(target, GAP_FACES))


def bar_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    width = 0.38
    for i, (method, accs) in enumerate(results.items()):
        xs = [j + (i - 0.5) * width for j in range(len(TARGETS))]
        bars = ax.bar(xs, [100 * accs[t] for t in TARGETS], width, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(TARGETS)), TARGETS)
    ax.set_ylabel("10-fold verification accuracy (%)")
    ax.set_ylim(40, 112)
    ax.legend(loc="upper center", ncol=2, frameon=False)
    ax.set_title("toy benchmark: baseline vs CFSM-guided")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output folder (stages already there are skipped)")
    p.add_argument("--data", default=str(REPO / "data" / "toy"), help="toy data folder (generated when missing)")
    p.add_argument("--steps", type=non_negative_int, default=0, help="optimizer steps of baseline and CFSM runs (0 = config)")
    p.add_argument("--generator-steps", type=non_negative_int, default=0, help="stage-1 steps (0 = config)")
    p.add_argument("--seed", type=int, default=2048, help="seed of both recognition runs")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra overrides for both recognition runs (e.g. num_epoch=3)")
    p.add_argument("--generator-set", nargs="*", default=[], metavar="KEY=VALUE", help="extra stage-1 overrides")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, data = Path(args.out).resolve(), Path(args.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    common = [f"rec={data}", f"seed={args.seed}", "resume=auto", *args.set] + \
        ([f"max_steps={args.steps}"] if args.steps else [])
    gen_file = out / "generator" / "generator.pth"
    stages = [
        ("data", data / "toy_meta.json", [py, "-m", "tools.make_toy_data", "--out", str(data)]),
        ("baseline", out / "baseline" / "summary.json",
         [py, "train.py", "configs/toy", f"output={out / 'baseline'}", *common]),
        ("generator", gen_file,
         [py, "train_generator.py", "configs/cfsm_toy", f"rec={data}", f"target={data / 'target_faces'}",
          f"id_model={out / 'baseline' / 'model.pt'}", f"output={out / 'generator'}", *args.generator_set]
         + ([f"max_steps={args.generator_steps}"] if args.generator_steps else [])),
        ("cfsm", out / "cfsm" / "summary.json",
         [py, "train.py", "configs/toy_ours", f"output={out / 'cfsm'}", f"pretrained_synthesis_model={gen_file}",
          *common]),
        ("style grid", out / "style_grid" / "style_grid_00.png",
         [py, "-m", "tools.style_grid", str(gen_file), "--faces", str(data), "--num-faces", "1",
          "--out", str(out / "style_grid")]),
    ]
    # every training stage's config and overrides, checked before the first stage runs: a typo in --set or
    # --generator-set would otherwise stop the pipeline minutes later, inside a stage's subprocess
    from configs.loader import load_config

    for _, _, cmd in stages:
        if cmd[1] in ("train.py", "train_generator.py"):
            load_config(str(REPO / cmd[2]), cmd[3:])
    t0 = time.time()
    with tqdm(total=len(stages) + 1, unit="stage", dynamic_ncols=True) as bar:
        for name, done_marker, cmd in stages:
            if done_marker.exists():
                tqdm.write(f"[{name}] skipped: {done_marker} exists")
            else:
                run_stage(name, cmd, out / "logs" / f"{name.replace(' ', '_')}.log", bar)
            bar.update(1)
        bar.set_description("evaluate")
        cfg = json.loads((out / "baseline" / "summary.json").read_text())["config"]
        results = {method: evaluate(out / method / "model.pt", cfg["network"], cfg["embedding_size"], data)
                   for method in ("baseline", "cfsm")}
        bar.update(1)

    style = generator_style_report(out, data, cfg["network"], cfg["embedding_size"])
    gain = {t: results["cfsm"][t] - results["baseline"][t] for t in TARGETS}  # the method's effect, per target
    write_json({**results, "gain": gain, "generator_style_report": style}, out / "results.json")
    bar_chart(results, out / "results.png")
    lines = ["", f"{'method':<10}" + "".join(f"{t:>12}" for t in TARGETS)]
    lines += [f"{m:<10}" + "".join(f"{100 * r[t]:>11.2f}%" for t in TARGETS) for m, r in results.items()]
    lines.append(f"{'gain':<10}" + "".join(f"{100 * gain[t]:>+11.2f} " for t in TARGETS)
                 + "  (cfsm - baseline, points; same data, schedule and seed)")
    lines.append("one seed per model: the gain moves by several points between seeds and generators "
                 "(docs/toy_results.md); `python -m tools.ablation --seeds 0 1 2 ...` settles it")
    lines.append(f"\nresults: {out / 'results.json'}, chart: {out / 'results.png'}, "
                 f"style grid: {out / 'style_grid'}; {time.time() - t0:.0f} s")
    if "domain_gap" in style:
        g = style["domain_gap"]
        lines.append(f"generator domain gap: {g['relative_gap']:.3f} (Fréchet distance of the identity network's "
                     f"embeddings, synthesized vs real target faces, relative to clean vs target; "
                     f"docs/generator_check.md)")
    met = [name for name, goal in style["goals"].items() if goal["met"]]
    lines.append(f"generator style report (diagnostics): {len(met)}/{len(style['goals'])} goals met ("
                 + ", ".join(f"{name} {goal['value']:.3f}{'' if goal['met'] else ' (not met)'}"
                             for name, goal in style["goals"].items()) + ")")
    print("\n".join(lines), flush=True)
    return {**results, "gain": gain, "generator_style_report": style}


if __name__ == "__main__":
    run_command(main)
