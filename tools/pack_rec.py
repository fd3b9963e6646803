"""Pack an image folder (one sub-folder per identity) into InsightFace ``train.rec``/``train.idx``/``property``.

    python -m tools.pack_rec IMAGE_FOLDER OUT_DIR [--workers N] [--quality 95] [--overwrite] [--skip-bad]

Labels follow the sorted sub-folder order. Images must be aligned 112x112 crops. JPEG files are stored as they are
(no generation loss) after a decode check; other formats are re-encoded as JPEG. Decoding/encoding runs in a
process pool; the output order is the sorted input order whatever the pool does.

Nothing is lost on failure: the pack is written to temporary files in OUT_DIR and renamed into place only when every
image has been checked, so a bad image (undecodable, empty, not 112x112) stops the run, naming the file, and leaves
OUT_DIR as it was. An existing pack in OUT_DIR is replaced only with ``--overwrite``. ``--skip-bad`` leaves bad images
out instead (listed at the end; an identity left with no image is dropped and the later labels close the gap).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset import IMAGE_SIZE, DataError, decode_image, scan_image_folder  # noqa: E402
from utils.cli import ArgumentParser, UsageError, add_workers_arg, expanded_path, run_command  # noqa: E402
from utils.data.recordio import cache_path_for, write_face_rec  # noqa: E402

PACK_FILES = ("train.rec", "train.idx", "property")


class PackResult(NamedTuple):
    num_classes: int
    num_images: int
    skipped: list[str]  # "path: reason" of each bad image left out (--skip-bad)


def encode_file(args: tuple[str, int]) -> bytes:
    """Validate one image file and return the bytes to store (original JPEG, or a fresh JPEG at ``quality``)."""
    path, quality = args
    try:
        buf = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read image: {e}") from None
    rgb = decode_image(buf, path)  # the training reader's own decode and checks: what packs, reads
    if buf[:3] == b"\xff\xd8\xff":
        return buf
    ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise DataError(f"{path}: JPEG encoding failed")
    return enc.tobytes()


def _encode_or_reason(args: tuple[str, int]) -> tuple[bytes | None, str | None]:
    """``encode_file`` for ``--skip-bad``: the error message instead of an exception."""
    try:
        return encode_file(args), None
    except DataError as e:
        return None, str(e)


def existing_pack(out_dir: Path) -> list[Path]:
    """The pack files already in ``out_dir``."""
    return [out_dir / name for name in PACK_FILES if (out_dir / name).exists()]


def pack_folder(image_folder: str | Path, out_dir: str | Path, workers: int = 0, quality: int = 95,
                progress: bool = True, overwrite: bool = False, skip_bad: bool = False) -> PackResult:
    """Pack ``image_folder`` into ``out_dir``; returns ``(num_classes, num_images, skipped)``.

    Raises ``FileExistsError`` when ``out_dir`` already holds a pack and ``overwrite`` is false, and ``DataError``
    naming the first bad image unless ``skip_bad``; in both cases ``out_dir`` is left exactly as it was.
    """
    root = Path(os.path.expanduser(image_folder))
    out = Path(os.path.expanduser(out_dir))
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    present = existing_pack(out)
    if present and not overwrite:
        raise FileExistsError(
            f"{out} already holds a pack ({', '.join(p.name for p in present)}); pass --overwrite (overwrite=True) "
            f"to replace it, or choose another output folder"
        )
    classes, samples = scan_image_folder(root)
    jobs = [(str(p), quality) for p, _ in samples]
    labels = [label for _, label in samples]
    workers = workers or (mp.cpu_count() or 1)
    skipped: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pack_rec.", suffix=".tmp", dir=out))  # same filesystem: renames are atomic
    bar = tqdm(total=len(jobs), desc="packing", unit="img", disable=not progress)

    def encoded() -> Iterator[tuple[int, bytes]]:
        work = _encode_or_reason if skip_bad else encode_file
        if workers <= 1:
            it = map(work, jobs)
            pool = None
        else:
            pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers)
            it = pool.imap(work, jobs, chunksize=64)  # imap keeps input order
        new_label: dict[int, int] = {}  # identities that kept at least one image, numbered 0, 1, ... in order
        try:
            for label, result in zip(labels, it):
                bar.update(1)
                if skip_bad:
                    body, reason = result
                    if body is None:
                        skipped.append(reason)
                        continue
                else:
                    body = result
                yield new_label.setdefault(label, len(new_label)), body
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

    try:
        n = write_face_rec(staging, encoded(), None if skip_bad else len(classes), IMAGE_SIZE)
        if n == 0:
            raise DataError(f"{root}: no image could be packed ({len(skipped)} skipped as bad)")
        if existing_pack(out) and not overwrite:  # appeared while we packed
            raise FileExistsError(f"{out}: a pack appeared while packing; pass --overwrite to replace it")
        stale_cache = cache_path_for(out / "train.idx")
        if stale_cache.exists():
            stale_cache.unlink()  # belongs to the index being replaced
        # The index goes last: a reader never sees a new .idx beside an old .rec.
        for name in ("property", "train.rec", "train.idx"):
            os.replace(staging / name, out / name)
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    num_classes = int((out / "property").read_text().split(",")[0])
    return PackResult(num_classes, n, skipped)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("image_folder", type=expanded_path, help="one sub-folder of aligned 112x112 faces per identity")
    ap.add_argument("out_dir", type=expanded_path, help="folder that receives train.rec, train.idx and property")
    add_workers_arg(ap, os.cpu_count() or 1, "encoding images")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded (non-JPEG) images")
    ap.add_argument("--overwrite", action="store_true", help="replace a pack already in OUT_DIR")
    ap.add_argument("--skip-bad", action="store_true",
                    help="leave undecodable / empty / wrongly sized images out (listed) instead of stopping")
    args = ap.parse_args(argv)
    if not 0 <= args.quality <= 100:
        ap.error(f"--quality must be in 0..100, got {args.quality}")
    try:
        result = pack_folder(args.image_folder, args.out_dir, max(1, args.workers), args.quality,
                             overwrite=args.overwrite, skip_bad=args.skip_bad)
    except FileExistsError as e:  # a user's choice to make, not a bug: one line, exit 2
        raise UsageError(str(e)) from None
    for reason in result.skipped:
        print(f"skipped {reason}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad image(s)")
    print(f"wrote {args.out_dir / 'train.rec'}: set num_classes = {result.num_classes} and "
          f"num_image = {result.num_images} in your config")
    return 0


if __name__ == "__main__":
    run_command(main)
