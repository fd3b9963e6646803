"""Face-recognition evaluation metrics, re-implemented from the documented reference rules.

Pure numpy / scikit-learn / scipy: this module takes arrays and returns numbers, it never imports torch, so it can
be tested and benchmarked without a model. Every function reproduces one rule of the reference evaluation tools
(see ``docs/eval_protocols.md``), including their quirks, because published numbers depend on those quirks:

* :func:`verification_accuracy` -- 10-fold ``.bin`` accuracy of insightface ``verification.py`` (``calculate_roc``).
* :func:`template_features` -- IJB-B/C template pooling of ``eval_ijbc.py`` (media mean, template sum, L2).
* :func:`tar_at_far` -- TAR@FAR "nearest ROC point" rule of ``eval_ijbc.py`` (not an interpolation).
* :func:`threshold_at_far` -- the score threshold that keeps the FAR at or below a target (``tools.compare_faces``).
* :func:`identification_ranks` -- closed-set CMC (IJB 1:N, TinyFace ``DIR_FAR`` with FARs=[1.0], IJB-S).
* :func:`tpir_at_fpir` -- open-set TPIR@FPIR of the PFE/AdaFace IJB-S helper, for one gallery.

Numeric note: sums are done in float64 where the reference used float32 or float64 (differences are at the 1e-7
level and cannot change a percentage printed with two decimals, except for exact ties at a threshold).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

# Rows of the probe x gallery score matrix processed at once: bounds memory for TinyFace-sized problems
# (3.7k probes x 158k gallery items would be 2.3 GB in float32 if built in one go).
_PROBE_CHUNK = 256

DEFAULT_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# ----------------------------------------------------------------------------------------------------------------
# 1. 10-fold verification accuracy
# ----------------------------------------------------------------------------------------------------------------
def verification_thresholds() -> np.ndarray:
    """The reference threshold grid on the squared L2 distance: ``np.arange(0, 4, 0.01)`` (400 values)."""
    return np.arange(0, 4, 0.01)


def _contiguous_folds(n: int, nfolds: int) -> list[np.ndarray]:
    """Test-index blocks of ``KFold(n_splits=nfolds, shuffle=False)``: the first ``n % nfolds`` folds get one more."""
    sizes = np.full(nfolds, n // nfolds, dtype=np.int64)
    sizes[: n % nfolds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(nfolds)]


def _accuracy_per_threshold(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(TP + TN) / n for every threshold, with "same" predicted iff ``dist < thr`` (strict, as the reference).

    Counting with ``searchsorted(side='left')`` on sorted distances gives ``#{d < thr}`` exactly, so this equals the
    reference's per-threshold loop while costing O(n log n + T log n) instead of O(n T).
    """
    pos = np.sort(dist[same])
    neg = np.sort(dist[~same])
    tp = np.searchsorted(pos, thresholds, side="left")
    tn = neg.size - np.searchsorted(neg, thresholds, side="left")
    # Same float expression as the reference: float(tp + tn) / n.
    return (tp + tn).astype(np.float64) / float(dist.size)


def verification_folds(
    emb_a: np.ndarray, emb_b: np.ndarray, issame: Sequence[bool] | np.ndarray, nfolds: int = 10
) -> dict[str, np.ndarray]:
    """Per-fold details of :func:`verification_accuracy`: ``accuracies``, ``thresholds`` (chosen per fold), ``dist``,
    and ``correct`` (per pair: right under its fold's threshold; with equal folds its mean is the accuracy)."""
    a = np.asarray(emb_a)
    b = np.asarray(emb_b)
    same = np.asarray(issame).astype(bool).reshape(-1)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"emb_a and emb_b must be 2-D arrays of the same shape, got {a.shape} and {b.shape}")
    if same.size != a.shape[0]:
        raise ValueError(f"issame has {same.size} entries but there are {a.shape[0]} embedding pairs")
    if nfolds < 2 or nfolds > same.size:
        raise ValueError(f"nfolds={nfolds} must be in [2, number of pairs={same.size}]")
    # Distance in the embeddings' own dtype (the reference works on float32 embeddings), then compared in float64:
    # float32 -> float64 is exact, and numpy >= 2 compares float32 arrays with float64 scalars in float64.
    diff = a - b
    dist = np.sum(np.square(diff), axis=1).astype(np.float64)
    thresholds = verification_thresholds()
    folds = _contiguous_folds(same.size, nfolds)
    accs = np.zeros(nfolds, dtype=np.float64)
    best = np.zeros(nfolds, dtype=np.float64)
    correct = np.zeros(same.size, dtype=bool)
    all_idx = np.arange(same.size)
    for i, test in enumerate(folds):
        train = np.setdiff1d(all_idx, test, assume_unique=True)
        acc_train = _accuracy_per_threshold(dist[train], same[train], thresholds)
        j = int(np.argmax(acc_train))  # first maximum == smallest threshold among ties, like the reference
        best[i] = thresholds[j]
        accs[i] = _accuracy_per_threshold(dist[test], same[test], thresholds[j : j + 1])[0]
        correct[test] = (dist[test] < best[i]) == same[test]
    return {"accuracies": accs, "thresholds": best, "dist": dist, "correct": correct}


