"""Unlabelled target-domain faces for stage 1: a dataset and a deterministic, rank-sharded batch sampler.

The original stage-1 code drew targets by a counter inside the dataset, so every DataLoader worker repeated the same
targets. Here the main process decides every target index (a batch sampler), workers only decode, and the stream is
a pure function of (seed, rank, world_size, step): resuming at step s yields exactly the batches a run that never
stopped would have seen.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["TargetFaceDataset", "TargetBatchSampler", "list_target_images", "check_target_images",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SIZE = 112


def list_target_images(target: str | os.PathLike, key: str = "target") -> list[Path]:
    """Image paths from a folder (searched recursively, sorted) or a .txt list (one path per line, relative paths
    are relative to the list's folder, '#' starts a comment). Errors name the config ``key`` and the path."""
    root = Path(target) if str(target) else None
    if root is None:
        raise FileNotFoundError(f"config key '{key}' is empty: give a folder of target-domain face images "
                                f"or a .txt file listing them")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise FileNotFoundError(f"config key '{key}' = {str(target)!r}: the folder holds no images "
                                    f"({', '.join(IMAGE_EXTENSIONS)})")
        return files
    if root.is_file() and root.suffix.lower() == ".txt":
        files, missing = [], []
        try:
            text = root.read_text(encoding="utf-8-sig")  # a BOM written by Windows editors is not part of a path
        except UnicodeDecodeError as e:
            raise ValueError(f"config key '{key}' = {str(target)!r}: not a UTF-8 text list of image paths "
                             f"(byte {e.start}: {e.reason})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            path = Path(line) if Path(line).is_absolute() else root.parent / line
            if not path.is_file():
                missing.append(f"line {lineno}: {path}")
            files.append(path)
        if missing:  # all of them at once: a list usually breaks as a whole (moved folder, other machine's paths)
            raise FileNotFoundError(f"config key '{key}' = {str(target)!r}: {len(missing)} of {len(files)} listed "
                                    f"images do not exist ({'; '.join(missing[:3])}"
                                    f"{'; ...' if len(missing) > 3 else ''}); relative paths are read from "
                                    f"{root.parent}")
        if not files:
            raise FileNotFoundError(f"config key '{key}' = {str(target)!r}: the list names no images")
        return files
    if root.is_file():
        raise ValueError(f"config key '{key}' = {str(target)!r}: expected a folder or a .txt list, got a "
                         f"{root.suffix or 'extensionless'} file")
    raise FileNotFoundError(f"config key '{key}' = {str(target)!r}: no such folder or file")


def _undecodable(path: Path) -> bool:
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is None  # 0-byte, truncated header, not an image


def check_target_images(files: list[Path], source: str, key: str = "target", workers: int = 8) -> None:
    """Decode every target image once before training (a DataLoader worker meeting a bad one hours in would stop
    the run mid-way); a ValueError lists how many failed and the first few paths.

    Threads: OpenCV decodes without the GIL. Cost: about a millisecond per 112x112 crop and thread."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        bad = [p for p, fails in zip(files, pool.map(_undecodable, files, chunksize=64)) if fails]
    if bad:
        raise ValueError(f"config key '{key}' = {source!r}: {len(bad)} of {len(files)} target images cannot be "
                         f"decoded, e.g. {', '.join(map(str, bad[:3]))}; delete or replace them (or list only good "
                         f"ones in a .txt file)")


class TargetFaceDataset(Dataset):
    """Target-domain faces as float32 CHW in [-1, 1] RGB (the source data's normalisation).

    Items are indexed by ``(index, flip)`` tuples (what `TargetBatchSampler` yields) or plain ints (no flip).
    Images that are not 112x112 are resized (target crops such as surveillance faces are often smaller); they
    should still be aligned like the source faces.
    """

    def __init__(self, target: str | os.PathLike, key: str = "target") -> None:
        self.files = list_target_images(target, key)
        self.source = str(target)

    def __len__(self) -> int:
        return len(self.files)

    def read_image(self, index: int) -> np.ndarray:
        import cv2

        path = self.files[index]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB)
        if img is None:
            raise ValueError(f"target image {path} (from {self.source}) could not be decoded")
        if img.shape[:2] != (SIZE, SIZE):
            interp = cv2.INTER_AREA if min(img.shape[:2]) > SIZE else cv2.INTER_LINEAR
            img = cv2.resize(img, (SIZE, SIZE), interpolation=interp)
        return img

    def __getitem__(self, index) -> torch.Tensor:
        i, flip = (int(index[0]), bool(index[1])) if isinstance(index, (tuple, list)) else (int(index), False)
        img = self.read_image(i)
        if flip:
            img = img[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        return x.div_(127.5).sub_(1.0)


class TargetBatchSampler(Sampler):
    """Endless target stream cut into batches, sharded by rank, addressable by global step.

    Position p of rank r's stream lies in target-epoch ``p // per_rank`` (per_rank = n // world_size), whose
    permutation (and flips) come from a generator seeded by (seed, target-epoch); rank r takes every world_size-th
    element. So within a target epoch no image repeats on a rank nor across ranks, and workers never share a
    counter. ``set_range(start_step, num_batches)`` selects the steps the next iteration yields.
    """

    def __init__(self, num_images: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 flip: bool = True) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"TargetBatchSampler: rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"TargetBatchSampler: batch_size must be >= 1, got {batch_size}")
        if num_images // world_size < 1:
            raise ValueError(f"TargetBatchSampler: {num_images} target images cannot be shared by "
                             f"{world_size} ranks (need at least one per rank)")
        self.num_images, self.batch_size = int(num_images), int(batch_size)
        self.rank, self.world_size, self.seed, self.flip = int(rank), int(world_size), int(seed), flip
        self.per_rank = self.num_images // self.world_size
        self.start_step, self.num_batches = 0, 0
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def set_range(self, start_step: int, num_batches: int) -> None:
        if start_step < 0 or num_batches < 0:
            raise ValueError(f"TargetBatchSampler.set_range: got start_step={start_step}, num_batches={num_batches}")
        self.start_step, self.num_batches = int(start_step), int(num_batches)

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator()
            # a salt keeps this stream independent of the source sampler's (seed, epoch) stream
            g.manual_seed((self.seed * 1_000_003 + epoch + 0x7A4637) & ((1 << 63) - 1))
            perm = torch.randperm(self.num_images, generator=g)
            flips = torch.randint(0, 2, (self.num_images,), generator=g, dtype=torch.bool)
            mine = perm[self.rank:: self.world_size][: self.per_rank]
            self._cache = (epoch, mine, flips[mine] if self.flip else torch.zeros_like(flips[mine]))
        return self._cache[1], self._cache[2]

    def batch_at(self, step: int) -> list[tuple[int, bool]]:
        """The target batch of global step ``step`` on this rank."""
        out = []
        for p in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(p, self.per_rank)
            idx, flips = self._epoch(epoch)
            out.append((int(idx[offset]), bool(flips[offset])))
        return out

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for step in range(self.start_step, self.start_step + self.num_batches):
            yield self.batch_at(step)
