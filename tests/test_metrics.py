"""eval.metrics against hand-checkable cases, the documented edge cases, and literal loop versions of the rules."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold

from eval import metrics


# ---------------------------------------------------------------------------------------------------------------
# verification_accuracy
# ---------------------------------------------------------------------------------------------------------------
def _pairs_from_dist(dist_roots: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """1-D embeddings whose squared distance is exactly root**2 (dyadic roots keep it exact)."""
    a = np.zeros((len(dist_roots), 1))
    b = np.asarray(dist_roots, dtype=np.float64)[:, None]
    return a, b


def _loop_verification(a: np.ndarray, b: np.ndarray, issame: np.ndarray, nfolds: int) -> np.ndarray:
    """Literal per-threshold loop of the documented rule (KFold from sklearn), used as an oracle."""
    dist = np.sum(np.square(a - b), 1)
    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(issame))):
        acc_train = np.zeros(len(thresholds))
        for i, t in enumerate(thresholds):
            pred = np.less(dist[train], t)
            acc_train[i] = float(np.sum(pred & issame[train]) + np.sum(~pred & ~issame[train])) / len(train)
        t = thresholds[np.argmax(acc_train)]
        pred = np.less(dist[test], t)
        accs.append(float(np.sum(pred & issame[test]) + np.sum(~pred & ~issame[test])) / len(test))
    return np.asarray(accs)


def test_verification_perfect_and_strict_threshold() -> None:
    # Genuine at d = 0.25 exactly, impostors at d = 1.0: "same" needs d < thr strictly, so the first grid value that
    # separates is 0.26 (0.25 itself would call the genuine pairs different), and ties go to the smallest threshold.
    a, b = _pairs_from_dist([0.5, 1.0] * 10)
    issame = np.array([True, False] * 10)
    mean, std = metrics.verification_accuracy(a, b, issame, nfolds=10)
    assert (mean, std) == (1.0, 0.0)
    folds = metrics.verification_folds(a, b, issame, nfolds=10)
    assert np.allclose(folds["thresholds"], 0.26)
    assert np.array_equal(folds["dist"], np.array([0.25, 1.0] * 10))


def test_verification_contiguous_folds_and_population_std() -> None:
    # folds {0,1}, {2,3}. Fold 0 trains on pairs 2,3 (gen 1.0, imp 2.25 -> thr 1.01) and gets pairs 0,1 right.
    # Fold 1 trains on pairs 0,1 (gen 0.25, imp 2.25 -> thr 0.26), so genuine pair 2 (d = 1.0) is missed: 0.5.
    a, b = _pairs_from_dist([0.5, 1.5, 1.0, 1.5])
    issame = np.array([True, False, True, False])
    folds = metrics.verification_folds(a, b, issame, nfolds=2)
    assert np.allclose(folds["thresholds"], [1.01, 0.26])
    assert np.array_equal(folds["accuracies"], [1.0, 0.5])
    mean, std = metrics.verification_accuracy(a, b, issame, nfolds=2)
    assert mean == 0.75
    assert std == pytest.approx(0.25)  # ddof=0; ddof=1 would be 0.354


@pytest.mark.parametrize("n", [60, 67, 203])
def test_verification_matches_loop_oracle(n: int) -> None:
    rng = np.random.default_rng(n)
    a = metrics.l2_normalize(rng.standard_normal((n, 8)).astype(np.float32))
    b = metrics.l2_normalize((a + rng.standard_normal((n, 8)).astype(np.float32) * 0.9).astype(np.float32))
    issame = rng.random(n) < 0.5
    b[~issame] = metrics.l2_normalize(rng.standard_normal((int((~issame).sum()), 8)).astype(np.float32))
    got = metrics.verification_folds(a, b, issame, nfolds=10)["accuracies"]
    want = _loop_verification(a, b, issame, 10)
    assert np.array_equal(got, want)
    mean, std = metrics.verification_accuracy(a, b, issame)
    assert mean == pytest.approx(want.mean()) and std == pytest.approx(want.std())


def test_verification_bad_input() -> None:
    a, b = _pairs_from_dist([0.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="issame has 2"):
        metrics.verification_accuracy(a, b, [True, False])
    with pytest.raises(ValueError, match="nfolds"):
        metrics.verification_accuracy(a, b, [True, False, True], nfolds=10)
    with pytest.raises(ValueError, match="same shape"):
        metrics.verification_accuracy(a, b[:2], [True, False, True])


# ---------------------------------------------------------------------------------------------------------------
# template_features
# ---------------------------------------------------------------------------------------------------------------
def test_template_features_hand_case() -> None:
    feats = np.array([[0, -5], [1, 0], [3, 0], [0, 2], [0, 0]], dtype=np.float32)
    templates = np.array([7, 3, 3, 3, 9])
    medias = np.array([1, 10, 10, 11, 4])
    ids, tf = metrics.template_features(feats, templates, medias)
    assert ids.tolist() == [3, 7, 9]
    # template 3: mean([1,0],[3,0]) = [2,0] for media 10, plus [0,2] for media 11 -> [2,2] -> unit.
    s = np.sqrt(0.5)
    assert np.allclose(tf, [[s, s], [0, -1], [0, 0]])  # all-zero template stays zero (no NaN)
    assert tf.dtype == np.float64


def test_template_features_media_shared_across_templates() -> None:
    # The same media id in two templates is two separate media groups.
    feats = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float64)
    ids, tf = metrics.template_features(feats, np.array([1, 2, 2]), np.array([5, 5, 6]))
    assert np.allclose(tf, [[1, 0], [np.sqrt(0.2), np.sqrt(0.8)]])


def test_template_features_matches_loop() -> None:
    rng = np.random.default_rng(0)
    n = 500
    feats = rng.standard_normal((n, 16)).astype(np.float32)
    templates = rng.integers(0, 40, n)
    medias = rng.integers(0, 25, n)
    ids, tf = metrics.template_features(feats, templates, medias)
    for k, t in enumerate(ids):
        sel = templates == t
        acc = sum(feats[sel][medias[sel] == m].astype(np.float64).mean(0) for m in np.unique(medias[sel]))
        assert np.allclose(tf[k], acc / np.linalg.norm(acc), atol=1e-6)


def test_template_features_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        metrics.template_features(np.zeros((3, 2)), np.arange(2), np.arange(3))


# ---------------------------------------------------------------------------------------------------------------
# roc / tar_at_far
# ---------------------------------------------------------------------------------------------------------------
def _reference_tar(scores: np.ndarray, labels: np.ndarray, fars) -> dict[float, float]:
    """The documented eval_ijbc.py rule, written literally with sklearn's roc_curve."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for x in fars:
        _, i = min(zip(abs(fpr - x), range(len(fpr))))
        out[x] = tpr[i] * 100
    return out


