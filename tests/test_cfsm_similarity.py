"""Dataset similarity from style bases: constructed subspaces with known principal angles."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfsm.similarity import compare_bases, mu_offset, principal_angles, subspace_similarity


def _random_basis(rng: np.random.Generator, k: int = 10, d: int = 128) -> np.ndarray:
    return rng.standard_normal((k, d))


def _rotation(rng: np.random.Generator, k: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((k, k)))
    return q * np.sign(np.diag(r))


def test_identical_subspaces_score_one():
    u = _random_basis(np.random.default_rng(0))
    assert subspace_similarity(u, u) == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(principal_angles(u, u), 0.0, atol=1e-6)


def test_orthogonal_subspaces_score_zero():
    eye = np.eye(128)
    assert subspace_similarity(eye[:10], eye[10:20]) == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(principal_angles(eye[:10], eye[10:20]), np.pi / 2)


def test_invariant_to_rotation_and_scale_within_subspace():
    rng = np.random.default_rng(1)
    u, v = _random_basis(rng), _random_basis(rng)
    r = _rotation(rng, 10)
    # same row space: rotation/reflection of the style coordinates and non-orthonormal mixing
    assert subspace_similarity(u, r @ u) == pytest.approx(1.0, abs=1e-10)
    mix = r @ np.diag(rng.uniform(0.5, 3.0, 10))
    assert subspace_similarity(u, mix @ u) == pytest.approx(1.0, abs=1e-10)
    # and the score against another subspace does not change when one side is re-parameterised
    assert subspace_similarity(r @ u, v) == pytest.approx(subspace_similarity(u, v), abs=1e-10)


def test_known_angle_and_monotone():
    eye = np.eye(128)
    for theta in (0.1, 0.5, 1.0, 1.4):
        b = eye[:10].copy()
        b[0] = np.cos(theta) * eye[0] + np.sin(theta) * eye[50]  # one direction tilted by theta
        angles = principal_angles(eye[:10], b)
        assert angles.max() == pytest.approx(theta, abs=1e-9)
        assert subspace_similarity(eye[:10], b) == pytest.approx((9 + np.cos(theta) ** 2) / 10, abs=1e-12)


def test_random_subspaces_near_chance_level():
    rng = np.random.default_rng(2)
    scores = [subspace_similarity(_random_basis(rng), _random_basis(rng)) for _ in range(5)]
    assert 0.03 < np.mean(scores) < 0.15  # chance level k/d = 10/128


def test_compare_bases_matrix_symmetric_and_offset():
    rng = np.random.default_rng(3)
    u = _random_basis(rng)
    mu = rng.standard_normal(128)
    res = compare_bases({"a": (u, mu), "b": (_rotation(rng, 10) @ u, mu + 3 * np.eye(128)[0]),
                         "c": (_random_basis(rng), mu)})
    assert np.allclose(res.similarity, res.similarity.T)
    assert np.allclose(np.diag(res.similarity), 1.0)
    assert res.similarity[0, 1] == pytest.approx(1.0, abs=1e-10) and res.similarity[0, 2] < 0.3
    assert res.offset[0, 1] == pytest.approx(3.0) and res.offset[0, 2] == 0.0
    assert json.loads(json.dumps(res.as_dict()))["names"] == ["a", "b", "c"]


def test_bad_inputs_name_the_basis():
    rng = np.random.default_rng(4)
    u = _random_basis(rng)
    with pytest.raises(ValueError, match="gen_b"):
        principal_angles(u, _random_basis(rng, 10, 64), ("gen_a", "gen_b"))
    with pytest.raises(ValueError, match="rank deficient"):
        principal_angles(u, np.vstack([u[:9], u[:1]]))
    with pytest.raises(ValueError, match="shape"):
        principal_angles(u, np.zeros(128))
    with pytest.raises(ValueError, match="non-finite"):
        principal_angles(u, np.full((10, 128), np.nan))
    with pytest.raises(ValueError, match="mu_b"):
        mu_offset(np.zeros(128), np.zeros(64))


def test_tool_reads_files_and_writes_outputs(tmp_path, capsys):
    from tools import dataset_similarity

    rng = np.random.default_rng(5)
    u = _random_basis(rng)
    for name, basis in (("a", u), ("b", _rotation(rng, 10) @ u), ("c", _random_basis(rng))):
        state = {"pca.U": torch.tensor(basis, dtype=torch.float32), "pca.mu": torch.zeros(128)}
        torch.save({"G_state_dict": state}, tmp_path / f"{name}.pth")
    out = dataset_similarity.main([f"{n}={tmp_path / f'{n}.pth'}" for n in "abc"] + ["--out", str(tmp_path / "o")])
    assert out["similarity"][0][1] == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "o" / "similarity.png").stat().st_size > 1000
    assert json.loads((tmp_path / "o" / "similarity.json").read_text())["names"] == ["a", "b", "c"]
    assert "subspace similarity" in capsys.readouterr().out
    torch.save({"G_state_dict": {"pca.U": torch.zeros(10, 128)}}, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="pca.mu"):
        dataset_similarity.main([f"a={tmp_path / 'a.pth'}", f"bad={tmp_path / 'bad.pth'}"])
