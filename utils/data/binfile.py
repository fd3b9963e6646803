"""InsightFace ``.bin`` verification files: a pickle of ``(bins, issame_list)``.

``bins`` holds 2N encoded images in pair order ``[a0, b0, a1, b1, ...]``; ``issame_list`` N booleans. Loading uses a
restricted unpickler: a pickle can run arbitrary code through ``find_class``/``REDUCE``, so only the handful of
globals real files need are admitted, and everything else is refused with an error naming the file.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from utils.errors import UserError

__all__ = ["BinFileError", "load_bin", "write_bin", "restricted_loads"]


class BinFileError(UserError, ValueError):
    """Malformed, unsafe or inconsistent ``.bin`` file; the message names the file."""


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, 'latin1'); allow only that use.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(obj).__name__}, {encoding!r}) is not allowed")
    return obj.encode("latin1")


def _numpy_scalar(dtype, data=None):
    # numpy bool/int/float scalars (e.g. np.bool_ in issame lists) pickle as multiarray.scalar(dtype, raw bytes).
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!r} is not allowed")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_dtype(spec, align=False, copy=False):
    dt = np.dtype(spec)
    if dt.kind not in "biuf":
        raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not allowed")
    return dt


_ALLOWED = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits lists, tuples, bytes/str, bools, numbers and numpy bool/number scalars; refuses every other global."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a .bin file") from None


def restricted_loads(data: bytes, encoding: str = "bytes"):
    """Unpickle ``data`` with the restricted unpickler (``encoding='bytes'`` keeps Python 2 ``str`` as bytes)."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def _decode(buf, path: Path, i: int, image_size: tuple[int, int]) -> np.ndarray:
    if isinstance(buf, str):  # Python 2 str unpickled with a text encoding
        buf = buf.encode("latin1")
    if not isinstance(buf, (bytes, bytearray)):
        raise BinFileError(f"{path}: image {i} is a {type(buf).__name__}, expected encoded image bytes")
    # OpenCV asserts (``!buf.empty()``, naming nothing) on empty input instead of returning None.
    img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR_RGB) if len(buf) else None
    if img is None:
        raise BinFileError(f"{path}: image {i} ({len(buf)} bytes) could not be decoded")
    if img.shape[:2] != image_size:
        img = cv2.resize(img, (image_size[1], image_size[0]), interpolation=cv2.INTER_LINEAR)
    return img


def _issame_array(issame_list, path: Path) -> np.ndarray:
    """Pair labels as a bool array; only booleans, 0/1 integers and numpy bools are accepted.

    ``bool("False")``, ``bool("0")`` and ``bool(b"0")`` are all True, so converting blindly turns impostor pairs
    into genuine ones and a verification score of 100 %.
    """
    out = np.empty(len(issame_list), dtype=np.bool_)
    for i, x in enumerate(issame_list):
        if isinstance(x, (bool, np.bool_)):
            out[i] = bool(x)
        elif isinstance(x, (int, np.integer)) and x in (0, 1):  # bool is an int too; handled above
            out[i] = x == 1
        else:
            raise BinFileError(
                f"{path}: issame_list[{i}] is {x!r} ({type(x).__name__}); each pair label must be True/False "
                f"(or 0/1): re-create the file with eval.binfile.write_bin"
            )
    return out


def load_bin(path: str | os.PathLike, image_size: tuple[int, int] = (112, 112)) -> tuple[torch.Tensor, np.ndarray]:
    """Load a verification ``.bin``: returns ``(images uint8 [2N, 3, H, W] RGB, issame bool [N])``.

    Images not of ``image_size`` are resized (as InsightFace does). Raises ``FileNotFoundError`` / ``BinFileError``
    naming the file for a missing file, an unsafe or malformed pickle, undecodable images or a pair-count mismatch.
    """
    path = Path(os.path.expanduser(path))
    if not path.is_file():
        raise FileNotFoundError(f".bin file not found: {path}")
    try:
        obj = restricted_loads(path.read_bytes())
    except pickle.UnpicklingError as e:
        raise BinFileError(f"{path}: refused to unpickle: {e}") from None
    except Exception as e:  # truncated / garbage pickle
        raise BinFileError(f"{path}: not a valid .bin pickle: {type(e).__name__}: {e}") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise BinFileError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame_list = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame_list, (list, tuple, np.ndarray)):
        raise BinFileError(f"{path}: bins/issame_list must be sequences")
    if len(bins) != 2 * len(issame_list):
        raise BinFileError(
            f"{path}: {len(bins)} images but {len(issame_list)} pairs in issame_list (need {2 * len(issame_list)})"
        )
    if len(issame_list) == 0:  # would otherwise surface as "embedded 0 images, expected 0", naming no file
        raise BinFileError(f"{path}: holds no pairs (empty bins and issame_list): nothing to verify; re-create it "
                           f"(eval.binfile.write_bin) or remove it from val_targets / --bin")
    issame = _issame_array(issame_list, path)  # before decoding thousands of images
    images = np.empty((len(bins), 3, image_size[0], image_size[1]), dtype=np.uint8)
    for i, buf in enumerate(bins):
        images[i] = _decode(buf, path, i, image_size).transpose(2, 0, 1)
    return torch.from_numpy(images), issame


def write_bin(
    path: str | os.PathLike,
    images_rgb_uint8: np.ndarray | torch.Tensor | Sequence[bytes] | Sequence[np.ndarray],
    issame: Sequence[bool] | np.ndarray,
    quality: int = 95,
) -> None:
    """Write a ``.bin``: images are HxWx3 RGB uint8 arrays (stacked ``[2N,H,W,3]`` or a list) or encoded bytes.

    Arrays are JPEG-encoded (from BGR, as InsightFace's tools do) at ``quality``; the file is written atomically.
    """
    path = Path(os.path.expanduser(path))
    issame_list = [bool(x) for x in _issame_array(list(np.asarray(issame, dtype=object).reshape(-1)), path)]
    if isinstance(images_rgb_uint8, torch.Tensor):
        images_rgb_uint8 = images_rgb_uint8.cpu().numpy()
    n = len(images_rgb_uint8)
    if n != 2 * len(issame_list):
        raise BinFileError(f"{path}: {n} images for {len(issame_list)} pairs (need {2 * len(issame_list)})")
    bins: list[bytes] = []
    for i, img in enumerate(images_rgb_uint8):
        if isinstance(img, (bytes, bytearray)):
            bins.append(bytes(img))
            continue
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise BinFileError(f"{path}: image {i} must be HxWx3 uint8 RGB, got {img.dtype} {img.shape}")
        ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise BinFileError(f"{path}: could not JPEG-encode image {i}")
        bins.append(enc.tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump((bins, issame_list), f, protocol=4)
    os.replace(tmp, path)
