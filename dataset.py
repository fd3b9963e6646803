"""Face recognition training data: RecordIO / image-folder / synthetic datasets, a deterministic distributed
sampler, the DataLoader factory and a CUDA prefetcher.

Items are ``(image float32 [3,112,112] RGB in [-1,1], label int64 scalar tensor)``. ``FaceSampler`` yields
``(index, flip)`` tuples so that the horizontal flips, like the order, are a pure function of (seed, epoch).
"""
from __future__ import annotations

import math
import os
import random
import warnings
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.errors import UserError
from utils.data.recordio import IndexedRecordReader, RecordIOError

__all__ = [
    "DataError",
    "RecordIOError",
    "MXFaceDataset",
    "ImageFolderDataset",
    "SyntheticDataset",
    "ensure_rec",
    "build_dataset",
    "FaceSampler",
    "get_dataloader",
    "CUDAPrefetcher",
    "decode_image",
    "to_tensor",
]

IMAGE_SIZE = (112, 112)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SCALE = np.float32(2.0 / 255.0)
_ONE = np.float32(1.0)


class DataError(UserError, ValueError):
    """Bad training data; the message names the file, key and value."""


def decode_image(buf: bytes, where: str) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 HxWx3 (OpenCV); ``where`` names file/key in the error."""
    # OpenCV asserts (``!buf.empty()``, naming nothing) on empty input instead of returning None.
    img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR_RGB) if len(buf) else None
    if img is None:
        raise DataError(f"{where}: could not decode image ({len(buf)} bytes)")
    if img.shape[:2] != IMAGE_SIZE:
        raise DataError(f"{where}: image is {img.shape[1]}x{img.shape[0]}, expected aligned 112x112 faces")
    return img


def to_tensor(rgb: np.ndarray, flip: bool) -> torch.Tensor:
    """RGB uint8 HWC -> float32 CHW ``(x / 255 - 0.5) / 0.5``, mirrored left-right when ``flip``."""
    if flip:
        rgb = rgb[:, ::-1]
    out = np.empty((3, rgb.shape[0], rgb.shape[1]), dtype=np.float32)
    # One fused pass (numpy handles the strided transpose/flip view); 20x faster than the torch op chain on 1 thread.
    np.multiply(rgb.transpose(2, 0, 1), _SCALE, out=out)
    out -= _ONE
    return torch.from_numpy(out)


def _split_index(index) -> tuple[int, bool | None]:
    if isinstance(index, (tuple, list)):
        i, flip = index
        return int(i), bool(flip)
    return int(index), None


class _FaceDatasetBase(Dataset):
    num_classes: int
    num_images: int
    augment: bool
    # optional rgb uint8 -> rgb uint8 callable (utils.data.degrade.Degradation), only when augmenting
    degradation = None

    def __len__(self) -> int:
        return self.num_images

    def _degrade(self, img: np.ndarray) -> np.ndarray:
        return self.degradation(img) if self.augment and self.degradation is not None else img

    def _flip(self, requested: bool | None) -> bool:
        if not self.augment:
            return False
        if requested is None:
            # Plain int index: random flip from the (seeded) worker's python RNG.
            return random.random() < 0.5
        return requested

    def _check_label(self, label: int, where: str) -> None:
        if not 0 <= label < self.num_classes:
            raise DataError(f"{where}: label {label} outside [0, {self.num_classes})")


def _integer_label(value: float, where: str) -> int:
    """A record's float label as an int; NaN, inf and fractions are a ``DataError`` naming ``where``."""
    value = float(value)
    if not math.isfinite(value) or value != int(value):
        raise DataError(f"{where}: label {value} is not an integer (identity labels are 0, 1, 2, ...)")
    return int(value)


