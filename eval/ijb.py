"""IJB-B / IJB-C evaluation: 1:1 TAR@FAR (``eval_ijbc.py`` rule) and, when the 1:N files exist, Rank-1/5/10.

    python -m eval.ijb --model model.pt --root <IJB_release> --target IJBC --out results/

Expected layout (insightface ``IJB_release``; ``<root>`` may also be the ``IJBC`` folder itself)::

    <root>/IJBC/loose_crop/<n>.jpg                   loose face crops (not aligned)
    <root>/IJBC/meta/ijbc_face_tid_mid.txt           "<img name> <template id> <media id>", one row per crop
    <root>/IJBC/meta/ijbc_name_5pts_score.txt        "<img name> x1 y1 ... x5 y5 <detector score>"
    <root>/IJBC/meta/ijbc_template_pair_label.txt    "<tid1> <tid2> <1 genuine / 0 impostor>"
    <root>/IJBC/meta/ijbc_1N_gallery_G1.csv, ..._G2.csv, ijbc_1N_probe_mixed.csv   (optional, 1:N)
    (IJB-B: ijbb_* names, galleries ijbb_1N_gallery_S1.csv / S2.csv)

What it does (``docs/eval_protocols.md`` §3-4):

* Landmarks are matched to the template file **by image name** (the reference assumes equal row order); a name
  missing from, duplicated in or extra in the landmark file is an error naming it. 68-point rows are reduced to 5.
* Each crop is aligned to the 112x112 ArcFace template and embedded with its mirror (batched, DataLoader workers,
  float16 autocast on CUDA). Images are fed in the model file's channel order (AdaFace-family files BGR).
* Fusion flags, defaults as insightface (F1 N1 D1): ``--no-flip`` (orig only instead of raw orig + raw flip),
  ``--no-norm-score`` (L2-normalise each image feature, N0), ``--no-detector-score`` (do not multiply by the
  detector score, D0 -- what AdaFace's script does).
* Templates: media mean, template sum, L2 (:func:`eval.metrics.template_features`); pair score = cosine.
* TAR@FAR by the nearest-ROC-point rule (:func:`eval.metrics.tar_at_far`), printed with two decimals.
* 1:N (only when all three csv files exist; some but not all is an error): gallery = the two gallery files
  concatenated (closed set), each probe subject must occur exactly once in it (as the reference requires);
  Rank-1/5/10 by :func:`eval.metrics.identification_ranks`.

Outputs in ``--out``: ``<target>_<model>.json`` (all numbers unrounded + settings), ``<target>_<model>.csv`` and
``<target>_<model>_roc.png``; ``--save-scores`` adds the pair scores as ``.npy``.

Any embedding size works (buffers use the model's real size). An unreadable image is an error naming it.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from dataclasses import dataclass
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
    landmarks_68_to_5,
    model_from_args,
    write_json,
)
from utils.cli import ArgumentParser, run_command
from utils.distributed import DistEnv

GALLERY_NAMES = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}


@dataclass
class IJBMeta:
    """Everything read from ``meta/``, rows in the order of ``*_face_tid_mid.txt``."""

    target: str
    target_dir: Path
    names: list[str]
    templates: np.ndarray  # int64 [N]
    medias: np.ndarray  # int64 [N]
    landmarks: np.ndarray  # float32 [N, 5, 2]
    faceness: np.ndarray  # float32 [N]
    t1: np.ndarray  # int64 [P]
    t2: np.ndarray  # int64 [P]
    labels: np.ndarray  # int8 [P]


def target_dir(root: str | Path, target: str) -> Path:
    """``<root>/<TARGET>`` or ``<root>`` itself when it already is the target folder (has ``meta/``)."""
    root = Path(root)
    t = target.upper()
    if t not in GALLERY_NAMES:
        raise EvalInputError(f"--target must be IJBB or IJBC, got {target!r}")
    for cand in (root / t, root):
        if (cand / "meta").is_dir():
            return cand
    raise EvalInputError(f"no {t} benchmark at {root}: expected {root / t / 'meta'} (or {root / 'meta'})")


def _need(path: Path) -> Path:
    if not path.is_file():
        raise EvalInputError(f"missing IJB meta file: {path}")
    return path


def read_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``<img> <template> <media>`` rows -> (names, templates, medias)."""
    names, tids, mids = [], [], []
    with open(_need(path)) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise EvalInputError(f"{path}:{lineno}: expected '<img> <template_id> <media_id>', got {line!r}")
            try:
                tids.append(int(parts[1]))
                mids.append(int(parts[2]))
            except ValueError:
                raise EvalInputError(f"{path}:{lineno}: template/media ids must be integers: {line!r}") from None
            names.append(parts[0])
    if not names:
        raise EvalInputError(f"{path} is empty")
    return names, np.asarray(tids, dtype=np.int64), np.asarray(mids, dtype=np.int64)


