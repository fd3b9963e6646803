"""Toy face renderer and ensure_toy_data."""
import json
import multiprocessing as mp

import numpy as np
import pytest

from utils.data.toyface import ARCFACE_TEMPLATE, ensure_toy_data, identity_params, render_face

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
    from utils.data.binfile import load_bin

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
    from utils.data.toyface import PARTIAL_MARKER, ToyDataError

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


# ---- target domains no hand-crafted recipe contains (issue 22) ----

def test_domains_are_deterministic_and_keep_the_clean_rendering():
    from utils.data.toyface import DOMAINS

    p = identity_params(0, 2)
    clean, lc = render_face(p, np.random.default_rng(7), "clean")
    for name in DOMAINS:
        a, la = render_face(p, np.random.default_rng(7), name)
        b, _ = render_face(p, np.random.default_rng(7), name)
        assert np.array_equal(a, b) and np.array_equal(la, lc), name  # same face, same geometry
        assert np.abs(a.astype(int) - clean.astype(int)).mean() > 1, name  # but captured differently
    with pytest.raises(ValueError, match="camera"):
        render_face(p, np.random.default_rng(7), "fog")


def _flat(value=128):
    return np.full((112, 112, 3), value, np.uint8)


def _high_pass(img):
    import cv2

    x = img.astype(np.float32).mean(2)
    return (x - cv2.GaussianBlur(x, (0, 0), 2.0)).ravel()


def test_camera_has_a_fixed_sensor_pattern_that_iid_noise_does_not():
    """One camera per universe: two shots of a flat grey card share their fine pattern (the recipe's noise is
    independent per image), and another universe's camera has another pattern."""
    from utils.data.degrade import Degradation
    from utils.data.toyface import degrade_domain

    shot = lambda s, seed=0: _high_pass(degrade_domain("camera", _flat(), np.random.default_rng(s), seed))  # noqa: E731
    assert np.corrcoef(shot(1), shot(2))[0, 1] > 0.5
    assert abs(np.corrcoef(shot(1), shot(2, seed=1))[0, 1]) < 0.2
    noise = Degradation(noise_prob=1.0)
    a, b = (_high_pass(noise(_flat(), np.random.default_rng(s))) for s in (1, 2))
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1


def _anisotropy(img):
    """Ratio of the principal second moments of a blurred point: 1 for an isotropic blur, large along a line."""
    w = img.astype(np.float64).mean(2)
    ys, xs = np.mgrid[0:112, 0:112]
    w = w / w.sum()
    my, mx = (w * ys).sum(), (w * xs).sum()
    cov = np.array([[(w * (ys - my) ** 2).sum(), (w * (ys - my) * (xs - mx)).sum()],
                    [(w * (ys - my) * (xs - mx)).sum(), (w * (xs - mx) ** 2).sum()]])
    low, high = np.linalg.eigvalsh(cov)
    return high / max(low, 1e-12)  # a perfectly straight line has no spread across it


def test_motion_blur_is_directional_where_the_recipe_blur_is_not():
    from utils.data.degrade import Degradation
    from utils.data.toyface import degrade_domain

    point = np.zeros((112, 112, 3), np.uint8)
    point[56, 56] = 255
    for s in range(4):
        assert _anisotropy(degrade_domain("motion", point, np.random.default_rng(s))) > 5
    blur = Degradation(blur_prob=1.0, blur_sigma=(1.5, 2.0))
    assert _anisotropy(blur(point, np.random.default_rng(0))) < 1.5


def test_illumination_is_not_a_global_colour_transform():
    """The recipe's colour jitter is one affine map per channel over the whole image; the light here varies across
    the face, so no per-channel affine map of the clean image explains it."""
    from utils.data.degrade import Degradation
    from utils.data.toyface import degrade_domain

    clean, _ = render_face(identity_params(0, 5), np.random.default_rng(3), "clean")

    def affine_residual(out):
        res = []
        for c in range(3):
            x = np.stack([clean[..., c].ravel().astype(np.float64), np.ones(clean[..., c].size)], 1)
            y = out[..., c].ravel().astype(np.float64)
            coef, *_ = np.linalg.lstsq(x, y, rcond=None)
            res.append(np.sqrt(np.mean((x @ coef - y) ** 2)) / (y.std() + 1e-9))
        return max(res)

    assert affine_residual(degrade_domain("illumination", clean, np.random.default_rng(1))) > 0.3
    colour = Degradation(color_prob=1.0, color_strength=0.2)
    assert affine_residual(colour(clean, np.random.default_rng(1))) < 0.15


