"""End-to-end runs of the benchmark CLIs on tiny benchmark folders built here in the published layouts.

Faces come from ``utils.data.toyface.render_face`` (image + 5 landmarks), pasted into larger "loose crops" at known
scales / offsets so the landmark files are meaningful. Known answers come from exact copies: a probe template made of
the same image files as its gallery template has cosine 1 with it, so its rank is 1 whatever the (random) model.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from eval import ijb, ijbs, tinyface
from eval.common import EvalInputError, FaceImages, align_face
from utils.checkpoint import CheckpointError
from utils.data.toyface import identity_params, render_face
from tests.helpers import headroom

SEED = 11


def _face(identity: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return render_face(identity_params(SEED, identity), np.random.default_rng(1000 * identity + k))


def _loose_crop(rgb: np.ndarray, lmk: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste a rescaled face into a noisy 150x170 canvas; returns (BGR canvas, landmarks in canvas pixels)."""
    size = int(rng.integers(100, 140))
    face = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    canvas = rng.integers(0, 255, (170, 150, 3), dtype=np.uint8)
    ox, oy = int(rng.integers(0, 150 - size + 1)), int(rng.integers(0, 170 - size + 1))
    canvas[oy : oy + size, ox : ox + size] = face
    s = size / 112.0
    # pixel-centre convention of cv2.resize: x_dst = (x_src + 0.5) * s - 0.5
    return canvas[:, :, ::-1].copy(), ((lmk + 0.5) * s - 0.5 + np.array([ox, oy])).astype(np.float32)


def _save_model(path: Path, network: str = "r_tiny", num_features: int = 64) -> Path:
    from backbones import get_model

    torch.manual_seed(0)
    torch.save(get_model(network, num_features=num_features).state_dict(), path)
    return path


def _jpg(path: Path, bgr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])


COMMON = ["--device", "cpu", "--batch-size", "16", "--workers", "0", "--no-progress"]


def test_alignment_undoes_the_paste() -> None:
    rgb, lmk = _face(0, 0)
    canvas, lmk2 = _loose_crop(rgb, lmk, np.random.default_rng(0))
    a = align_face(rgb, lmk).astype(np.float32)
    b = align_face(canvas[:, :, ::-1].copy(), lmk2).astype(np.float32)
    inner = (slice(20, 100), slice(20, 92))  # away from the border, where the canvas noise differs
    assert np.abs(a[inner] - b[inner]).mean() < 8.0
    assert np.abs(a[inner] - np.roll(b, 6, axis=1)[inner]).mean() > 2 * np.abs(a[inner] - b[inner]).mean()


