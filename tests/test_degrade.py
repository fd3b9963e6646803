"""Hand-crafted degradation augmentation (utils/data/degrade.py) and its hook in the datasets' workers."""
import cv2
import numpy as np
import pytest
import torch
from easydict import EasyDict

from utils.data.degrade import Degradation, DegradeConfigError


def _face() -> np.ndarray:
    from utils.data.toyface import identity_params, render_face

    return render_face(identity_params(0, 3), np.random.default_rng(0))[0]


def _sharpness(rgb: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64), cv2.CV_64F).var())


def test_all_off_is_none_and_bad_values_name_the_key():
    assert Degradation.from_config(EasyDict()) is None
    assert Degradation.from_config(EasyDict(degrade_blur_prob=0.0)) is None
    with pytest.raises(DegradeConfigError, match="degrade_jpeg_prob"):
        Degradation.from_config(EasyDict(degrade_jpeg_prob=1.5))
    with pytest.raises(DegradeConfigError, match="degrade_resize_range"):
        Degradation.from_config(EasyDict(degrade_resize_prob=0.5, degrade_resize_range=(64, 16)))
    with pytest.raises(DegradeConfigError, match="degrade_noise_std"):
        Degradation.from_config(EasyDict(degrade_noise_prob=0.5, degrade_noise_std="big"))
    with pytest.raises(DegradeConfigError, match="degrade_color_strength"):
        Degradation.from_config(EasyDict(degrade_color_prob=0.5, degrade_color_strength=1.0))


@pytest.mark.parametrize("key,blurs", [("resize", None), ("blur", True), ("noise", False), ("jpeg", None),
                                       ("color", None)])
def test_each_operation_changes_the_face(key, blurs):
    face = _face()
    deg = Degradation.from_config(EasyDict({f"degrade_{key}_prob": 1.0, "degrade_resize_range": (16, 20),
                                            "degrade_blur_sigma": (1.5, 2.0), "degrade_noise_std": (8, 10)}))
    out = deg(face, np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.shape == face.shape
    assert np.abs(out.astype(int) - face.astype(int)).mean() > 0.5
    if blurs is True:
        assert _sharpness(out) < 0.5 * _sharpness(face)
    elif blurs is False:
        assert _sharpness(out) > _sharpness(face)
    # same generator state, same result: the randomness is the caller's rng only
    assert np.array_equal(out, deg(face, np.random.default_rng(1)))


def test_probability_is_honoured():
    face = _face()
    deg = Degradation.from_config(EasyDict(degrade_blur_prob=0.3))
    rng = np.random.default_rng(0)
    changed = sum(not np.array_equal(deg(face, rng), face) for _ in range(200))
    assert 35 <= changed <= 85


def test_dataset_applies_it_in_workers_only_when_augmenting(mini_toy):
    from dataset import build_dataset

    ds = build_dataset(mini_toy, augment=True)
    plain = ds[(0, False)][0]
    ds.degradation = Degradation.from_config(EasyDict(degrade_resize_prob=1.0, degrade_resize_range=(16, 20)))
    loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=[(0, False)], num_workers=1)
    degraded = next(iter(loader))[0][0]
    assert (degraded - plain).abs().mean() > 0.01
    ds.augment = False  # evaluation-style reads stay untouched
    assert torch.equal(ds[(0, False)][0], plain)
