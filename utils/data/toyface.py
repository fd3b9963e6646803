"""Procedural toy faces: the embedded benchmark every command defaults to.

An identity is a fixed set of geometry/colour parameters (face shape, skin tone, hair, eyes, brows, nose, mouth,
accessories); each image adds pose jitter, scale, expression, lighting and background. Faces are drawn in the
ArcFace 112x112 frame so the five landmarks sit near the standard template (with jitter). ``style="target"``
imitates surveillance capture: low resolution, blur, noise, colour cast and heavy JPEG compression.

``ensure_toy_data(root)`` writes the training ``.rec``, the ``toy_clean.bin``/``toy_target.bin`` pair files over
held-out identities and a folder of unlabelled target-style faces, once, safely under concurrent callers.

Further target domains (``DOMAINS``) are made by processes that the hand-crafted augmentation of
``utils/data/degrade.py`` (resize, Gaussian blur, global colour jitter, i.i.d. noise, JPEG) does not contain:
``camera`` (one fixed random "camera" per toy universe: spatially varying random blur kernels, a fixed sensor
pattern, vignetting and a tone curve), ``motion`` (motion blur along a random direction) and ``illumination``
(strong non-uniform light: a spot light and a soft cast shadow). ``ensure_toy_domains(root, names)`` adds
``toy_<name>.bin`` (the same pairs and the same renderings as ``toy_clean.bin``, with the domain's capture) and
``target_faces_<name>/`` to an existing toy folder, leaving every file ``ensure_toy_data`` wrote untouched.

Validation pairs (``VALIDATION_SETS``: ``toy_clean_val.bin``, ``toy_target_val.bin``, ``toy_<domain>_val.bin``) hold
the same styles over identities of their own, disjoint from training, from the reported pairs and from the target
faces: choices (recipes, defaults) are made on them and the reported sets stay untouched by tuning. They are added to
a toy folder made before they existed without rewriting any of its files.
"""
from __future__ import annotations

import fcntl
import json
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from utils.errors import UserError

__all__ = [
    "ARCFACE_TEMPLATE",
    "sample_identity",
    "identity_params",
    "render_face",
    "degrade_target",
    "ensure_toy_data",
    "ensure_toy_domains",
    "degrade_domain",
    "DOMAINS",
    "TOY_VERSION",
    "VALIDATION_SETS",
]

TOY_VERSION = 1
SIZE = 112
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
_SHIFT = 4  # cv2 fixed-point bits for sub-pixel drawing
_ONE = 1 << _SHIFT

# Seed-stream tags keep identities, training images, pairs and target faces independent of each other.
_TAG_IDENTITY, _TAG_TRAIN, _TAG_PAIR_IMG, _TAG_PAIRS, _TAG_TARGET = 1, 2, 3, 4, 5
_TAG_CAMERA = 6  # the fixed parameters of the `camera` domain (per universe seed)
_TAG_VAL_PAIRS, _TAG_VAL_IMG = 7, 8  # the validation pairs and their images (their own identities, see below)

_HAIR_COLOURS = np.array(
    [[20, 18, 16], [60, 40, 25], [110, 75, 40], [170, 130, 80], [210, 180, 120], [140, 60, 30], [150, 150, 150],
     [230, 230, 225]],
    dtype=np.float32,
)
_IRIS_COLOURS = np.array([[60, 40, 20], [90, 60, 30], [50, 90, 140], [70, 110, 70], [40, 30, 25]], dtype=np.float32)


_YY, _XX = (g.astype(np.float32) / SIZE - 0.5 for g in np.mgrid[0:SIZE, 0:SIZE])


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def sample_identity(rng: np.random.Generator) -> dict:
    """Draw one identity's fixed parameters (plain floats/ints/lists, JSON-serialisable)."""
    u = rng.uniform
    # Skin tone: interpolate along a light-to-dark ramp plus a small hue shift.
    t = u(0, 1)
    skin = (1 - t) * np.array([238, 205, 180]) + t * np.array([110, 70, 45]) + rng.normal(0, 10, 3)
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.normal(0, 12, 3)
    return {
        "face_w": u(33, 43),  # half-width of the face ellipse
        "face_h": u(44, 56),  # half-height
        "face_cy": u(60, 66),
        "jaw": u(0.0, 1.0),  # 0 = round chin, 1 = square jaw
        "skin": np.clip(skin, 0, 255).tolist(),
        "hair": np.clip(hair, 0, 255).tolist(),
        "hair_style": int(rng.integers(0, 5)),  # 0 bald, 1 short, 2 fringe, 3 side part, 4 long
        "hairline": u(14, 28),
        "eye_dx": u(-3.5, 3.5),  # change of half inter-ocular distance
        "eye_dy": u(-3.0, 3.0),
        "eye_r": u(3.5, 6.0),
        "eye_aspect": u(0.45, 0.85),
        "eye_tilt": u(-12, 12),
        "iris": (_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0, 8, 3)).clip(0, 255).tolist(),
        "brow_gap": u(5, 10),
        "brow_thick": u(1.0, 3.5),
        "brow_angle": u(-15, 15),
        "brow_len": u(7, 12),
        "nose_dy": u(-3.0, 3.0),
        "nose_len": u(9, 17),
        "nose_w": u(3.5, 8.0),
        "mouth_dy": u(-3.0, 3.0),
        "mouth_dx": u(-3.0, 3.5),  # change of half mouth width
        "lip_thick": u(1.0, 4.0),
        "lip": np.clip(np.array(skin) * np.array([0.85, 0.55, 0.55]) + rng.normal(0, 10, 3), 0, 255).tolist(),
        "ear": u(4, 9),
        "glasses": bool(u() < 0.15),
        "beard": bool(u() < 0.18),
        "mole": [u(-25, 25), u(-10, 30)] if u() < 0.35 else None,
        "cheek": u(0.0, 0.25),  # blush strength
    }