# ---------------------------------------------------------------------------------------------------------------
# IJB-C
# ---------------------------------------------------------------------------------------------------------------
N_SUBJ = 6


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ijb") / "IJB_release"
    d = root / "IJBC"
    rng = np.random.default_rng(0)
    rows, lmk_rows = [], []
    n = 0

    def add(canvas: np.ndarray, lm: np.ndarray, tid: int, mid: int, score: float) -> None:
        nonlocal n
        n += 1
        _jpg(d / "loose_crop" / f"{n}.jpg", canvas)
        rows.append(f"{n}.jpg {tid} {mid}")
        lmk_rows.append(f"{n}.jpg " + " ".join(f"{v:.3f}" for v in lm.reshape(-1)) + f" {score:.4f}")

    for s in range(N_SUBJ):
        crops = [_loose_crop(*_face(s, k), rng) for k in range(2)]
        scores = rng.uniform(0.5, 1.0, 2)
        for (c, lm), sc in zip(crops, scores):
            add(c, lm, 100 + s, 1000 + s, sc)  # gallery template: two images of one media
        for (c, lm), sc in zip(crops, scores):
            add(c, lm, 200 + s, 2000 + s, sc)  # probe template: the same two images -> cosine 1 with the gallery
        for k in (2, 3):
            c, lm = _loose_crop(*_face(s, k), rng)
            add(c, lm, 300 + s, 3000 + s + 10 * k, rng.uniform(0.05, 1.0))  # two medias
    meta = d / "meta"
    meta.mkdir(parents=True)
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(rows) + "\n")
    order = rng.permutation(len(lmk_rows))  # landmark rows in another order: must be matched by name
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(lmk_rows[i] for i in order) + "\n")
    pairs = [f"{100 + g} {p + s} {int(g == s)}" for g in range(N_SUBJ) for p in (200, 300) for s in range(N_SUBJ)]
    (meta / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    (meta / "ijbc_1N_gallery_G1.csv").write_text(header + "".join(f"{100 + s},{s},x.jpg\n" * 2 for s in range(3)))
    (meta / "ijbc_1N_gallery_G2.csv").write_text(header + "".join(f"{100 + s},{s},x.jpg\n" * 2 for s in range(3, 6)))
    (meta / "ijbc_1N_probe_mixed.csv").write_text(header + "".join(f"{200 + s},{s},x.jpg\n" for s in range(6)))
    _save_model(root.parent / "model.pt")
    return root


def _run_ijb(root: Path, out: Path, *extra: str) -> dict:
    return ijb.main(["--model", str(root.parent / "model.pt"), "--network", "r_tiny", "--root", str(root),
                     "--target", "IJBC", "--out", str(out), *COMMON, *extra])


def test_ijb_end_to_end(ijb_root: Path, tmp_path: Path) -> None:
    res = _run_ijb(ijb_root, tmp_path, "--save-scores", "--workers", "1")
    assert res["embedding_size"] == 64  # not 512: buffers follow the model
    assert res["n_images"] == N_SUBJ * 6 and res["n_templates"] == N_SUBJ * 3 and res["n_pairs"] == 72
    assert res["identification"]["ranks"] == {"1": 1.0, "5": 1.0, "10": 1.0}
    stem = tmp_path / "IJBC_model"
    saved = json.loads(Path(f"{stem}.json").read_text())
    assert saved["tar_at_far"] == res["tar_at_far"]
    assert Path(f"{stem}_roc.png").stat().st_size > 1000
    with open(f"{stem}.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["metric", "value"] and rows[1][0] == "TAR@FAR=1e-06"
    scores = np.load(f"{stem}_scores.npy")
    pairs = np.loadtxt(ijb_root / "IJBC" / "meta" / "ijbc_template_pair_label.txt", dtype=np.int64)
    copy_pairs = (pairs[:, 1] == pairs[:, 0] + 100)
    assert np.allclose(scores[copy_pairs], 1.0, atol=1e-5)
    from eval import metrics

    assert metrics.tar_at_far(scores, pairs[:, 2]) == {float(k): v for k, v in res["tar_at_far"].items()}


def test_ijb_landmark_order_does_not_matter_and_flags(ijb_root: Path, tmp_path: Path) -> None:
    base = _run_ijb(ijb_root, tmp_path / "a", "--no-1n")
    root2 = tmp_path / "sorted" / "IJB_release"
    shutil.copytree(ijb_root, root2)
    shutil.copy(ijb_root.parent / "model.pt", root2.parent / "model.pt")
    lm = root2 / "IJBC" / "meta" / "ijbc_name_5pts_score.txt"
    lines = lm.read_text().splitlines()
    lm.write_text("\n".join(sorted(lines, key=lambda l: int(l.split(".")[0]))) + "\n")
    again = _run_ijb(root2, tmp_path / "b", "--no-1n")
    assert again["tar_at_far"] == base["tar_at_far"] and "identification" not in again
    d0 = _run_ijb(ijb_root, tmp_path / "c", "--no-1n", "--no-detector-score", "--no-norm-score", "--no-flip")
    assert d0["settings"]["fusion"] == "none"


def _hand_pair_scores(root: Path, flip: bool, norm_score: bool, detector_score: bool) -> np.ndarray:
    """IJB pair scores recomputed with plain loops: image feature (raw + mirror, or raw; L2 per image for N0;
    times the detector score for D1) -> mean per media -> sum over a template's medias -> L2 -> cosine."""
    from eval.common import FaceImages, embed_dataset, load_backbone

    meta = ijb.load_meta(root, "IJBC")
    model = load_backbone(root.parent / "model.pt", "r_tiny")
    orig, flipped = embed_dataset(model, FaceImages(ijb.image_paths(meta), meta.landmarks), batch_size=16, flip=flip)
    feats = orig + flipped if flip else orig
    if not norm_score:
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    if detector_score:
        feats = feats * meta.faceness[:, None]
    templates: dict[int, np.ndarray] = {}
    for t in np.unique(meta.templates):
        medias = {}
        for i in np.flatnonzero(meta.templates == t):
            medias.setdefault(int(meta.medias[i]), []).append(feats[i])
        v = sum(np.mean(m, axis=0) for m in medias.values())
        templates[int(t)] = v / np.linalg.norm(v)
    return np.array([templates[int(a)] @ templates[int(b)] for a, b in zip(meta.t1, meta.t2)])


@pytest.mark.parametrize("flags", [(), ("--no-flip", "--no-norm-score", "--no-detector-score"), ("--no-norm-score",)])
def test_ijb_fusion_flags_change_scores_as_documented(ijb_root: Path, tmp_path: Path, flags: tuple[str, ...]) -> None:
    _run_ijb(ijb_root, tmp_path, "--no-1n", "--save-scores", *flags)
    scores = np.load(tmp_path / "IJBC_model_scores.npy")
    expected = _hand_pair_scores(ijb_root, "--no-flip" not in flags, "--no-norm-score" not in flags,
                                 "--no-detector-score" not in flags)
    assert np.allclose(scores, expected, atol=1e-5)
    if flags:  # each setting really changes the scores (the detector scores differ between images)
        assert not np.allclose(scores, _hand_pair_scores(ijb_root, True, True, True), atol=1e-3)


def test_fuse_image_features_flags() -> None:
    o = np.array([[3.0, 4.0]])
    f = np.array([[1.0, 0.0]])
    s = np.array([0.5], dtype=np.float32)
    assert np.allclose(ijb.fuse_image_features(o, f, s), [[2.0, 2.0]])  # F N1 D1: (o + f) * score
    assert np.allclose(ijb.fuse_image_features(o, None, s, norm_score=False), [[0.3, 0.4]])
    assert np.allclose(ijb.fuse_image_features(o, f, s, detector_score=False), [[4.0, 4.0]])


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy" / "IJB_release"
    shutil.copytree(root, dst)
    shutil.copy(root.parent / "model.pt", dst.parent / "model.pt")
    return dst


def test_ijb_missing_meta_file(ijb_root: Path, tmp_path: Path) -> None:
    root = _copy(ijb_root, tmp_path)
    (root / "IJBC" / "meta" / "ijbc_face_tid_mid.txt").unlink()
    with pytest.raises(EvalInputError, match="ijbc_face_tid_mid.txt"):
        _run_ijb(root, tmp_path / "out")
    with pytest.raises(EvalInputError, match="no IJBB benchmark"):
        ijb.load_meta(root, "IJBB")


def test_ijb_landmarks_missing_extra_duplicate(ijb_root: Path, tmp_path: Path) -> None:
    root = _copy(ijb_root, tmp_path)
    lm = root / "IJBC" / "meta" / "ijbc_name_5pts_score.txt"
    lines = lm.read_text().splitlines()
    lm.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(EvalInputError, match="no landmarks for 1 image"):
        ijb.load_meta(root, "IJBC")
    lm.write_text("\n".join(lines + ["999.jpg" + lines[0][lines[0].index(" "):]]) + "\n")
    with pytest.raises(EvalInputError, match=r"not in the template file, e.g. \['999.jpg'\]"):
        ijb.load_meta(root, "IJBC")
    lm.write_text("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(EvalInputError, match="listed twice"):
        ijb.load_meta(root, "IJBC")
    lm.write_text("\n".join(lines + ["5.jpg 1 2 3"]) + "\n")
    with pytest.raises(EvalInputError, match="12 fields"):
        ijb.load_meta(root, "IJBC")


def test_ijb_unusable_landmarks_name_file_line_and_image(ijb_root: Path, tmp_path: Path) -> None:
    root = _copy(ijb_root, tmp_path)
    lm = root / "IJBC" / "meta" / "ijbc_name_5pts_score.txt"
    lines = lm.read_text().splitlines()
    name = lines[3].split()[0]
    for bad, what in (("nan " * 10, "NaN/inf"), ("40 50 " * 5, "all landmarks are the same point")):
        lm.write_text("\n".join(lines[:3] + [f"{name} {bad}0.9"] + lines[4:]) + "\n")
        with pytest.raises(EvalInputError) as info:
            ijb.load_meta(root, "IJBC")
        assert f"{lm}:4: image {name}: " in str(info.value) and what in str(info.value)


def test_alignment_error_names_the_image(tmp_path: Path) -> None:
    path = tmp_path / "face.jpg"
    _jpg(path, np.zeros((120, 120, 3), np.uint8))
    with pytest.raises(EvalInputError, match=rf"image {path}: landmarks contain NaN"):
        FaceImages([path], np.full((1, 5, 2), np.nan, np.float32))[0]


def test_ijb_unreadable_image_and_partial_1n(ijb_root: Path, tmp_path: Path) -> None:
    root = _copy(ijb_root, tmp_path)
    (root / "IJBC" / "loose_crop" / "3.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(EvalInputError, match=r"3\.jpg cannot be decoded"):
        _run_ijb(root, tmp_path / "out", "--no-1n")
    (root / "IJBC" / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    with pytest.raises(EvalInputError, match="incomplete 1:N protocol.*G2"):
        _run_ijb(root, tmp_path / "out")


def test_ijb_wrong_architecture(ijb_root: Path, tmp_path: Path) -> None:
    model = _save_model(tmp_path / "mbf.pt", "mbf_tiny", 64)
    with pytest.raises(CheckpointError, match="first mismatching key"):
        ijb.main(["--model", str(model), "--network", "r_tiny", "--root", str(ijb_root), "--out", str(tmp_path),
                  *COMMON])


# ---------------------------------------------------------------------------------------------------------------
# TinyFace
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tinyface_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tinyface")
    al = root / tinyface.ALIGNED_DIR
    for s in range(5):
        probe, _ = _face(s, 0)
        _jpg(al / "Probe" / f"{s + 1}_1.jpg", probe[:, :, ::-1])
        (al / "Gallery_Match").mkdir(parents=True, exist_ok=True)
        shutil.copy(al / "Probe" / f"{s + 1}_1.jpg", al / "Gallery_Match" / f"{s + 1}_2.jpg")  # exact copy
        _jpg(al / "Gallery_Match" / f"{s + 1}_3.jpg", _face(s, 1)[0][:, :, ::-1])
    for d in range(12):
        _jpg(al / "Gallery_Distractor" / f"{d}_1.jpg", _face(50 + d, 0)[0][:, :, ::-1])
    _save_model(root / "model.pt")
    return root


def test_tinyface_end_to_end(tinyface_root: Path, tmp_path: Path) -> None:
    res = tinyface.main(["--model", str(tinyface_root / "model.pt"), "--root",  # --network auto: from the file
                         str(tinyface_root), "--out", str(tmp_path), *COMMON])
    assert res["network"] == "r_tiny" and res["embedding_size"] == 64
    assert res["ranks"]["1"] == 1.0 and res["ranks"]["20"] == 1.0  # each probe's exact copy is in the gallery
    assert (res["n_probe"], res["n_gallery_match"], res["n_distractor"]) == (5, 10, 12)
    assert json.loads((tmp_path / "TinyFace_model.json").read_text())["ranks"] == res["ranks"]


def test_tinyface_reports_probes_with_and_without_mate(tinyface_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "tf"
    shutil.copytree(tinyface_root, root)
    _jpg(root / tinyface.ALIGNED_DIR / "Probe" / "9_1.jpg", _face(9, 0)[0][:, :, ::-1])  # identity 9: no mate
    res = tinyface.main(["--model", str(root / "model.pt"), "--network", "r_tiny", "--root", str(root),
                         "--out", str(tmp_path), *COMMON])
    assert (res["n_probe"], res["n_probe_with_mate"]) == (6, 5)
    assert res["ranks"]["1"] == 1.0  # over the 5 mated probes (over all 6 it could be at most 5/6)
    assert "over the 5 of 6 probes that have a gallery mate" in capsys.readouterr().out


def test_tinyface_bad_inputs(tinyface_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "tf"
    shutil.copytree(tinyface_root, root)
    orig = root / "tinyface" / "Testing_Set" / "Probe"
    orig.mkdir(parents=True)
    (orig / "1_1.jpg").write_bytes(b"x")
    (orig / "9_1.jpg").write_bytes(b"x")
    with pytest.raises(EvalInputError, match=r"no aligned copy of .*9_1\.jpg"):
        tinyface.list_split(root, "Probe")
    shutil.rmtree(root / "tinyface")
    _jpg(root / tinyface.ALIGNED_DIR / "Probe" / "7_1.jpg", np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(EvalInputError, match=r"7_1\.jpg is 100x100, expected an aligned 112x112"):
        tinyface.main(["--model", str(root / "model.pt"), "--network", "r_tiny", "--root", str(root),
                       "--out", str(tmp_path), *COMMON])
    _jpg(root / tinyface.ALIGNED_DIR / "Probe" / "abc.jpg", np.zeros((112, 112, 3), np.uint8))
    with pytest.raises(EvalInputError, match="cannot read the identity"):
        tinyface.label_of(root / tinyface.ALIGNED_DIR / "Probe" / "abc.jpg")
    with pytest.raises(EvalInputError, match="aligned folder not found"):
        tinyface.list_split(tmp_path / "nowhere", "Probe")


# ---------------------------------------------------------------------------------------------------------------
# IJB-S
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ijbs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ijbs")
    proto, frames = root / "protocols", root / "frames"
    (proto / "galleries").mkdir(parents=True)
    # videos: 10 (subjects 1, 2, 5), 11 (3, 4): V2S/V2B probes; 13 (2, 4): V2V probe; 12 (1, 3), 14 (2, 4): V2V gallery
    videos = {"10": ["1", "2", "5"], "11": ["3", "4"], "12": ["1", "3"], "13": ["2", "4"], "14": ["2", "4"]}
    meta = ["SUBJECT_ID,FILENAME"] + [f"{s},videos/{v}.mp4" for v, ss in videos.items() for s in ss]
    meta += [f"{s},img/{s}0{k}.jpg" for s in "1234" for k in (1, 2)]
    (proto / "cs6_metadata.csv").write_text("\n".join(meta) + "\n")
    (proto / "cs6_surveillance_to_single-booking_probe.csv").write_text(
        "VIDEO_ID,VIDEO_FILENAME\n10,videos/10.mp4\n11,videos/11.mp4\n")
    (proto / "cs6_surveillance_to_surveillance_probe.csv").write_text("VIDEO_ID,VIDEO_FILENAME\n13,videos/13.mp4\n")
    hdr = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    for g, subj in ((1, "12"), (2, "34")):
        (proto / "galleries" / f"cs6_surveillance_to_single_g{g}.csv").write_text(
            hdr + "".join(f"{s},{s},img/{s}01.jpg\n" for s in subj))
        (proto / "galleries" / f"cs6_surveillance_to_booking_g{g}.csv").write_text(
            hdr + "".join(f"{s},{s},img/{s}0{k}.jpg\n" for s in subj for k in (1, 2)))
    (proto / "galleries" / "cs6_surveillance_to_surveillance_g1.csv").write_text(
        hdr + "1,1,videos/12.mp4\n2,2,videos/14.mp4\n")
    (proto / "galleries" / "cs6_surveillance_to_surveillance_g2.csv").write_text(
        hdr + "3,3,videos/12.mp4\n4,4,videos/14.mp4\n")
    sid = {s: i for i, s in enumerate("12345")}
    for s in "1234":
        still = _face(sid[s], 0)[0][:, :, ::-1]
        _jpg(frames / s / f"img_{s}01.jpg", still)
        _jpg(frames / s / f"img_{s}02.jpg", _face(sid[s], 1)[0][:, :, ::-1])
    for v, ss in videos.items():
        for s in ss:
            if s == "5":
                continue  # subject 5 has no kept frame: a zero template
            for f in range(2):
                if v in ("10", "11"):  # V2S probes: exact copies of the still -> cosine 1 with the single gallery
                    shutil.copy(frames / s / f"img_{s}01.jpg", frames / s / f"videos_{v}_{f}.jpg")
                else:
                    _jpg(frames / s / f"videos_{v}_{f}.jpg", _face(sid[s], 10 + f + int(v))[0][:, :, ::-1])
    listed = sorted(str(p.relative_to(frames)) for p in frames.rglob("*.jpg"))
    (root / "kept.csv").write_text("path\n" + "\n".join(listed) + "\n")
    _save_model(root / "model.pt")
    return root


def test_ijbs_end_to_end(ijbs_root: Path, tmp_path: Path) -> None:
    res = ijbs.main(["--model", str(ijbs_root / "model.pt"), "--network", "r_tiny", "--protocol-dir",
                     str(ijbs_root / "protocols"), "--frames-dir", str(ijbs_root / "frames"), "--frame-list",
                     str(ijbs_root / "kept.csv"), "--out", str(tmp_path), *COMMON])
    v2s = res["protocols"]["V2S"]
    assert v2s["n_probe_templates"] == 5 and v2s["empty_probe_templates"] == 1
    assert v2s["ranks"]["1"] == 1.0
    # k = floor(3 * 0.01) = 0 in each gallery -> threshold just above the best non-mated score; copies score 1
    assert v2s["tpir_at_fpir"] == {"0.01": 1.0, "0.1": 1.0}
    # V2B / V2V numbers of a random model mean nothing: test_ijbs_v2b_v2v_hand_computed_ranks checks them
    assert res["protocols"]["V2V"]["n_probe_templates"] == 2
    assert res["protocols"]["V2B"]["n_gallery_templates"] == [2, 2]  # stills of one subject form one template
    assert json.loads((tmp_path / "IJBS_model.json").read_text())["protocols"]["V2S"]["ranks"] == v2s["ranks"]


class MeanColour(torch.nn.Module):
    """A 'face model' whose embedding is the image's mean colour: solid-colour frames get embeddings chosen by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _colour_frame(path: Path, degrees: float) -> None:
    """A solid frame whose MeanColour embedding points at ``degrees`` in the (G, B) plane (R at the centre)."""
    a = np.radians(degrees)
    rgb = [0.0, 0.9 * np.cos(a), 0.9 * np.sin(a)]  # in the model's [-1, 1] input range
    pixel = [int(round((v * 0.5 + 0.5) * 255)) for v in rgb]
    _jpg(path, np.full((112, 112, 3), pixel[::-1], np.uint8))


def test_ijbs_v2b_v2v_hand_computed_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gallery subject s (1..7) sits at angle 20 (s - 1) degrees, G1 = subjects 1-4, G2 = 5-7; each probe template
    is placed at an angle that puts its mate at a chosen rank. Every template averages two frames at +-d degrees
    (the mean points at the middle), so the template rule is exercised too."""
    proto, frames = tmp_path / "protocols", tmp_path / "frames"
    (proto / "galleries").mkdir(parents=True)
    gallery = {s: 20.0 * (s - 1) for s in range(1, 8)}
    # V2B probes in videos 10 (subjects 1, 2) and 11 (3, 6); V2V probes in videos 30 (1, 2) and 31 (3, 6)
    v2b = {("10", 1): 5.0, ("10", 2): 95.0, ("11", 3): 52.0, ("11", 6): 112.0}
    v2v = {("30", 1): 45.0, ("30", 2): 18.0, ("31", 3): 67.0, ("31", 6): 101.0}
    meta = ["SUBJECT_ID,FILENAME"]
    for (vid, s), angle in {**v2b, **v2v}.items():
        meta.append(f"{s},videos/{vid}.mp4")
        for k, d in enumerate((-3.0, 3.0)):
            _colour_frame(frames / str(s) / f"videos_{vid}_{k}.jpg", angle + d)
    for s, angle in gallery.items():
        for k, d in ((1, -4.0), (2, 4.0)):  # two booking stills
            _colour_frame(frames / str(s) / f"img_{s}0{k}.jpg", angle + d)
        for k, d in enumerate((-2.0, 2.0)):  # one surveillance gallery video each: video 20 + s
            _colour_frame(frames / str(s) / f"videos_{20 + s}_{k}.jpg", angle + d)
    (proto / "cs6_metadata.csv").write_text("\n".join(meta) + "\n")
    (proto / "cs6_surveillance_to_single-booking_probe.csv").write_text("V,F\n1,videos/10.mp4\n2,videos/11.mp4\n")
    (proto / "cs6_surveillance_to_surveillance_probe.csv").write_text("V,F\n1,videos/30.mp4\n2,videos/31.mp4\n")
    hdr = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    for g, subjects in ((1, range(1, 5)), (2, range(5, 8))):
        (proto / "galleries" / f"cs6_surveillance_to_booking_g{g}.csv").write_text(
            hdr + "".join(f"{s},{s},img/{s}0{k}.jpg\n" for s in subjects for k in (1, 2)))
        (proto / "galleries" / f"cs6_surveillance_to_surveillance_g{g}.csv").write_text(
            hdr + "".join(f"{s},{s},videos/{20 + s}.mp4\n" for s in subjects))
    monkeypatch.setattr(ijbs, "model_from_args", lambda args, env=None: (MeanColour(), torch.device("cpu")))
    res = ijbs.main(["--model", "unused.pt", "--protocol-dir", str(proto), "--frames-dir", str(frames),
                     "--protocols", "V2B,V2V", "--out", str(tmp_path / "out"), *COMMON])["protocols"]
    # Mate ranks by angular distance to the 7 gallery angles 0, 20, ..., 120:
    #   V2B  1@5 -> 1;  2@95 -> 6 (100, 80, 120, 60, 40 are nearer than 20);  3@52 -> 2 (60 nearer);  6@112 -> 2
    #   V2V  1@45 -> 5 (40, 60, 20, 80 nearer);  2@18 -> 1;  3@67 -> 3 (60, 80 nearer);  6@101 -> 1
    assert res["V2B"]["ranks"] == {"1": 0.25, "5": 0.75, "10": 1.0}
    assert res["V2V"]["ranks"] == {"1": 0.5, "5": 1.0, "10": 1.0}
    # TPIR per gallery (k = floor(n_nonmated * fpir) = 0: threshold = best non-mated score), then the mean:
    #   V2B  G1: mated 1, 2, 3, non-mated 6 (best cos(112-60)); only 1@5 is rank 1 in G1 -> 1/3.
    #        G2: mated 6@112, nearest is 7 (120), not its mate 6 (100) -> 0.                       mean 1/6
    #   V2V  G1: only 2@18 is rank 1 (cos 2 deg > cos(101-60)) -> 1/3.  G2: 6@101 rank 1, cos 1 deg above the
    #        best non-mated cos(80-67) -> 1.                                                          mean 2/3
    assert res["V2B"]["tpir_at_fpir"] == pytest.approx({"0.01": 1 / 6, "0.1": 1 / 6})
    assert res["V2V"]["tpir_at_fpir"] == pytest.approx({"0.01": 2 / 3, "0.1": 2 / 3})
    assert res["V2B"]["n_gallery_templates"] == [4, 3] and res["V2V"]["n_probe_templates"] == 4


def test_ijbs_bad_inputs(ijbs_root: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="missing IJB-S protocol file: .*cs6_metadata.csv"):
        ijbs.read_metadata(tmp_path / "cs6_metadata.csv")
    bad = tmp_path / "g.csv"
    bad.write_text("T,S,F\n1,1,photo.png\n")
    with pytest.raises(EvalInputError, match=r"g\.csv:2: column 2"):
        ijbs.read_gallery(bad)
    (tmp_path / "fr" / "1").mkdir(parents=True)
    _jpg(tmp_path / "fr" / "1" / "weird.jpg", np.zeros((112, 112, 3), np.uint8))
    with pytest.raises(EvalInputError, match="unexpected frame name"):
        ijbs.index_frames(tmp_path / "fr", None)
    lst = tmp_path / "list.csv"
    lst.write_text("file\n1/weird.jpg\n")
    with pytest.raises(EvalInputError, match="needs a 'path' column"):
        ijbs.index_frames(tmp_path / "fr", lst)


# ---------------------------------------------------------------------------------------------------------------
# .bin verification
# ---------------------------------------------------------------------------------------------------------------
def test_empty_bin_names_the_file(tmp_path: Path) -> None:
    import pickle

    from eval import verification
    from utils.data.binfile import BinFileError

    path = tmp_path / "empty.bin"
    path.write_bytes(pickle.dumps(([], []), protocol=4))  # a valid pickle with no pair: used to embed 0 images
    with pytest.raises(BinFileError, match=rf"{path}: holds no pairs"):
        verification.main(["--model", str(_save_model(tmp_path / "m.pt")), "--network", "r_tiny", "--bin", str(path),
                           "--device", "cpu", "--no-progress"])  # .bin images are in memory: no --workers


# ---- a non-finite model never scores (NaN compares false: ranks read 100 %, accuracies 50 +- 50) ----

@pytest.fixture(scope="module")
def broken_models(tmp_path_factory) -> dict[str, Path]:
    """r_tiny state dicts: one NaN weight ('nan'); finite weights whose forward overflows to Inf/NaN ('overflow')."""
    from backbones import get_model

    root = tmp_path_factory.mktemp("broken")
    state = get_model("r_tiny", num_features=64).state_dict()
    nan = {k: v.clone() for k, v in state.items()}
    nan["fc.weight"][0, 0] = float("nan")
    huge = {k: v.clone() for k, v in state.items()}
    huge["conv1.weight"].fill_(3.0e38)
    torch.save(nan, root / "nan.pt")
    torch.save(huge, root / "overflow.pt")
    return {"nan": root / "nan.pt", "overflow": root / "overflow.pt"}


@pytest.mark.parametrize("kind, expected", [("nan", r"nan.pt: weight 'fc.weight' holds NaN/Inf"),
                                            ("overflow", r"overflow.pt: \d+ of \d+ embeddings hold NaN/Inf")])
def test_every_evaluation_and_tool_refuses_a_non_finite_model(tinyface_root: Path, ijbs_root: Path, mini_toy: Path,
                                                             broken_models, tmp_path: Path, kind: str,
                                                             expected: str) -> None:
    from eval import verification
    from tools import compare_faces, embed, export_onnx

    model = str(broken_models[kind])
    face = sorted((tinyface_root).rglob("*.jpg"))[0]
    calls = {
        "tinyface": lambda: tinyface.main(["--model", model, "--network", "r_tiny", "--root", str(tinyface_root),
                                           "--out", str(tmp_path / "t"), *COMMON]),
        "ijbs": lambda: ijbs.main(["--model", model, "--network", "r_tiny", "--protocol-dir",
                                   str(ijbs_root / "protocols"), "--frames-dir", str(ijbs_root / "frames"),
                                   "--frame-list", str(ijbs_root / "kept.csv"), "--out", str(tmp_path / "s"),
                                   *COMMON]),
        "verification": lambda: verification.main(["--model", model, "--network", "r_tiny", "--bin",
                                                   str(mini_toy / "toy_clean.bin"), "--device", "cpu",
                                                   "--batch-size", "16", "--no-progress"]),
        "embed": lambda: embed.main([str(face.parent), "--model", model, "--network", "r_tiny", "--out",
                                     str(tmp_path / "e"), *COMMON]),
        "compare_faces": lambda: compare_faces.main([str(face), str(face), "--model", model, "--network", "r_tiny",
                                                     "--device", "cpu"]),
        "export_onnx": lambda: export_onnx.main(["--model", model, "--network", "r_tiny", "--out",
                                                 str(tmp_path / "o")]),
    }
    for name, call in calls.items():
        with pytest.raises(EvalInputError, match=expected if name != "export_onnx" or kind == "nan"
                           else r"overflow.pt: the model gives non-finite outputs"):
            call()
    assert not list((tmp_path / "o").glob("*.onnx")) if (tmp_path / "o").exists() else True


@pytest.mark.parametrize("command", ["ijb", "tinyface"])
def test_vit_network_is_accepted(ijb_root: Path, tinyface_root: Path, tmp_path: Path, command: str) -> None:
    """The ViTs are registry names, so every eval command takes them (here the toy ViT; a vit_t file would load the
    same way): exact copies of each probe in the gallery give rank-1 = 1.0 with any weights."""
    model = _save_model(tmp_path / "vit.pt", "vit_toy")
    if command == "ijb":
        res = ijb.main(["--model", str(model), "--network", "vit_toy", "--root", str(ijb_root), "--target", "IJBC",
                        "--out", str(tmp_path), *COMMON])
        assert res["embedding_size"] == 64 and res["identification"]["ranks"]["1"] == 1.0
    else:
        res = tinyface.main(["--model", str(model), "--network", "vit_toy", "--root", str(tinyface_root), "--out",
                             str(tmp_path), *COMMON])
        assert res["ranks"]["1"] == 1.0
    with pytest.raises(CheckpointError, match="vit.pt does not match"):
        tinyface.main(["--model", str(model), "--network", "vit_t", "--root", str(tinyface_root), "--out",
                       str(tmp_path), *COMMON])


# ---------------------------------------------------------------------------------------------------------------
# N processes: torchrun splits the extraction; results equal one process's
# ---------------------------------------------------------------------------------------------------------------
def _launch(module: str, args: list[str], nproc: int) -> str:
    from tests.helpers import run_module

    proc = run_module(module, args, nproc)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_ijb_on_two_ranks_equals_one_process(ijb_root: Path, tmp_path: Path) -> None:
    """36 crops in batches of 16: rank 0 embeds batches 0 and 2 (20 images), rank 1 batch 1 (16)."""
    base = ["--model", str(ijb_root.parent / "model.pt"), "--network", "r_tiny", "--root", str(ijb_root),
            "--save-scores", "--device", "cpu", "--batch-size", "16", "--workers", "0", "--no-progress"]
    one = _launch("eval.ijb", [*base, "--out", str(tmp_path / "one")], 0)
    two = _launch("eval.ijb", [*base, "--out", str(tmp_path / "two")], 2)
    assert two.count("wrote ") == 1 and two.count("| Methods |") == 1  # rank 0 alone prints and writes
    assert [l for l in one.splitlines() if l.startswith(("|", "1:N"))] == \
        [l for l in two.splitlines() if l.startswith(("|", "1:N"))]  # the printed TAR@FAR table and ranks
    a, b = (json.loads((tmp_path / d / "IJBC_model.json").read_text()) for d in ("one", "two"))
    for key in ("tar_at_far", "auc", "identification", "n_images", "n_templates", "n_pairs", "embedding_size"):
        assert a[key] == b[key], key
    sa, sb = (np.load(tmp_path / d / "IJBC_model_scores.npy") for d in ("one", "two"))
    assert sa.shape == (72,) and np.array_equal(sa, sb)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow
def test_embed_and_tinyface_on_two_ranks_equal_one_process(tinyface_root: Path, tmp_path: Path) -> None:
    """tools.embed: 27 aligned faces in batches of 8 (rank 0: 16 images, rank 1: 11): every embedding equal, in
    the same order; TinyFace's ranks equal."""
    model = ["--model", str(tinyface_root / "model.pt"), "--network", "r_tiny", "--device", "cpu",
             "--batch-size", "8", "--workers", "0", "--no-progress"]
    images = str(tinyface_root / tinyface.ALIGNED_DIR)
    _launch("tools.embed", [images, *model, "--out", str(tmp_path / "one")], 0)
    _launch("tools.embed", [images, *model, "--out", str(tmp_path / "two")], 2)
    ea, eb = (np.load(tmp_path / d / "embeddings.npy") for d in ("one", "two"))
    assert ea.shape == (27, 64) and np.array_equal(ea, eb)
    assert (tmp_path / "one" / "images.txt").read_text() == (tmp_path / "two" / "images.txt").read_text()
    _launch("eval.tinyface", ["--root", str(tinyface_root), *model, "--out", str(tmp_path / "tf1")], 0)
    _launch("eval.tinyface", ["--root", str(tinyface_root), *model, "--out", str(tmp_path / "tf2")], 2)
    ra, rb = (json.loads((tmp_path / d / "TinyFace_model.json").read_text()) for d in ("tf1", "tf2"))
    assert ra["ranks"] == rb["ranks"] and ra["n_probe"] == rb["n_probe"]


@pytest.mark.slow
def test_bad_image_on_one_rank_stops_every_rank(ijb_root: Path, tmp_path: Path) -> None:
    """Crop 20.jpg is in batch 1 (rank 1's): rank 1 names it, rank 0 stops with it instead of waiting."""
    from tests.helpers import run_module

    root = _copy(ijb_root, tmp_path)
    (root / "IJBC" / "loose_crop" / "20.jpg").write_bytes(b"not a jpeg")
    proc = run_module("eval.ijb", ["--model", str(root.parent / "model.pt"), "--network", "r_tiny", "--root",
                                   str(root), "--out", str(tmp_path / "out"), *COMMON], 2, timeout=headroom(90))
    assert proc.returncode != 0
    assert "error: image" in proc.stderr and "20.jpg cannot be decoded" in proc.stderr
    assert "error: rank 1 failed during embedding" in proc.stderr
    assert not (tmp_path / "out" / "IJBC_model.json").exists()


@pytest.mark.slow
def test_ijbs_on_two_ranks_equals_one_process(ijbs_root: Path, tmp_path: Path) -> None:
    args = ["--model", str(ijbs_root / "model.pt"), "--network", "r_tiny", "--protocol-dir",
            str(ijbs_root / "protocols"), "--frames-dir", str(ijbs_root / "frames"), "--frame-list",
            str(ijbs_root / "kept.csv"), "--device", "cpu", "--batch-size", "8", "--workers", "0", "--no-progress"]
    _launch("eval.ijbs", [*args, "--out", str(tmp_path / "one")], 0)
    _launch("eval.ijbs", [*args, "--out", str(tmp_path / "two")], 2)
    ra, rb = (json.loads((tmp_path / d / "IJBS_model.json").read_text()) for d in ("one", "two"))
    assert ra["protocols"] == rb["protocols"] and ra["n_frames"] == rb["n_frames"]