def verification_accuracy(
    emb_a: np.ndarray, emb_b: np.ndarray, issame: Sequence[bool] | np.ndarray, nfolds: int = 10
) -> tuple[float, float]:
    """10-fold verification accuracy of the insightface ``.bin`` protocol.

    Args:
        emb_a, emb_b: [N, D] unit-normalised (already flip-fused) embeddings of the first / second image of each pair.
        issame: N booleans, True for a genuine pair.
        nfolds: number of contiguous, unshuffled folds (``KFold(shuffle=False)``).

    Returns:
        ``(mean, std)`` of the fold accuracies, std with ddof=0 (``np.std``), as fractions in [0, 1].

    Rule: distance ``||a - b||^2``; thresholds ``arange(0, 4, 0.01)``; "same" iff ``d < thr``; per fold the first
    threshold maximising accuracy on the other folds is applied to the held-out fold.
    """
    accs = verification_folds(emb_a, emb_b, issame, nfolds)["accuracies"]
    return float(np.mean(accs)), float(np.std(accs))


# ----------------------------------------------------------------------------------------------------------------
# 2. IJB template pooling
# ----------------------------------------------------------------------------------------------------------------
def l2_normalize(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """Row-wise L2 normalisation that leaves all-zero rows at zero (``sklearn.preprocessing.normalize`` semantics)."""
    x = np.asarray(x)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    norm[norm == 0] = 1.0
    return x / norm


def template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pool image features into IJB template features (``eval_ijbc.py`` rule).

    Inside a template, images with the same media id are averaged into one media feature; the media features are
    summed; the sum is L2-normalised. Flip fusion, keeping the norm and the detector-score weight are the caller's
    choice (apply them to ``features`` first).

    Args:
        features: [N, D] image features (any float dtype).
        templates: [N] template id of each image.
        medias: [N] media id of each image.

    Returns:
        ``(template_ids, template_feats)``: sorted unique template ids [T] and float64 unit features [T, D]
        (a template whose pooled feature is all zero stays zero).

    Implementation: one sparse [T, N] weight matrix with ``1 / (images in that media of that template)`` per image,
    so pooling is a single sparse-dense product, O(N D) with no Python loop.
    """
    from scipy import sparse  # scipy ships with scikit-learn; imported lazily to keep import time small

    feats = np.asarray(features)
    t = np.asarray(templates).reshape(-1)
    m = np.asarray(medias).reshape(-1)
    if feats.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {feats.shape}")
    if not (t.size == m.size == feats.shape[0]):
        raise ValueError(
            f"features ({feats.shape[0]} rows), templates ({t.size}) and medias ({m.size}) must have the same length"
        )
    if feats.shape[0] == 0:
        raise ValueError("template_features got no images")
    if not np.issubdtype(feats.dtype, np.floating):
        feats = feats.astype(np.float64)
    template_ids, t_inv = np.unique(t, return_inverse=True)
    _, m_inv = np.unique(m, return_inverse=True)
    # (template, media) groups; counts give each image its averaging weight.
    key = t_inv.astype(np.int64) * (int(m_inv.max()) + 1) + m_inv.astype(np.int64)
    _, k_inv, k_counts = np.unique(key, return_inverse=True, return_counts=True)
    # float32 features keep a float32 weight matrix so scipy does not copy the (possibly ~1 GB) feature array.
    wdtype = feats.dtype if feats.dtype in (np.float32, np.float64) else np.float64
    weights = (1.0 / k_counts[k_inv]).astype(wdtype)
    pool = sparse.csr_matrix(
        (weights, (t_inv, np.arange(t.size))), shape=(template_ids.size, t.size), dtype=wdtype
    )
    pooled = np.asarray(pool @ feats, dtype=np.float64)
    return template_ids, l2_normalize(pooled)


# ----------------------------------------------------------------------------------------------------------------
# 3. TAR@FAR (nearest ROC point)
# ----------------------------------------------------------------------------------------------------------------
def _check_binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.size != y.size:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) must have the same length")
    y = y.astype(bool) if y.dtype != bool else y
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"need both genuine and impostor pairs, got {n_pos} genuine of {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return s, y


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC identical to ``sklearn.metrics.roc_curve(labels, scores)`` with its default ``drop_intermediate=True``
    (the reference's call), computed without an argsort.

    Returns ``(fpr, tpr, thresholds)`` in sklearn's order (increasing fpr, thresholds starting at +inf).

    Why not call sklearn: it argsorts all scores (mergesort) and validates the inputs several times, ~6 s for the
    15.6 M IJB-C pairs on 2 cores. The ROC only needs, for each distinct score v in descending order, the counts of
    positives and of all pairs scoring >= v, and those do not depend on how ties are ordered. So: one plain sort of the
    scores, the group start of every positive found by ``searchsorted``, a suffix sum -- then sklearn's exact
    ``drop_intermediate`` rule (keep a point iff the second difference of fps or tps is non-zero, plus both ends)
    and the (0, 0) point. ``tests/test_metrics.py`` checks equality with sklearn, ties included.
    """
    s, y = _check_binary(scores, labels)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    s = s + s.dtype.type(0.0)  # -0.0 -> +0.0, which compare equal and must form one group
    n = s.size
    srt = np.sort(s)  # ascending
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(srt[1:], srt[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)  # ascending distinct values: index of each group's first element
    pos_start = np.searchsorted(srt, s[y], side="left")
    tp_suffix = np.cumsum(np.bincount(pos_start, minlength=n)[::-1])[::-1]  # positives with index >= i
    # Descending thresholds, cumulative counts of everything scoring >= the threshold (whole tie group included).
    starts = starts[::-1]
    tps = tp_suffix[starts].astype(np.float64)
    fps = (n - starts).astype(np.float64) - tps
    thr = srt[starts]
    if fps.shape[0] > 2:
        keep = np.concatenate([[True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True]])
        idx = np.flatnonzero(keep)
        fps, tps, thr = fps[idx], tps[idx], thr[idx]
    tps = np.concatenate([[0.0], tps])
    fps = np.concatenate([[0.0], fps])
    thr = np.concatenate([[np.inf], thr.astype(np.float64)])
    return fps / fps[-1], tps / tps[-1], thr


def tar_at_far_from_roc(
    fpr: np.ndarray, tpr: np.ndarray, fars: Iterable[float] = DEFAULT_FARS
) -> dict[float, float]:
    """Apply the reference's nearest-point rule to a ROC already computed by :func:`roc`.

    The arrays are flipped (fpr high -> low); for each target the point minimising ``|fpr - far|`` is taken, ties to
    the smallest flipped index (the larger TPR at equal FPR; the larger FPR between equidistant neighbours) --
    ``np.argmin`` returns the first minimum, which is exactly ``min(zip(|fpr - x|, index))``.
    """
    f = np.flipud(np.asarray(fpr))
    t = np.flipud(np.asarray(tpr))
    out: dict[float, float] = {}
    for far in fars:
        idx = int(np.argmin(np.abs(f - far)))
        out[float(far)] = float(t[idx] * 100.0)
    return out


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: Iterable[float] = DEFAULT_FARS
) -> dict[float, float]:
    """TAR (in percent, unrounded) at each FAR, by the ``eval_ijbc.py`` nearest-ROC-point rule.

    Consequences kept on purpose (they are what published tables used): the chosen point may have FPR > far, and a
    target below ``1 / N_impostor`` selects the FPR = 0 point (the best TPR before the first false accept).
    The reference prints ``'%.2f' % value``; round only for display.
    """
    fpr, tpr, _ = roc(scores, labels)
    return tar_at_far_from_roc(fpr, tpr, fars)


def threshold_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> dict[str, float]:
    """The decision threshold of a verifier that accepts "same" iff ``score >= threshold`` and falsely accepts at
    most a fraction ``far`` of the impostor pairs, with the highest TAR among such thresholds: the smallest score
    above the ``floor(far * impostors) + 1``-th highest impostor score (ties counted whole). Unlike
    :func:`tar_at_far`'s nearest ROC point it never lies above the asked FAR. Returns ``{"threshold", "far", "tar",
    "impostors", "genuines"}`` (``far``/``tar`` measured at the threshold, fractions). ValueError when ``far`` is
    below ``1 / impostors``, the smallest FAR the pairs can measure, or there are no genuine / impostor pairs."""
    s, y = _check_binary(scores, labels)
    s = s.astype(np.float64)
    neg, pos = np.sort(s[~y])[::-1], s[y]
    if not 0.0 < far <= 1.0:
        raise ValueError(f"far must be in (0, 1], got {far}")
    if far < 1.0 / neg.size:
        raise ValueError(f"FAR {far:g} is below 1/{neg.size}, the smallest FAR {neg.size} impostor pairs can measure")
    allowed = int(np.floor(far * neg.size + 1e-9))  # false accepts allowed (1e-9: 0.001 * 3000 is 2.9999999...)
    if allowed >= neg.size:
        threshold = float(s.min())  # every impostor may pass: accept everything
    else:
        above = s[s > neg[allowed]]
        threshold = float(above.min()) if above.size else float(np.nextafter(neg[allowed], np.inf))
    return {"threshold": threshold, "far": float(np.mean(neg >= threshold)), "tar": float(np.mean(pos >= threshold)),
            "impostors": int(neg.size), "genuines": int(pos.size)}


# ----------------------------------------------------------------------------------------------------------------
# 4. Identification (closed set ranks, open set TPIR@FPIR)
# ----------------------------------------------------------------------------------------------------------------
def _first_mate_position(
    probe_feats: np.ndarray, probe_labels: np.ndarray, gallery_feats: np.ndarray, gallery_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every probe: 0-based position of its first mate in the descending score order, best mate score,
    max score over the gallery, and whether it has any mate (positions of unmated probes are meaningless).

    Tie rule: the order is a *stable* descending sort in gallery order (the reference's ``argsort`` leaves exact ties
    implementation-defined; this makes them deterministic). The first mate in that order is the best-scoring mate
    with the smallest index, and its position is the number of non-mates scored higher, plus non-mates with equal
    score placed before it in gallery order.
    """
    p = np.asarray(probe_feats)
    g = np.asarray(gallery_feats)
    pl = np.asarray(probe_labels).reshape(-1)
    gl = np.asarray(gallery_labels).reshape(-1)
    if p.ndim != 2 or g.ndim != 2 or p.shape[1] != g.shape[1]:
        raise ValueError(f"probe_feats {p.shape} and gallery_feats {g.shape} must be [P, D] and [G, D]")
    if pl.size != p.shape[0] or gl.size != g.shape[0]:
        raise ValueError(
            f"labels must match rows: probe {pl.size} vs {p.shape[0]}, gallery {gl.size} vs {g.shape[0]}"
        )
    if g.shape[0] == 0 or p.shape[0] == 0:
        raise ValueError(f"empty probe ({p.shape[0]}) or gallery ({g.shape[0]}) set")
    n_p = p.shape[0]
    pos = np.zeros(n_p, dtype=np.int64)
    mate_score = np.full(n_p, -np.inf)
    max_score = np.zeros(n_p)
    has_mate = np.zeros(n_p, dtype=bool)
    gidx = np.arange(g.shape[0])
    for s in range(0, n_p, _PROBE_CHUNK):
        e = min(n_p, s + _PROBE_CHUNK)
        sim = p[s:e] @ g.T
        mates = pl[s:e, None] == gl[None, :]
        has_mate[s:e] = mates.any(axis=1)
        max_score[s:e] = sim.max(axis=1)
        masked = np.where(mates, sim, -np.inf)
        best_idx = np.argmax(masked, axis=1)  # first max: smallest-index best mate
        best = masked[np.arange(e - s), best_idx]
        mate_score[s:e] = best
        before = (sim > best[:, None]) | ((sim == best[:, None]) & (gidx[None, :] < best_idx[:, None]))
        pos[s:e] = np.count_nonzero(before & ~mates, axis=1)
    return pos, mate_score, max_score, has_mate


def identification_ranks(
    probe_feats: np.ndarray,
    probe_labels: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_labels: np.ndarray,
    ranks: Iterable[int] = (1, 5, 10),
) -> dict[int, float]:
    """Closed-set identification rate at each rank (CMC), as fractions keyed by rank.

    Scores are ``probe_feats @ gallery_feats.T`` (pass unit features for cosine). A probe succeeds at rank k when
    **any** of the k top-scored gallery items is a mate (same label), so probes may have several mates (TinyFace).
    Gallery items whose label matches no probe are distractors and only push mates down.

    Only probes with at least one mate are counted, as the reference ``DIR_FAR`` does (its closed-set mode keeps the
    "match" probes); a ValueError is raised if no probe has a mate. Exact score ties: see ``_first_mate_position``.
    """
    ranks = [int(r) for r in ranks]
    if any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    pos, _, _, has_mate = _first_mate_position(probe_feats, probe_labels, gallery_feats, gallery_labels)
    if not has_mate.any():
        raise ValueError("no probe has a mate in the gallery: closed-set ranks are undefined")
    pos = pos[has_mate]
    return {r: float(np.count_nonzero(pos < r)) / pos.size for r in ranks}


def fpir_threshold(nonmated_max_scores: np.ndarray, fpir: float, epsilon: float = 1e-8) -> float:
    """Threshold of the PFE/IJB-S rule: k = floor(n * fpir) (float product, like ``astype(int32)``); the k-th largest
    non-mated maximum, or ``max + epsilon`` when k = 0 (so that no non-mated probe is accepted).

    The epsilon is added in float64, as numpy < 2 did for a float32 scalar plus a Python float; in float32 it
    would vanish for scores near 1.
    """
    s = np.sort(np.asarray(nonmated_max_scores, dtype=np.float64).reshape(-1))[::-1]
    if s.size == 0:
        raise ValueError("no non-mated probes: FPIR thresholds are undefined")
    k = int(s.size * float(fpir))
    if k == 0:
        return float(s[0]) + epsilon
    return float(s[min(k, s.size) - 1])


def tpir_at_fpir(
    probe_feats: np.ndarray,
    probe_labels: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_labels: np.ndarray,
    fpirs: Iterable[float] = (0.01, 0.1),
) -> dict[float, float]:
    """Open-set TPIR at each FPIR for **one** gallery, IJB-S (PFE ``DIR_FAR``) rule, as fractions keyed by fpir.

    Probes whose label is not in the gallery are the non-mated probes; their maximum scores define the threshold
    (:func:`fpir_threshold`). TPIR = fraction of mated probes that are rank-1 correct **and** whose mate score is
    ``>= threshold``. IJB-S reports the mean over its two galleries; the caller averages.

    Raises ValueError when there are no mated or no non-mated probes (the reference asserts the latter).
    """
    pos, mate_score, max_score, has_mate = _first_mate_position(
        probe_feats, probe_labels, gallery_feats, gallery_labels
    )
    if not has_mate.any():
        raise ValueError("no mated probe (no probe label occurs in the gallery): TPIR is undefined")
    if has_mate.all():
        raise ValueError("no non-mated probe (every probe label occurs in the gallery): FPIR is undefined")
    nonmated_max = max_score[~has_mate]
    rank1 = pos[has_mate] == 0
    gt = mate_score[has_mate]
    out: dict[float, float] = {}
    for f in fpirs:
        thr = fpir_threshold(nonmated_max, f)
        out[float(f)] = float(np.count_nonzero(rank1 & (gt >= thr))) / rank1.size
    return out


# ----------------------------------------------------------------------------------------------------------------
# 5. Helpers for the benchmark CLIs (pair scoring, plain template means)
# ----------------------------------------------------------------------------------------------------------------
def pair_scores(
    template_ids: np.ndarray,
    template_feats: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    block: int = 1024,
) -> np.ndarray:
    """Cosine scores ``<f(t1[i]), f(t2[i])>`` of template pairs (features already unit-norm), float64.

    The reference gathers both features of every pair (15.6 M x 512 x 2 reads for IJB-C). When pairs are dense in
    (t1, t2) -- IJB pairs every gallery template with most probes -- it is much cheaper to multiply blocks of the
    unique t1 features with all unique t2 features (BLAS) and pick the needed entries. Both give the same dot
    products up to summation order (~1e-16). Raises ValueError naming the first template id with no feature.
    """
    ids = np.asarray(template_ids).reshape(-1)
    feats = np.asarray(template_feats, dtype=np.float64)
    a = np.asarray(t1).reshape(-1)
    b = np.asarray(t2).reshape(-1)
    if a.size != b.size:
        raise ValueError(f"t1 ({a.size}) and t2 ({b.size}) must have the same length")

    if ids.size == 0 or np.any(ids[1:] <= ids[:-1]):
        raise ValueError("template_ids must be non-empty, sorted and unique (as returned by template_features)")
    span = int(ids[-1]) - int(ids[0]) + 1 if np.issubdtype(ids.dtype, np.integer) else -1
    lut = None
    if 0 < span <= 4 * ids.size + 1_000_000:  # integer ids in a compact range: O(1) lookup instead of a search
        lut = np.full(span, -1, dtype=np.int64)
        lut[ids - ids[0]] = np.arange(ids.size)

    def rows(t: np.ndarray, which: str) -> np.ndarray:
        if lut is not None and np.issubdtype(t.dtype, np.integer):
            off = t.astype(np.int64) - int(ids[0])
            inside = (off >= 0) & (off < span)
            r = np.where(inside, lut[np.clip(off, 0, span - 1)], -1)
            bad = r < 0
        else:
            r = np.minimum(np.searchsorted(ids, t), ids.size - 1)
            bad = ids[r] != t
        if bad.any():
            raise ValueError(f"template {t[np.flatnonzero(bad)[0]]} ({which}) has no feature "
                             f"({int(bad.sum())} pairs affected)")
        return r

    def compact(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # unique rows + inverse via a presence table: O(n), no sort of the 15.6 M pair list
        present = np.zeros(ids.size, dtype=bool)
        present[r] = True
        u = np.flatnonzero(present)
        pos = np.cumsum(present) - 1
        return u, pos[r]

    r1, r2 = rows(a, "t1"), rows(b, "t2")
    u1, inv1 = compact(r1)
    u2, inv2 = compact(r2)
    out = np.empty(a.size, dtype=np.float64)
    if u1.size * u2.size <= 8 * max(a.size, 1):
        f2t = np.ascontiguousarray(feats[u2].T)
        for k in range(0, u1.size, block):
            sel = np.flatnonzero((inv1 >= k) & (inv1 < k + block))
            if sel.size == 0:
                continue
            sim = feats[u1[k : k + block]] @ f2t
            out[sel] = sim[inv1[sel] - k, inv2[sel]]
    else:
        step = 100_000
        for s in range(0, a.size, step):
            out[s : s + step] = np.einsum("ij,ij->i", feats[r1[s : s + step]], feats[r2[s : s + step]])
    return out


def group_mean(features: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean feature per group id in ``[0, n_groups)`` (float64); a group with no member is all zero."""
    from scipy import sparse

    f = np.asarray(features)
    g = np.asarray(groups, dtype=np.int64).reshape(-1)
    if g.size != f.shape[0]:
        raise ValueError(f"groups ({g.size}) and features ({f.shape[0]}) must have the same length")
    if g.size and (g.min() < 0 or g.max() >= n_groups):
        raise ValueError(f"group ids must be in [0, {n_groups}), got [{g.min()}, {g.max()}]")
    counts = np.bincount(g, minlength=n_groups)
    w = 1.0 / counts[g]
    m = sparse.csr_matrix((w, (g, np.arange(g.size))), shape=(n_groups, g.size))
    return np.asarray(m @ f.astype(np.float64, copy=False), dtype=np.float64).reshape(n_groups, f.shape[1])
