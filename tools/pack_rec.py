"""Pack an image folder (one sub-folder per identity) into InsightFace ``train.rec``/``train.idx``/``property``.

    python tools/pack_rec.py IMAGE_FOLDER OUT_DIR [--workers N] [--quality 95]

Labels follow the sorted sub-folder order. Images must be aligned 112x112 crops. JPEG files are stored as they are
(no generation loss) after a decode check; other formats are re-encoded as JPEG. Decoding/encoding runs in a
process pool; the output order is the sorted input order whatever the pool does.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset import DataError, scan_image_folder  # noqa: E402
from utils.recordio import write_face_rec  # noqa: E402

IMAGE_SIZE = (112, 112)


def encode_file(args: tuple[str, int]) -> bytes:
    """Validate one image file and return the bytes to store (original JPEG, or a fresh JPEG at ``quality``)."""
    path, quality = args
    buf = Path(path).read_bytes()
    img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: could not decode image ({len(buf)} bytes)")
    if img.shape[:2] != IMAGE_SIZE:
        raise DataError(f"{path}: image is {img.shape[1]}x{img.shape[0]}, expected aligned 112x112 faces")
    if buf[:3] == b"\xff\xd8\xff":
        return buf
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])  # img is BGR, as MXNet's tools
    if not ok:
        raise DataError(f"{path}: JPEG encoding failed")
    return enc.tobytes()


def pack_folder(image_folder: str | Path, out_dir: str | Path, workers: int = 0, quality: int = 95,
                progress: bool = True) -> tuple[int, int]:
    """Pack ``image_folder`` into ``out_dir``; returns ``(num_classes, num_images)``."""
    root = Path(image_folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes, samples = scan_image_folder(root)
    jobs = [(str(p), quality) for p, _ in samples]
    labels = [label for _, label in samples]
    workers = workers or (mp.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="packing", unit="img", disable=not progress)

    def encoded():
        if workers <= 1:
            it = map(encode_file, jobs)
            pool = None
        else:
            pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers)
            it = pool.imap(encode_file, jobs, chunksize=64)  # imap keeps input order
        try:
            for label, body in zip(labels, it):
                bar.update(1)
                yield label, body
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

    try:
        n = write_face_rec(out_dir, encoded(), len(classes), IMAGE_SIZE)
    finally:
        bar.close()
    return len(classes), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image_folder", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--workers", type=int, default=0, help="encoding processes (default: CPU count)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded (non-JPEG) images")
    args = ap.parse_args(argv)
    num_classes, num_images = pack_folder(args.image_folder, args.out_dir, args.workers, args.quality)
    print(f"wrote {args.out_dir / 'train.rec'}: set num_classes = {num_classes} and num_image = {num_images} in your config")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
