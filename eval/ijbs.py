"""IJB-S surveillance identification: V2S, V2B, V2V with Rank-1/5/10 and TPIR at FPIR 1% / 10% (AdaFace/PFE rule).

    python -m eval.ijbs --model model.pt --protocol-dir <IJB-S protocols> \
        --frames-dir <aligned frames> [--frame-list kept_frames.csv] --out results/

The reference loads a pickled ``IJB_S_proto.pkl`` and ``image_list_mtcnn_fail_skipped_v1.csv`` that are **not
distributed**. This tool rebuilds the same templates from the official ``cs6`` protocol csv files plus the aligned
frames. What the user must prepare (``docs/eval_protocols.md`` §5.2):

1. ``--protocol-dir`` with the official files (one header line each, comma separated)::

       cs6_metadata.csv                                   col0 subject id, col1 videos/<vid>.mp4 or img/<id>.jpg
       cs6_surveillance_to_single-booking_probe.csv       probe videos for V2S and V2B
       cs6_surveillance_to_surveillance_probe.csv         probe videos for V2V
       galleries/cs6_surveillance_to_single_g{1,2}.csv    col1 subject, col2 img/<id>.jpg (one still per subject)
       galleries/cs6_surveillance_to_booking_g{1,2}.csv   col1 subject, col2 img/<id>.jpg (all = one template)
       galleries/cs6_surveillance_to_surveillance_g{1,2}.csv  col1 subject, col2 videos/<vid>.mp4

   Probe files: every cell of the form ``videos/<vid>.mp4`` names a probe video (the column layout is not relied
   on). A probe template is one (subject, video) pair for every subject that ``cs6_metadata.csv`` lists in a probe
   video; a V2V gallery template is one (subject, video) row of the surveillance gallery.
2. ``--frames-dir``: faces cropped from the ground-truth boxes (square, 10% pad, 256x256), then aligned to 112x112
   (AdaFace used MTCNN), stored as ``<subject>/videos_<vid>_<frame>.jpg`` and stills as ``<subject>/img_<id>.jpg``.
3. Optional ``--frame-list``: a csv with a ``path`` column (relative to ``--frames-dir``) of the frames to keep,
   like AdaFace's ``image_list_mtcnn_fail_skipped_v1.csv``. Default: every image under ``--frames-dir``.

Rules kept from the reference: no flip test (``--flip`` to add it; not the reference), template feature =
``mean(raw embeddings)`` L2-normalised (eps 1e-8); a template with no kept frame is a zero vector (score 0 against
everything; their number is reported); closed set = ranks on the two galleries stacked; open set = TPIR@FPIR per
gallery (:func:`eval.metrics.tpir_at_fpir`, k = floor(n*fpir)), averaged over G1 and G2. Images are fed in the
model file's channel order (BGR for AdaFace-family files, RGB otherwise; ``eval.common.BackboneChoice``).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from eval import metrics
from eval.common import (
    EvalInputError,
    FaceImages,
    add_model_args,
    check_output_folder,
    embed_dataset,
    eval_ranks,
    flip_fuse,
    model_from_args,
    write_json,
)
from utils.cli import ArgumentParser, run_command
from utils.distributed import DistEnv

PROTOCOLS = {
    "V2S": ("cs6_surveillance_to_single-booking_probe.csv", "cs6_surveillance_to_single"),
    "V2B": ("cs6_surveillance_to_single-booking_probe.csv", "cs6_surveillance_to_booking"),
    "V2V": ("cs6_surveillance_to_surveillance_probe.csv", "cs6_surveillance_to_surveillance"),
}
_VIDEO = re.compile(r"videos/([^/]+)\.mp4$")
_IMG = re.compile(r"img/([^/]+)\.jpg$")
_FRAME = re.compile(r"^videos_(.+)_(\d+)$")
_STILL = re.compile(r"^img_(.+)$")

Key = tuple  # ("video", subject, vid) or ("img", subject, img_id)


def _rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise EvalInputError(f"missing IJB-S protocol file: {path}")
    with open(path, newline="") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if r]
    if not rows:
        raise EvalInputError(f"{path} is empty")
    return rows


def read_metadata(path: Path) -> dict[str, set[str]]:
    """video id -> subjects appearing in it, from ``cs6_metadata.csv`` (col0 subject, col1 media)."""
    out: dict[str, set[str]] = {}
    for r in _rows(path):
        if len(r) >= 2:
            m = _VIDEO.search(r[1])
            if m:
                out.setdefault(m.group(1), set()).add(r[0])
    if not out:
        raise EvalInputError(f"{path}: no 'subject,videos/<id>.mp4' rows")
    return out


def read_probe_videos(path: Path) -> list[str]:
    vids: list[str] = []
    for r in _rows(path):
        for c in r:
            m = _VIDEO.search(c)
            if m and m.group(1) not in vids:
                vids.append(m.group(1))
    if not vids:
        raise EvalInputError(f"{path}: no 'videos/<id>.mp4' entries")
    return vids


def read_gallery(path: Path) -> list[tuple[str, list[Key]]]:
    """[(subject, [media keys])] in first-appearance order; stills of one subject form one template, each
    (subject, video) row is its own template."""
    templates: dict[tuple, tuple[str, list[Key]]] = {}
    for lineno, r in enumerate(_rows(path), 1):
        if len(r) < 3:
            if lineno == 1:
                continue
            raise EvalInputError(f"{path}:{lineno}: expected at least 3 columns, got {r!r}")
        subject, media = r[1], r[2]
        mv, mi = _VIDEO.search(media), _IMG.search(media)
        if mv:
            key = ("video", subject, mv.group(1))
            templates.setdefault(key, (subject, [key]))
        elif mi:
            t = templates.setdefault(("img", subject), (subject, []))
            t[1].append(("img", subject, mi.group(1)))
        elif lineno == 1:
            continue  # header
        else:
            raise EvalInputError(f"{path}:{lineno}: column 2 is neither img/<id>.jpg nor videos/<id>.mp4: {media!r}")
    if not templates:
        raise EvalInputError(f"{path}: no gallery rows")
    return list(templates.values())


def index_frames(frames_dir: Path, frame_list: Path | None) -> dict[Key, list[Path]]:
    """Group kept images by media key: ``<subject>/videos_<vid>_<frame>.jpg`` and ``<subject>/img_<id>.jpg``."""
    if not frames_dir.is_dir():
        raise EvalInputError(f"frames folder not found: {frames_dir}")
    if frame_list is not None:
        if not frame_list.is_file():
            raise EvalInputError(f"--frame-list {frame_list}: file not found (a csv with a 'path' column)")
        with open(frame_list, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise EvalInputError(f"{frame_list}: needs a 'path' column, got {reader.fieldnames}")
            paths = [frames_dir / row["path"] for row in reader]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise EvalInputError(f"{frame_list}: {len(missing)} listed frame(s) missing, e.g. {missing[:3]}")
    else:
        paths = sorted(p for p in frames_dir.rglob("*.jpg"))
    index: dict[Key, list[Path]] = {}
    for p in paths:
        subject = p.parent.name
        mf, ms = _FRAME.match(p.stem), _STILL.match(p.stem)
        if mf:
            index.setdefault(("video", subject, mf.group(1)), []).append(p)
        elif ms:
            index.setdefault(("img", subject, ms.group(1)), []).append(p)
        else:
            raise EvalInputError(f"unexpected frame name {p} (want <subject>/videos_<vid>_<frame>.jpg or img_<id>.jpg)")
    return index


def template_matrix(
    templates: list[tuple[str, list[Key]]], index: dict[Key, list[Path]], row_of: dict[Path, int], n_rows: int,
    raw: np.ndarray,
) -> tuple[np.ndarray, int]:
    """Unit template features (mean of raw frame embeddings, L2 with eps 1e-8) and the number of empty templates."""
    groups, members = [], []
    for t, (_, keys) in enumerate(templates):
        for k in keys:
            for p in index.get(k, []):
                groups.append(t)
                members.append(row_of[p])
    n_t = len(templates)
    mean = metrics.group_mean(raw[np.asarray(members, dtype=np.int64)], np.asarray(groups, dtype=np.int64), n_t) \
        if members else np.zeros((n_t, raw.shape[1]))
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    empty = int(np.count_nonzero(norm[:, 0] == 0))
    return mean / (norm + 1e-8), empty


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(description="IJB-S V2S / V2B / V2V identification")
    add_model_args(ap)
    ap.add_argument("--protocol-dir", required=True, help="folder of the IJB-S protocol csv files")
    ap.add_argument("--frames-dir", required=True, help="folder of the aligned 112x112 frames")
    ap.add_argument("--frame-list", default=None,
                    help="csv with a path column of the frames to keep (default: every frame)")
    ap.add_argument("--protocols", default="V2S,V2B,V2V", help="comma-separated protocols to run")
    ap.add_argument("--flip", action="store_true", help="add the mirror (NOT the reference protocol)")
    ap.add_argument("--out", default="results", help="output folder")
    args = ap.parse_args(argv)
    with eval_ranks(args.device) as env:  # one process, or one rank of torchrun
        return evaluate(args, env)


def evaluate(args: argparse.Namespace, env: DistEnv) -> dict | None:
    """The evaluation on this rank: every rank embeds its share, rank 0 computes and writes (others: None)."""
    t0 = time.time()
    out_dir = check_output_folder(args.out)
    pdir = Path(args.protocol_dir)
    if not pdir.is_dir():
        raise EvalInputError(f"--protocol-dir {pdir}: folder not found (it holds cs6_metadata.csv and galleries/)")
    if not Path(args.frames_dir).is_dir():
        raise EvalInputError(f"--frames-dir {args.frames_dir}: folder not found (aligned frames, "
                             f"<subject>/videos_<vid>_<frame>.jpg)")
    if args.frame_list and not Path(args.frame_list).is_file():
        raise EvalInputError(f"--frame-list {args.frame_list}: file not found (a csv with a 'path' column)")
    protocols = [p.strip().upper() for p in args.protocols.split(",") if p.strip()]
    for p in protocols:
        if p not in PROTOCOLS:
            raise EvalInputError(f"--protocols {args.protocols!r}: unknown protocol {p!r}; choices {list(PROTOCOLS)}")
    if not protocols:
        raise EvalInputError(f"--protocols {args.protocols!r}: name at least one of {list(PROTOCOLS)}")
    video_subjects = read_metadata(pdir / "cs6_metadata.csv")
    probes: dict[str, list[tuple[str, list[Key]]]] = {}
    galleries: dict[str, list[list[tuple[str, list[Key]]]]] = {}
    for p in protocols:
        probe_file, gal_prefix = PROTOCOLS[p]
        if probe_file not in probes:
            tmpl = []
            for vid in read_probe_videos(pdir / probe_file):
                if vid not in video_subjects:
                    raise EvalInputError(f"{pdir / probe_file}: video {vid} is not in cs6_metadata.csv")
                tmpl += [(s, [("video", s, vid)]) for s in sorted(video_subjects[vid])]
            probes[probe_file] = tmpl
        galleries[p] = [read_gallery(pdir / "galleries" / f"{gal_prefix}_g{g}.csv") for g in (1, 2)]

    index = index_frames(Path(args.frames_dir), Path(args.frame_list) if args.frame_list else None)
    all_templates = [t for tl in probes.values() for t in tl] + [
        t for gs in galleries.values() for g in gs for t in g]
    needed: set[Key] = {k for _, keys in all_templates for k in keys}
    paths = sorted({p for k in needed for p in index.get(k, [])})
    if not paths:
        raise EvalInputError(f"no frame under {args.frames_dir} belongs to any template of {protocols}")
    row_of = {p: i for i, p in enumerate(paths)}
    backbone, device = model_from_args(args, env)
    embedded = embed_dataset(
        backbone, FaceImages(paths, None, bgr=args.bgr), batch_size=args.batch_size, workers=args.workers,
        device=device, flip=args.flip, amp=not args.no_amp, progress=not args.no_progress, desc="IJB-S", env=env,
    )
    if embedded is None:
        return None  # another rank than 0: rank 0 has every row and writes the results
    orig, flipped = embedded
    raw = flip_fuse(orig, flipped)

    labels: dict[str, int] = {}

    def lab(ts: list[tuple[str, list[Key]]]) -> np.ndarray:
        return np.asarray([labels.setdefault(s, len(labels)) for s, _ in ts], dtype=np.int64)

    result: dict = {"benchmark": "IJB-S", "model": str(args.model), "network": args.network,
                    "embedding_size": int(orig.shape[1]), "bgr": args.bgr, "flip": args.flip,
                    "n_frames": len(paths), "protocols": {}}
    print("| protocol | Rank-1 | Rank-5 | Rank-10 | TPIR@FPIR=1% | TPIR@FPIR=10% |")
    print("|---|---|---|---|---|---|")
    for p in protocols:
        probe_t = probes[PROTOCOLS[p][0]]
        pf, p_empty = template_matrix(probe_t, index, row_of, len(paths), raw)
        pl = lab(probe_t)
        gfs, gls, g_empty = [], [], 0
        for g in galleries[p]:
            f, e = template_matrix(g, index, row_of, len(paths), raw)
            gfs.append(f)
            gls.append(lab(g))
            g_empty += e
        ranks = metrics.identification_ranks(pf, pl, np.concatenate(gfs), np.concatenate(gls), ranks=(1, 5, 10))
        per_g = [metrics.tpir_at_fpir(pf, pl, gf, gl, fpirs=(0.01, 0.1)) for gf, gl in zip(gfs, gls)]
        tpir = {f: float(np.mean([r[f] for r in per_g])) for f in (0.01, 0.1)}
        result["protocols"][p] = {
            "ranks": {str(k): v for k, v in ranks.items()},
            "tpir_at_fpir": {f"{k:g}": v for k, v in tpir.items()},
            "tpir_per_gallery": [{f"{k:g}": v for k, v in r.items()} for r in per_g],
            "n_probe_templates": len(probe_t), "n_gallery_templates": [len(g) for g in galleries[p]],
            "empty_probe_templates": p_empty, "empty_gallery_templates": g_empty,
        }
        print(f"| {p} | " + " | ".join(f"{100 * v:.2f}" for v in list(ranks.values()) + list(tpir.values())) + " |")
    result["seconds"] = time.time() - t0
    out = out_dir / f"IJBS_{Path(args.model).stem}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    run_command(main)
