"""Does the adversarial style search help? Equal-step recognition runs of several methods over seeds, one command.

    python -m tools.ablation --out runs/ablation --generator runs/toy/generator/generator.pth --data data/toy \\
        [--seeds 0 1 2 3 4 5] [--steps 224] [--methods ...] [--epsilons 0.314 1 2] [--ks 1 3] [--domains ...]

Methods (every run: `train.py` with the toy schedule, same steps, same seed list; runs already finished are reused):
  baseline         configs/toy (clean images only)
  handcrafted      configs/toy plus AdaFace-style degradations (utils/data/degrade.py) on the same share of images
  random           configs/toy_ours with k=0: a quarter of each batch restyled with a random style o0 ~ N(0, I)
  adv_k1, adv_k3   configs/toy_ours, k = 1 / 3 with epsilon = alpha = 0.314 (the paper's setting)
  adv_e<E>_k<K>    the budget sweep: k = K sign-gradient steps of alpha = E / K, |o - o0|_inf <= epsilon = E
  rand_e<E>_k<K>   its control, "farther but not harder": the same K steps of alpha = E / K from the same kind of o0,
                   each in a random sign direction (style_search=random_sign), so o moves as far from o0 as under
                   the attack but the model does not choose where
By default the sweep runs every E of --epsilons with every K of --ks, both adv_ and rand_; any adv_e<E>_k<K> /
rand_e<E>_k<K> name may be given in --methods.

Every run is verified (10 folds) on toy_clean, toy_target and toy_<domain> for each of --domains: target domains
that the hand-crafted recipe does not contain (utils/toyface.DOMAINS, added to --data when missing), and on the
validation pairs of each (toy_<name>_val: identities of their own; choose on these, report the others). The generator
saw at most the one domain it was trained on (its stage-1 `target`, recorded in the table); the others are held out.

Statistics (per target): mean and standard error over seeds, the paired difference of each method against
--reference (same seed) with its standard error, and the minimum detectable difference of the design: the true
difference a two-sided paired t-test (alpha 0.05) would find with 80 % power at the observed spread of the paired
differences, (t_{0.975,n-1} + t_{0.8,n-1}) * SE; plus the seeds such a test would need to resolve --resolve points.
Writes OUT/ablation.json (every number, per seed), OUT/ablation.md (the tables) and OUT/ablation.png (mean +- SE
per method and target, the seeds as dots, and the attack gain), and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from utils.checkpoint import write_json
from utils.data.toyface import VERIFICATION_SETS as TARGETS
from utils.cli import ArgumentParser, UsageError, non_negative_int, run_command

REPO = Path(__file__).resolve().parents[1]
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
SWEEP_NAME = re.compile(r"^(adv|rand)_e([0-9]+(?:\.[0-9]+)?)_k([1-9][0-9]*)$")
ALPHA_POWER, POWER = 0.05, 0.8


def sweep_name(kind: str, epsilon: float, k: int) -> str:
    """`adv_e1_k3` / `rand_e0.314_k1`: the budget-sweep method of this kind, epsilon and step count."""
    return f"{kind}_e{epsilon:g}_k{k}"


def method_recipe(name: str) -> tuple[str, list[str]]:
    """(config, overrides) of a method: a fixed one of METHODS or a sweep name; UsageError for anything else."""
    if name in METHODS:
        return METHODS[name]
    match = SWEEP_NAME.match(name)
    if not match:
        raise UsageError(f"unknown method {name!r}: use one of {', '.join(METHODS)} or adv_e<EPS>_k<K> / "
                         f"rand_e<EPS>_k<K> (e.g. adv_e1_k3)")
    kind, epsilon, k = match.group(1), float(match.group(2)), int(match.group(3))
    if epsilon <= 0:
        raise UsageError(f"method {name!r}: epsilon must be > 0")
    search = "adversarial" if kind == "adv" else "random_sign"
    return "configs/toy_ours", [f"k={k}", f"epsilon={epsilon:g}", f"alpha={epsilon / k:.6g}",
                                f"style_search={search}"]


def default_methods(epsilons: list[float], ks: list[int]) -> list[str]:
    return ["baseline", "handcrafted", "random"] + [sweep_name(kind, e, k) for e in epsilons for k in ks
                                                    for kind in ("adv", "rand")]


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


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std, ddof 1, over sqrt(n)); SE is nan for one value."""
    arr = np.asarray(values, dtype=np.float64)
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")
    return float(arr.mean()), se


