"""Your results beside the paper's: IJB-B/C, TinyFace and IJB-S numbers of the seed's published models, with the
differences.

    python -m eval.report RESULTS... [--method arcface_r50_ms1mv2_cfsm] [--out DIR]

RESULTS are the JSON files the eval commands write (``eval.ijb``: ``IJBB_<model>.json`` / ``IJBC_<model>.json``;
``eval.tinyface``: ``TinyFace_<model>.json``; ``eval.ijbs``: ``IJBS_<model>.json``) or folders holding them. For each
benchmark found, one table: the metric, your value, the published value of ``--method`` and your difference to it,
and the same for the method's baseline (ArcFace / AdaFace without CFSM). Every number is in percent; a metric the
seed did not publish for that method shows ``-`` (nothing is filled in).

The published numbers are the seed's tables, typed in once from their source: the CFSM repository's
``GuidedFaceRecognition/README.md`` (github.com/liufeng2915/CFSM, commit dd56184), section "Validation". IJB-B and
IJB-C rows exist for the ArcFace R50 (MS1MV2) models only; TinyFace and IJB-S rows for all four. The FAR columns
there are in percent (IJB-B "TAR@FAR=0.001%" is FAR 1e-5); IJB-S's "1%" / "10%" are TPIR at FPIR 0.01 / 0.1.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from eval.common import EvalInputError, check_output_folder, write_json
from utils.cli import ArgumentParser, add_out_arg, expanded_path, run_command

SOURCE = ("CFSM README (github.com/liufeng2915/CFSM, GuidedFaceRecognition/README.md at dd56184, "
          "section Validation)")


@dataclass(frozen=True)
class Published:
    """One method's row(s) of the seed's tables: benchmark -> metric -> percent."""

    label: str
    baseline: str | None
    results: Mapping[str, Mapping[str, float]]


def _ijbs(*values: float) -> dict[str, float]:
    """The 12 IJB-S columns in the README's order: V2S, V2B, V2V x (Rank-1, Rank-5, 1%, 10%)."""
    names = [f"{p} {m}" for p in ("V2S", "V2B", "V2V")
             for m in ("Rank-1", "Rank-5", "TPIR@FPIR=1%", "TPIR@FPIR=10%")]
    assert len(values) == len(names)
    return dict(zip(names, values))


def _ijb(fars: tuple[str, str, str], *values: float) -> dict[str, float]:
    names = [f"TAR@FAR={f}" for f in fars] + ["Rank-1", "Rank-5"]
    return dict(zip(names, values))


IJBB_FARS = ("1e-05", "0.0001", "0.001")  # the README's 0.001% / 0.01% / 0.1%
IJBC_FARS = ("1e-06", "1e-05", "0.0001")  # the README's 0.0001% / 0.001% / 0.01%

# The seed's published numbers (source: SOURCE). Typed in once; tests/test_eval_report.py checks a few against the
# README's table cells.
PUBLISHED: dict[str, Published] = {
    "arcface_r50_ms1mv2": Published("ArcFace R50 MS1MV2", None, {
        "IJB-B": _ijb(IJBB_FARS, 87.26, 94.01, 95.95, 94.61, 96.52),
        "IJB-C": _ijb(IJBC_FARS, 87.24, 93.32, 95.61, 95.89, 97.08),
        "TinyFace": {"Rank-1": 62.21, "Rank-5": 66.85},
        "IJB-S": _ijbs(58.78, 66.40, 40.99, 50.45, 60.66, 67.43, 43.12, 51.38, 14.81, 26.72, 2.51, 5.72),
    }),
    "arcface_r50_ms1mv2_cfsm": Published("ArcFace+CFSM R50 MS1MV2", "arcface_r50_ms1mv2", {
        "IJB-B": _ijb(IJBB_FARS, 90.95, 94.61, 96.21, 94.96, 96.84),
        "IJB-C": _ijb(IJBC_FARS, 89.34, 94.06, 95.90, 96.31, 97.48),
        "TinyFace": {"Rank-1": 63.01, "Rank-5": 68.21},
        "IJB-S": _ijbs(63.86, 69.95, 47.86, 56.44, 65.95, 71.16, 47.28, 57.24, 21.38, 35.11, 2.96, 7.41),
    }),
    "adaface_r100_webface12m": Published("AdaFace R100 WebFace12M", None, {
        "TinyFace": {"Rank-1": 72.29, "Rank-5": 74.97},
        "IJB-S": _ijbs(71.35, 76.24, 59.40, 66.34, 71.93, 76.56, 59.37, 66.68, 36.71, 50.03, 4.62, 11.84),
    }),
    "adaface_r100_webface12m_cfsm": Published("AdaFace+CFSM R100 WebFace12M", "adaface_r100_webface12m", {
        "TinyFace": {"Rank-1": 73.87, "Rank-5": 76.77},
        "IJB-S": _ijbs(72.54, 77.59, 60.94, 66.02, 72.65, 78.18, 60.26, 65.88, 39.14, 50.91, 5.05, 13.17),
    }),
}
BENCHMARKS = ("IJB-B", "IJB-C", "TinyFace", "IJB-S")