class MXFaceDataset(_FaceDatasetBase):
    """InsightFace ``train.rec``/``train.idx`` in ``root_dir`` (header-record layout or no-header layout)."""

    def __init__(self, root_dir: str | os.PathLike, augment: bool = True) -> None:
        self.root_dir = Path(os.path.expanduser(root_dir))
        self.augment = augment
        rec, idx = self.root_dir / "train.rec", self.root_dir / "train.idx"
        for p in (rec, idx):
            if not p.is_file():
                raise FileNotFoundError(f"RecordIO file not found: {p}")
        self.reader = IndexedRecordReader(rec, idx)
        self.rec_path = rec
        header = None
        if 0 in self.reader:
            h, labels, _ = self.reader.read_unpacked(0)
            if h.flag > 0:
                header = labels
        if header is not None:
            if header.size < 2:
                raise DataError(f"{rec}: key 0 header record has label {header.tolist()}, expected [a, b]")
            a = _integer_label(header[0], f"{rec} key 0 (header record [a, b])")
            b = _integer_label(header[1], f"{rec} key 0 (header record [a, b])")
            self.imgidx = np.arange(1, a, dtype=np.int64)
            self.num_classes = b - a
            missing = [k for k in (1, a - 1) if k not in self.reader] if a > 1 else []
            if missing:
                raise DataError(f"{idx}: header says images are keys 1..{a - 1} but key {missing[0]} is not indexed")
            if a > 1:
                self._check_header_range(a, b)
        else:
            self.imgidx = np.array(sorted(self.reader.keys), dtype=np.int64)
            self.num_classes = self._classes_without_header()
        self.num_images = len(self.imgidx)
        if self.num_images == 0 or self.num_classes <= 0:
            raise DataError(f"{rec}: no images ({self.num_images}) or no classes ({self.num_classes})")

    def _check_header_range(self, a: int, b: int) -> None:
        """The header's image range must end on an image, and should cover every image the ``.idx`` holds."""
        rec, idx = self.rec_path, self.reader.idx_path
        h, labels, body = self.reader.read_unpacked(a - 1)
        if h.flag >= 2 and not body:  # an identity record [first_key, end_key): no image bytes
            raise DataError(
                f"{rec}: header record (key 0) says images are keys 1..{a - 1} and identities {a}..{b - 1}, but key "
                f"{a - 1} is an identity record (label {labels.tolist()}, no image): the header range covers identity "
                f"records; fix the header (write_face_rec / tools/pack_rec.py write a correct one) or re-pack"
            )
        held = len(self.reader) - 1 - self.reader.count_keys(a, b)  # keys other than the header and identities
        if held > a - 1:
            warnings.warn(
                f"{rec}: header record (key 0) lists {a - 1} images (keys 1..{a - 1}) but {idx} holds {held} image "
                f"records: training uses only the {a - 1} the header lists; re-pack (tools/pack_rec.py) to use all",
                stacklevel=3,
            )

    def _classes_without_header(self) -> int:
        prop = self.root_dir / "property"
        if prop.is_file():
            text = prop.read_text().strip()
            try:
                return int(text.split(",")[0])
            except ValueError:
                raise DataError(f"{prop}: expected 'num_classes,height,width', got {text!r}") from None
        # No header, no property: one pass over the labels (reads whole records; only for small sets).
        top = -1
        for k in self.imgidx:
            _, labels, _ = self.reader.read_unpacked(int(k))
            top = max(top, _integer_label(labels[0], f"{self.rec_path} key {int(k)}"))
        return top + 1

    def read_image(self, index: int) -> tuple[np.ndarray, int]:
        """RGB uint8 image and integer label of item ``index`` (no augmentation)."""
        key = int(self.imgidx[index])
        where = f"{self.rec_path} key {key}"
        _, labels, body = self.reader.read_unpacked(key)
        label = _integer_label(labels[0], where)
        self._check_label(label, where)
        return decode_image(body, where), label

    def __getitem__(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        i, flip = _split_index(index)
        img, label = self.read_image(i)
        return to_tensor(self._degrade(img), self._flip(flip)), torch.tensor(label, dtype=torch.long)


class ImageFolderDataset(_FaceDatasetBase):
    """``root_dir/<identity>/<image>``: labels are the sorted sub-folder order; images must be 112x112 crops."""

    def __init__(self, root_dir: str | os.PathLike, augment: bool = True) -> None:
        self.root_dir = Path(os.path.expanduser(root_dir))
        self.augment = augment
        if not self.root_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root_dir}")
        self.classes, samples = scan_image_folder(self.root_dir)
        # Paths relative to the root in one fixed-width bytes array and labels in an int64 array: no per-image Python
        # objects, so forked DataLoader workers share them without copy-on-access growth (a list of Paths would).
        self.rel_paths = np.array([os.fsencode(p.relative_to(self.root_dir)) for p, _ in samples], dtype=np.bytes_)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.num_classes = len(self.classes)
        self.num_images = len(samples)

    def read_image(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.root_dir / os.fsdecode(self.rel_paths[index]), int(self.labels[index])
        try:
            buf = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read image: {e}") from None
        return decode_image(buf, str(path)), label

    def __getitem__(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        i, flip = _split_index(index)
        img, label = self.read_image(i)
        return to_tensor(self._degrade(img), self._flip(flip)), torch.tensor(label, dtype=torch.long)


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted identity sub-folders and ``(path, label)`` samples; raises ``DataError`` for an empty folder."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no identity sub-folders (expected root/<identity>/<image>)")
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(f"{root / name}: identity folder {name!r} (label {label}) has no images")
        samples.extend((p, label) for p in files)
    return classes, samples


class SyntheticDataset(_FaceDatasetBase):
    """Fixed random image, label ``index % num_classes``: measures the training step without I/O."""

    def __init__(self, num_classes: int, num_images: int) -> None:
        if num_classes <= 0 or num_images <= 0:
            raise DataError(f"synthetic dataset needs num_classes > 0 and num_images > 0, got {num_classes}, {num_images}")
        self.num_classes = int(num_classes)
        self.num_images = int(num_images)
        self.augment = False
        g = torch.Generator().manual_seed(0)
        self.image = torch.rand(3, *IMAGE_SIZE, generator=g) * 2 - 1

    def __getitem__(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        i, _ = _split_index(index)
        return self.image, torch.tensor(i % self.num_classes, dtype=torch.long)


def ensure_rec(rec: str | os.PathLike, generate_toy_data: bool) -> None:
    """What a run's ``rec`` names, made so before anything reads it: with ``generate_toy_data`` the embedded toy
    benchmark, written into ``rec`` when it is missing (``utils.data.toyface.ensure_toy_data``: refuses a folder that
    holds other data, and toy data made with other settings); else the user's data, left as it is.

    Every rank calls it (the trainers, before checking their inputs): concurrent callers are serialised by a file
    lock, the first writes the set and the others find it there; a refusal is raised on every rank alike."""
    if generate_toy_data:
        from utils.data.toyface import ensure_toy_data

        ensure_toy_data(rec)


def build_dataset(
    rec: str | os.PathLike,
    augment: bool = True,
    num_classes: int | None = None,
    num_image: int | None = None,
) -> _FaceDatasetBase:
    """``"synthetic"`` | a folder holding ``train.rec`` | an image folder; checks config counts against the data."""
    if str(rec) == "synthetic":
        if num_classes is None or num_image is None:
            raise DataError("rec='synthetic' needs num_classes and num_image")
        return SyntheticDataset(num_classes, num_image)
    root = Path(os.path.expanduser(str(rec)))
    if not root.exists():
        raise FileNotFoundError(f"dataset not found: {root}: set rec= to the folder holding train.rec/train.idx, or to "
                                f"an image folder")
    if root.is_file():
        raise DataError(
            f"rec={str(rec)!r} is a file; rec is the folder holding train.rec and train.idx (or an image folder): "
            f"set rec={str(root.parent)!r}"
        )
    if (root / "train.rec").exists() or (root / "train.idx").exists():
        ds: _FaceDatasetBase = MXFaceDataset(root, augment=augment)
    else:
        ds = ImageFolderDataset(root, augment=augment)
    if num_classes is not None and int(num_classes) != ds.num_classes:
        raise DataError(f"{root}: config num_classes={num_classes} but the data has {ds.num_classes} classes")
    if num_image is not None and int(num_image) != ds.num_images:
        raise DataError(f"{root}: config num_image={num_image} but the data has {ds.num_images} images")
    return ds


class FaceSampler(Sampler):
    """Deterministic distributed sampler yielding ``(index, flip)``.

    Each epoch one permutation and one flip vector over the whole dataset are drawn from a generator seeded by
    ``(seed, epoch)`` (identical on every rank); rank ``r`` takes ``perm[r::world_size]`` truncated to
    ``batches_per_epoch * batch_size`` (drop_last). ``set_epoch(epoch, start_batch)`` skips the first
    ``start_batch`` of this rank's batches for mid-epoch resume; ``start_sample`` continues after that many samples
    consumed by all ranks (a resume on another world size).
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        flip: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"FaceSampler: rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"FaceSampler: batch_size must be >= 1, got {batch_size}")
        self.dataset_len = int(dataset_len)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.flip = flip
        self.epoch = 0
        self.start_sample = 0
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{dataset_len} images over {world_size} rank(s) give no full batch of batch_size={batch_size} "
                f"(images per rank per step): lower batch_size to at most {dataset_len // world_size}"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Full batches this rank gets per epoch (same on every rank)."""
        return (self.dataset_len // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0, start_sample: int | None = None) -> None:
        """Position at `start_batch` of this rank's batches, or after `start_sample` samples of the epoch consumed
        by all ranks together (the first `start_sample` entries of the epoch's permutation; a resume on another
        world size continues there, see utils/run/elastic.py)."""
        if start_sample is None:
            if not 0 <= start_batch <= self.batches_per_epoch:
                raise ValueError(f"FaceSampler: start_batch {start_batch} not in [0, {self.batches_per_epoch}]")
            start_sample = start_batch * self.batch_size * self.world_size
        elif not 0 <= start_sample <= self.dataset_len:
            raise ValueError(f"FaceSampler: start_sample {start_sample} not in [0, {self.dataset_len}]")
        self.epoch = int(epoch)
        self.start_sample = int(start_sample)

    @property
    def batches_left(self) -> int:
        """Full batches this rank still gets in the positioned epoch (same on every rank)."""
        return (self.dataset_len - self.start_sample) // (self.world_size * self.batch_size)

    def __len__(self) -> int:
        return self.batches_left * self.batch_size

    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator()
        # Mix seed and epoch into one 63-bit seed; different epochs never share a stream.
        g.manual_seed((self.seed * 1_000_003 + self.epoch) & ((1 << 63) - 1))
        n = self.dataset_len
        perm = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        flips = torch.randint(0, 2, (n,), generator=g, dtype=torch.bool) if self.flip else torch.zeros(n, dtype=torch.bool)
        return perm, flips

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        perm, flips = self._epoch_plan()
        mine = perm[self.start_sample + self.rank :: self.world_size][: self.batches_left * self.batch_size]
        flip_of = flips[mine]
        return iter(zip(mine.tolist(), flip_of.tolist()))


def seed_worker(worker_id: int, opencv_threads: int | None = None) -> None:
    """The one DataLoader worker-init (training, stage 1, evaluation): seeds python/numpy from torch's worker seed.

    `opencv_threads` (spawned workers only, e.g. `functools.partial(seed_worker, opencv_threads=1)`) caps OpenCV's
    pool so N workers do not each start one per core."""
    # torch seeds each worker as base_seed + worker_id (base_seed from the loader's seeded generator); derive
    # python/numpy RNGs from it so random flips of plain-int indices are reproducible too.
    seed = torch.initial_seed() % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    # Never cv2.setNumThreads in a forked child: it deadlocks when the parent already used OpenCV's thread pool.
    if opencv_threads is not None:
        cv2.setNumThreads(opencv_threads)


def get_dataloader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_workers: int,
    rank: int | None = 0,
    world_size: int | None = 1,
    device: torch.device = torch.device("cpu"),
) -> DataLoader:
    """DataLoader over ``dataset`` with a ``FaceSampler`` (drop_last, seeded workers, pinned memory on CUDA).

    ``rank``/``world_size`` = ``None`` take the values of the initialised process group (else 0 / 1).
    """
    import torch.distributed as dist

    dist_on = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if dist_on else 0
    if world_size is None:
        world_size = dist.get_world_size() if dist_on else 1
    sampler = FaceSampler(len(dataset), batch_size, rank, world_size, seed)
    g = torch.Generator()
    g.manual_seed(seed * 1000 + rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        drop_last=True,
        worker_init_fn=seed_worker,
        generator=g,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def training_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int, rank: int, world_size: int,
                    device: torch.device):
    """The trainers' loader: `get_dataloader` over `dataset`, wrapped in a `CUDAPrefetcher` on a CUDA device (host to
    device copies overlap compute). Its `.sampler` is the `FaceSampler` the run positions by step."""
    loader = get_dataloader(dataset, batch_size, seed, num_workers, rank, world_size, device)
    return CUDAPrefetcher(loader, device) if torch.device(device).type == "cuda" else loader


def batch_sampler_loader(dataset: Dataset, batch_sampler: Sampler, num_workers: int,
                         device: torch.device) -> DataLoader:
    """A DataLoader whose batches come from `batch_sampler` (e.g. stage 1's `TargetBatchSampler`), with the same
    seeded workers and pinned memory on CUDA as `get_dataloader`."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                      pin_memory=torch.device(device).type == "cuda", worker_init_fn=seed_worker,
                      persistent_workers=num_workers > 0)


class CUDAPrefetcher:
    """Iterates a loader, copying the next batch to ``device`` on a side stream while the current one is used."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CUDAPrefetcher needs a CUDA device, got {device}")
        self.loader = loader
        self.device = device
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = torch.cuda.Stream(device=self.device)
        it = iter(self.loader)

        def load():
            try:
                images, labels = next(it)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

        nxt = load()
        while nxt is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            images, labels = nxt
            # Tell the caching allocator these tensors are now used on the main stream.
            images.record_stream(torch.cuda.current_stream(self.device))
            labels.record_stream(torch.cuda.current_stream(self.device))
            nxt = load()
            yield images, labels