def detectable_difference(se: float, n: int, alpha: float = ALPHA_POWER, power: float = POWER) -> float:
    """The true mean difference a two-sided paired t-test at level ``alpha`` detects with ``power``, when the paired
    differences of ``n`` seeds have standard error ``se``: (t_{1-alpha/2, n-1} + t_{power, n-1}) * se."""
    from scipy.stats import t

    if n < 2 or not math.isfinite(se):
        return float("nan")
    return float((t.ppf(1 - alpha / 2, n - 1) + t.ppf(power, n - 1)) * se)


def seeds_needed(sd_diff: float, difference: float, alpha: float = ALPHA_POWER, power: float = POWER,
                 limit: int = 1000) -> int | None:
    """Fewest seeds whose paired test detects ``difference`` given the per-seed sd of the differences (None: more
    than ``limit``, or no spread measured)."""
    if not math.isfinite(sd_diff) or difference <= 0:
        return None
    for n in range(2, limit + 1):
        if detectable_difference(sd_diff / math.sqrt(n), n, alpha, power) <= difference:
            return n
    return None


def paired_statistics(per_seed: dict[str, dict[int, float]], reference: str, resolve: float = 0.01,
                      bits: dict[str, dict[int, np.ndarray]] | None = None) -> dict:
    """Per method: mean, SE over seeds, and against ``reference`` on the seeds both ran: the mean paired difference,
    its SE, the minimum detectable difference (80 % power, alpha 0.05) and the seeds needed to resolve ``resolve``.
    With ``bits`` (per-pair right/wrong of every run): ``pair_share``, the part of the seed-to-seed variance of the
    paired differences that pairs flipping between right and wrong explains (`pair_noise` / observed variance): the
    part a larger pair set would remove (it shrinks as 1 / pairs); the rest is whole-model shifts that only more
    seeds average out. An estimate: with few seeds the observed variance is itself noisy (the share can exceed 1)."""
    out = {}
    ref = per_seed.get(reference, {})
    for method, values in per_seed.items():
        mean, se = mean_se(list(values.values()))
        row = {"mean": mean, "se": se, "n": len(values)}
        common = sorted(set(values) & set(ref))
        if method != reference and common:
            diffs = np.array([values[s] - ref[s] for s in common])
            d_mean, d_se = mean_se(list(diffs))
            sd = float(diffs.std(ddof=1)) if diffs.size > 1 else float("nan")
            row.update(diff=d_mean, diff_se=d_se, diff_n=len(common),
                       detectable=detectable_difference(d_se, len(common)),
                       seeds_needed=seeds_needed(sd, resolve))
            have = [s for s in common if bits and s in bits.get(method, {}) and s in bits.get(reference, {})]
            if have and math.isfinite(sd) and sd > 0:
                row["pair_share"] = pair_noise([bits[method][s] for s in have],
                                               [bits[reference][s] for s in have]) / sd ** 2
        out[method] = row
    return out


def verify(run: Path, targets: list[str], data: Path) -> dict[str, float]:
    """10-fold accuracy of the run's model on each target, and which pairs it got right (the folds' thresholds):
    cached in RUN/verification.json as {target: {"accuracy", "correct": "0110..."}}. The per-pair bits let
    `pair_noise` separate the evaluation's own sampling noise (which pairs) from the training's (which seed)."""
    from eval.common import load_backbone
    from eval.metrics import l2_normalize, verification_folds
    from eval.verification import embed_images, load_bin

    cache_path = run / "verification.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    missing = [t for t in targets if not isinstance(cache.get(t), dict)]  # a bare number: written before the bits
    if missing:
        cfg = json.loads((run / "summary.json").read_text())["config"]
        backbone = load_backbone(run / "model.pt", cfg["network"], embedding_size=cfg["embedding_size"],
                                 device="cpu")
        for target in missing:
            images, issame = load_bin(data / f"{target}.bin")
            emb = l2_normalize(embed_images(backbone, images, batch_size=128, flip=True))
            folds = verification_folds(emb[0::2], emb[1::2], issame)
            cache[target] = {"accuracy": float(np.mean(folds["accuracies"])),
                             "correct": "".join("1" if c else "0" for c in folds["correct"])}
        write_json(cache, cache_path)
    return {t: cache[t]["accuracy"] for t in targets}


