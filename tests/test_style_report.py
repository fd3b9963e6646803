"""The style report (cfsm/style_report.py, tools/style_report.py) and the stage-1 recipe keys it judges."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfsm import Generator, MultiDiscriminator
from cfsm.stage1 import sample_style
from cfsm.style_report import sharpness, spearman, style_report


class _Pixels(torch.nn.Module):
    """Identity 'network': the flattened, pooled image (distance grows with any pixel change)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 8).flatten(1) + 1.5


class _StyleShift(torch.nn.Module):
    """A generator whose output moves away from x in proportion to |o| along a per-basis colour pattern."""

    def __init__(self, style_dim: int = 3, strength: float = 0.05) -> None:
        super().__init__()
        self.style_dim, self.strength = style_dim, strength
        self.pattern = torch.nn.Parameter(torch.randn(style_dim, 3, 1, 1, generator=torch.Generator().manual_seed(1)),
                                          requires_grad=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, content: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return (content + self.strength * (o[:, :, None, None, None] * self.pattern).sum(1)).clamp(-1, 1)


def _faces(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return F.interpolate(torch.rand(n, 3, 14, 14, generator=g) * 1.6 - 0.8, size=112, mode="nearest")


def test_spearman_and_sharpness():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.894, abs=1e-3)  # ties: average ranks
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    faces = _faces()
    assert sharpness(F.avg_pool2d(faces, 5, stride=1, padding=2)) < sharpness(faces) - 0.5


def test_report_separates_a_controllable_generator_from_an_inert_one():
    faces, targets = _faces(), _faces(3) * 0.5
    good = style_report(_StyleShift(strength=0.06), _Pixels(), faces, targets, directions=2)
    inert = style_report(_StyleShift(strength=0.0), _Pixels(), faces, targets, directions=2)
    assert good["recon_l1"] == pytest.approx(0.0, abs=1e-6) and good["id_distance_o0"] == pytest.approx(0, abs=1e-5)
    assert good["magnitude_spearman"] > 0.7 and good["distance_rising"]
    assert good["direction_effect"] > 0.03 and good["direction_distinctness"] > 0.5
    assert good["goals"]["recon_l1"]["met"] and good["goals"]["direction_effect"]["met"]
    assert inert["direction_effect"] == 0 and not inert["goals"]["direction_effect"]["met"]
    assert not inert["goals"]["magnitude_spearman"]["met"] and not inert["goals_met"]
    # distance curve against d*: reported per magnitude, mean gap matches its definition
    gaps = [abs(a - b) for a, b in zip(good["id_distance_by_magnitude"], good["target_distance_by_magnitude"])]
    assert good["distance_vs_target"] == pytest.approx(float(np.mean(gaps)))
    assert good == style_report(_StyleShift(strength=0.06), _Pixels(), faces, targets, directions=2)  # seeded
    json.dumps(good)


def test_direction_abs_cos_tells_one_change_at_three_strengths_from_three_changes():
    faces, targets = _faces(), _faces(3) * 0.5
    one_look = _StyleShift(strength=0.02)
    with torch.no_grad():  # basis i = (i + 1) x one colour pattern: distinct strengths, the same change
        one_look.pattern.copy_(torch.arange(1.0, 4.0)[:, None, None, None] * one_look.pattern[:1])
    same = style_report(one_look, _Pixels(), faces, targets, directions=2)
    varied = style_report(_StyleShift(strength=0.02), _Pixels(), faces, targets, directions=2)
    assert same["direction_distinctness"] > 0.5  # the distinctness goal alone is met by strengths
    assert same["direction_abs_cos"] == pytest.approx(1.0, abs=1e-3)
    assert varied["direction_abs_cos"] < 0.9


def test_sample_style_uniform_magnitude_spreads_norms():
    rng = torch.Generator().manual_seed(0)
    gauss = sample_style(4000, 10, rng, "gaussian").norm(dim=1)
    uniform = sample_style(4000, 10, rng, "uniform_magnitude", 6.0).norm(dim=1)
    assert gauss.std() < 0.9 and 2.8 < gauss.mean() < 3.4
    assert uniform.min() >= 0 and uniform.max() <= 6.0 and uniform.std() > 1.5
    with pytest.raises(ValueError, match="style_sampling"):
        sample_style(2, 10, rng, "laplace")


def test_discriminator_width_keeps_released_layout():
    wide, narrow = MultiDiscriminator(), MultiDiscriminator(dim=16)
    assert list(wide.state_dict()) == list(narrow.state_dict())
    assert wide.models.disc_0[0].weight.shape == (64, 3, 4, 4) and narrow.models.disc_0[0].weight.shape == (16, 3, 4, 4)
    assert sum(p.numel() for p in narrow.parameters()) * 10 < sum(p.numel() for p in wide.parameters())
    assert [o.shape for o in narrow(torch.zeros(2, 3, 112, 112))] == [o.shape for o in wide(torch.zeros(2, 3, 112, 112))]


def test_cli_writes_json_png_and_prints_json_last(tmp_path, mini_toy, capsys):
    from backbones import get_model
    from tools import style_report as cli

    torch.manual_seed(0)
    gen, idm = tmp_path / "g.pth", tmp_path / "id.pt"
    torch.save({"G_state_dict": Generator(dim=8, n_residual=1, latent_dim=16, style_dim=3).state_dict()}, gen)
    torch.save(get_model("r_tiny", num_features=32).state_dict(), idm)
    report = cli.main([str(gen), "--faces", str(mini_toy), "--id-model", str(idm), "--id-network", "r_tiny",
                       "--target-faces", str(mini_toy / "target_faces"), "--out", str(tmp_path / "r"),
                       "--num-faces", "3", "--num-target-faces", "2", "--directions", "1", "--gap-faces", "4"])
    printed = capsys.readouterr()
    last = printed.out.strip().splitlines()[-1]
    assert json.loads(last)["recon_l1"] == pytest.approx(report["recon_l1"])
    gap = json.loads(last)["domain_gap"]  # the usefulness measure (cfsm/domain_gap.py), on its own face sets
    assert (gap["num_faces"], gap["num_target_faces"]) == (4, 4) and gap["relative_gap"] >= 0
    assert f"domain gap: {gap['relative_gap']:.3f}" in printed.err
    assert (tmp_path / "r" / "style_report.png").stat().st_size > 1000
    assert json.loads((tmp_path / "r" / "style_report.json").read_text())["goals"].keys() == report["goals"].keys()
    with pytest.raises(SystemExit, match="--num-faces"):
        cli.main([str(gen), "--faces", str(mini_toy), "--id-model", str(idm), "--id-network", "r_tiny",
                  "--target-faces", str(mini_toy / "target_faces"), "--out", str(tmp_path / "r"), "--num-faces", "1"])


def test_stage1_writes_the_report_and_checks_recipe_keys(tmp_path):
    import train_generator
    from backbones import get_model
    from configs.loader import ConfigError
    from utils.data.toyface import ensure_toy_data

    data = ensure_toy_data(tmp_path / "toy", num_identities=4, images_per_identity=4, num_eval_identities=2,
                           num_pairs=2, num_target_faces=6, workers=1)
    torch.manual_seed(0)
    torch.save(get_model("r_tiny", num_features=32).state_dict(), tmp_path / "id.pt")
    keys = dict(rec=data, target=data / "target_faces", generate_toy_data=False, id_model=tmp_path / "id.pt",
                id_network="r_tiny", id_embedding_size=32, gen_dim=4, gen_latent_dim=16, gen_style_dim=3,
                batch_size=4, max_steps=2, num_workers=0, tensorboard=False, image_every=0, save_every=0,
                frequent=1, output=tmp_path / "out", seed=3, dis_dim=8, lambda_rec=10.0,
                style_sampling="uniform_magnitude", style_report_faces=3, gen_input_skip="image")

    def run(**extra):
        return train_generator.main(["configs/cfsm_toy"] + [f"{k}={v}" for k, v in {**keys, **extra}.items()])

    summary = run()
    report = summary["style_report"]
    assert report["num_faces"] == 3 and set(report["goals"]) >= {"recon_l1", "magnitude_spearman", "sharpness"}
    assert report["domain_gap"]["num_faces"] == 16 and report["domain_gap"]["relative_gap"] >= 0  # all 16 faces
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["style_report"]["recon_l1"] == \
        pytest.approx(report["recon_l1"])
    assert (tmp_path / "out" / "style_report" / "style_report.png").is_file()
    d_state = torch.load(tmp_path / "out" / "generator.pth", weights_only=True)["D_state_dict"]
    assert d_state["models.disc_0.0.weight"].shape[0] == 8
    from cfsm import load_generator
    assert load_generator(tmp_path / "out" / "generator.pth").input_skip == "image"
    for key, bad in (("gen_input_skip", "pixels"), ("style_sampling", "laplace"), ("lambda_rec", -1.0), ("dis_dim", 0), ("style_report_faces", -2)):
        with pytest.raises(ConfigError, match=key):
            run(**{key: bad}, output=tmp_path / "bad")


def test_input_color_skip_restores_what_instance_norm_hides(tmp_path):
    from cfsm import load_generator

    torch.manual_seed(0)
    x = _faces(4)
    shifted = 0.7 * x + torch.tensor([0.2, -0.1, 0.05])[None, :, None, None]
    o = torch.zeros(4, 3)
    released = Generator(dim=8, n_residual=1, latent_dim=16, style_dim=3).eval()
    skip = Generator(dim=8, n_residual=1, latent_dim=16, style_dim=3, input_skip="color").eval()
    skip.load_state_dict(released.state_dict(), strict=False)  # same weights; only the marker differs
    with torch.no_grad():
        # the defect: the released architecture cannot see a per-channel shift / global scale of its input
        assert (released(x, o)[1] - released(shifted, o)[1]).abs().max() < 5e-3
        a, b = skip(x, o)[1], skip(shifted, o)[1]
    assert (a.mean(dim=(2, 3)) - b.mean(dim=(2, 3))).abs().mean() > 0.05
    assert set(skip.state_dict()) - set(released.state_dict()) == {"input_color_skip_marker"}
    torch.save({"G_state_dict": skip.state_dict()}, tmp_path / "skip.pth")
    torch.save({"G_state_dict": released.state_dict()}, tmp_path / "released.pth")
    loaded = load_generator(tmp_path / "skip.pth")
    assert loaded.input_skip == "color" and load_generator(tmp_path / "released.pth").input_skip == "none"
    with torch.no_grad():
        assert torch.allclose(loaded.decode(loaded.encode(x), o), a, atol=1e-5)


@pytest.mark.parametrize("mode,pool", [("image", 1), ("half", 2), ("lowpass", 4)])
def test_input_image_skip_makes_the_decoder_a_residual_on_the_input(tmp_path, mode, pool):
    from cfsm import load_generator

    torch.manual_seed(0)
    x = _faces(3).clamp(-0.98, 0.98)
    o = torch.zeros(3, 3)
    gen = Generator(dim=8, n_residual=1, latent_dim=16, style_dim=3, input_skip=mode).eval()
    last = gen.decoder.model[-2]  # the 7x7 conv before tanh: zeroed, the decoder's residual is 0
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        content = gen.encode(x)
        # the (pooled) input travels in the content code, pixel-unshuffled onto its grid, and comes back
        assert content.shape[1] == gen.encoder.out_channels + 3 * (4 // pool) ** 2 and content.shape[2:] == (28, 28)
        expect = x if pool == 1 else F.interpolate(F.avg_pool2d(x, pool), scale_factor=pool, mode="bilinear",
                                                   align_corners=False)
        assert torch.allclose(gen.decode(content, o), expect, atol=1e-5)
        assert torch.allclose(gen.decode(content, torch.randn(3, 3)), expect, atol=1e-5)  # style acts via residual
    released = Generator(dim=8, n_residual=1, latent_dim=16, style_dim=3)
    assert set(gen.state_dict()) - set(released.state_dict()) == {f"input_{mode}_skip_marker"}
    torch.save({"G_state_dict": gen.state_dict()}, tmp_path / "skip.pth")
    loaded = load_generator(tmp_path / "skip.pth")
    assert loaded.input_skip == mode
    with torch.no_grad():
        assert torch.allclose(loaded(x, o)[1], expect, atol=1e-5)
    with pytest.raises(ValueError, match="input_skip"):
        Generator(dim=8, input_skip="pixels")