def identity_params(seed: int, identity: int) -> dict:
    """Parameters of identity number ``identity`` in the universe defined by ``seed``."""
    return sample_identity(_rng(seed, _TAG_IDENTITY, identity))


def _p(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def _ax(a: float, b: float) -> tuple[int, int]:
    return max(int(round(a * _ONE)), 1), max(int(round(b * _ONE)), 1)


def _ellipse(img, c, axes, angle, colour, thickness=-1, start=0, end=360) -> None:
    cv2.ellipse(img, _p(*c), _ax(*axes), angle, start, end, colour, thickness, cv2.LINE_AA, _SHIFT)


def _poly(img, pts, colour, thickness=1, closed=False, fill=False) -> None:
    arr = np.round(np.asarray(pts, dtype=np.float64) * _ONE).astype(np.int32).reshape(-1, 1, 2)
    if fill:
        cv2.fillPoly(img, [arr], colour, cv2.LINE_AA, _SHIFT)
    else:
        cv2.polylines(img, [arr], closed, colour, max(int(round(thickness)), 1), cv2.LINE_AA, _SHIFT)


def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(20, 235, 3)
    other = np.clip(base + rng.normal(0, 50, 3), 0, 255)
    ang = rng.uniform(0, 2 * math.pi)
    ramp = np.float32(math.cos(ang)) * _XX + np.float32(math.sin(ang)) * _YY
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    base, other = base.astype(np.float32), other.astype(np.float32)
    img = (base + ramp[..., None] * (other - base)).astype(np.uint8)
    for _ in range(int(rng.integers(0, 5))):  # clutter
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        if rng.uniform() < 0.5:
            cv2.rectangle(img, tuple(int(v) for v in rng.integers(0, SIZE, 2)),
                          tuple(int(v) for v in rng.integers(0, SIZE, 2)), col, -1)
        else:
            _ellipse(img, rng.uniform(0, SIZE, 2), rng.uniform(4, 25, 2), rng.uniform(0, 180), col)
    return img


def _draw_face(p: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Canonical-frame drawing (before the pose warp); returns the image (RGB) and the 5 landmarks."""
    u = rng.uniform
    img = _background(rng)
    skin = tuple(p["skin"])
    hair = tuple(p["hair"])
    yaw = u(-1.0, 1.0)  # fake out-of-plane rotation: inner features slide sideways, far side narrows
    smile = u(-0.4, 1.0)
    open_mouth = u(0, 1) < 0.25
    eye_open = 1.0 if u() < 0.85 else u(0.15, 0.6)
    brow_raise = u(-1.5, 2.5)

    cx = 56.0 + yaw * 2.0
    cy = p["face_cy"]
    fw, fh = p["face_w"] * (1 - 0.06 * abs(yaw)), p["face_h"]
    shift = yaw * 4.0  # horizontal slide of inner features

    if p["hair_style"] == 4:  # long hair behind the face
        _ellipse(img, (cx, cy + 4), (fw + 9, fh + 8), 0, hair)
    # neck and ears
    cv2.rectangle(img, _p(cx - fw * 0.45, cy + fh * 0.6), _p(cx + fw * 0.45, SIZE + 5), skin, -1, cv2.LINE_AA, _SHIFT)
    for side in (-1, 1):
        ear_w = p["ear"] * (1 - 0.4 * max(0.0, side * yaw))
        _ellipse(img, (cx + side * (fw - 1), cy - 2), (ear_w * 0.55, p["ear"] * 1.4), 0, skin)
    _ellipse(img, (cx, cy), (fw, fh), 0, skin)
    if p["jaw"] > 0.3:  # squarer jaw: a trapezoid over the lower ellipse
        jw = fw * (0.55 + 0.35 * p["jaw"])
        _poly(img, [(cx - fw * 0.98, cy), (cx + fw * 0.98, cy), (cx + jw, cy + fh * 0.82), (cx - jw, cy + fh * 0.82)],
              skin, fill=True)
    # cheeks
    if p["cheek"] > 0.05:
        blush = img.copy()
        for side in (-1, 1):
            _ellipse(blush, (cx + shift + side * fw * 0.55, cy + 8), (7, 5), 0, (220, 90, 90))
        img = cv2.addWeighted(blush, p["cheek"], img, 1 - p["cheek"], 0)
    # hair on top
    top = cy - fh
    if p["hair_style"] in (1, 2, 3, 4):
        line = top + p["hairline"]
        cap = np.zeros((SIZE, SIZE), np.uint8)
        _ellipse(cap, (cx, cy - 2), (fw + 3, fh + 3), 0, 255)
        cap[int(max(line, 0)) :] = 0
        if p["hair_style"] == 2:  # fringe: straight cut lower on the forehead
            cap[int(max(line, 0)) : int(max(line + 6, 0))] = 0
            _poly(cap, [(cx - fw * 0.8, line), (cx + fw * 0.8, line), (cx + fw * 0.7, line + 6), (cx - fw * 0.7, line + 6)],
                  255, fill=True)
        if p["hair_style"] == 3:  # side part: hair sweeps down one side
            _ellipse(cap, (cx - fw * 0.6, line), (fw * 0.5, 7), 20, 255)
        img[cap > 0] = np.asarray(hair, np.float32).astype(np.uint8)
    # eyes and brows
    tmpl = ARCFACE_TEMPLATE
    ex = (tmpl[1, 0] - tmpl[0, 0]) / 2 + p["eye_dx"]
    ey = (tmpl[0, 1] + tmpl[1, 1]) / 2 + p["eye_dy"] + (cy - 62) * 0.5
    eyes = []
    for side in (-1, 1):
        far = max(0.0, side * yaw)  # the eye on the side we turn towards is foreshortened
        ecx = 56.0 + shift + side * ex * (1 - 0.15 * far)
        eyes.append((ecx, ey))
        r = p["eye_r"] * (1 - 0.2 * far)
        h = r * p["eye_aspect"] * eye_open
        tilt = p["eye_tilt"] * side
        _ellipse(img, (ecx, ey), (r, max(h, 0.6)), tilt, (245, 245, 240))
        if eye_open > 0.5:
            _ellipse(img, (ecx + yaw * 1.5, ey), (r * 0.55, min(r * 0.55, h)), 0, tuple(p["iris"]))
            _ellipse(img, (ecx + yaw * 1.5, ey), (r * 0.22, min(r * 0.22, h)), 0, (10, 10, 10))
        _ellipse(img, (ecx, ey), (r, max(h, 0.6)), tilt, (60, 40, 35), 1)
        by = ey - p["brow_gap"] - brow_raise
        bl = p["brow_len"] * (1 - 0.2 * far)
        a = math.radians(p["brow_angle"] * side)
        dx, dy = math.cos(a) * bl / 2, math.sin(a) * bl / 2
        brow_col = tuple(float(c) * 0.8 for c in hair) if p["hair_style"] else (60, 45, 35)
        _poly(img, [(ecx - dx, by + dy), (ecx, by - 1.2), (ecx + dx, by - dy)], brow_col, p["brow_thick"])
    # glasses
    if p["glasses"]:
        for ecx, eyy in eyes:
            _ellipse(img, (ecx, eyy), (p["eye_r"] + 3.5, p["eye_r"] + 2), 0, (30, 30, 30), 1)
        _poly(img, [(eyes[0][0] + p["eye_r"] + 3.5, ey), (eyes[1][0] - p["eye_r"] - 3.5, ey)], (30, 30, 30), 1)
    # nose: the tip is the nose landmark
    nx = tmpl[2, 0] + shift * 1.6
    ny = tmpl[2, 1] + p["nose_dy"] + (ey - 51.6) * 0.5
    shade = tuple(float(c) * 0.7 for c in skin)
    _poly(img, [(56.0 + shift, ny - p["nose_len"]), (nx + yaw * 1.5, ny - 1), (nx - p["nose_w"] * 0.4, ny + 1.5)],
          shade, 1.3)
    for side in (-1, 1):
        _ellipse(img, (nx + side * p["nose_w"] * 0.45, ny + 1), (1.4, 0.9), 0, tuple(float(c) * 0.45 for c in skin))
    # mouth: corners are landmarks 4 and 5
    mw = (tmpl[4, 0] - tmpl[3, 0]) / 2 + p["mouth_dx"] + smile * 1.5
    my = (tmpl[3, 1] + tmpl[4, 1]) / 2 + p["mouth_dy"] + (ny - 71.7) * 0.5 - smile * 0.8
    mcx = 56.0 + shift * 1.2
    lcorner, rcorner = (mcx - mw * (1 - 0.12 * max(0, -yaw)), my), (mcx + mw * (1 - 0.12 * max(0, yaw)), my)
    curve = smile * 3.0
    if p["beard"]:
        beard_col = tuple(float(c) for c in hair) if p["hair_style"] else (50, 40, 35)
        _poly(img, [(cx - fw * 0.85, cy + 6), (lcorner[0] - 3, my - 4), (rcorner[0] + 3, my - 4), (cx + fw * 0.85, cy + 6),
                    (cx + fw * 0.5, cy + fh * 0.95), (cx - fw * 0.5, cy + fh * 0.95)], beard_col, fill=True)
    lip = tuple(p["lip"])
    upper = [lcorner, (mcx, my + curve - p["lip_thick"] * 0.5), rcorner]
    lower_y = my + curve + p["lip_thick"] + (4.0 if open_mouth else 0.0)
    lower = [rcorner, (mcx, lower_y), lcorner]
    if open_mouth:
        _poly(img, upper + lower, (70, 20, 25), fill=True)
    _poly(img, upper, lip, p["lip_thick"])
    _poly(img, lower, lip, p["lip_thick"])
    if p["mole"] is not None:
        _ellipse(img, (cx + shift + p["mole"][0] * fw / 40, cy + p["mole"][1]), (1.3, 1.3), 0, (60, 35, 30))
    lm = np.array([eyes[0], eyes[1], (nx, ny), lcorner, rcorner], dtype=np.float32)
    return img, lm


def _lighting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    strength = rng.uniform(0.0, 0.45)
    ang = rng.uniform(0, 2 * math.pi)
    gain = np.float32(rng.uniform(0.75, 1.2)) * (
        1 + np.float32(2 * strength) * (np.float32(math.cos(ang)) * _XX + np.float32(math.sin(ang)) * _YY)
    )
    tint = rng.uniform(0.9, 1.1, 3).astype(np.float32)
    out = img.astype(np.float32) * gain[..., None] * tint
    return np.clip(out, 0, 255).astype(np.uint8)


def degrade_target(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Surveillance-style degradation: downscale and back, blur, colour cast, noise, strong JPEG."""
    small = int(rng.integers(16, 36))
    img = cv2.resize(rgb, (small, small), interpolation=cv2.INTER_AREA)
    img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 1.6))
    x = img.astype(np.float32)
    cast = rng.uniform(0.75, 1.25, 3).astype(np.float32)
    contrast = rng.uniform(0.55, 0.9)
    x = (x - 128.0) * contrast + 128.0 + rng.uniform(-25, 25)
    x = x * cast + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(rng.uniform(3, 10))
    img = np.clip(x, 0, 255).astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(8, 35))])
    return cv2.imdecode(enc, cv2.IMREAD_COLOR_RGB)


