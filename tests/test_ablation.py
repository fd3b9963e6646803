"""tools/ablation.py: equal-step method comparison over seeds."""
import json

import pytest

from tools import ablation


def test_find_number_and_mean_std():
    summary = {"config": {"k": 1}, "losses": {"loss": 2.0}, "attack": {"attack_gain": 0.25, "style_norm": 3.5}}
    assert ablation.find_number(summary, ("attack_gain",)) == 0.25
    assert ablation.find_number(summary, ("style_norm",)) == 3.5
    assert ablation.find_number({"attack_gain": True}, ("attack_gain",)) is None  # flags are not numbers
    assert ablation.find_number(summary, ("missing",)) is None
    assert ablation.mean_std([0.9, 0.8]) == pytest.approx((0.85, 0.05))


def test_methods_differ_only_in_what_they_ablate():
    assert ablation.METHODS["baseline"] == ("configs/toy", [])
    assert [ablation.METHODS[m][1] for m in ("random", "adv_k1", "adv_k3")] == [["k=0"], ["k=1"], ["k=3"]]
    assert all(key.startswith("degrade_") for key in ablation.METHODS["handcrafted"][1])


def test_missing_inputs_are_named(tmp_path, mini_toy):
    with pytest.raises(SystemExit, match="--generator"):
        ablation.main(["--out", str(tmp_path), "--generator", str(tmp_path / "nope.pth"), "--data", str(mini_toy)])
    (tmp_path / "g.pth").write_bytes(b"x")
    with pytest.raises(SystemExit, match="--data"):
        ablation.main(["--out", str(tmp_path), "--generator", str(tmp_path / "g.pth"), "--data", str(tmp_path)])


@pytest.mark.slow
def test_runs_and_tabulates(tmp_path, mini_toy, tiny_generator_file, capsys):
    args = ["--out", str(tmp_path / "abl"), "--generator", str(tiny_generator_file), "--data", str(mini_toy),
            "--seeds", "0", "1", "--steps", "2", "--methods", "baseline", "adv_k1", "handcrafted",
            "--set", "network=r_tiny", "batch_size=16", "num_workers=0", "val_targets=[]"]
    table = ablation.main(args)
    assert set(table["methods"]) == {"baseline", "adv_k1", "handcrafted"}
    for row in table["methods"].values():
        assert set(row["per_seed"]) == {0, 1} and all(0 <= row[t][0] <= 1 for t in ablation.TARGETS)
        assert all(r["steps"] == 2 for r in row["per_seed"].values())
    on_disk = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(on_disk["methods"]) == set(table["methods"])
    assert "degrade_jpeg_prob=0.25" in (tmp_path / "abl" / "handcrafted" / "seed_0" / "train.log").read_text() or \
        json.loads((tmp_path / "abl" / "handcrafted" / "seed_0" / "summary.json").read_text())["config"][
            "degrade_jpeg_prob"] == 0.25
    assert "adv_k1" in capsys.readouterr().out
