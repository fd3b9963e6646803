"""eval.report: the user's IJB-B/C, TinyFace and IJB-S results beside the seed's published rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import report
from eval.common import EvalInputError
from tests.helpers import headroom

from .conftest import REPO_ROOT


def _results(folder: Path) -> Path:
    """Results files shaped as eval.ijb / eval.tinyface / eval.ijbs write them (TAR in percent, ranks as fractions)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "IJBC_model.json").write_text(json.dumps({
        "target": "IJBC", "model": "model.pt", "tar_at_far": {"1e-06": 88.0, "1e-05": 94.0, "0.0001": 96.0,
                                                               "0.001": 97.0, "0.01": 98.0, "0.1": 99.0},
        "identification": {"ranks": {"1": 0.96, "5": 0.975, "10": 0.98}}}))
    (folder / "TinyFace_model.json").write_text(json.dumps({
        "benchmark": "TinyFace", "model": "model.pt", "ranks": {"1": 0.6401, "5": 0.69, "20": 0.72}}))
    protocols = {p: {"ranks": {"1": 0.6, "5": 0.7, "10": 0.75}, "tpir_at_fpir": {"0.01": 0.45, "0.1": 0.55}}
                 for p in ("V2S", "V2B", "V2V")}
    (folder / "IJBS_model.json").write_text(json.dumps({"benchmark": "IJB-S", "model": "model.pt",
                                                        "protocols": protocols}))
    (folder / "verification.json").write_text(json.dumps({"lfw": {"accuracy": 0.99}}))  # skipped in a folder
    return folder


def test_published_numbers_are_the_seed_tables() -> None:
    """A few cells, read off the CFSM README's Validation tables (dd56184)."""
    pub = report.PUBLISHED
    assert pub["arcface_r50_ms1mv2_cfsm"].results["IJB-B"]["TAR@FAR=1e-05"] == 90.95
    assert pub["arcface_r50_ms1mv2"].results["IJB-C"]["TAR@FAR=1e-06"] == 87.24
    assert pub["adaface_r100_webface12m_cfsm"].results["TinyFace"]["Rank-1"] == 73.87
    assert pub["arcface_r50_ms1mv2"].results["IJB-S"]["V2V TPIR@FPIR=10%"] == 5.72
    assert pub["adaface_r100_webface12m"].results["IJB-S"]["V2B Rank-5"] == 76.56
    assert "IJB-B" not in pub["adaface_r100_webface12m_cfsm"].results  # not published: not invented
    assert all(len(r["IJB-S"]) == 12 for r in (p.results for p in pub.values()))


def test_report_prints_yours_published_and_differences(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = report.main([str(_results(tmp_path / "res")), "--out", str(tmp_path / "rep")])
    text = capsys.readouterr().out
    assert "| TAR@FAR=1e-06 | 88.00 | 89.34 | -1.34 | 87.24 | +0.76 |" in text
    assert "| Rank-1 | 64.01 | 63.01 | +1.00 | 62.21 | +1.80 |" in text
    assert "| V2S TPIR@FPIR=1% | 45.00 | 47.86 | -2.86 | 40.99 | +4.01 |" in text
    assert "not given (published for ArcFace+CFSM R50 MS1MV2): IJB-B" in text
    ijbc = out["benchmarks"]["IJB-C"]["metrics"]["Rank-5"]
    assert ijbc["yours"] == pytest.approx(97.5) and ijbc["diff"] == pytest.approx(97.5 - 97.48)
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["method"] == "arcface_r50_ms1mv2_cfsm"


def test_adaface_method_and_its_missing_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report.main([str(_results(tmp_path / "res")), "--method", "adaface_r100_webface12m_cfsm"])
    text = capsys.readouterr().out
    assert "| Rank-1 | 64.01 | 73.87 | -9.86 | 72.29 | -8.28 |" in text
    assert "(the seed published no IJB-C numbers for AdaFace+CFSM R100 WebFace12M)" in text
    assert "| Rank-1 | 96.00 | - | - | - | - |" in text  # the user's IJB-C shown; nothing invented beside it


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    folder = _results(tmp_path / "res")
    with pytest.raises(EvalInputError, match=r"two results for TinyFace: .*TinyFace_model\.json and .*other\.json"):
        (tmp_path / "other.json").write_text((folder / "TinyFace_model.json").read_text())
        report.main([str(folder), str(tmp_path / "other.json")])
    with pytest.raises(EvalInputError, match=r"verification\.json: not a results file of eval\.ijb"):
        report.main([str(folder / "verification.json")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CFSM_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-m", "eval.report", str(tmp_path / "none.json")], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=env, timeout=headroom(120))
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: RESULTS {tmp_path / 'none.json'} does not exist; give the JSON files (or folders) the eval "
        "commands wrote")
