"""MXNet indexed RecordIO (``.rec`` + ``.idx``) without MXNet.

Format facts live in ``../shared/docs/recordio_format.md``. The reader does random access by key with ``os.pread``
on a per-process file descriptor, so it never loads the whole file and is safe to use from forked DataLoader
workers. The writer produces byte-identical output to MXNet 1.9.1's ``MXIndexedRecordIO`` writer.
"""
from __future__ import annotations

import os
import struct
from collections import namedtuple
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "RecordIOError",
    "IRHeader",
    "MAGIC",
    "pack_record",
    "unpack_record",
    "IndexedRecordReader",
    "IndexedRecordWriter",
    "write_face_rec",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_FRAME = struct.Struct("<II")
_IR_FORMAT = "<IfQQ"
_IR_STRUCT = struct.Struct(_IR_FORMAT)
IR_SIZE = _IR_STRUCT.size  # 24

# cflag values of a physical record
_FULL, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3


class RecordIOError(ValueError):
    """Malformed or missing RecordIO data; the message names the file, key and offending value."""


IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "InsightFace/MXNet image record header: flag (label count), label (float), id, id2."


def pack_record(header: IRHeader, body: bytes, label_array: Sequence[float] | np.ndarray | None = None) -> bytes:
    """Serialise an IRHeader (+ optional label array) and a body into one record payload.

    A label array (``label_array``, or a non-scalar ``header.label`` as MXNet's ``pack`` accepts) sets ``flag`` to its
    length and is written as float32 after the header; otherwise the scalar ``header.label`` is stored with flag 0.
    """
    flag, label, id_, id2 = header
    if label_array is None and np.ndim(label) > 0:
        label_array = label
    if label_array is not None:
        arr = np.asarray(label_array, dtype=np.float32).reshape(-1)
        head = _IR_STRUCT.pack(arr.size, 0.0, int(id_), int(id2))
        return head + arr.tobytes() + bytes(body)
    return _IR_STRUCT.pack(int(flag), float(label), int(id_), int(id2)) + bytes(body)


def unpack_record(payload: bytes, where: str = "record") -> tuple[IRHeader, np.ndarray, bytes]:
    """Split a payload into ``(IRHeader, labels float32 array, body bytes)``.

    ``labels`` has one element (the header float) when ``flag == 0``, else the ``flag`` label values. ``where`` is
    used in error messages (e.g. ``"train.rec key 17"``).
    """
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"{where}: payload of {len(payload)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = _IR_STRUCT.unpack_from(payload, 0)
    if flag == 0:
        labels = np.array([label], dtype=np.float32)
        body_start = IR_SIZE
    else:
        body_start = IR_SIZE + 4 * flag
        if len(payload) < body_start:
            raise RecordIOError(
                f"{where}: IRHeader flag={flag} needs {body_start} bytes of header+labels, payload has {len(payload)}"
            )
        labels = np.frombuffer(payload, dtype=np.float32, count=flag, offset=IR_SIZE).copy()
    return IRHeader(flag, label, id_, id2), labels, bytes(payload[body_start:])


def _parse_idx(idx_path: Path) -> tuple[list[int], dict[int, int]]:
    """Read ``key\\toffset`` lines; returns keys in file order and a key -> offset dict."""
    keys: list[int] = []
    offsets: dict[int, int] = {}
    with open(idx_path, "r", encoding="ascii", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                key, off = int(parts[0]), int(parts[1])
            except ValueError:
                raise RecordIOError(f"{idx_path}: line {lineno} is not '<key>\\t<offset>': {line.rstrip()!r}") from None
            if off < 0:
                raise RecordIOError(f"{idx_path}: key {key} has negative offset {off}")
            if key in offsets:
                raise RecordIOError(f"{idx_path}: key {key} appears twice (line {lineno})")
            keys.append(key)
            offsets[key] = off
    return keys, offsets


class IndexedRecordReader:
    """Random access to an MXNet indexed RecordIO pair by integer key.

    The ``.idx`` is parsed eagerly (small); the ``.rec`` is opened lazily per process id, so an instance created
    before ``fork`` (DataLoader workers) opens its own descriptor in each worker. Reads use ``os.pread`` which has no
    shared file position.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        for p in (self.rec_path, self.idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"RecordIO file not found: {p}")
        self._keys, self._offsets = _parse_idx(self.idx_path)
        self._size = self.rec_path.stat().st_size
        for key, off in self._offsets.items():
            # +8: every record has at least its magic + lrec words
            if off + 8 > self._size:
                raise RecordIOError(
                    f"{self.idx_path}: key {key} offset {off} is past the end of {self.rec_path} ({self._size} bytes)"
                )
        self._fd: int | None = None
        self._pid: int | None = None

    # -- pickling / fork safety -------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        return state

    def _handle(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            # A descriptor inherited through fork belongs to the parent; open our own (never close the parent's).
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = pid
        return self._fd

    def close(self) -> None:
        """Close this process's descriptor (a later read reopens it)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._pid = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- access ---------------------------------------------------------------------------------------------------
    @property
    def keys(self) -> list[int]:
        """Keys in ``.idx`` file order."""
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: int) -> bool:
        return key in self._offsets

    def offset(self, key: int) -> int:
        """Byte offset of ``key``'s first physical record."""
        try:
            return self._offsets[key]
        except KeyError:
            raise KeyError(f"{self.idx_path}: no key {key!r}") from None

    def read(self, key: int) -> bytes:
        """Return the logical record payload stored under ``key`` (parts joined, magic re-inserted)."""
        fd = self._handle()
        pos = self.offset(key)
        chunks: list[bytes] = []
        part = 0
        while True:
            head = os.pread(fd, 8, pos)
            if len(head) < 8:
                raise RecordIOError(
                    f"{self.rec_path}: key {key}: truncated record header at offset {pos} (file ends at {self._size})"
                )
            magic, lrec = _FRAME.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: key {key}: bad magic 0x{magic:08X} at offset {pos} (expected 0x{MAGIC:08X})"
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if (part == 0 and cflag not in (_FULL, _FIRST)) or (part > 0 and cflag not in (_MIDDLE, _LAST)):
                raise RecordIOError(
                    f"{self.rec_path}: key {key}: unexpected part flag cflag={cflag} at offset {pos} (part {part})"
                )
            data = os.pread(fd, length, pos + 8) if length else b""
            if len(data) < length:
                raise RecordIOError(
                    f"{self.rec_path}: key {key}: truncated record at offset {pos}: length {length}, "
                    f"only {len(data)} bytes left"
                )
            if cflag == _FULL:
                return data
            if part > 0:
                chunks.append(_MAGIC_BYTES)
            chunks.append(data)
            if cflag == _LAST:
                return b"".join(chunks)
            pos += 8 + ((length + 3) & ~3)
            part += 1

    def read_unpacked(self, key: int) -> tuple[IRHeader, np.ndarray, bytes]:
        """``unpack_record(self.read(key))`` with the file and key in any error message."""
        return unpack_record(self.read(key), where=f"{self.rec_path} key {key}")


