"""Toy face renderer and ensure_toy_data."""
import json
import multiprocessing as mp

import numpy as np
import pytest

from utils.toyface import ARCFACE_TEMPLATE, ensure_toy_data, identity_params, render_face

SMALL = dict(num_identities=6, images_per_identity=4, num_eval_identities=4, num_pairs=8, num_target_faces=10)


def test_render_is_deterministic_and_shaped():
    p = identity_params(0, 3)
    assert p == identity_params(0, 3) and p != identity_params(0, 4)
    a, la = render_face(p, np.random.default_rng(1))
    b, lb = render_face(p, np.random.default_rng(1))
    assert a.shape == (112, 112, 3) and a.dtype == np.uint8 and la.shape == (5, 2) and la.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    c, _ = render_face(p, np.random.default_rng(2))
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="style"):
        render_face(p, np.random.default_rng(1), style="cartoon")


def test_landmarks_near_arcface_template():
    lms = np.stack([render_face(identity_params(0, i), np.random.default_rng(i))[1] for i in range(40)])
    err = np.linalg.norm(lms - ARCFACE_TEMPLATE, axis=2)
    assert np.linalg.norm(lms.mean(0) - ARCFACE_TEMPLATE, axis=1).max() < 3.0  # centred on the template
    assert 1.0 < err.mean() < 10.0  # jittered, but roughly aligned
    assert (lms[:, 1, 0] > lms[:, 0, 0]).all() and (lms[:, 4, 0] > lms[:, 3, 0]).all()  # left/right order


def test_target_style_is_degraded():
    p = identity_params(0, 1)
    clean, lc = render_face(p, np.random.default_rng(5), "clean")
    target, lt = render_face(p, np.random.default_rng(5), "target")
    assert np.array_equal(lc, lt)  # same geometry, different capture

    def sharpness(img):
        g = img.astype(np.float32).mean(2)
        return np.abs(np.diff(g, axis=1)).mean()

    assert sharpness(target) < sharpness(clean)


def _call_ensure(root):
    ensure_toy_data(root, workers=1, **SMALL)


def test_ensure_toy_data_small_and_concurrent(tmp_path):
    root = tmp_path / "toy"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_call_ensure, args=(root,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    meta = json.loads((root / "toy_meta.json").read_text())
    assert meta["num_classes"] == 6 and meta["num_image"] == 24 and meta["seed"] == 0
    assert len(list((root / "target_faces").glob("*.jpg"))) == 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".toy.tmp")]  # temp dirs cleaned

    from dataset import build_dataset
    from eval.binfile import load_bin

    ds = build_dataset(str(root), num_classes=6, num_image=24)
    assert [int(ds[(i, False)][1]) for i in range(0, 24, 4)] == list(range(6))
    for name in ("toy_clean.bin", "toy_target.bin"):
        images, issame = load_bin(root / name)
        assert images.shape == (16, 3, 112, 112) and issame.sum() == 4
    # second call is a no-op; a conflicting request is an error naming both values
    mtime = (root / "train.rec").stat().st_mtime_ns
    assert ensure_toy_data(root) == root and (root / "train.rec").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="num_identities"):
        ensure_toy_data(root, num_identities=7)


def test_generation_is_deterministic(tmp_path):
    a = ensure_toy_data(tmp_path / "a", workers=1, **SMALL)
    b = ensure_toy_data(tmp_path / "b", workers=2, **{**SMALL, "num_identities": 6})
    for name in ("train.rec", "train.idx", "toy_clean.bin", "toy_target.bin"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_toy_data_is_never_written_into_a_folder_of_other_files(tmp_path):
    from utils.toyface import PARTIAL_MARKER, ToyDataError

    for name in ("train.rec", "alice"):  # a pack of the user's, an image folder
        user = tmp_path / name / "data"
        user.mkdir(parents=True)
        (user / name).write_bytes(b"the user's")
        with pytest.raises(ToyDataError, match=rf"rec='{user}' holds files that are not a toy data set \({name}; "
                                               rf"no toy_meta.json\).*generate_toy_data=False"):
            ensure_toy_data(user, num_identities=2, images_per_identity=1, num_eval_identities=2, num_pairs=2,
                            num_target_faces=1, workers=1)
        assert [p.name for p in user.iterdir()] == [name]
    half = tmp_path / "half"  # a move cut short: its marker says the files are the toy's own
    half.mkdir()
    (half / PARTIAL_MARKER).touch()
    (half / "train.rec").write_bytes(b"half")
    ensure_toy_data(half, num_identities=2, images_per_identity=1, num_eval_identities=2, num_pairs=2,
                    num_target_faces=1, workers=1)
    assert (half / "toy_meta.json").is_file() and not (half / PARTIAL_MARKER).exists()
