"""RecordIO reader/writer: framing, multi-part records, MXNet-written fixtures, bad input."""
import hashlib
import json
import struct

import cv2
import numpy as np
import pytest

from utils.data.recordio import (
    MAGIC,
    IndexedRecordReader,
    IndexedRecordWriter,
    IRHeader,
    RecordIOError,
    pack_record,
    unpack_record,
    write_face_rec,
)

M = struct.pack("<I", MAGIC)
VARIANTS = ["jpeg_header_first", "png", "face2rec2_layout", "multipart"]


@pytest.fixture(scope="module")
def expected(fixtures_dir):
    return json.loads((fixtures_dir / "mxrec/expected.json").read_text())


def _variant_dir(fixtures_dir, expected, name):
    return fixtures_dir / "mxrec" / expected[name]["dir"]


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_framing_matches_documented_examples(tmp_path):
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    with IndexedRecordWriter(rec, idx) as w:
        w.write(7, b"ABCD" + M + b"xyz" + M + b"12345")
        w.write(3, M + b"tail!")
        w.write(5, b"")
    data = rec.read_bytes()
    # record 7: part cflag=1 len=4, then cflag=3 len=12 (second magic unaligned, kept), padded to 4
    assert data[:12] == M + struct.pack("<I", (1 << 29) | 4) + b"ABCD"
    assert data[12:20] == M + struct.pack("<I", (3 << 29) | 12)
    assert data[20:32] == b"xyz" + M + b"12345"
    # record 3: cflag=1 len=0, then cflag=3 len=5 + 3 pad bytes
    assert data[32:40] == M + struct.pack("<I", 1 << 29)
    assert data[40:48] == M + struct.pack("<I", (3 << 29) | 5)
    assert data[48:56] == b"tail!\0\0\0"
    assert data[56:] == M + struct.pack("<I", 0)
    assert idx.read_text() == "7\t0\n3\t32\n5\t56\n"


def test_round_trip_multipart_and_any_key_order(tmp_path):
    rng = np.random.default_rng(0)
    payloads = {
        10: b"",
        2: M,
        4: M * 3,
        0: b"x" + M + b"yyy" + M,  # unaligned then aligned
        9: bytes(rng.integers(0, 256, 1001, dtype=np.uint8)) + M + b"z",
    }
    for k in range(20, 40):
        body = bytearray(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 4))):
            pos = int(rng.integers(0, len(body) + 1))
            body[pos:pos] = M
        payloads[k] = bytes(body)
    rec, idx = tmp_path / "b.rec", tmp_path / "b.idx"
    order = list(payloads)
    rng.shuffle(order)
    with IndexedRecordWriter(rec, idx) as w:
        for k in order:
            w.write(k, payloads[k])
    r = IndexedRecordReader(rec, idx)
    assert r.keys.tolist() == order and len(r) == len(payloads)
    for k in reversed(order):
        assert r.read(k) == payloads[k], k


