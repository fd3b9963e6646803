"""tools/pack_rec.py: image folder -> RecordIO."""
import cv2
import numpy as np
import pytest

from dataset import DataError, MXFaceDataset
from tools.pack_rec import main, pack_folder
from utils.recordio import IndexedRecordReader


def _folder(root, bad=None):
    rng = np.random.default_rng(0)
    for name, n in (("zed", 2), ("amy", 3), ("kim", 1)):
        (root / name).mkdir(parents=True)
        for j in range(n):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            cv2.imwrite(str(root / name / f"{j}.{'png' if j == 0 else 'jpg'}"), img)
    (root / "amy" / "notes.txt").write_text("ignored")
    return root


def test_pack_and_read_back(tmp_path, capsys):
    src = _folder(tmp_path / "src")
    assert main([str(src), str(tmp_path / "out"), "--workers", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "num_classes = 3" in last and "num_image = 6" in last
    ds = MXFaceDataset(tmp_path / "out", augment=False)
    assert ds.num_classes == 3 and ds.num_images == 6
    assert [ds.read_image(i)[1] for i in range(6)] == [0, 0, 0, 1, 2, 2]  # amy, kim, zed
    # JPEGs are stored untouched; PNGs re-encoded to JPEG
    r = IndexedRecordReader(tmp_path / "out/train.rec")
    assert r.read_unpacked(2)[2] == (src / "amy/1.jpg").read_bytes()
    assert r.read_unpacked(1)[2][:3] == b"\xff\xd8\xff"
    assert (tmp_path / "out/property").read_text().strip() == "3,112,112"
    # deterministic output whatever the worker count
    pack_folder(src, tmp_path / "out1", workers=1, progress=False)
    assert (tmp_path / "out1/train.rec").read_bytes() == (tmp_path / "out/train.rec").read_bytes()


def test_pack_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no identity sub-folders"):
        pack_folder(tmp_path / "empty", tmp_path / "o", progress=False)
    src = _folder(tmp_path / "src")
    (src / "kim" / "broken.jpg").write_bytes(b"\xff\xd8\xffnot really")
    with pytest.raises(DataError, match=r"kim/broken\.jpg: could not decode"):
        pack_folder(src, tmp_path / "o2", workers=2, progress=False)
    cv2.imwrite(str(src / "kim" / "broken.jpg"), np.zeros((50, 60, 3), np.uint8))
    with pytest.raises(DataError, match=r"broken\.jpg: image is 60x50"):
        pack_folder(src, tmp_path / "o3", workers=1, progress=False)
