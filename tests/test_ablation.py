"""tools/ablation.py: equal-step method comparison over seeds."""
import json
import math

import numpy as np
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


def test_sweep_names_set_epsilon_alpha_k_and_the_search():
    assert ablation.method_recipe("adv_e1_k3") == ("configs/toy_ours", ["k=3", "epsilon=1", "alpha=0.333333",
                                                                        "style_search=adversarial"])
    assert ablation.method_recipe("rand_e0.314_k1") == ("configs/toy_ours", ["k=1", "epsilon=0.314",
                                                                             "alpha=0.314", "style_search=random_sign"])
    assert ablation.method_recipe("random") == ablation.METHODS["random"]
    methods = ablation.default_methods([0.314, 2.0], [1, 3])
    assert methods[:3] == ["baseline", "handcrafted", "random"] and len(methods) == 3 + 2 * 2 * 2
    assert "adv_e2_k3" in methods and "rand_e0.314_k1" in methods
    for bad in ("adv_k2", "adv_e1_k0", "adv_e0_k1", "fancy"):
        with pytest.raises(ablation.UsageError, match="method"):
            ablation.method_recipe(bad)


def test_statistics_on_known_numbers():
    # SE of (1, 2, 3) = 1 / sqrt(3); the paired differences against the reference are 1, 1, 4 (mean 2, sd sqrt 3)
    per_seed = {"random": {0: 0.10, 1: 0.20, 2: 0.30}, "adv": {0: 0.11, 1: 0.21, 2: 0.34}, "one": {0: 0.5}}
    stats = ablation.paired_statistics(per_seed, "random", resolve=0.01)
    assert stats["random"]["mean"] == pytest.approx(0.2) and stats["random"]["se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert "diff" not in stats["random"]  # the reference is not compared with itself
    adv = stats["adv"]
    assert adv["diff"] == pytest.approx(0.02) and adv["diff_se"] == pytest.approx(0.01) and adv["diff_n"] == 3
    # (t_0.975,2 + t_0.8,2) * SE = (4.3027 + 1.0607) * 0.01
    assert adv["detectable"] == pytest.approx(0.053634, abs=1e-5)
    # sd of the differences 0.01 * sqrt(3): the fewest seeds with (t + t) * sd / sqrt(n) <= 0.01
    n = adv["seeds_needed"]
    sd = 0.01 * 3 ** 0.5
    assert ablation.detectable_difference(sd / n ** 0.5, n) <= 0.01 < ablation.detectable_difference(
        sd / (n - 1) ** 0.5, n - 1)
    assert 20 <= n <= 30
    assert math.isnan(stats["one"]["se"]) and math.isnan(stats["one"]["detectable"])  # one seed: no spread
    assert ablation.seeds_needed(float("nan"), 0.01) is None and ablation.detectable_difference(1.0, 1) != 1.0


def test_pair_noise_on_known_bits():
    # per-pair differences (0, 1, 0, 0): sample variance 0.25, over 4 pairs 0.0625; a second seed with none: 0
    a, b = np.array([1, 1, 0, 0], np.uint8), np.array([1, 0, 0, 0], np.uint8)
    assert ablation.pair_noise([a], [b]) == pytest.approx(0.0625)
    assert ablation.pair_noise([a, a], [b, a]) == pytest.approx(0.03125)
    per_seed = {"ref": {0: 0.5, 1: 0.6}, "m": {0: 0.75, 1: 0.6}}
    stats = ablation.paired_statistics(per_seed, "ref", bits={"ref": {0: b, 1: a}, "m": {0: a, 1: a}})
    sd2 = np.var([0.25, 0.0], ddof=1)
    assert stats["m"]["pair_share"] == pytest.approx(0.03125 / sd2)


@pytest.mark.parametrize("argv, message", [
    (["--epsilons", "0"], "--epsilons"), (["--ks", "0"], "--ks"), (["--seeds", "1", "1"], "--seeds"),
    (["--methods", "adv_k2"], "--methods"), (["--methods", "random", "random"], "--methods"),
    (["--methods", "baseline"], "--reference"), (["--domains", "fog"], "--domains"), (["--steps", "-1"], "--steps"),
    (["--resolve", "0"], "--resolve")])
def test_argument_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        ablation.parse_args(["--out", "o", "--generator", "g.pth", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_missing_inputs_are_named(tmp_path, mini_toy):
    with pytest.raises(SystemExit, match="--generator"):
        ablation.main(["--out", str(tmp_path), "--generator", str(tmp_path / "nope.pth"), "--data", str(mini_toy)])
    (tmp_path / "g.pth").write_bytes(b"x")
    with pytest.raises(SystemExit, match="--data"):
        ablation.main(["--out", str(tmp_path), "--generator", str(tmp_path / "g.pth"), "--data", str(tmp_path)])


@pytest.mark.slow
def test_runs_and_tabulates(tmp_path, mini_toy, tiny_generator_file, capsys):
    args = ["--out", str(tmp_path / "abl"), "--generator", str(tiny_generator_file), "--data", str(mini_toy),
            "--seeds", "0", "1", "--steps", "2", "--methods", "baseline", "random", "rand_e1_k1", "adv_e1_k1", "handcrafted",
            "--domains", "motion", "--set", "network=r_tiny", "batch_size=16", "num_workers=0", "val_targets=[]"]
    table = ablation.main(args)
    assert set(table["methods"]) == {"baseline", "random", "rand_e1_k1", "adv_e1_k1", "handcrafted"}
    # the validation pairs of every target too (identities of their own: choose on these, report the others)
    assert table["targets"] == ["toy_clean", "toy_target", "toy_motion", "toy_clean_val", "toy_target_val",
                                "toy_motion_val"]
    for row in table["methods"].values():
        assert set(row["per_seed"]) == {0, 1} and all(0 <= row[t][0] <= 1 for t in table["targets"])
        assert all(r["steps"] == 2 for r in row["per_seed"].values())
    rand = table["methods"]["rand_e1_k1"]
    assert rand["attack_gain"] is not None and rand["style_norm"][0] > 0  # the control reports its gain and |o|
    stats = table["statistics"]["toy_motion"]["rand_e1_k1"]
    assert stats["diff_n"] == 2 and stats["diff"] == pytest.approx(
        sum(rand["per_seed"][s]["toy_motion"] - table["methods"]["random"]["per_seed"][s]["toy_motion"]
            for s in (0, 1)) / 2)
    on_disk = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(on_disk["methods"]) == set(table["methods"])
    assert (tmp_path / "abl" / "ablation.png").stat().st_size > 0
    assert "| rand_e1_k1 |" in (tmp_path / "abl" / "ablation.md").read_text()
    cached = json.loads((tmp_path / "abl" / "random" / "seed_0" / "verification.json").read_text())
    assert set(cached) == set(table["targets"])
    for entry in cached.values():  # the per-pair bits are the 10-fold accuracy, pair by pair
        bits = [int(c) for c in entry["correct"]]
        assert len(bits) == 20 and sum(bits) / 20 == pytest.approx(entry["accuracy"], abs=1e-12)
    # the adversarial search is paired with its own control, seed by seed
    control = table["controls"]["toy_clean"]["adv_e1_k1"]
    assert control["control"] == "rand_e1_k1" and control["diff_n"] == 2
    assert control["diff"] == pytest.approx(sum(
        table["methods"]["adv_e1_k1"]["per_seed"][s]["toy_clean"] - rand["per_seed"][s]["toy_clean"]
        for s in (0, 1)) / 2)
    shares = [row["pair_share"] for row in table["statistics"]["toy_clean"].values() if "pair_share" in row]
    assert all(v >= 0 for v in shares)
    assert "harder, not only farther" in (tmp_path / "abl" / "ablation.md").read_text()
    again = ablation.main([*args, "--only-finished"])  # nothing trains: the same numbers from the cache
    assert {m: r["per_seed"] for m, r in again["methods"].items()} == \
        {m: r["per_seed"] for m, r in table["methods"].items()}
    assert "degrade_jpeg_prob=0.25" in (tmp_path / "abl" / "handcrafted" / "seed_0" / "train.log").read_text() or \
        json.loads((tmp_path / "abl" / "handcrafted" / "seed_0" / "summary.json").read_text())["config"][
            "degrade_jpeg_prob"] == 0.25
    assert "rand_e1_k1" in capsys.readouterr().out
