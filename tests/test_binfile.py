"""Verification .bin files: fixtures (protocol 5 and Python 2 style), round trip, bad input, unsafe pickles."""
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

from utils.binfile import BinFileError, load_bin, write_bin


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