def read_landmarks(path: Path) -> dict[str, tuple[np.ndarray, float]]:
    """``<img> x1 y1 .. x5 y5 <score>`` (or 68 points) rows -> {name: (landmarks [5,2], score)}; duplicates error."""
    out: dict[str, tuple[np.ndarray, float]] = {}
    with open(_need(path)) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (12, 138):
                raise EvalInputError(
                    f"{path}:{lineno}: expected '<img> x1 y1 ... x5 y5 <score>' (12 fields) or 68 points "
                    f"(138 fields), got {len(parts)} fields"
                )
            try:
                vals = np.asarray([float(v) for v in parts[1:]], dtype=np.float64)
            except ValueError:
                raise EvalInputError(f"{path}:{lineno}: non-numeric landmark or score in {line.strip()!r}") from None
            pts = vals[:-1].reshape(-1, 2)
            lmk = landmarks_68_to_5(pts) if pts.shape[0] == 68 else pts.astype(np.float32)
            # checked here, not at alignment time: hours into embedding, a worker's error could not name the row
            if not np.isfinite(vals).all():
                raise EvalInputError(f"{path}:{lineno}: image {parts[0]}: landmarks or score are NaN/inf: "
                                     f"{line.strip()!r}")
            if np.ptp(lmk, axis=0).max() <= 0:
                raise EvalInputError(f"{path}:{lineno}: image {parts[0]}: all landmarks are the same point "
                                     f"{lmk[0].tolist()}: no alignment can be estimated from them")
            if parts[0] in out:
                raise EvalInputError(f"{path}:{lineno}: image {parts[0]} listed twice")
            out[parts[0]] = (lmk, float(vals[-1]))
    return out


