"""tools.embed: embeddings of a folder or list of aligned faces (.npy + list file), flip fusion, normalisation."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from eval.common import EvalInputError
from tools import embed


@pytest.fixture()
def faces(tmp_path: Path) -> list[Path]:
    from utils.data.toyface import identity_params, render_face

    folder = tmp_path / "faces" / "sub"
    folder.mkdir(parents=True)
    paths = []
    for i in range(5):
        img, _ = render_face(identity_params(i, 0), np.random.default_rng(i))  # RGB 112x112
        path = folder / f"{i:02d}.png"  # lossless: the test compares exact pixels
        cv2.imwrite(str(path), img[:, :, ::-1])
        paths.append(path)
    return paths


def _expected(model_file: Path, paths: list[Path], flip: bool) -> np.ndarray:
    from eval.common import load_backbone
    from eval.verification import embed_images

    images = np.stack([cv2.imread(str(p))[:, :, ::-1].transpose(2, 0, 1) for p in paths])  # RGB uint8
    return embed_images(load_backbone(model_file, "r_tiny"), np.ascontiguousarray(images), flip=flip)


def _run(*args: str) -> Path:
    return embed.main([*args, "--network", "r_tiny", "--device", "cpu", "--workers", "0", "--no-progress"])


def test_folder_embeddings_match_the_flip_fused_model_output(tmp_path: Path, faces, model_file) -> None:
    out = _run(str(tmp_path / "faces"), "--model", str(model_file), "--out", str(tmp_path / "emb"))
    emb = np.load(out / "embeddings.npy")
    listed = (out / "images.txt").read_text().splitlines()
    assert listed == [str(p) for p in faces]  # recursive, sorted; row i = line i
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, _expected(model_file, faces, flip=True), rtol=1e-4, atol=1e-5)


def test_no_flip_and_normalize(tmp_path: Path, faces, model_file) -> None:
    out = _run(str(tmp_path / "faces"), "--model", str(model_file), "--out", str(tmp_path / "emb"), "--no-flip",
               "--normalize")
    emb = np.load(out / "embeddings.npy")
    raw = _expected(model_file, faces, flip=False)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)


def test_list_file_keeps_its_order_and_relative_paths(tmp_path: Path, faces, model_file) -> None:
    listing = tmp_path / "faces" / "list.txt"
    listing.write_text("sub/03.png\n\n" + f"{faces[1]}\n")
    out = _run(str(listing), "--model", str(model_file), "--out", str(tmp_path / "emb"))
    assert (out / "images.txt").read_text().splitlines() == [str(faces[3]), str(faces[1])]
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), _expected(model_file, [faces[3], faces[1]], True),
                               rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_the_file(tmp_path: Path, faces, model_file) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("faces/sub/00.png\nfaces/sub/nope.png\n")
    with pytest.raises(EvalInputError, match=r"1 of 2 files do not exist \(line 2: .*nope\.png\)"):
        _run(str(listing), "--model", str(model_file), "--out", str(tmp_path / "emb"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="holds no"):
        _run(str(tmp_path / "empty"), "--model", str(model_file), "--out", str(tmp_path / "emb"))
    cv2.imwrite(str(faces[0].parent / "big.png"), np.zeros((120, 120, 3), np.uint8))
    with pytest.raises(EvalInputError, match=r"big\.png is 120x120, expected an aligned 112x112 face"):
        _run(str(tmp_path / "faces"), "--model", str(model_file), "--out", str(tmp_path / "emb"))


def test_align_embeds_the_faces_of_raw_photos(tmp_path: Path, model_file) -> None:
    """--align: one row per face (photos without a face skipped with a warning), faces.csv lines up with the rows,
    and each row equals the embedding of the crop tools.align writes for that photo (the same alignment)."""
    from PIL import Image
    from skimage import data

    from tools import align

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(data.astronaut()).save(photos / "a.png")
    Image.fromarray(np.ascontiguousarray(data.astronaut()[:, ::-1])).convert("L").save(photos / "b_grey.png")
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(photos / "c_blank.png")
    out = _run(str(photos), "--align", "--model", str(model_file), "--out", str(tmp_path / "emb"))
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (2, 32)
    assert (out / "images.txt").read_text().splitlines() == [str(photos / "a.png"), str(photos / "b_grey.png")]
    rows = (out / "faces.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith(f"{photos / 'a.png'},0,,")
    align.main([str(photos), "--out", str(tmp_path / "crops"), "--no-progress"])
    crops = [tmp_path / "crops" / "a_face0.png", tmp_path / "crops" / "b_grey_face0.png"]
    np.testing.assert_allclose(emb, _expected(model_file, crops, flip=True), rtol=1e-4, atol=1e-5)


def test_align_without_any_face_is_an_error(tmp_path: Path, model_file) -> None:
    from eval.align import NoFaceError

    cv2.imwrite(str(tmp_path / "blank.png"), np.zeros((80, 80, 3), np.uint8))
    with pytest.raises(NoFaceError, match=r"no face aligned from any of the 1 photo \(first: photo .*blank\.png: "
                                          r"no face found"):
        _run(str(tmp_path / "blank.png"), "--align", "--model", str(model_file), "--out", str(tmp_path / "emb"))


def test_a_few_images_are_read_without_reader_processes(tmp_path: Path, faces, model_file) -> None:
    """5 images: no --workers given, none are started (each costs seconds to spawn), the decision is printed, and
    the rows equal an explicit --workers 0 run's."""
    import subprocess
    import sys

    from tests.helpers import REPO, headroom, launch_env

    command = [sys.executable, "-m", "tools.embed", str(tmp_path / "faces"), "--model", str(model_file),
               "--network", "r_tiny", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "auto")]
    proc = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=headroom(60))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "image readers: 0 (5 images: read in the main process, faster than starting a reader process " \
           "(--workers N to choose))" in proc.stdout.splitlines(), proc.stdout
    explicit = _run(str(tmp_path / "faces"), "--model", str(model_file), "--out", str(tmp_path / "zero"))
    assert np.array_equal(np.load(tmp_path / "auto" / "embeddings.npy"), np.load(explicit / "embeddings.npy"))