# --------------------------------------------------------------------------------------------------------------
# Target domains no hand-crafted recipe contains

DOMAINS = ("camera", "motion", "illumination")
VERIFICATION_SETS = ("toy_clean", "toy_target")  # the toy .bin sets every toy set holds (names in `rec`)
# Validation pairs: the same styles over identities of their own (numbered after the target faces' identities, so
# disjoint from training, from VERIFICATION_SETS' pairs and from target_faces/). Recipes and defaults are chosen
# on these; the sets above are only reported.
VALIDATION_SUFFIX = "_val"
VALIDATION_SETS = tuple(name + VALIDATION_SUFFIX for name in VERIFICATION_SETS)
VALIDATION_MARKER = "toy_val.json"
_CAMERA_KERNELS = 4  # random point-spread functions, blended across the frame


def _camera(seed: int) -> dict:
    """The fixed parameters of the universe's camera: PSFs, their spatial weight maps, sensor pattern, tone curve."""
    cached = _CAMERA_CACHE.get(seed)
    if cached is not None:
        return cached
    rng = _rng(seed, _TAG_CAMERA)
    kernels = []
    for _ in range(_CAMERA_KERNELS):  # smoothed random positive 9x9 kernels: anisotropic, off-centre, not Gaussian
        k = cv2.GaussianBlur(rng.uniform(0, 1, (9, 9)).astype(np.float32) ** 3, (0, 0), 1.0)
        kernels.append(k / k.sum())
    centres = rng.uniform(-0.5, 0.5, (_CAMERA_KERNELS, 2)).astype(np.float32)
    dist = np.stack([(_XX - cx) ** 2 + (_YY - cy) ** 2 for cx, cy in centres])
    weights = np.exp(-dist / 0.05)
    weights /= weights.sum(0, keepdims=True)
    # sensor: per-pixel gain (photo-response non-uniformity), column stripes and a 2x2 colour mosaic gain
    gain = 1 + rng.normal(0, 0.06, (SIZE, SIZE, 1)).astype(np.float32)
    gain = gain * (1 + rng.normal(0, 0.05, (1, SIZE, 1)).astype(np.float32))
    mosaic = rng.uniform(0.9, 1.1, (2, 2, 3)).astype(np.float32)
    gain = gain * np.tile(mosaic, (SIZE // 2, SIZE // 2, 1))
    vignette = (1 - rng.uniform(0.8, 1.2) * (_XX ** 2 + _YY ** 2))[..., None].astype(np.float32)
    camera = {"kernels": kernels, "weights": weights.astype(np.float32), "pattern": (gain * vignette),
              "gamma": float(rng.uniform(1.3, 1.6)), "offset": rng.uniform(8, 30, 3).astype(np.float32)}
    _CAMERA_CACHE[seed] = camera
    return camera


_CAMERA_CACHE: dict[int, dict] = {}


def _degrade_camera(rgb: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    cam = _camera(seed)
    x = rgb.astype(np.float32)
    x = sum(w[..., None] * cv2.filter2D(x, -1, k, borderType=cv2.BORDER_REFLECT101)
            for k, w in zip(cam["kernels"], cam["weights"]))
    x = x * cam["pattern"] * np.float32(rng.uniform(0.8, 1.1))                  # exposure varies per shot
    x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** np.float32(cam["gamma"]) + cam["offset"]  # crushed shadows, lifted black
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.sqrt(np.maximum(x, 0) * np.float32(0.15))  # shot noise
    return np.clip(x, 0, 255).astype(np.uint8)


def _degrade_motion(rgb: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    length = rng.uniform(6, 14)
    angle = rng.uniform(0, math.pi)
    kernel = np.zeros((15, 15), np.float32)
    dx, dy = math.cos(angle) * (length - 1) / 2, math.sin(angle) * (length - 1) / 2
    cv2.line(kernel, _p(7 - dx, 7 - dy), _p(7 + dx, 7 + dy), 1.0, 1, cv2.LINE_AA, _SHIFT)
    img = cv2.filter2D(rgb, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT101)
    return img


def _degrade_illumination(rgb: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    spot = rng.uniform(-0.35, 0.35, 2).astype(np.float32)
    width = np.float32(rng.uniform(0.08, 0.25))
    light = np.float32(0.25) + np.float32(rng.uniform(1.0, 1.6)) * np.exp(
        -((_XX - spot[0]) ** 2 + (_YY - spot[1]) ** 2) / width)
    ang = rng.uniform(0, 2 * math.pi)  # a soft shadow edge across the face
    edge = np.float32(math.cos(ang)) * _XX + np.float32(math.sin(ang)) * _YY - np.float32(rng.uniform(-0.2, 0.2))
    shadow = 1 - np.float32(rng.uniform(0.4, 0.7)) / (1 + np.exp(-edge / np.float32(0.03)))
    colour = np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.5, 0.8)], np.float32)  # warm lamp light
    x = rgb.astype(np.float32) * (light * shadow)[..., None] * colour
    return np.clip(x, 0, 255).astype(np.uint8)


_DOMAIN_FUNCS = {"camera": _degrade_camera, "motion": _degrade_motion, "illumination": _degrade_illumination}


def degrade_domain(name: str, rgb: np.ndarray, rng: np.random.Generator, seed: int = 0) -> np.ndarray:
    """Capture ``rgb`` (uint8 112x112x3) in target domain ``name`` (one of ``DOMAINS``); ``seed`` picks the universe's
    fixed camera. None of these processes is in utils/data/degrade.py's hand-crafted recipe."""
    if name not in _DOMAIN_FUNCS:
        raise ValueError(f"degrade_domain: unknown domain {name!r}; choices: {', '.join(DOMAINS)}")
    return np.ascontiguousarray(_DOMAIN_FUNCS[name](rgb, rng, seed))


def render_face(identity_params: dict, rng: np.random.Generator, style: str = "clean",
                universe_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image of an identity: ``(rgb uint8 [112,112,3], landmarks5 float32 [5,2])``.

    Landmarks (left eye, right eye, nose tip, left and right mouth corner) are in image coordinates after the pose
    warp. ``style="target"`` applies :func:`degrade_target` on top of the clean rendering, a name of ``DOMAINS``
    applies :func:`degrade_domain` (``universe_seed`` picks the fixed camera) to the clean rendering; geometry is
    unchanged and the same ``rng`` state gives the same face in every style.
    """
    if style not in ("clean", "target", *DOMAINS):
        raise ValueError(f"render_face: style must be 'clean', 'target' or one of {', '.join(DOMAINS)}, got {style!r}")
    img, lm = _draw_face(identity_params, rng)
    # In-plane pose: rotation + scale + translation about the template centre.
    angle = rng.normal(0, 6.0)
    scale = rng.uniform(0.9, 1.1)
    M = cv2.getRotationMatrix2D((56.0, 62.0), angle, scale)
    M[:, 2] += rng.normal(0, 2.0, 2)
    img = cv2.warpAffine(img, M, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    lm = (lm @ M[:, :2].T + M[:, 2]).astype(np.float32)
    img = _lighting(img, rng)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.35, 0.7))
    if style == "target":
        img = degrade_target(img, rng)
    else:
        noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.5, 2.5))
        img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        if style != "clean":  # a domain captures the clean image (same geometry, lighting and sensor noise)
            img = degrade_domain(style, img, rng, universe_seed)
    return np.ascontiguousarray(img), lm


# --------------------------------------------------------------------------------------------------------------
# Dataset generation


def _encode(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover
        raise RuntimeError("JPEG encoding failed")
    return enc.tobytes()


def _render_job(job: tuple[int, int, int, int, int, str]) -> bytes:
    """job = (seed, identity, tag, a, b, style): deterministic in its arguments only (order-free parallelism)."""
    seed, ident, tag, a, b, style = job
    img, _ = render_face(identity_params(seed, ident), _rng(seed, tag, ident, a, b), style, seed)
    return _encode(img)


def _pool_map(jobs: list, workers: int) -> list[bytes]:
    if workers <= 1 or len(jobs) < 64:
        return [_render_job(j) for j in jobs]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # No cv2.setNumThreads initializer: it deadlocks in a forked child once the parent used OpenCV's thread pool.
    with ctx.Pool(workers) as pool:
        return pool.map(_render_job, jobs, chunksize=max(16, len(jobs) // (workers * 8)))


def _make_pairs(seed: int, ids: list[int], num_pairs: int, tag: int = _TAG_PAIRS) -> list[tuple[int, int, bool]]:
    rng = _rng(seed, tag)
    pairs = []
    for k in range(num_pairs):
        same = k % 2 == 0  # alternate genuine / impostor, like LFW folds are balanced
        a = int(rng.choice(ids))
        b = a if same else int(rng.choice([i for i in ids if i != a]))
        pairs.append((a, b, same))
    return pairs


_DEFAULTS = {
    "num_identities": 300,
    "images_per_identity": 24,
    "num_eval_identities": 200,
    "num_pairs": 600,
    "num_target_faces": 2000,
}


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ToyDataError(UserError, ValueError):
    """The toy data folder holds something else, or toy data made with other settings; the message names it."""


PARTIAL_MARKER = ".toy_partial"  # present while a toy set is being moved into its folder


def ensure_toy_data(
    root: str | os.PathLike,
    num_identities: int | None = None,
    images_per_identity: int | None = None,
    seed: int = 0,
    num_eval_identities: int | None = None,
    num_pairs: int | None = None,
    num_target_faces: int | None = None,
    workers: int | None = None,
    verbose: bool = False,
) -> Path:
    """Create the toy benchmark under ``root`` unless ``root/toy_meta.json`` says it is already there.

    Writes ``train.rec``/``train.idx``/``property`` (``num_identities`` x ``images_per_identity``), ``toy_clean.bin``
    and ``toy_target.bin`` (``num_pairs`` pairs, half genuine, over ``num_eval_identities`` held-out identities; same
    pairs in both styles), ``target_faces/*.jpg`` (``num_target_faces`` unlabelled target-style faces of further
    held-out identities) and ``toy_meta.json``. ``None`` arguments mean "the defaults, or whatever exists"; explicit
    values that disagree with existing data raise ``ToyDataError``, and so does a folder that holds anything but a
    (possibly half-moved) toy set: the user's own data is never overwritten. Concurrent callers (e.g. two ranks) are serialised
    with a file lock; files are produced in a temp dir and moved in, the meta file last.
    """
    root = Path(os.path.expanduser(root))
    asked = {
        "num_identities": num_identities,
        "images_per_identity": images_per_identity,
        "num_eval_identities": num_eval_identities,
        "num_pairs": num_pairs,
        "num_target_faces": num_target_faces,
    }
    meta_path = root / "toy_meta.json"
    with _locked(root.parent / f".{root.name}.lock"):
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            wrong = {k: (v, meta.get(k)) for k, v in asked.items() if v is not None and meta.get(k) != v}
            if meta.get("seed") != seed and any(v is not None for v in asked.values()):
                wrong["seed"] = (seed, meta.get("seed"))
            if wrong:
                raise ToyDataError(
                    f"{root}: existing toy data differs from the request (asked, found): {wrong}; "
                    f"delete {root} or use another directory"
                )
            _ensure_validation(root, meta, workers, verbose)  # toy sets written before the validation split
            return root
        partial = root / PARTIAL_MARKER
        held = sorted(p.name for p in root.iterdir() if p.name != PARTIAL_MARKER) if root.is_dir() else []
        if held and not partial.exists():
            shown = ", ".join(held[:4]) + (f", ... ({len(held)} entries)" if len(held) > 4 else "")
            raise ToyDataError(
                f"rec={str(root)!r} holds files that are not a toy data set ({shown}; no {meta_path.name}): "
                f"generate_toy_data=True writes only into a missing or empty folder. To train on this data set "
                f"generate_toy_data=False; for toy data point rec= at a new folder")
        cfg = {k: (v if v is not None else _DEFAULTS[k]) for k, v in asked.items()}
        if cfg["num_pairs"] % 2 or cfg["num_eval_identities"] < 2:
            raise ValueError(f"ensure_toy_data: num_pairs must be even and num_eval_identities >= 2, got {cfg}")
        workers = workers or min(os.cpu_count() or 1, 8)
        t0 = time.perf_counter()
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp", dir=root.parent))
        try:
            meta = _generate(tmp, cfg, seed, workers, verbose)
            meta["generation_seconds"] = round(time.perf_counter() - t0, 2)
            meta["workers"] = workers
            root.mkdir(parents=True, exist_ok=True)
            partial.touch()  # a move cut short leaves this marker: the next call may overwrite what it finds
            for item in tmp.iterdir():
                dest = root / item.name
                if dest.is_dir():
                    shutil.rmtree(dest)
                os.replace(item, dest)
            tmp_meta = root / ".toy_meta.json.tmp"
            tmp_meta.write_text(json.dumps(meta, indent=1))
            os.replace(tmp_meta, meta_path)  # marks completion
            partial.unlink()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _ensure_validation(root, meta, workers, verbose)
        if verbose:
            print(f"toy data written to {root} in {meta['generation_seconds']} s", flush=True)
    return root


def _generate(out: Path, cfg: dict, seed: int, workers: int, verbose: bool) -> dict:
    from utils.data.binfile import write_bin
    from utils.data.recordio import write_face_rec

    n_id, per_id = cfg["num_identities"], cfg["images_per_identity"]
    n_eval = cfg["num_eval_identities"]
    n_target = cfg["num_target_faces"]
    # Identity numbering: [0, n_id) train, [n_id, n_id + n_eval) pairs, then target-face identities.
    eval_ids = list(range(n_id, n_id + n_eval))
    target_first = n_id + n_eval
    n_target_ids = max(1, n_target // 10)
    pairs = _make_pairs(seed, eval_ids, cfg["num_pairs"])

    jobs = [(seed, i, _TAG_TRAIN, j, 0, "clean") for i in range(n_id) for j in range(per_id)]
    pair_jobs = []
    for k, (a, b, _) in enumerate(pairs):
        pair_jobs += [(seed, a, _TAG_PAIR_IMG, k, 0), (seed, b, _TAG_PAIR_IMG, k, 1)]
    jobs += [j + ("clean",) for j in pair_jobs] + [j + ("target",) for j in pair_jobs]
    jobs += [(seed, target_first + t % n_target_ids, _TAG_TARGET, t, 0, "target") for t in range(n_target)]
    if verbose:
        print(f"rendering {len(jobs)} toy faces with {workers} processes ...", flush=True)
    encoded = _pool_map(jobs, workers)

    n_train = n_id * per_id
    train = encoded[:n_train]
    write_face_rec(out, ((i // per_id, train[i]) for i in range(n_train)), n_id)
    issame = [s for _, _, s in pairs]
    p = len(pair_jobs)
    write_bin(out / "toy_clean.bin", encoded[n_train : n_train + p], issame)
    write_bin(out / "toy_target.bin", encoded[n_train + p : n_train + 2 * p], issame)
    tdir = out / "target_faces"
    tdir.mkdir()
    for t, buf in enumerate(encoded[n_train + 2 * p :]):
        (tdir / f"{t:06d}.jpg").write_bytes(buf)
    return {
        "version": TOY_VERSION,
        "seed": seed,
        **cfg,
        "num_classes": n_id,
        "num_image": n_train,
        "eval_identities": [eval_ids[0], eval_ids[-1] + 1],
        "target_face_identities": [target_first, target_first + n_target_ids],
        "image_size": [SIZE, SIZE],
    }


def ensure_toy_domains(root: str | os.PathLike, names: list[str] | tuple[str, ...] = DOMAINS,
                       workers: int | None = None, verbose: bool = False) -> list[Path]:
    """Add target domains to the toy set at ``root`` (made by :func:`ensure_toy_data`); returns their ``.bin`` paths.

    For each name of ``DOMAINS`` not there yet: ``toy_<name>.bin`` (the pairs of ``toy_clean.bin``, each image the
    same rendering captured in the domain) and ``target_faces_<name>/`` (as many unlabelled faces as
    ``target_faces/``, of the same held-out identities), then ``toy_<name>.json`` last (marks completion). Files
    of ``ensure_toy_data`` are never rewritten, so ``toy_target.bin`` and the training set stay bit-identical.
    """
    from utils.data.binfile import write_bin

    root = Path(os.path.expanduser(root))
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise ToyDataError(f"unknown toy domain(s) {', '.join(map(repr, unknown))}; choices: {', '.join(DOMAINS)}")
    meta_path = root / "toy_meta.json"
    if not meta_path.is_file():
        raise ToyDataError(f"{root}: no {meta_path.name}; make the toy data first (python -m tools.make_toy_data "
                           f"--out {root})")
    meta = json.loads(meta_path.read_text())
    seed, n_target = meta["seed"], meta["num_target_faces"]
    eval_ids = list(range(*meta["eval_identities"]))
    target_first, target_end = meta["target_face_identities"]
    pairs = _make_pairs(seed, eval_ids, meta["num_pairs"])
    paths = []
    with _locked(root.parent / f".{root.name}.lock"):
        for name in names:
            marker = root / f"toy_{name}.json"
            paths.append(root / f"toy_{name}.bin")
            if marker.is_file():
                continue
            t0 = time.perf_counter()
            jobs = []
            for k, (a, b, _) in enumerate(pairs):  # the very jobs of toy_clean.bin, in another style
                jobs += [(seed, a, _TAG_PAIR_IMG, k, 0, name), (seed, b, _TAG_PAIR_IMG, k, 1, name)]
            jobs += [(seed, target_first + t % (target_end - target_first), _TAG_TARGET, t, 0, name)
                     for t in range(n_target)]
            encoded = _pool_map(jobs, workers or min(os.cpu_count() or 1, 8))
            p = 2 * len(pairs)
            tmp_bin = root / f".toy_{name}.bin.tmp"
            write_bin(tmp_bin, encoded[:p], [s for _, _, s in pairs])
            faces = root / f"target_faces_{name}"
            tmp_dir = root / f".target_faces_{name}.tmp"
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir()
            for t, buf in enumerate(encoded[p:]):
                (tmp_dir / f"{t:06d}.jpg").write_bytes(buf)
            shutil.rmtree(faces, ignore_errors=True)
            os.replace(tmp_dir, faces)
            os.replace(tmp_bin, root / f"toy_{name}.bin")
            _write_validation_bins(root, meta, (name,), workers)
            marker.write_text(json.dumps({"domain": name, "seed": seed, "num_pairs": len(pairs),
                                          "num_target_faces": n_target,
                                          "generation_seconds": round(time.perf_counter() - t0, 2)}, indent=1))
            if verbose:
                print(f"toy domain {name}: {root / f'toy_{name}.bin'}, {faces}", flush=True)
    return paths


def validation_identities(meta: dict) -> list[int]:
    """The validation pairs' identities: as many as the reported pairs have, numbered after the target faces'."""
    first = meta["target_face_identities"][1]
    return list(range(first, first + meta["num_eval_identities"]))


def _write_validation_bins(root: Path, meta: dict, styles: tuple[str, ...], workers: int | None) -> None:
    """``toy_<style>_val.bin`` for each style: ``num_pairs`` pairs over :func:`validation_identities`, the same
    pairs and renderings in every style (as the reported sets), from seed streams of their own."""
    from utils.data.binfile import write_bin

    seed = meta["seed"]
    pairs = _make_pairs(seed, validation_identities(meta), meta["num_pairs"], tag=_TAG_VAL_PAIRS)
    base = []
    for k, (a, b, _) in enumerate(pairs):
        base += [(seed, a, _TAG_VAL_IMG, k, 0), (seed, b, _TAG_VAL_IMG, k, 1)]
    encoded = _pool_map([job + (style,) for style in styles for job in base], workers or min(os.cpu_count() or 1, 8))
    for i, style in enumerate(styles):
        name = f"toy_{style}{VALIDATION_SUFFIX}.bin"
        tmp = root / f".{name}.tmp"
        write_bin(tmp, encoded[i * len(base):(i + 1) * len(base)], [s for _, _, s in pairs])
        os.replace(tmp, root / name)


def _ensure_validation(root: Path, meta: dict, workers: int | None, verbose: bool) -> None:
    """Add the validation pairs (clean, target, and every domain already there) once; called under the toy lock.
    Files written before are never touched, so a toy set made before the split keeps its bytes."""
    marker = root / VALIDATION_MARKER
    if marker.is_file():
        return
    t0 = time.perf_counter()
    domains = tuple(n for n in DOMAINS if (root / f"toy_{n}.json").is_file())
    _write_validation_bins(root, meta, ("clean", "target") + domains, workers)
    marker.write_text(json.dumps({"seed": meta["seed"], "num_pairs": meta["num_pairs"],
                                  "identities": [validation_identities(meta)[0], validation_identities(meta)[-1] + 1],
                                  "generation_seconds": round(time.perf_counter() - t0, 2)}, indent=1))
    if verbose:
        print(f"toy validation pairs: {', '.join(f'toy_{n}{VALIDATION_SUFFIX}.bin' for n in ('clean', 'target') + domains)}"
              f" in {root}", flush=True)