def match_landmarks(
    names: list[str], table: dict[str, tuple[np.ndarray, float]], source: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks and scores in the order of ``names``; every name must be present and no extra name allowed."""
    missing = [n for n in names if n not in table]
    if missing:
        raise EvalInputError(
            f"{source}: no landmarks for {len(missing)} image(s) of the template file, e.g. {missing[:3]}"
        )
    if len(table) != len(set(names)):
        extra = sorted(set(table) - set(names))
        raise EvalInputError(f"{source}: {len(extra)} image(s) not in the template file, e.g. {extra[:3]}")
    lmk = np.stack([table[n][0] for n in names]).astype(np.float32)
    score = np.asarray([table[n][1] for n in names], dtype=np.float32)
    return lmk, score


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<tid1> <tid2> <label>`` rows -> int arrays (numpy's C loadtxt: ~1.5 s for IJB-C's 15.6 M rows, and it
    rejects a row with another column count or a non-integer, naming the row)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below instead
            arr = np.loadtxt(_need(path), dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise EvalInputError(f"{path}: expected integer rows '<tid1> <tid2> <label>': {e}") from None
    if arr.shape[0] == 0 or arr.shape[1] != 3:
        raise EvalInputError(f"{path}: expected rows '<tid1> <tid2> <label>', got shape {arr.shape}")
    labels = arr[:, 2]
    if not np.isin(labels, (0, 1)).all():
        raise EvalInputError(f"{path}: labels must be 0 or 1, found {np.unique(labels)[:5].tolist()}")
    return arr[:, 0], arr[:, 1], labels.astype(np.int8)


def load_meta(root: str | Path, target: str) -> IJBMeta:
    t = target.upper()
    d = target_dir(root, t)
    p = t.lower()
    names, templates, medias = read_tid_mid(d / "meta" / f"{p}_face_tid_mid.txt")
    lm_path = d / "meta" / f"{p}_name_5pts_score.txt"
    lmk, score = match_landmarks(names, read_landmarks(lm_path), lm_path)
    t1, t2, labels = read_pairs(d / "meta" / f"{p}_template_pair_label.txt")
    return IJBMeta(t, d, names, templates, medias, lmk, score, t1, t2, labels)


def image_paths(meta: IJBMeta) -> list[Path]:
    """Loose-crop paths; all must exist (checked up front so a missing file fails before hours of embedding)."""
    crop = meta.target_dir / "loose_crop"
    paths = [crop / n for n in meta.names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise EvalInputError(f"{len(missing)} loose crop(s) missing, e.g. {[str(m) for m in missing[:3]]}")
    return paths


def fuse_image_features(
    orig: np.ndarray,
    flipped: np.ndarray | None,
    faceness: np.ndarray,
    norm_score: bool = True,
    detector_score: bool = True,
) -> np.ndarray:
    """eval_ijbc.py image features: F (raw orig + raw flip, when ``flipped`` is given), then N0 = L2-normalise
    each image (only when ``norm_score`` is False), then D1 = multiply by the detector score."""
    f = orig.astype(np.float32) if flipped is None else orig + flipped
    if not norm_score:
        f = metrics.l2_normalize(f)
    if detector_score:
        f = f * faceness.astype(f.dtype)[:, None]
    return f


def read_1n_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Template ids (sorted unique) and their subject ids (first row of each template) from a 1:N csv."""
    tids, sids = [], []
    with open(_need(path), newline="") as f:
        rows = csv.reader(f)
        next(rows, None)  # header
        for lineno, row in enumerate(rows, 2):
            if not row:
                continue
            try:
                tids.append(int(row[0]))
                sids.append(int(row[1]))
            except (ValueError, IndexError):
                raise EvalInputError(f"{path}:{lineno}: expected TEMPLATE_ID,SUBJECT_ID,... got {row!r}") from None
    if not tids:
        raise EvalInputError(f"{path} has no rows")
    t, first = np.unique(np.asarray(tids, dtype=np.int64), return_index=True)
    return t, np.asarray(sids, dtype=np.int64)[first]


def onen_files(meta_dir: Path, target: str) -> list[Path] | None:
    """The three 1:N csv files, None when none exists; an error when only some exist."""
    p = target.lower()
    g1, g2 = GALLERY_NAMES[target]
    files = [meta_dir / f"{p}_1N_gallery_{g1}.csv", meta_dir / f"{p}_1N_gallery_{g2}.csv",
             meta_dir / f"{p}_1N_probe_mixed.csv"]
    present = [f.is_file() for f in files]
    if not any(present):
        return None
    if not all(present):
        raise EvalInputError(f"incomplete 1:N protocol: missing {[str(f) for f, ok in zip(files, present) if not ok]}")
    return files


def evaluate_1n(
    template_ids: np.ndarray, template_feats: np.ndarray, files: list[Path], ranks=(1, 5, 10)
) -> dict:
    """Closed-set identification on the merged gallery; returns ranks and set sizes."""
    g1_t, g1_s = read_1n_csv(files[0])
    g2_t, g2_s = read_1n_csv(files[1])
    p_t, p_s = read_1n_csv(files[2])
    g_t = np.concatenate([g1_t, g2_t])
    g_s = np.concatenate([g1_s, g2_s])

    def feats(t: np.ndarray, src: Path) -> np.ndarray:
        r = np.minimum(np.searchsorted(template_ids, t), template_ids.size - 1)
        bad = template_ids[r] != t
        if bad.any():
            raise EvalInputError(f"{src}: template {t[bad][0]} has no image in the tid_mid file")
        return template_feats[r]

    gf = np.concatenate([feats(g1_t, files[0]), feats(g2_t, files[1])])
    pf = feats(p_t, files[2])
    uniq, counts = np.unique(g_s, return_counts=True)
    cnt = dict(zip(uniq.tolist(), counts.tolist()))
    for t, s in zip(p_t, p_s):  # the reference's gen_mask requires exactly one gallery template per probe subject
        if cnt.get(int(s), 0) != 1:
            raise EvalInputError(
                f"{files[2]}: probe template {t} (subject {s}) has {cnt.get(int(s), 0)} gallery templates, need 1"
            )
    r = metrics.identification_ranks(pf, p_s, gf, g_s, ranks=ranks)
    return {"ranks": {str(k): v for k, v in r.items()}, "n_gallery": int(g_t.size), "n_probe": int(p_t.size)}


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, label: str, path: Path, fars=metrics.DEFAULT_FARS) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    keep = fpr > 0
    ax.plot(fpr[keep], tpr[keep] * 100, lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_xlim(min(fars), 1)
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", ls=":", lw=0.5)
    ax.set_xlabel("False Accept Rate")
    ax.set_ylabel("True Accept Rate (%)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(description="IJB-B/C 1:1 verification and 1:N identification")
    add_model_args(ap)
    ap.add_argument("--root", required=True, help="IJB_release folder (containing IJBB/ or IJBC/)")
    ap.add_argument("--target", default="IJBC", choices=["IJBB", "IJBC"], type=str.upper,
                    help="benchmark: IJBB or IJBC")
    ap.add_argument("--out", default="results", help="output folder")
    ap.add_argument("--no-flip", action="store_true", help="F0: use the original image only")
    ap.add_argument("--no-norm-score", action="store_true", help="N0: L2-normalise each image feature")
    ap.add_argument("--no-detector-score", action="store_true", help="D0: ignore the detector score")
    ap.add_argument("--no-1n", action="store_true", help="skip 1:N even when the csv files exist")
    ap.add_argument("--save-scores", action="store_true", help="also write the pair scores (.npy)")
    args = ap.parse_args(argv)
    with eval_ranks(args.device) as env:  # one process, or one rank of torchrun
        return evaluate(args, env)


def evaluate(args: argparse.Namespace, env: DistEnv) -> dict | None:
    """The evaluation on this rank: every rank embeds its share, rank 0 computes and writes (others: None)."""
    t0 = time.time()
    out = check_output_folder(args.out)

    meta = load_meta(args.root, args.target)
    paths = image_paths(meta)
    files_1n = None if args.no_1n else onen_files(meta.target_dir / "meta", meta.target)
    backbone, device = model_from_args(args, env)
    dataset = FaceImages(paths, meta.landmarks, bgr=args.bgr)
    embedded = embed_dataset(
        backbone, dataset, batch_size=args.batch_size, workers=args.workers, device=device,
        flip=not args.no_flip, amp=not args.no_amp, progress=not args.no_progress, desc=meta.target, env=env,
    )
    if embedded is None:
        return None  # another rank than 0: rank 0 has every row and writes the results
    orig, flipped = embedded
    t_embed = time.time() - t0
    img_feats = fuse_image_features(orig, flipped, meta.faceness, not args.no_norm_score, not args.no_detector_score)
    template_ids, template_feats = metrics.template_features(img_feats, meta.templates, meta.medias)
    scores = metrics.pair_scores(template_ids, template_feats, meta.t1, meta.t2)
    fpr, tpr, _ = metrics.roc(scores, meta.labels)
    tar = metrics.tar_at_far_from_roc(fpr, tpr)
    from sklearn.metrics import auc

    name = Path(args.model).stem
    flags = ("F" if not args.no_flip else "") + ("N" if not args.no_norm_score else "") + (
        "D" if not args.no_detector_score else "")
    result: dict = {
        "target": meta.target, "model": str(args.model), "network": args.network,
        "embedding_size": int(orig.shape[1]),
        "settings": {"flip": not args.no_flip, "norm_score": not args.no_norm_score,
                     "detector_score": not args.no_detector_score, "bgr": args.bgr, "fusion": flags or "none"},
        "n_images": len(paths), "n_templates": int(template_ids.size), "n_pairs": int(scores.size),
        "n_genuine": int(meta.labels.sum()),
        "tar_at_far": {f"{k:g}": v for k, v in tar.items()}, "auc": float(auc(fpr, tpr)),
    }
    header = "| Methods | " + " | ".join(f"{k:g}" for k in tar) + " |"
    print(header)
    print("|" + "---|" * (len(tar) + 1))
    print(f"| {name}-{meta.target}-{flags} | " + " | ".join(f"{v:.2f}" for v in tar.values()) + " |")
    if files_1n is not None:
        r1n = evaluate_1n(template_ids, template_feats, files_1n)
        result["identification"] = r1n
        print(f"1:N ({r1n['n_probe']} probes, merged gallery of {r1n['n_gallery']}): "
              + "  ".join(f"Rank-{k} {100 * v:.2f}" for k, v in r1n["ranks"].items()))
    result["seconds"] = {"embed": t_embed, "total": time.time() - t0}

    stem = f"{meta.target}_{name}"
    write_json(out / f"{stem}.json", result)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "value"])
        for k, v in tar.items():
            w.writerow([f"TAR@FAR={k:g}", f"{v:.6f}"])
        w.writerow(["AUC", f"{result['auc']:.6f}"])
        for k, v in result.get("identification", {}).get("ranks", {}).items():
            w.writerow([f"Rank-{k}", f"{100 * v:.6f}"])
    plot_roc(fpr, tpr, f"{name} {meta.target} ({flags})", out / f"{stem}_roc.png")
    if args.save_scores:
        np.save(out / f"{stem}_scores.npy", scores)
    print(f"wrote {out / stem}.json / .csv / _roc.png")
    return result


if __name__ == "__main__":
    run_command(main)