def test_roc_equals_sklearn_including_ties() -> None:
    rng = np.random.default_rng(1)
    for it in range(150):
        n = int(rng.integers(2, 300))
        y = rng.random(n) < rng.random()
        if y.all() or not y.any():
            continue
        dtype = (np.float32, np.float64)[it % 2]
        if it % 3:  # heavy ties
            s = (rng.integers(0, int(rng.integers(1, 20)), n) / 7).astype(dtype)
        else:
            s = rng.standard_normal(n).astype(dtype)
        want = roc_curve(y, s)
        got = metrics.roc(s, y)
        for w, g in zip(want, got):
            assert w.shape == g.shape and np.array_equal(w, g)


def test_roc_signed_zero_is_one_value() -> None:
    s = np.array([0.0, -0.0, 0.5, -0.5])
    y = np.array([1, 0, 1, 0])
    for w, g in zip(roc_curve(y, s), metrics.roc(s, y)):
        assert np.array_equal(w, g)


def test_tar_at_far_hand_case() -> None:
    # genuine 0.9, 0.8, 0.4; impostor 0.7, 0.3, 0.2, 0.1 (N_neg = 4, so the smallest non-zero FPR is 0.25).
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    res = metrics.tar_at_far(scores, labels, fars=(1e-6, 0.2, 0.125, 0.25))
    # Below 1/N_neg: the FPR = 0 point with the best TPR before the first false accept (2 of 3 genuine).
    assert res[1e-6] == pytest.approx(200 / 3)
    # Nearest point, not conservative: FPR 0.25 (distance 0.05) beats FPR 0 (0.2), so TAR is 100 at FAR 0.2.
    assert res[0.2] == 100.0
    # Equidistant neighbours (0 and 0.25 around 0.125): the larger FPR wins.
    assert res[0.125] == 100.0
    # Equal FPR (0.25 at TPR 2/3 and 1): the larger TPR wins.
    assert res[0.25] == 100.0
    assert res == pytest.approx(_reference_tar(scores, labels, (1e-6, 0.2, 0.125, 0.25)))


def test_tar_at_far_random_matches_reference_rule() -> None:
    rng = np.random.default_rng(5)
    n = 20000
    y = rng.random(n) < 0.05
    s = (rng.standard_normal(n) + 2.0 * y).astype(np.float32)
    s[:500] = np.round(s[:500], 1)  # some ties
    fars = metrics.DEFAULT_FARS
    assert metrics.tar_at_far(s, y, fars) == _reference_tar(s, y, fars)


