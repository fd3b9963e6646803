"""The one-command toy pipeline, wired end to end on the miniature data with a few steps per stage."""
import json

import pytest

from tools import pipeline


@pytest.mark.slow
def test_pipeline_stages_wired_and_resumable(mini_toy, tmp_path, capsys):
    args = ["--out", str(tmp_path / "run"), "--data", str(mini_toy), "--steps", "2", "--generator-steps", "2",
            "--set", "network=r_tiny", "batch_size=16", "num_workers=0", "val_targets=[]",
            "--generator-set", "batch_size=4", "num_workers=0", "style_report_faces=3"]
    results = pipeline.main(args)
    run = tmp_path / "run"
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == results and set(results) == {"baseline", "cfsm", "generator_style_report"}
    assert results["generator_style_report"]["num_faces"] == 3  # stage 1's own report of the generator
    assert set(results["generator_style_report"]["goals"]) >= {"recon_l1", "magnitude_spearman"}
    for method in (results["baseline"], results["cfsm"]):
        assert set(method) == {"toy_clean", "toy_target"} and all(0 <= v <= 1 for v in method.values())
    for path in ("results.png", "style_grid/style_grid_00.png", "generator/generator.pth", "cfsm/model.pt"):
        assert (run / path).is_file(), path
    assert "pretrained_synthesis_model" in (run / "logs" / "cfsm.log").read_text()
    # second call: every stage is skipped, the table is recomputed from the existing models
    capsys.readouterr()
    assert pipeline.main(args) == results
    assert capsys.readouterr().out.count("skipped") >= 5