def test_reader_count_follows_the_input_size() -> None:
    import os

    from utils.cli import IMAGES_PER_READER, auto_workers

    assert auto_workers(None, IMAGES_PER_READER - 1)[0] == 0
    assert auto_workers(None, IMAGES_PER_READER)[0] == 1
    assert auto_workers(None, 100 * IMAGES_PER_READER)[0] == min(8, os.cpu_count() or 1)
    assert auto_workers(3, 5) == (3, "--workers 3")  # the user's choice stands


def test_an_unaligned_image_under_a_progress_bar_is_one_error_line_pointing_at_align(tmp_path: Path, faces,
                                                                                      model_file) -> None:
    """The third of five images is a raw 200x160 picture, the bar is on (2 images per batch): the error starts on a
    line of its own after the bar and says how to embed raw photos."""
    import subprocess
    import sys

    from tests.helpers import REPO, headroom, launch_env

    raw = faces[2].parent / "02.png"
    cv2.imwrite(str(raw), cv2.resize(cv2.imread(str(raw)), (200, 160)))
    command = [sys.executable, "-m", "tools.embed", str(tmp_path / "faces"), "--model", str(model_file),
               "--network", "r_tiny", "--device", "cpu", "--batch-size", "2", "--out", str(tmp_path / "emb")]
    proc = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=headroom(60))
    assert proc.returncode == 2
    assert "embed: " in proc.stderr  # the bar was on screen
    errors = [line for line in proc.stderr.split("\n") if "error:" in line]
    assert errors == [f"error: image {raw} is 200x160, expected an aligned 112x112 face (pass --align for raw "
                      f"photos)"], proc.stderr
