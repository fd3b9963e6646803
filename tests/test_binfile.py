"""Verification .bin files: fixtures (protocol 5 and Python 2 style), round trip, bad input, unsafe pickles."""
import hashlib
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

from utils.data.binfile import BinFileError, load_bin, write_bin


@pytest.fixture(scope="module")
def expected(fixtures_dir):
    return json.loads((fixtures_dir / "mxrec/expected.json").read_text())["tiny_ver"]


@pytest.mark.parametrize("name", ["tiny_ver.bin", "tiny_ver_py2.bin"])
def test_fixture_bins(fixtures_dir, expected, name):
    images, issame = load_bin(fixtures_dir / "mxrec" / name)
    assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8
    assert tuple(images.shape) == (40, 3, 112, 112)
    assert issame.dtype == np.bool_ and issame.tolist() == expected["issame_list"]
    for i, e in enumerate(expected["images"]):
        hwc = np.ascontiguousarray(images[i].permute(1, 2, 0).numpy())
        assert hashlib.md5(hwc.tobytes()).hexdigest() == e["mx_imdecode_rgb_md5"], i


def test_round_trip_arrays_and_bytes(tmp_path, fixtures_dir):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    write_bin(tmp_path / "a.bin", imgs, [True, False])
    images, issame = load_bin(tmp_path / "a.bin")
    assert issame.tolist() == [True, False] and images.shape == (4, 3, 112, 112)
    bins, _ = pickle.loads((fixtures_dir / "mxrec/tiny_ver.bin").read_bytes())
    write_bin(tmp_path / "b.bin", bins[:4], np.array([True, True]))
    ref, _ = load_bin(fixtures_dir / "mxrec/tiny_ver.bin")
    got, issame = load_bin(tmp_path / "b.bin")
    assert torch.equal(got, ref[:4]) and issame.tolist() == [True, True]


def test_numpy_bools_and_protocol2_bytes(tmp_path, fixtures_dir):
    bins, issame = pickle.loads((fixtures_dir / "mxrec/tiny_ver.bin").read_bytes())
    (tmp_path / "c.bin").write_bytes(pickle.dumps((bins, [np.bool_(x) for x in issame]), protocol=2))
    _, got = load_bin(tmp_path / "c.bin")
    assert got.tolist() == issame


def test_pair_count_mismatch(tmp_path, fixtures_dir):
    bins, issame = pickle.loads((fixtures_dir / "mxrec/tiny_ver.bin").read_bytes())
    (tmp_path / "d.bin").write_bytes(pickle.dumps((bins[:5], issame[:2])))
    with pytest.raises(BinFileError, match=r"d\.bin: 5 images but 2 pairs"):
        load_bin(tmp_path / "d.bin")
    with pytest.raises(BinFileError, match="3 images for 2 pairs"):
        write_bin(tmp_path / "e.bin", bins[:3], [True, False])


def test_missing_and_garbage(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_bin(tmp_path / "missing.bin")
    (tmp_path / "g.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(BinFileError, match=r"g\.bin"):
        load_bin(tmp_path / "g.bin")
    (tmp_path / "u.bin").write_bytes(pickle.dumps(([b"\x00garbage", b"x"], [True])))
    with pytest.raises(BinFileError, match=r"u\.bin: image 0 .* could not be decoded"):
        load_bin(tmp_path / "u.bin")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([_Exploit(marker), b"x"], [True])))
    with pytest.raises(BinFileError, match=r"evil\.bin: refused to unpickle: global '(posix|os)\.system'"):
        load_bin(tmp_path / "evil.bin")
    assert not marker.exists()
    # other classic gadgets
    (tmp_path / "evil2.bin").write_bytes(pickle.dumps((eval, [True])))
    with pytest.raises(BinFileError, match="builtins.eval"):
        load_bin(tmp_path / "evil2.bin")


@pytest.mark.parametrize("bad, position", [("False", 1), ("0", 0), (b"0", 1), (2, 0), (None, 1), (0.0, 0), (-1, 1)])
def test_issame_accepts_only_booleans(tmp_path, fixtures_dir, bad, position):
    """bool("False") is True: a blind conversion scores impostor pairs as genuine (100 %)."""
    bins, _ = pickle.loads((fixtures_dir / "mxrec/tiny_ver.bin").read_bytes())
    issame = [False, False]
    issame[position] = bad
    (tmp_path / "s.bin").write_bytes(pickle.dumps((bins[:4], issame), protocol=2))
    with pytest.raises(BinFileError, match=rf"s\.bin: issame_list\[{position}\] is {re.escape(repr(bad))}"):
        load_bin(tmp_path / "s.bin")
    with pytest.raises(BinFileError, match=rf"issame_list\[{position}\]"):
        write_bin(tmp_path / "w.bin", bins[:4], issame)
    assert not (tmp_path / "w.bin").exists()


def test_issame_integers_and_numpy_bools_are_accepted(tmp_path, fixtures_dir):
    bins, _ = pickle.loads((fixtures_dir / "mxrec/tiny_ver.bin").read_bytes())
    (tmp_path / "i.bin").write_bytes(pickle.dumps((bins[:8], [1, 0, np.bool_(True), np.int64(0)]), protocol=2))
    assert load_bin(tmp_path / "i.bin")[1].tolist() == [True, False, True, False]


def test_zero_length_image_is_named(tmp_path, fixtures_dir):
    bins, _ = pickle.loads((fixtures_dir / "mxrec/tiny_ver.bin").read_bytes())
    (tmp_path / "z.bin").write_bytes(pickle.dumps(([bins[0], b"", bins[2], bins[3]], [True, False])))
    with pytest.raises(BinFileError, match=r"z\.bin: image 1 \(0 bytes\) could not be decoded"):
        load_bin(tmp_path / "z.bin")


def test_tilde_in_bin_path_is_expanded(tmp_path, fixtures_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.bin").write_bytes((fixtures_dir / "mxrec/tiny_ver.bin").read_bytes())
    assert load_bin("~/t.bin")[1].size == 20


def test_eval_binfile_keeps_its_public_names():
    """The format moved to utils/data/binfile.py; `from eval.binfile import ...` gives the same objects."""
    import eval.binfile
    import utils.data.binfile

    for name in eval.binfile.__all__:
        assert getattr(eval.binfile, name) is getattr(utils.data.binfile, name), name
