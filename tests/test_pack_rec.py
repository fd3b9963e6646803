"""tools/pack_rec.py: image folder -> RecordIO."""
import cv2
import numpy as np
import pytest

from dataset import DataError, MXFaceDataset
from tools.pack_rec import main, pack_folder
from utils.cli import UsageError
from utils.data.recordio import IndexedRecordReader


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


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_repack_leaves_the_existing_pack_untouched(tmp_path):
    src = _folder(tmp_path / "src")
    out = tmp_path / "out"
    pack_folder(src, out, workers=1, progress=False)
    before = _snapshot(out)
    (src / "kim" / "9.jpg").write_bytes(b"")  # a 0-byte file (interrupted copy), sorted last
    with pytest.raises(DataError, match=r"kim/9\.jpg: could not decode image \(0 bytes\)"):
        pack_folder(src, out, workers=2, progress=False, overwrite=True)
    assert _snapshot(out) == before  # same files, same bytes, no temporary leftovers
    ds = MXFaceDataset(out, augment=False)
    assert ds.num_images == 6


def test_existing_pack_is_replaced_only_with_overwrite(tmp_path, capsys):
    src = _folder(tmp_path / "src")
    out = tmp_path / "out"
    pack_folder(src, out, workers=1, progress=False)
    before = _snapshot(out)
    cv2.imwrite(str(src / "kim" / "1.jpg"), np.zeros((112, 112, 3), np.uint8))
    with pytest.raises(FileExistsError, match=rf"{out} already holds a pack \(train\.rec, train\.idx, property\); "
                                              r"pass --overwrite"):
        pack_folder(src, out, workers=1, progress=False)
    with pytest.raises(UsageError, match="--overwrite"):
        main([str(src), str(out), "--workers", "1"])
    assert _snapshot(out) == before
    assert main([str(src), str(out), "--workers", "1", "--overwrite"]) == 0
    assert MXFaceDataset(out).num_images == 7 and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_skip_bad_lists_and_leaves_out_bad_images(tmp_path, capsys):
    src = _folder(tmp_path / "src")
    (src / "amy" / "5.jpg").write_bytes(b"\xff\xd8\xffnot really")
    (src / "kim" / "0.png").unlink()
    (src / "kim" / "0.jpg").write_bytes(b"")  # kim's only image: kim is dropped, zed becomes label 1
    assert main([str(src), str(tmp_path / "out"), "--workers", "2", "--skip-bad"]) == 0
    text = capsys.readouterr().out
    assert "amy/5.jpg: could not decode image" in text and "kim/0.jpg: could not decode image (0 bytes)" in text
    assert "skipped 2 bad image(s)" in text and "num_classes = 2 and num_image = 5" in text
    ds = MXFaceDataset(tmp_path / "out", augment=False)
    assert (ds.num_classes, ds.num_images) == (2, 5)
    assert [ds.read_image(i)[1] for i in range(5)] == [0, 0, 0, 1, 1]


def test_tilde_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _folder(tmp_path / "src")
    assert pack_folder("~/src", "~/out", workers=1, progress=False)[:2] == (3, 6)
    assert (tmp_path / "out" / "train.rec").is_file() and not (tmp_path / "~").exists()
