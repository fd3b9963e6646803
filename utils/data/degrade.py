"""Hand-crafted face degradations (AdaFace-style), the non-learned alternative to CFSM's synthesized styles.

Each operation runs with its own probability, in this order, on an RGB uint8 112x112 face (in the data workers):

1. down-then-up scaling: resize to s x s, s ~ U(degrade_resize_range), then back with a random interpolation;
2. Gaussian blur, sigma ~ U(degrade_blur_sigma);
3. colour jitter: brightness, contrast, saturation and a per-channel gain, each ~ U(1 +- degrade_color_strength);
4. additive Gaussian noise, std ~ U(degrade_noise_std) on the 0..255 scale;
5. JPEG re-encoding, quality ~ U(degrade_jpeg_quality).

All probabilities default to 0 (off). `Degradation.from_config(cfg)` validates the keys (errors name the key, the
value and what is expected) and returns None when every probability is 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from utils.errors import UserError

__all__ = ["Degradation", "DEGRADE_KEYS", "DEGRADE_BOUNDS"]

DEGRADE_KEYS = ("degrade_resize_prob", "degrade_resize_range", "degrade_blur_prob", "degrade_blur_sigma",
                "degrade_color_prob", "degrade_color_strength", "degrade_noise_prob", "degrade_noise_std",
                "degrade_jpeg_prob", "degrade_jpeg_quality")
# The (min, max) ranges' bounds, declared once: the config rows of these keys (configs/base.py) read them too.
DEGRADE_BOUNDS: dict[str, tuple[float, float, str]] = {
    "degrade_resize_range": (4, 112, "sides in pixels"),
    "degrade_blur_sigma": (0.05, 20.0, "sigmas in pixels"),
    "degrade_noise_std": (0.0, 128.0, "std on the 0..255 scale"),
    "degrade_jpeg_quality": (1, 100, "JPEG quality"),
}
_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA)


class DegradeConfigError(UserError, ValueError):
    """A bad degrade_* config value; the message names the key."""


def _prob(cfg, key: str) -> float:
    value = cfg.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise DegradeConfigError(f"config key '{key}' = {value!r}: must be a probability in [0, 1]")
    return float(value)


def _range(cfg, key: str, default: tuple[float, float]) -> tuple[float, float]:
    low, high, _ = DEGRADE_BOUNDS[key]
    value = cfg.get(key, default)
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DegradeConfigError(f"config key '{key}' = {value!r}: expected (min, max)") from None
    if not low <= a <= b <= high:
        raise DegradeConfigError(f"config key '{key}' = {value!r}: need {low:g} <= min <= max <= {high:g}")
    return a, b


@dataclass
class Degradation:
    """A picklable callable ``rgb uint8 HxWx3 -> rgb uint8 HxWx3`` (shipped to DataLoader workers)."""

    resize_prob: float = 0.0
    resize_range: tuple[float, float] = (16, 64)
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 2.0)
    color_prob: float = 0.0
    color_strength: float = 0.25
    noise_prob: float = 0.0
    noise_std: tuple[float, float] = (2.0, 10.0)
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[float, float] = (10, 60)
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng: np.random.Generator | None = None
        self._pid = -1

    @classmethod
    def from_config(cls, cfg, seed: int = 0) -> "Degradation | None":
        """The configured degradation, or None when all degrade_*_prob keys are 0."""
        strength = cfg.get("degrade_color_strength", 0.25)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength < 1.0:
            raise DegradeConfigError(f"config key 'degrade_color_strength' = {strength!r}: must be in [0, 1)")
        deg = cls(resize_prob=_prob(cfg, "degrade_resize_prob"),
                  resize_range=_range(cfg, "degrade_resize_range", (16, 64)),
                  blur_prob=_prob(cfg, "degrade_blur_prob"),
                  blur_sigma=_range(cfg, "degrade_blur_sigma", (0.5, 2.0)),
                  color_prob=_prob(cfg, "degrade_color_prob"), color_strength=float(strength),
                  noise_prob=_prob(cfg, "degrade_noise_prob"),
                  noise_std=_range(cfg, "degrade_noise_std", (2.0, 10.0)),
                  jpeg_prob=_prob(cfg, "degrade_jpeg_prob"),
                  jpeg_quality=_range(cfg, "degrade_jpeg_quality", (10, 60)), seed=int(seed))
        return deg if deg.enabled else None

    @property
    def enabled(self) -> bool:
        return any(p > 0 for p in (self.resize_prob, self.blur_prob, self.color_prob, self.noise_prob,
                                   self.jpeg_prob))

    def _generator(self) -> np.random.Generator:
        # one stream per process: each DataLoader worker (a new pid) seeds its own from the seed torch gave it
        if self._rng is None or self._pid != os.getpid():
            import torch

            self._rng = np.random.default_rng([self.seed, torch.initial_seed() % (2 ** 63), os.getpid()])
            self._pid = os.getpid()
        return self._rng

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng if rng is not None else self._generator()
        h, w = rgb.shape[:2]
        img = rgb
        if rng.random() < self.resize_prob:
            side = int(round(rng.uniform(*self.resize_range)))
            small = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
            img = cv2.resize(small, (w, h), interpolation=_INTERPOLATIONS[int(rng.integers(len(_INTERPOLATIONS)))])
        if rng.random() < self.blur_prob:
            img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(*self.blur_sigma)))
        if rng.random() < self.color_prob:
            s = self.color_strength
            x = img.astype(np.float32)
            grey = x.mean(axis=2, keepdims=True)
            x = grey + (x - grey) * np.float32(rng.uniform(1 - s, 1 + s))            # saturation
            x = (x - x.mean()) * np.float32(rng.uniform(1 - s, 1 + s)) + x.mean()    # contrast
            x = x * np.float32(rng.uniform(1 - s, 1 + s))                             # brightness
            x = x * rng.uniform(1 - s / 2, 1 + s / 2, 3).astype(np.float32)           # colour cast
            img = np.clip(x, 0, 255).astype(np.uint8)
        if rng.random() < self.noise_prob:
            noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(*self.noise_std))
            img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        if rng.random() < self.jpeg_prob:
            quality = int(round(rng.uniform(*self.jpeg_quality)))
            ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise RuntimeError(f"JPEG re-encoding at quality {quality} failed")
            img = cv2.imdecode(enc, cv2.IMREAD_COLOR)[:, :, ::-1]
        return np.ascontiguousarray(img)