def test_pack_unpack_scalar_and_array_labels():
    p = pack_record(IRHeader(0, 3.0, 5, 0), b"body")
    h, labels, body = unpack_record(p)
    assert h.flag == 0 and labels.tolist() == [3.0] and body == b"body" and h.id == 5
    p = pack_record(IRHeader(0, 0.0, 1, 0), b"img", label_array=[2.0, 1.0])
    h, labels, body = unpack_record(p)
    assert h.flag == 2 and labels.dtype == np.float32 and labels.tolist() == [2.0, 1.0] and body == b"img"
    # MXNet-style: array label passed in the header itself
    assert pack_record(IRHeader(0, np.array([2.0, 1.0]), 1, 0), b"img") == p
    with pytest.raises(RecordIOError, match="shorter"):
        unpack_record(b"\0" * 10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mxnet_fixtures_labels_and_pixels(fixtures_dir, expected, variant):
    e = expected[variant]
    d = _variant_dir(fixtures_dir, expected, variant)
    r = IndexedRecordReader(d / e["rec_file"], d / e["idx_file"])
    assert [[k, r.offset(k)] for k in r.keys] == e["idx_lines_in_file_order"]
    h, labels, body = r.read_unpacked(0)
    assert h.flag == e["header_record"]["header"]["flag"]
    assert labels.tolist() == e["header_record"]["header"]["label"] and body == b""
    for ident in e["identity_records"]:
        h, labels, _ = r.read_unpacked(ident["index"])
        assert labels.tolist() == ident["header"]["label"]
    for im in e["images"]:
        h, labels, body = r.read_unpacked(im["index"])
        assert float(labels[0]) == im["label"]
        assert _md5(body) == im["image_bytes_md5"]
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert _md5(np.ascontiguousarray(rgb).tobytes()) == im["mx_imdecode_rgb_md5"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_writer_is_byte_identical_to_mxnet(fixtures_dir, expected, variant, tmp_path):
    e = expected[variant]
    d = _variant_dir(fixtures_dir, expected, variant)
    r = IndexedRecordReader(d / e["rec_file"], d / e["idx_file"])
    with IndexedRecordWriter(tmp_path / "x.rec", tmp_path / "x.idx") as w:
        for k in r.keys:
            w.write(k, r.read(k))
    assert _md5((tmp_path / "x.rec").read_bytes()) == e["rec_md5"]
    assert _md5((tmp_path / "x.idx").read_bytes()) == e["idx_md5"]


def test_write_face_rec_layout(tmp_path):
    samples = [(0, b"a"), (0, b"b"), (1, b"c"), (2, b"d" + M), (2, b"e")]
    n = write_face_rec(tmp_path, iter(samples), 3)
    assert n == 5 and (tmp_path / "property").read_text().strip() == "3,112,112"
    r = IndexedRecordReader(tmp_path / "train.rec", tmp_path / "train.idx")
    assert r.read_unpacked(0)[1].tolist() == [6.0, 9.0]
    assert [r.read_unpacked(k)[1].tolist() for k in (6, 7, 8)] == [[1, 3], [3, 4], [4, 6]]
    assert [(int(r.read_unpacked(k)[1][0]), r.read_unpacked(k)[2]) for k in range(1, 6)] == samples
    with pytest.raises(ValueError, match="label 0 after identity 1"):
        write_face_rec(tmp_path / "bad", iter([(0, b"a"), (1, b"b"), (0, b"c")]), 2)


# ---- bad input ------------------------------------------------------------------------------------------------


def _small_rec(tmp_path, payloads=(b"hello world", b"second")):
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with IndexedRecordWriter(rec, idx) as w:
        for k, p in enumerate(payloads):
            w.write(k, p)
    return rec, idx


def test_missing_files(tmp_path):
    rec, idx = _small_rec(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        IndexedRecordReader(rec, tmp_path / "nope.idx")
    with pytest.raises(FileNotFoundError, match="nope.rec"):
        IndexedRecordReader(tmp_path / "nope.rec", idx)


def test_bad_magic_names_file_and_key(tmp_path):
    rec, idx = _small_rec(tmp_path)
    data = bytearray(rec.read_bytes())
    off = int(idx.read_text().splitlines()[1].split("\t")[1])
    data[off] ^= 0xFF
    rec.write_bytes(bytes(data))
    r = IndexedRecordReader(rec, idx)
    assert r.read(0) == b"hello world"
    with pytest.raises(RecordIOError, match=r"t\.rec: key 1: bad magic"):
        r.read(1)


def test_truncated_record(tmp_path):
    rec, idx = _small_rec(tmp_path)
    rec.write_bytes(rec.read_bytes()[:-5])
    with pytest.raises(RecordIOError, match=r"t\.rec: key 1: truncated record"):
        IndexedRecordReader(rec, idx).read(1)


def test_idx_offset_past_eof(tmp_path):
    rec, idx = _small_rec(tmp_path)
    idx.write_text(idx.read_text() + "2\t99999\n")
    with pytest.raises(RecordIOError, match=r"t\.idx: key 2 offset 99999 is past the end"):
        IndexedRecordReader(rec, idx)


def test_malformed_idx_line(tmp_path):
    rec, idx = _small_rec(tmp_path)
    idx.write_text("0\t0\nbanana\n")
    with pytest.raises(RecordIOError, match=r"t\.idx: line 2"):
        IndexedRecordReader(rec, idx)


def test_reader_pickles_without_handle(tmp_path):
    import pickle

    rec, idx = _small_rec(tmp_path)
    r = IndexedRecordReader(rec, idx)
    r.read(0)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._fd is None and r2.read(1) == b"second"


# ---- the index at scale: numpy arrays, chunked parse, binary cache ---------------------------------------------------

import os  # noqa: E402
import tracemalloc  # noqa: E402

import utils.data.recordio as recordio  # noqa: E402


def _big_idx(tmp_path, n, keys=None):
    """A sparse .rec and a real .idx of n records spaced 64 bytes apart (offsets only; nothing is read)."""
    rec, idx = tmp_path / "big.rec", tmp_path / "big.idx"
    keys = np.arange(n) if keys is None else np.asarray(keys)
    idx.write_text("".join(f"{k}\t{64 * i}\n" for i, k in enumerate(keys.tolist())))
    with open(rec, "wb") as f:
        f.truncate(64 * n)
    return rec, idx


def test_index_is_numpy_without_per_record_objects(tmp_path):
    n = 200_000
    rec, idx = _big_idx(tmp_path, n)
    tracemalloc.start()
    try:
        r = IndexedRecordReader(rec, idx, index_cache=False)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a dict + list of Python ints costs > 100 bytes a record; int64 offsets are 8 (the dense layout keeps no keys)
    assert held < 16 * n, held
    assert isinstance(r.keys, np.ndarray) and r.keys.dtype == np.int64 and not r.keys.flags.writeable
    assert r.keys[-1] == n - 1 and len(r) == n and r.offset(n - 1) == 64 * (n - 1) and r.offset(np.int64(7)) == 448
    assert (n - 1) in r and n not in r and -1 not in r and "3" not in r
    with pytest.raises(KeyError, match=rf"big\.idx: no key {n}"):
        r.offset(n)


@pytest.mark.parametrize("layout", ["header_last", "sparse_keys", "shuffled", "shuffled_sparse"])
def test_index_lookup_in_any_key_order(tmp_path, layout):
    rng = np.random.default_rng(1)
    keys = {"header_last": np.r_[np.arange(1, 500), 0], "sparse_keys": np.arange(0, 1500, 3),
            "shuffled": rng.permutation(np.arange(-5, 495)),
            "shuffled_sparse": rng.permutation(np.arange(0, 1500, 3))}[layout]
    rec, idx = _big_idx(tmp_path, keys.size, keys)
    for cache in (False, True):
        r = IndexedRecordReader(rec, idx, index_cache=cache, cache_min_records=1)
        assert r.keys.tolist() == keys.tolist()
        for i in rng.permutation(keys.size)[:50].tolist():
            assert r.offset(int(keys[i])) == 64 * i
        assert 10_000 not in r


def test_chunked_parse_matches_line_by_line(tmp_path, monkeypatch):
    """Chunk edges, blank lines, CRLF, spaces and signs (the exact path) mixed with plain lines (the fast path)."""
    lines = [f"{k}\t{8 * k}" for k in range(300)]
    lines[17] = " 17  136 "
    lines[40] = "+40\t320\r"
    lines[41] = ""
    lines[200] = "200\t" + "0" * 25 + "1600"  # 29 digits: beyond the vectorised path's 18
    idx = tmp_path / "mix.idx"
    idx.write_text("\n".join(lines))  # no final newline
    rec = tmp_path / "mix.rec"
    rec.write_bytes(b"\0" * 4000)
    monkeypatch.setattr(recordio, "_IDX_CHUNK", 64)
    r = IndexedRecordReader(rec, idx, index_cache=False)
    expected = [k for k in range(300) if k != 41]
    assert r.keys.tolist() == expected and [r.offset(k) for k in expected] == [8 * k for k in expected]


def test_repeated_key_names_line_in_any_order(tmp_path, monkeypatch):
    rec, idx = _big_idx(tmp_path, 50, [*range(30), 5, *range(30, 49)])
    monkeypatch.setattr(recordio, "_IDX_CHUNK", 128)
    with pytest.raises(RecordIOError, match=r"big\.idx: key 5 appears twice \(line 31\)"):
        IndexedRecordReader(rec, idx)
    rec, idx = _big_idx(tmp_path, 4, [3, 1, 1, 0])  # spans exactly 4 values, but 2 is missing and 1 repeats
    with pytest.raises(RecordIOError, match=r"big\.idx: key 1 appears twice \(line 3\)"):
        IndexedRecordReader(rec, idx)


def test_idx_with_byte_order_mark_or_non_ascii(tmp_path):
    rec, idx = _small_rec(tmp_path)
    good = idx.read_bytes()
    idx.write_bytes(b"\xef\xbb\xbf" + good)  # saved by an editor as "UTF-8 with BOM"
    with pytest.raises(RecordIOError, match=r"t\.idx: line 1 starts with a UTF-8 byte-order mark"):
        IndexedRecordReader(rec, idx)
    idx.write_bytes(good + "2\t1\u00e9\n".encode())
    with pytest.raises(RecordIOError, match=r"t\.idx: line 3 holds the non-ASCII byte 0xC3"):
        IndexedRecordReader(rec, idx)


def test_negative_offset_and_long_line_messages_unchanged(tmp_path):
    rec, idx = _small_rec(tmp_path)
    idx.write_text("0\t0\n1\t-8\n")
    with pytest.raises(RecordIOError, match=r"t\.idx: key 1 has negative offset -8"):
        IndexedRecordReader(rec, idx)


def test_cache_is_written_atomically_used_and_validated(tmp_path, monkeypatch):
    rec, idx = _big_idx(tmp_path, 1000)
    cache = recordio.cache_path_for(idx)
    IndexedRecordReader(rec, idx, cache_min_records=10_000)
    assert not cache.exists()  # small indexes get no cache file
    IndexedRecordReader(rec, idx, cache_min_records=1)
    assert cache.is_file() and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    parses = []
    real_parse = recordio._parse_idx
    monkeypatch.setattr(recordio, "_parse_idx", lambda p: parses.append(p) or real_parse(p))
    r = IndexedRecordReader(rec, idx, cache_min_records=1)
    assert parses == [] and r.offset(999) == 64 * 999  # served by the cache

    # a stale cache: same size and mtime, other content (offsets doubled on one line)
    st = os.stat(idx)
    idx.write_text(idx.read_text().replace("1\t64\n", "1\t65\n", 1))
    os.utime(idx, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(idx).st_size == st.st_size
    r = IndexedRecordReader(rec, idx, cache_min_records=1)
    assert len(parses) == 1 and r.offset(1) == 65

    # a corrupt cache (one flipped payload byte) is never trusted; it is rebuilt
    data = bytearray(cache.read_bytes())
    data[-3] ^= 0x40
    cache.write_bytes(bytes(data))
    assert IndexedRecordReader(rec, idx, cache_min_records=1).offset(999) == 64 * 999 and len(parses) == 2
    assert IndexedRecordReader(rec, idx, cache_min_records=1).offset(998) == 64 * 998 and len(parses) == 2
    cache.write_bytes(b"CFSMIDX1")  # truncated
    assert IndexedRecordReader(rec, idx, cache_min_records=1).offset(5) == 320 and len(parses) == 3

    # a grown .idx: its errors are the parser's, not a stale cache's
    idx.write_text(idx.read_text() + "1000\t999999\n")
    with pytest.raises(RecordIOError, match=r"big\.idx: key 1000 offset 999999 is past the end"):
        IndexedRecordReader(rec, idx, cache_min_records=1)


def test_cache_in_read_only_folder_is_skipped(tmp_path, monkeypatch):
    rec, idx = _big_idx(tmp_path, 100)

    def refuse(*a, **k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(recordio.os, "replace", refuse)
    assert IndexedRecordReader(rec, idx, cache_min_records=1).offset(99) == 64 * 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.idx", "big.rec"]