class IndexedRecordWriter:
    """Write an indexed RecordIO pair, byte-compatible with MXNet's ``MXIndexedRecordIO(..., 'w')``.

    Use as a context manager; ``write(key, payload)`` appends a record and its ``.idx`` line.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")
        self._pos = 0
        self._keys: set[int] = set()

    def __enter__(self) -> "IndexedRecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._rec.closed:
            self._rec.close()
        if not self._idx.closed:
            self._idx.close()

    def write(self, key: int, payload: bytes) -> None:
        """Append ``payload`` under integer ``key``; aligned magic words in it split the record into parts."""
        key = int(key)
        if key in self._keys:
            raise RecordIOError(f"{self.idx_path}: key {key} written twice")
        if len(payload) > _LEN_MASK:
            raise RecordIOError(f"{self.rec_path}: key {key}: record of {len(payload)} bytes exceeds 2**29 - 1")
        self._keys.add(key)
        self._idx.write(f"{key}\t{self._pos}\n")
        self._pos += self._write_framed(payload)

    def _write_framed(self, payload: bytes) -> int:
        out = []
        n = len(payload)
        start = 0
        # Same rule as MXNet: a magic word at a 4-byte aligned offset is cut out and ends a part.
        i = payload.find(_MAGIC_BYTES)
        while i != -1:
            if i % 4 == 0:
                cflag = _FIRST if start == 0 else _MIDDLE
                out.append(_FRAME.pack(MAGIC, (cflag << 29) | (i - start)))
                out.append(payload[start:i])  # i - start is a multiple of 4: no padding needed
                start = i + 4
                i = payload.find(_MAGIC_BYTES, start)
            else:
                i = payload.find(_MAGIC_BYTES, i + 1)
        cflag = _LAST if start else _FULL
        out.append(_FRAME.pack(MAGIC, (cflag << 29) | (n - start)))
        out.append(payload[start:])
        pad = (4 - (n - start) % 4) % 4
        if pad:
            out.append(b"\0" * pad)
        blob = b"".join(out)
        self._rec.write(blob)
        return len(blob)


def write_face_rec(
    out_dir: str | os.PathLike,
    samples: Iterable[tuple[int, bytes]],
    num_classes: int,
    image_size: tuple[int, int] = (112, 112),
) -> int:
    """Write an InsightFace ``train.rec``/``train.idx``/``property`` from ``(label, encoded_image)`` samples.

    Samples must come grouped by label in increasing order (0..num_classes-1, every class present). Layout: header
    record 0 (flag 2, ``[num_images + 1, num_images + 1 + num_classes]``), images ``1..num_images``, then one identity
    record per class with ``[first_key, end_key)``. Returns the number of images.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path = out / "train.rec", out / "train.idx"
    starts: list[int] = []  # first image key of each identity
    key = 1
    with IndexedRecordWriter(rec_path, idx_path) as w:
        # The header needs the image count, unknown while streaming: write a placeholder of the same size
        # (flag 2 => 24 + 8 bytes, no magic inside) and patch it in place at the end, keeping the header-first layout.
        w.write(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", label_array=[0.0, 0.0]))
        for label, body in samples:
            label = int(label)
            if label == len(starts):
                starts.append(key)
            elif label != len(starts) - 1:
                raise ValueError(
                    f"{rec_path}: image {key} has label {label} after identity {len(starts) - 1}; labels must be "
                    f"grouped and consecutive from 0 (num_classes={num_classes})"
                )
            w.write(key, pack_record(IRHeader(0, float(label), key, 0), body))
            key += 1
        if len(starts) != num_classes:
            raise ValueError(f"{rec_path}: got images for {len(starts)} identities, num_classes={num_classes}")
        ends = starts[1:] + [key]
        for cls, (a, b) in enumerate(zip(starts, ends)):
            w.write(key + cls, pack_record(IRHeader(0, 0.0, key + cls, 0), b"", label_array=[a, b]))
    header = pack_record(IRHeader(0, 0.0, 0, 0), b"", label_array=[key, key + num_classes])
    with open(rec_path, "r+b") as f:
        f.seek(8)
        f.write(header)
    (out / "property").write_text(f"{num_classes},{image_size[0]},{image_size[1]}\n")
    return key - 1
