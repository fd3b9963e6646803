"""eval.verification: flip fusion, xnorm, accuracy on a model with a known answer, the training callback."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eval import verification
from eval.verification import CallBackVerification, embed_images, evaluate_verification
from utils.binfile import write_bin


class HalfMeans(nn.Module):
    """Embedding = mean of the left half and of the right half of channel 0: a mirror swaps the two entries."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bn = nn.BatchNorm1d(2)  # makes train/eval mode observable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[3] // 2
        return torch.stack([x[:, 0, :, :w].mean((1, 2)), x[:, 0, :, w:].mean((1, 2))], 1) * self.scale


class Colour(nn.Module):
    """Embedding = per-channel mean: images of one colour are one 'identity'."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) * self.w + 0.1


def _colour_pairs(n_pairs: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n_pairs * 2, 3))
    issame = np.arange(n_pairs) % 2 == 0
    imgs = np.zeros((2 * n_pairs, 3, 16, 16), dtype=np.uint8)
    for i in range(n_pairs):
        ca = colours[2 * i]
        cb = ca if issame[i] else colours[2 * i + 1]
        imgs[2 * i] = ca[:, None, None]
        imgs[2 * i + 1] = cb[:, None, None]
    return torch.from_numpy(imgs), issame


def test_embed_images_flip_fusion_sums_raw_outputs() -> None:
    img = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    img[:, 0, :, :2] = 255  # left half white in channel 0 -> orig = [1, -1], mirror = [-1, 1]
    model = HalfMeans()
    no_flip = embed_images(model, img, batch_size=2, flip=False)
    assert np.allclose(no_flip, [[1, -1]] * 3)
    fused = embed_images(model, img, batch_size=2, flip=True)
    assert np.allclose(fused, 0.0)
    assert model.training  # mode restored


def test_evaluate_verification_known_answer_and_xnorm() -> None:
    images, issame = _colour_pairs(40)
    model = Colour()
    r = evaluate_verification(model, images, issame, batch_size=7)
    assert r["accuracy"] == 1.0 and r["std"] == 0.0
    x = images.float().div(255).sub(0.5).div(0.5).mean((2, 3)) + 0.1
    assert r["xnorm"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="80 images for 39 pairs"):
        evaluate_verification(model, images, issame[:39])


def test_load_bin_is_reexported() -> None:
    from utils.binfile import load_bin

    assert verification.load_bin is load_bin


def _write_toy_bin(path: Path, n_pairs: int, seed: int) -> None:
    images, issame = _colour_pairs(n_pairs, seed)
    big = torch.nn.functional.interpolate(images.float(), size=(112, 112)).round().to(torch.uint8)
    write_bin(path, big.permute(0, 2, 3, 1).numpy(), issame)


class Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, float(value), step))


def test_callback_verification(tmp_path: Path) -> None:
    _write_toy_bin(tmp_path / "toy_a.bin", 20, 1)
    _write_toy_bin(tmp_path / "toy_b.bin", 20, 2)
    writer = Writer()
    cb = CallBackVerification(["toy_a", "toy_b"], tmp_path, batch_size=16, summary_writer=writer)
    model = Colour()
    model.train()
    res = cb(100, model)
    assert set(res) == {"toy_a", "toy_b"}
    assert all(v == 1.0 for v in res.values())  # JPEG of flat colours keeps identities apart
    assert model.training
    tags = {t for t, _, _ in writer.scalars}
    assert tags == {"val/toy_a_accuracy", "val/toy_a_xnorm", "val/toy_b_accuracy", "val/toy_b_xnorm"}
    assert all(s == 100 for _, _, s in writer.scalars)
    # highest is kept when a later evaluation is worse
    with torch.no_grad():
        model.w.zero_()
    res2 = cb(200, model)
    assert res2["toy_a"] < 1.0 and cb.highest["toy_a"] == 1.0


def test_callback_with_real_backbone_runs(tmp_path: Path) -> None:
    from backbones import get_model

    _write_toy_bin(tmp_path / "v.bin", 10, 3)
    model = get_model("r_tiny", num_features=64)
    cb = CallBackVerification(["v"], str(tmp_path), batch_size=8)
    res = cb(1, model)
    assert 0.0 <= res["v"] <= 1.0
    assert cb.last["v"]["xnorm"] > 0
    assert model.training


def test_callback_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"lfw\.bin"):
        CallBackVerification(["lfw"], tmp_path)