def test_tar_at_far_unrounded_and_bad_input() -> None:
    scores = np.array([0.9, 0.5, 0.6, 0.1, 0.2, 0.3])
    labels = np.array([1, 1, 1, 0, 0, 0])
    assert metrics.tar_at_far(scores, labels, fars=(0.1,))[0.1] == 100.0
    with pytest.raises(ValueError, match="both genuine and impostor"):
        metrics.tar_at_far(scores, np.ones(6))
    with pytest.raises(ValueError, match="same length"):
        metrics.tar_at_far(scores, labels[:3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.tar_at_far(np.array([np.nan, 0.1]), np.array([1, 0]))
    three = metrics.tar_at_far(np.array([0.9, 0.2, 0.8, 0.1]), np.array([1, 1, 0, 0]), fars=(0.0,))
    assert three[0.0] == 50.0  # 1 of 2 genuine before the first false accept: exactly 50, no rounding


def test_threshold_at_far_hand_case() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    got = metrics.threshold_at_far(scores, labels, 0.2)  # 1 of 5 impostors may pass: the 0.7 one
    assert got == {"threshold": 0.6, "far": 0.2, "tar": 1.0, "impostors": 5, "genuines": 3}
    assert metrics.threshold_at_far(scores, labels, 0.39)["threshold"] == 0.6  # still 1 false accept allowed
    assert metrics.threshold_at_far(scores, labels, 0.4)["threshold"] == 0.5  # 2: the 0.7 and 0.5 impostors
    assert metrics.threshold_at_far(scores, labels, 1.0)["threshold"] == 0.2
    with pytest.raises(ValueError, match="below 1/5"):
        metrics.threshold_at_far(scores, labels, 0.1)


@pytest.mark.parametrize("seed", range(5))
def test_threshold_at_far_is_the_best_threshold_within_the_far(seed: int) -> None:
    """Against brute force over every candidate threshold, with ties (scores rounded to 2 decimals)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(labels * 1.0, 0.7), 2)
    far = float(rng.choice([0.01, 0.05, 0.2]))
    got = metrics.threshold_at_far(scores, labels, far)
    neg, pos = scores[~labels], scores[labels]
    candidates = np.concatenate([np.unique(scores), [np.inf]])
    ok = [t for t in candidates if np.mean(neg >= t) <= far]
    best_tar = max(np.mean(pos >= t) for t in ok)
    best = min(t for t in ok if np.mean(pos >= t) == best_tar)
    assert np.mean(neg >= got["threshold"]) <= far and got["tar"] == best_tar
    assert got["threshold"] <= best + 1e-12 or best_tar == 0.0


# ---------------------------------------------------------------------------------------------------------------
# identification_ranks / tpir_at_fpir (probe_feats = score rows, gallery = identity: sim == the rows)
# ---------------------------------------------------------------------------------------------------------------
def test_identification_multiple_mates_and_distractors() -> None:
    scores = np.array(
        [
            [0.1, 0.9, 0.5, 0.8, 0.0],  # label 1: mates at 0 and 2; order g1, g3, g2 -> first mate at rank 3
            [0.2, 0.1, 0.3, 0.4, 0.95],  # label 2: mate g1 is last; distractor g4 (-100) on top -> rank 5
            [0.9, 0.1, 0.3, 0.2, 0.0],  # label 1: best item g0 is a mate -> rank 1
            [0.9, 0.1, 0.3, 0.2, 0.0],  # label 42: no mate -> not counted (DIR_FAR keeps match probes only)
        ]
    )
    res = metrics.identification_ranks(scores, np.array([1, 2, 1, 42]), np.eye(5), np.array([1, 2, 1, 3, -100]),
                                       ranks=(1, 2, 3, 5))
    assert res == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 5: 1.0}


def test_identification_ties_are_stable_in_gallery_order() -> None:
    scores = np.array([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    # probe 0 (label 1): mate g0 ties non-mate g1 and comes first in gallery order -> rank 1
    # probe 1 (label 2): mate g1 ties non-mate g0 which comes first -> rank 2
    res = metrics.identification_ranks(scores, np.array([1, 2]), np.eye(3), np.array([1, 2, 3]), ranks=(1, 2))
    assert res == {1: 0.5, 2: 1.0}


def test_identification_chunking_matches_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    p = metrics.l2_normalize(rng.standard_normal((70, 6)))
    g = metrics.l2_normalize(rng.standard_normal((40, 6)))
    pl, gl = rng.integers(0, 30, 70), rng.integers(0, 30, 40)
    full = metrics.identification_ranks(p, pl, g, gl, ranks=(1, 5, 10))
    monkeypatch.setattr(metrics, "_PROBE_CHUNK", 7)
    assert metrics.identification_ranks(p, pl, g, gl, ranks=(1, 5, 10)) == full
    # oracle: argsort per row
    sim = p @ g.T
    hits = {1: 0, 5: 0, 10: 0}
    counted = 0
    for i in range(70):
        if not (gl == pl[i]).any():
            continue
        counted += 1
        order = np.argsort(-sim[i], kind="stable")
        for r in hits:
            hits[r] += bool((gl[order[:r]] == pl[i]).any())
    assert full == {r: pytest.approx(h / counted) for r, h in hits.items()}


def test_identification_no_mate_raises() -> None:
    with pytest.raises(ValueError, match="no probe has a mate"):
        metrics.identification_ranks(np.eye(2), np.array([5, 6]), np.eye(2), np.array([1, 2]))


def test_tpir_at_fpir_hand_case() -> None:
    gallery_labels = np.array([1, 2, 3])
    scores = np.array(
        [
            [0.9, 0.1, 0.0],  # label 1: rank-1 correct, score 0.9
            [0.0, 0.75, 0.1],  # label 2: rank-1 correct, score 0.75
            [0.99, 0.0, 0.95],  # label 3: mate 0.95 but a non-mate is higher -> never a hit
            [0.9, 0.0, 0.0],  # non-mated (label 8), max 0.9
            [0.0, 0.7, 0.0],  # non-mated, max 0.7
            [0.0, 0.0, 0.5],  # non-mated, max 0.5
            [0.3, 0.0, 0.0],  # non-mated, max 0.3
        ]
    )
    labels = np.array([1, 2, 3, 8, 8, 9, 9])
    res = metrics.tpir_at_fpir(scores, labels, np.eye(3), gallery_labels, fpirs=(0.1, 0.25, 0.5))
    # 0.1: k = floor(0.4) = 0 -> thr = 0.9 + 1e-8, so even the 0.9 mate is rejected.
    # 0.25: k = 1 -> thr = 0.9 (>=, so 0.9 is accepted). 0.5: k = 2 -> thr = 0.7.
    assert res == {0.1: 0.0, 0.25: pytest.approx(1 / 3), 0.5: pytest.approx(2 / 3)}


def test_fpir_threshold_floor_of_float_product() -> None:
    s = np.arange(100, dtype=np.float64)[::-1] / 100.0  # 0.99, 0.98, ...
    # 100 * 0.29 = 28.999999999999996 -> k = 28 (floor of the float product, like astype(int32)).
    assert metrics.fpir_threshold(s, 0.29) == pytest.approx(0.72)
    assert metrics.fpir_threshold(s, 0.001) == pytest.approx(0.99 + 1e-8)
    f32 = np.array([0.99999994], dtype=np.float32)
    assert metrics.fpir_threshold(f32, 0.01) > float(f32[0])  # epsilon survives (float64), unlike float32 math


def test_tpir_empty_sets_raise() -> None:
    with pytest.raises(ValueError, match="no non-mated probe"):
        metrics.tpir_at_fpir(np.eye(2), np.array([1, 2]), np.eye(2), np.array([1, 2]))
    with pytest.raises(ValueError, match="no mated probe"):
        metrics.tpir_at_fpir(np.eye(2), np.array([5, 6]), np.eye(2), np.array([1, 2]))


def test_metrics_module_imports_no_torch() -> None:
    code = "import sys, eval.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


# ---------------------------------------------------------------------------------------------------------------
# pair_scores / group_mean
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dense", [True, False])
def test_pair_scores_matches_direct_dot(dense: bool) -> None:
    rng = np.random.default_rng(9)
    ids = np.array([3, 5, 8, 13, 21, 34, 55, 89])
    f = metrics.l2_normalize(rng.standard_normal((8, 5)))
    n = 200 if dense else 3
    t1, t2 = rng.choice(ids, n), rng.choice(ids, n)
    got = metrics.pair_scores(ids, f, t1, t2, block=3)
    want = np.sum(f[np.searchsorted(ids, t1)] * f[np.searchsorted(ids, t2)], 1)
    assert np.allclose(got, want, atol=1e-15)
    # non-integer ids take the searchsorted path
    assert np.allclose(metrics.pair_scores(ids.astype(float), f, t1.astype(float), t2.astype(float)), want)


def test_pair_scores_unknown_template() -> None:
    with pytest.raises(ValueError, match="template 4 .t2. has no feature"):
        metrics.pair_scores(np.array([1, 2, 3]), np.eye(3), np.array([1, 2]), np.array([3, 4]))


def test_group_mean() -> None:
    f = np.array([[1.0, 0], [3, 0], [0, 4]])
    m = metrics.group_mean(f, np.array([0, 0, 2]), 4)
    assert np.allclose(m, [[2, 0], [0, 0], [0, 4], [0, 0]])