def test_ensure_toy_domains_adds_files_and_leaves_the_toy_set_alone(tmp_path):
    import hashlib

    from utils.data.binfile import load_bin
    from utils.data.toyface import DOMAINS, ToyDataError, ensure_toy_domains

    root = ensure_toy_data(tmp_path / "toy", workers=1, **SMALL)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()}
    paths = ensure_toy_domains(root, ["camera", "motion"], workers=1)
    assert [p.name for p in paths] == ["toy_camera.bin", "toy_motion.bin"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()
            if p.is_file() and p.name in before} == before  # toy_target.bin, train.rec, ... untouched
    clean, issame = load_bin(root / "toy_clean.bin")
    for name in ("camera", "motion"):
        images, same = load_bin(root / f"toy_{name}.bin")
        assert images.shape == clean.shape and np.array_equal(same, issame)
        assert len(list((root / f"target_faces_{name}").glob("*.jpg"))) == SMALL["num_target_faces"]
    mtime = (root / "toy_camera.bin").stat().st_mtime_ns
    ensure_toy_domains(root, ["camera"])  # done once: a second call is a no-op
    assert (root / "toy_camera.bin").stat().st_mtime_ns == mtime
    other = ensure_toy_data(tmp_path / "other", workers=1, **SMALL)
    ensure_toy_domains(other, ["camera"], workers=2)
    assert (other / "toy_camera.bin").read_bytes() == (root / "toy_camera.bin").read_bytes()  # deterministic
    with pytest.raises(ToyDataError, match="'fog'.*camera"):
        ensure_toy_domains(root, ["fog"])
    with pytest.raises(ToyDataError, match="make_toy_data"):
        ensure_toy_domains(tmp_path / "empty", list(DOMAINS))


def test_make_toy_data_adds_domains_and_refuses_unknown_ones(tmp_path, capsys):
    from tools import make_toy_data

    with pytest.raises(SystemExit) as exc:
        make_toy_data.main(["--out", str(tmp_path / "t"), "--domains", "fog"])
    assert exc.value.code == 2 and "--domains" in capsys.readouterr().err and not (tmp_path / "t").exists()
    make_toy_data.main(["--out", str(tmp_path / "t"), "--workers", "1", "--num-identities", "2",
                        "--images-per-identity", "2", "--num-eval-identities", "2", "--num-pairs", "2",
                        "--num-target-faces", "1", "--domains", "illumination"])
    assert (tmp_path / "t" / "toy_illumination.bin").is_file() and not (tmp_path / "t" / "toy_camera.bin").exists()


def test_validation_pairs_have_their_own_identities_and_leave_the_toy_set_alone(tmp_path):
    """toy_<style>_val.bin: pairs over identities disjoint from training, the reported pairs and the target faces,
    the same pairs in every style; added to a set made before them without changing any of its files."""
    import hashlib

    from utils.data.binfile import load_bin
    from utils.data.toyface import _TAG_VAL_PAIRS, VALIDATION_MARKER, VALIDATION_SETS, _make_pairs, ensure_toy_domains, \
        validation_identities

    root = ensure_toy_data(tmp_path / "toy", workers=1, **SMALL)
    assert VALIDATION_SETS == ("toy_clean_val", "toy_target_val")
    meta = json.loads((root / "toy_meta.json").read_text())
    val_ids = set(validation_identities(meta))
    taken = set(range(meta["num_classes"])) | set(range(*meta["eval_identities"])) | \
        set(range(*meta["target_face_identities"]))
    assert len(val_ids) == meta["num_eval_identities"] and not val_ids & taken
    clean, same = load_bin(root / "toy_clean_val.bin")
    target, same_t = load_bin(root / "toy_target_val.bin")
    assert clean.shape == target.shape == (2 * meta["num_pairs"], 3, 112, 112) and np.array_equal(same, same_t)
    reported, _ = load_bin(root / "toy_clean.bin")
    assert not np.array_equal(clean, reported)  # other faces than the reported pairs
    assert not np.array_equal(clean, target)  # the target style of the same renderings
    pairs = _make_pairs(meta["seed"], sorted(val_ids), meta["num_pairs"], tag=_TAG_VAL_PAIRS)
    assert {a for a, _, _ in pairs} <= val_ids

    # a toy set from before the split: its files keep their bytes, the split comes back identical
    val_bytes = {n: (root / f"{n}.bin").read_bytes() for n in VALIDATION_SETS}
    for n in VALIDATION_SETS:
        (root / f"{n}.bin").unlink()
    (root / VALIDATION_MARKER).unlink()
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()}
    ensure_toy_data(root)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()
            if p.is_file() and p.name in before} == before
    assert {n: (root / f"{n}.bin").read_bytes() for n in VALIDATION_SETS} == val_bytes
    # a domain gets its validation pairs too: the same pairs in that capture
    ensure_toy_domains(root, ["motion"], workers=1)
    motion, same_m = load_bin(root / "toy_motion_val.bin")
    assert motion.shape == clean.shape and np.array_equal(same_m, same)