def correct_bits(run: Path, target: str) -> np.ndarray | None:
    """The per-pair right/wrong bits `verify` cached for ``target`` (None when not cached)."""
    entry = json.loads((run / "verification.json").read_text()).get(target) if (run / "verification.json").is_file() \
        else None
    return np.frombuffer(entry["correct"].encode(), dtype=np.uint8) - ord("0") if isinstance(entry, dict) else None


def pair_noise(bits_a: list[np.ndarray], bits_b: list[np.ndarray]) -> float:
    """Variance of a paired accuracy difference that comes from the evaluation pairs alone: per seed, the difference
    of two models on the same N pairs is a mean of N per-pair differences, variance var(per-pair diff) / N; averaged
    over seeds. Compare with the variance of the differences across seeds (which also holds the training noise)."""
    per_seed = [np.var(a.astype(np.float64) - b, ddof=1) / a.size for a, b in zip(bits_a, bits_b)]
    return float(np.mean(per_seed)) if per_seed else float("nan")


def plot(table: dict, targets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table["methods"])
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(3.2 * (len(targets) + 1), 0.28 * len(methods) + 1.8),
                             sharey=True)
    ys = np.arange(len(methods))[::-1]
    for ax, target in zip(axes, targets):
        stats = table["statistics"][target]
        for y, m in zip(ys, methods):
            seeds = table["methods"][m]["per_seed"]
            ax.scatter([100 * r[target] for r in seeds.values()], [y] * len(seeds), s=9, color="0.6", zorder=1)
            se = stats[m]["se"]
            ax.errorbar(100 * stats[m]["mean"], y, xerr=100 * se if math.isfinite(se) else 0, fmt="o",
                        color="C3" if m.startswith("adv") else "C0" if m.startswith(("rand", "random")) else "k",
                        ms=4, capsize=3, zorder=2)
        ax.set_title(target, fontsize=9)
        ax.set_xlabel("accuracy (%)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    gains = [table["methods"][m]["attack_gain"] for m in methods]
    axes[-1].barh(ys, [g[0] if g else 0 for g in gains], xerr=[g[1] if g and math.isfinite(g[1]) else 0
                                                                   for g in gains], color="C2", height=0.6)
    axes[-1].set_title("attack gain (loss at o* - at o0)", fontsize=9)
    axes[0].set_yticks(ys, methods, fontsize=8)
    steps = "the toy config's steps" if table["steps"] == "config" else f"{table['steps']} steps"
    fig.suptitle(f"toy ablation: mean +- SE over seeds {table['seeds']} (dots: seeds), {steps}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_tables(table: dict, targets: list[str], reference: str) -> list[str]:
    """Markdown tables: accuracy mean +- SE, paired difference against the reference +- SE, detectable difference;
    then the attack gain and |o*| per method."""
    pct = lambda v: "-" if v is None or not math.isfinite(v) else f"{100 * v + 0.0:.2f}"  # noqa: E731
    share = lambda row: f"{row['pair_share']:.2f}" if "pair_share" in row else "-"  # noqa: E731
    lines = []
    for target in targets:
        stats = table["statistics"][target]
        lines += [f"**{target}** (accuracy %, seeds {', '.join(map(str, table['seeds']))}; difference = method - "
                  f"{reference}, paired by seed)", "",
                  f"| method | mean | SE | diff vs ref | SE diff | detectable (80 %) | "
                  f"seeds for {table.get('resolve_points', 1.0):g} pt | share more pairs would remove |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, row in stats.items():
            lines.append(f"| {m} | {pct(row['mean'])} | {pct(row['se'])} | {pct(row.get('diff'))} | "
                         f"{pct(row.get('diff_se'))} | {pct(row.get('detectable'))} | "
                         f"{row.get('seeds_needed') or '-'} | {share(row)} |")
        lines.append("")
    controls = table.get("controls", {})
    if any(controls.values()):
        lines += ["**harder, not only farther**: each adversarial search minus its own random-sign control (same "
                  "epsilon, k and alpha), paired by seed; accuracy points", "",
                  "| method - control | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
        for m in next(c for c in controls.values() if c):
            cells = []
            for target in targets:
                row = controls[target].get(m)
                cells.append("-" if row is None else f"{pct(row['diff'])} +- {pct(row['diff_se'])} "
                             f"(det. {pct(row['detectable'])}, n {row['diff_n']})")
            lines.append(f"| {m} - {controls[targets[0]][m]['control']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| method | attack gain (mean +- SE) | mean abs(o*) |", "|---|---|---|"]
    for m, row in table["methods"].items():
        g, o = row["attack_gain"], row["style_norm"]
        lines.append(f"| {m} | " + ("-" if not g else f"{g[0]:.4f}" if not math.isfinite(g[1]) else
                                    f"{g[0]:.4f} +- {g[1]:.4f}") + " | "
                     + (f"{o[0]:.3f}" if o else "-") + " |")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output folder (runs already finished there are reused)")
    p.add_argument("--generator", required=True, help="stage-1 generator file used by the CFSM methods")
    p.add_argument("--data", default=str(REPO / "data" / "toy"), help="toy data folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5],
                   help="seeds; each method runs once per seed")
    p.add_argument("--steps", type=non_negative_int, default=0,
                   help="optimizer steps of every run (0 = the toy config's)")
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.314, 1.0, 2.0],
                   help="attack radii swept when --methods is not given (alpha = epsilon / k)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3], help="attack step counts swept when --methods is not given")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to run (default: baseline handcrafted random, then adv_ and rand_ for every "
                        "epsilon and k)")
    p.add_argument("--reference", default="random", help="the method every other one is compared with, per seed")
    p.add_argument("--domains", nargs="*", default=None,
                   help="extra verification domains toy_<name>.bin (default: all of utils/toyface.DOMAINS)")
    p.add_argument("--resolve", type=float, default=1.0,
                   help="difference in accuracy points the 'seeds for 1 pt' column is computed for")
    p.add_argument("--only-finished", action="store_true",
                   help="tabulate the runs already finished in --out; train nothing")
    p.add_argument("--style-report", default=None, help="style_report.json of the generator (default: the "
                   "style_report in the summary.json next to the generator, when present)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    args = p.parse_args(argv)
    if any(e <= 0 for e in args.epsilons):
        p.error(f"argument --epsilons: every epsilon must be > 0, got {args.epsilons}")
    if any(k < 1 for k in args.ks):
        p.error(f"argument --ks: every k must be >= 1, got {args.ks}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"argument --seeds: a seed is listed twice ({args.seeds}); paired statistics need distinct seeds")
    if not 0 < args.resolve < 100:
        p.error(f"argument --resolve: accuracy points in (0, 100), got {args.resolve}")
    args.methods = args.methods or default_methods(args.epsilons, args.ks)
    if len(set(args.methods)) != len(args.methods):
        p.error(f"argument --methods: a method is listed twice ({' '.join(args.methods)})")
    for name in args.methods:
        try:
            method_recipe(name)
        except UsageError as exc:
            p.error(f"argument --methods: {exc}")
    if args.reference not in args.methods:
        p.error(f"argument --reference: {args.reference!r} is not among --methods ({' '.join(args.methods)})")
    from utils.data.toyface import DOMAINS

    args.domains = list(DOMAINS) if args.domains is None else args.domains
    unknown = [d for d in args.domains if d not in DOMAINS]
    if unknown:
        p.error(f"argument --domains: unknown {' '.join(unknown)}; choices: {' '.join(DOMAINS)}")
    return args


def main(argv=None) -> dict:
    from utils.data.toyface import ensure_toy_domains

    args = parse_args(argv)
    out, data, gen = Path(args.out).resolve(), Path(args.data).resolve(), Path(args.generator).resolve()
    if not gen.is_file():
        raise SystemExit(f"--generator {gen}: file not found (train one: python -m tools.pipeline --out runs/toy)")
    if not (data / "train.rec").is_file():
        raise SystemExit(f"--data {data}: no train.rec (python -m tools.make_toy_data --out {data})")
    if args.domains:
        ensure_toy_domains(data, args.domains, verbose=True)
    targets = [*TARGETS, *(f"toy_{d}" for d in args.domains)]
    from utils.data.toyface import VALIDATION_SUFFIX, ensure_toy_data

    ensure_toy_data(data)  # adds the validation pairs to a toy set made before them (never rewrites its files)
    targets += [t + VALIDATION_SUFFIX for t in targets if (data / f"{t}{VALIDATION_SUFFIX}.bin").is_file()]
    runs: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:  # seed-major: a study stopped part-way leaves whole seeds, which pair
        for method in args.methods:
            config, extra = method_recipe(method)
            run = out / method / f"seed_{seed}"
            if not (run / "summary.json").is_file():
                if args.only_finished:
                    continue
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
            runs.setdefault(method, {})[seed] = {
                **verify(run, targets, data), "steps": summary.get("steps"),
                "attack_gain": find_number(summary, ("attack_gain", "attack_gain_mean", "mean_attack_gain")),
                "style_norm": find_number(summary, ("style_norm", "style_norm_mean", "mean_style_norm"))}
    if not runs:
        raise SystemExit(f"--only-finished: no finished run in {out} (drop the flag to train them)")

    report_path = Path(args.style_report) if args.style_report else gen.parent / "summary.json"
    style_report, generator_target = None, None
    if report_path.is_file():
        loaded = json.loads(report_path.read_text())
        style_report = loaded.get("style_report", loaded if "goals" in loaded else None)
        generator_target = loaded.get("config", {}).get("target")
    seeds = sorted({s for per_seed in runs.values() for s in per_seed})
    table: dict = {"seeds": seeds, "steps": args.steps or "config", "generator": str(gen),
                   "generator_target": generator_target, "targets": targets, "reference": args.reference,
                   "resolve_points": args.resolve,
                   "methods": {}, "statistics": {}, "controls": {}}
    for method, per_seed in runs.items():
        row = {"per_seed": per_seed}
        for target in targets:
            row[target] = mean_se([r[target] for r in per_seed.values()])
        gains = [r["attack_gain"] for r in per_seed.values() if r["attack_gain"] is not None]
        norms = [r["style_norm"] for r in per_seed.values() if r["style_norm"] is not None]
        row["attack_gain"] = mean_se(gains) if gains else None
        row["style_norm"] = mean_se(norms) if norms else None
        table["methods"][method] = row
    bits = {t: {m: {s: b for s in per_seed if (b := correct_bits(out / m / f"seed_{s}", t)) is not None}
                for m, per_seed in runs.items()} for t in targets}
    for target in targets:
        accuracy = {m: {s: r[target] for s, r in per_seed.items()} for m, per_seed in runs.items()}
        table["statistics"][target] = paired_statistics(accuracy, args.reference, args.resolve / 100, bits[target])
        # harder, not only farther: each adv_e<E>_k<K> against its own random-sign control, paired by seed
        table["controls"].setdefault(target, {})
        for method in runs:
            control = "rand" + method[3:] if SWEEP_NAME.match(method) and method.startswith("adv") else None
            if control in runs:
                table["controls"][target][method] = paired_statistics(
                    {method: accuracy[method], control: accuracy[control]}, control, args.resolve / 100,
                    bits[target])[method] | {"control": control}
    if style_report is not None:
        table["style_report"] = {k: style_report[k] for k in (
            "id_distance_o0", "id_distance_by_magnitude", "magnitude_spearman", "recon_l1", "direction_effect",
            "direction_distinctness", "direction_abs_cos", "sharpness", "goals_met") if k in style_report}
    write_json(table, out / "ablation.json")  # atomic: a stopped run never leaves half a table
    lines = [f"seeds {seeds}, steps {table['steps']}, generator {gen} (stage-1 target: {generator_target}); "
             f"SE = standard error over seeds; detectable = paired difference found with 80 % power at alpha 0.05",
             "", *format_tables(table, targets, args.reference)]
    if style_report is not None:
        r = style_report
        lines.append(f"\ngenerator: recon_l1 {r['recon_l1']:.3f}, id distance at o=0 {r['id_distance_o0']:.3f}, "
                     f"Spearman {r['magnitude_spearman']:.2f}, direction effect {r['direction_effect']:.3f}, "
                     f"distinctness {r['direction_distinctness']:.2f}"
                     + (f" (|cos| {r['direction_abs_cos']:.2f})" if "direction_abs_cos" in r else ""))
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    plot(table, targets, out / "ablation.png")
    print("\n".join(lines) + f"\n\ntables: {out / 'ablation.md'}, plot: {out / 'ablation.png'}, "
          f"numbers: {out / 'ablation.json'}", flush=True)
    return table


if __name__ == "__main__":
    run_command(main)