def user_metrics(result: Mapping[str, Any], path: Path) -> tuple[str, dict[str, float]]:
    """(benchmark, metric -> percent) of one results file of ``eval.ijb`` / ``eval.tinyface`` / ``eval.ijbs``."""
    try:
        if result.get("target") in ("IJBB", "IJBC"):
            bench = "IJB-B" if result["target"] == "IJBB" else "IJB-C"
            out = {f"TAR@FAR={k}": float(v) for k, v in result["tar_at_far"].items()}  # already percent
            for k, v in result.get("identification", {}).get("ranks", {}).items():
                out[f"Rank-{k}"] = 100 * float(v)
            return bench, out
        if result.get("benchmark") == "TinyFace":
            return "TinyFace", {f"Rank-{k}": 100 * float(v) for k, v in result["ranks"].items()}
        if result.get("benchmark") == "IJB-S":
            out = {}
            for p, r in result["protocols"].items():
                out.update({f"{p} Rank-{k}": 100 * float(v) for k, v in r["ranks"].items()})
                out.update({f"{p} TPIR@FPIR={100 * float(k):g}%": 100 * float(v)
                            for k, v in r["tpir_at_fpir"].items()})
            return "IJB-S", out
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EvalInputError(f"{path}: not a complete results file of the eval commands ({type(exc).__name__}: "
                             f"{exc}); give the JSON eval.ijb / eval.tinyface / eval.ijbs wrote") from None
    raise EvalInputError(f"{path}: not a results file of eval.ijb, eval.tinyface or eval.ijbs (no 'target' IJBB/IJBC "
                         "or 'benchmark' TinyFace/IJB-S); give the JSON those commands wrote")


def collect(paths: list[Path]) -> dict[str, tuple[Path, dict[str, float], str]]:
    """benchmark -> (file, metrics, model) over the given files and folders (``*.json`` inside); one per benchmark."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.glob("*.json") if f.name != "report.json")
            if not found:
                raise EvalInputError(f"RESULTS folder {p} holds no .json results; give the eval commands' --out folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise EvalInputError(f"RESULTS {p} does not exist; give the JSON files (or folders) the eval commands "
                                 "wrote")
    out: dict[str, tuple[Path, dict[str, float], str]] = {}
    for f in files:
        try:
            result = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise EvalInputError(f"{f}: cannot read it as JSON ({exc})") from None
        if not isinstance(result, dict):
            raise EvalInputError(f"{f}: not a results file of the eval commands (a JSON object is expected)")
        if result.get("benchmark") is None and result.get("target") is None and f.parent in paths:
            continue  # another JSON in a results folder (verification.json, ...): not a benchmark of the tables
        bench, metrics = user_metrics(result, f)
        if bench in out:
            raise EvalInputError(f"two results for {bench}: {out[bench][0]} and {f}; give one file per benchmark")
        out[bench] = (f, metrics, str(result.get("model", "?")))
    if not out:
        raise EvalInputError(f"no IJB-B/C, TinyFace or IJB-S results among {', '.join(map(str, paths))}")
    return out


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _diff(mine: float | None, theirs: float | None) -> str:
    return "-" if mine is None or theirs is None else f"{mine - theirs:+.2f}"


def report(paths: list[Path], method: str) -> dict[str, Any]:
    """The tables as printed, and as a dict (benchmark -> metric -> yours / published / baseline / differences)."""
    pub = PUBLISHED[method]
    base = PUBLISHED[pub.baseline] if pub.baseline else None
    found = collect(paths)
    print(f"published: {pub.label}" + (f" (baseline: {base.label})" if base else "") + f"; source: {SOURCE}")
    out: dict[str, Any] = {"method": method, "baseline": pub.baseline, "source": SOURCE, "benchmarks": {}}
    for bench in BENCHMARKS:
        if bench not in found:
            continue
        path, mine, model = found[bench]
        theirs, baseline = pub.results.get(bench, {}), (base.results.get(bench, {}) if base else {})
        names = list(theirs) + [m for m in baseline if m not in theirs] or list(mine)
        print(f"\n{bench}: {path} (model {model})")
        head = f"| metric | yours | {method} | diff |" + (f" {pub.baseline} | diff |" if base else "")
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        rows = {}
        for name in names:
            y, t, b = mine.get(name), theirs.get(name), baseline.get(name)
            line = f"| {name} | {_cell(y)} | {_cell(t)} | {_diff(y, t)} |"
            if base:
                line += f" {_cell(b)} | {_diff(y, b)} |"
            print(line)
            rows[name] = {"yours": y, "published": t, "published_baseline": b,
                          "diff": None if y is None or t is None else y - t,
                          "diff_baseline": None if y is None or b is None else y - b}
        if not theirs and not baseline:
            print(f"(the seed published no {bench} numbers for {pub.label})")
        out["benchmarks"][bench] = {"file": str(path), "model": model, "metrics": rows}
    missing = [b for b in BENCHMARKS if b not in found and b in pub.results]
    if missing:
        print(f"\nnot given (published for {pub.label}): {', '.join(missing)}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("results", nargs="+", type=expanded_path,
                    help="results JSON files of eval.ijb / eval.tinyface / eval.ijbs, or folders holding them")
    ap.add_argument("--method", default="arcface_r50_ms1mv2_cfsm", choices=tuple(PUBLISHED),
                    help="the published method to compare with (its baseline is shown too)")
    add_out_arg(ap, "report.json", optional=True)
    args = ap.parse_args(argv)
    out_dir = check_output_folder(args.out) if args.out is not None else None
    result = report(list(args.results), args.method)
    if out_dir is not None:
        write_json(out_dir / "report.json", result)
        print(f"wrote {out_dir / 'report.json'}")
    return result


if __name__ == "__main__":
    run_command(main)
