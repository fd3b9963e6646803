"""MXNet indexed RecordIO (``.rec`` + ``.idx``) without MXNet.

Format facts live in ``docs/recordio_format.md``. The reader does random access by key with ``os.pread``
on a per-process file descriptor, so it never loads the whole file and is safe to use from forked DataLoader
workers. The writer produces byte-identical output to MXNet 1.9.1's ``MXIndexedRecordIO`` writer.
"""
from __future__ import annotations

import os
import struct
import sys
import uuid
import zlib
from collections import namedtuple
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from utils.errors import UserError

__all__ = [
    "RecordIOError",
    "IRHeader",
    "MAGIC",
    "pack_record",
    "unpack_record",
    "IdxIndex",
    "load_idx",
    "cache_path_for",
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


class RecordIOError(UserError, ValueError):
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


# ---- the .idx index: numpy arrays, parsed in vectorised chunks, optionally cached beside the .idx ----------------

_IDX_CHUNK = 1 << 22  # bytes parsed per vectorised step: bounds the temporary arrays to a few tens of MB
_MAX_FAST_DIGITS = 18  # longer numbers (or signs, spaces, blank lines) take the exact line-by-line path
CACHE_SUFFIX = ".npcache"  # the binary cache is "<idx file name>.npcache" in the .idx's folder
CACHE_MIN_RECORDS = 1_000_000  # smaller indexes parse in well under a second: no cache file is written for them
_CACHE_MAGIC = b"CFSMIDX1"
# magic, records, key_base (_NO_KEY_BASE: keys stored), .idx size, .idx mtime_ns, .idx head/tail crc32,
# payload crc32, payload bytes; the payload is the offsets, then the keys when stored (little-endian int64)
_CACHE_HEAD = struct.Struct("<8sQqQQIIQ")
_NO_KEY_BASE = -(1 << 63)
_UTF8_BOM = b"\xef\xbb\xbf"


class IdxIndex:
    """Keys and offsets of a ``.idx`` as int64 numpy arrays (no per-record Python objects).

    Arrays are shared copy-on-write with forked DataLoader workers; reading them never touches per-record refcounts,
    so workers do not grow. The common InsightFace layout (keys ``k0, k0+1, ...`` in file order) keeps only the offsets
    and looks a key up by subtraction; a contiguous key range in another order (face2rec2 writes the header last)
    adds an int32 key -> position table; other layouts keep the keys sorted for ``searchsorted``.
    """

    def __init__(self, idx_path: Path, keys: np.ndarray | None, offsets: np.ndarray, key_base: int | None) -> None:
        self.idx_path = idx_path
        self.offsets = offsets  # file order
        self.key_base = key_base  # dense layout: keys == key_base + arange(n), no key array kept
        self._pos_of_key: np.ndarray | None = None  # contiguous keys in another order: position of key_base + i
        self._sorted_keys: np.ndarray | None = None  # other layouts: keys ascending ...
        self._sorted_pos: np.ndarray | None = None  # ... and their file positions (None when file order is sorted)
        if keys is None:
            return
        if bool(np.all(keys[1:] > keys[:-1])):
            self._sorted_keys = keys  # already ascending and unique: the file order is the lookup order
            return
        lo, n = int(keys.min()), keys.size
        if int(keys.max()) - lo == n - 1 and n < (1 << 31):
            table = np.full(n, -1, dtype=np.int32)
            table[keys - lo] = np.arange(n, dtype=np.int32)
            if int(table.min()) >= 0:  # n keys filled n slots: no key repeats
                self.key_base, self._pos_of_key = lo, table
                return
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        repeats = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if repeats.size:
            # The repeat that comes first in file order, as the line-by-line reader reported it.
            pos = int(order[1:][repeats].min())
            raise RecordIOError(
                f"{idx_path}: key {int(keys[pos])} appears twice (line {_line_of_record(idx_path, pos)})"
            )
        self._sorted_keys = sorted_keys
        self._sorted_pos = order.astype(np.int32) if keys.size < (1 << 31) else order

    def __len__(self) -> int:
        return int(self.offsets.size)

    @property
    def keys(self) -> np.ndarray:
        """Keys in file order (a read-only int64 array)."""
        if self._pos_of_key is not None:
            out = np.empty(self.offsets.size, dtype=np.int64)
            out[self._pos_of_key] = np.arange(self.key_base, self.key_base + self.offsets.size, dtype=np.int64)
        elif self.key_base is not None:
            out = np.arange(self.key_base, self.key_base + self.offsets.size, dtype=np.int64)
        elif self._sorted_pos is None:
            out = self._sorted_keys.view()
        else:
            out = np.empty_like(self._sorted_keys)
            out[self._sorted_pos] = self._sorted_keys
        out.flags.writeable = False
        return out

    def count_in_range(self, lo: int, hi: int) -> int:
        """How many indexed keys lie in ``[lo, hi)``."""
        if hi <= lo:
            return 0
        if self.key_base is not None:
            return max(0, min(hi, self.key_base + self.offsets.size) - max(lo, self.key_base))
        return int(np.searchsorted(self._sorted_keys, hi) - np.searchsorted(self._sorted_keys, lo))

    def position(self, key) -> int:
        """File-order position of ``key``, or -1 when it is not indexed."""
        try:
            k = int(key)
        except (TypeError, ValueError):
            return -1
        if k != key:
            return -1
        if self.key_base is not None:
            i = k - self.key_base
            if not 0 <= i < self.offsets.size:
                return -1
            return i if self._pos_of_key is None else int(self._pos_of_key[i])
        sk = self._sorted_keys
        i = int(np.searchsorted(sk, k))
        if i >= sk.size or int(sk[i]) != k:
            return -1
        return i if self._sorted_pos is None else int(self._sorted_pos[i])


def _line_of_record(idx_path: Path, record: int) -> int:
    """1-based line number of the ``record``-th non-blank line (only used to word an error)."""
    with open(idx_path, "rb") as f:
        seen = -1
        for lineno, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == record:
                    return lineno
    return -1


def _parse_chunk_fast(chunk: bytes, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Parse whole ``<digits>\t<digits>\n`` lines vectorised; ``None`` when the chunk needs the exact path."""
    if buf.size == 0 or int(buf.max()) > ord("9"):
        return None
    # Every byte is now a digit, a separator, or another byte below '0': find the bytes below '0'. The plain format
    # has them alternating tab, newline, tab, newline, ..., never adjacent nor first (no empty field), and ending
    # the chunk.
    sep = np.flatnonzero(buf < ord("0"))
    if sep.size % 2 or sep.size == 0 or int(sep[-1]) != buf.size - 1 or int(sep[0]) == 0:
        return None
    if not (bool(np.all(buf[sep[0::2]] == 9)) and bool(np.all(buf[sep[1::2]] == 10))):
        return None
    field_len = np.diff(sep) - 1
    if field_len.size and (int(field_len.min()) < 1 or int(field_len.max()) > _MAX_FAST_DIGITS):
        return None
    if int(sep[0]) > _MAX_FAST_DIGITS:
        return None
    # Known to be "digits tab digits newline" lines, so a whitespace-separated C parse yields key, offset, ...
    values = np.fromstring(chunk, dtype=np.int64, sep=" ")
    if values.size != sep.size:
        return None
    pairs = values.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]  # strided views: _parse_idx copies them into its output arrays


def _parse_chunk_exact(idx_path: Path, text: bytes, first_line: int) -> tuple[np.ndarray, np.ndarray]:
    """Line-by-line parse (blank lines, spaces, signs, long numbers) with the reader's historical messages."""
    keys: list[int] = []
    offsets: list[int] = []
    for lineno, raw in enumerate(text.split(b"\n"), first_line):
        line = raw.decode("ascii")  # non-ASCII bytes were refused before
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
        if not -(1 << 63) <= key < (1 << 63) or off >= (1 << 63):
            raise RecordIOError(f"{idx_path}: line {lineno}: key or offset does not fit in 64 bits: {line.rstrip()!r}")
        keys.append(key)
        offsets.append(off)
    return np.array(keys, dtype=np.int64), np.array(offsets, dtype=np.int64)


def _refuse_non_ascii(idx_path: Path, buf: np.ndarray, first_line: int, at_file_start: bool) -> None:
    if buf.size == 0 or int(buf.max()) < 0x80:
        return
    bad = np.flatnonzero(buf >= 0x80)
    if not bad.size:
        return
    pos = int(bad[0])
    lineno = first_line + int(np.count_nonzero(buf[:pos] == 10))
    if at_file_start and pos == 0 and bytes(buf[:3]) == _UTF8_BOM:
        raise RecordIOError(
            f"{idx_path}: line 1 starts with a UTF-8 byte-order mark (the file was saved by a text editor); a .idx is "
            f"plain ASCII '<key>\\t<offset>' lines: remove the first 3 bytes or regenerate the .idx"
        )
    raise RecordIOError(
        f"{idx_path}: line {lineno} holds the non-ASCII byte 0x{int(buf[pos]):02X}; a .idx is plain ASCII "
        f"'<key>\\t<offset>' lines: regenerate it (tools/pack_rec.py) or fix that line"
    )


def _parse_idx(idx_path: Path) -> tuple[np.ndarray | None, np.ndarray, int | None]:
    """Read ``key\\toffset`` lines in bounded chunks of whole lines: ``(keys, offsets, key_base)``, file order.

    While the keys run ``k0, k0+1, ...`` (the InsightFace layout) they are not stored at all: ``keys`` is None and
    ``key_base`` is ``k0``; otherwise ``keys`` is an int64 array and ``key_base`` None. Results go straight into
    arrays sized from the first chunk's line density (pages past the end are never touched, so never resident).
    """
    keys_out: np.ndarray | None = None  # None while the keys are consecutive
    offs_out = np.empty(0, np.int64)
    key_base: int | None = None
    n = 0
    line_base = 1
    at_file_start = True
    with open(idx_path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        while True:
            chunk = f.read(_IDX_CHUNK)
            if not chunk:
                break
            if not chunk.endswith(b"\n"):
                chunk += f.readline()  # finish the chunk's last line
                if not chunk.endswith(b"\n"):  # the file's last line has no newline
                    chunk += b"\n"
            buf = np.frombuffer(chunk, dtype=np.uint8)
            _refuse_non_ascii(idx_path, buf, line_base, at_file_start)
            parsed = _parse_chunk_fast(chunk, buf)
            fast = parsed is not None
            if parsed is None:
                parsed = _parse_chunk_exact(idx_path, chunk[:-1], line_base)
            keys, count = parsed[0], parsed[0].size
            if n + count > offs_out.size:
                # First chunk: lines per byte so far x file size, +5 %; later (longer lines than guessed): x1.5.
                guess = int(file_size * count / max(len(chunk), 1) * 1.05) + 16 if n == 0 else int(offs_out.size * 1.5)
                capacity = max(guess, n + count)
                offs_out = _grown(offs_out, n, capacity)
                if keys_out is not None:
                    keys_out = _grown(keys_out, n, capacity)
            if count and n == 0 and keys_out is None:
                key_base = int(keys[0])
            if keys_out is None and count and not (
                int(keys[0]) == key_base + n and int(keys[-1]) == key_base + n + count - 1
                and bool(np.all(keys[1:] > keys[:-1]))
            ):
                keys_out = np.empty(offs_out.size, dtype=np.int64)  # not consecutive: store keys from here on
                keys_out[:n] = np.arange(key_base, key_base + n, dtype=np.int64)
            if keys_out is not None:
                keys_out[n:n + count] = keys
            offs_out[n:n + count] = parsed[1]
            n += count
            line_base += parsed[0].size if fast else int(np.count_nonzero(buf == 10))
            at_file_start = False
    if keys_out is None and n:
        return None, offs_out[:n], key_base
    return (np.empty(0, np.int64) if keys_out is None else keys_out[:n]), offs_out[:n], None


def _grown(array: np.ndarray, used: int, capacity: int) -> np.ndarray:
    out = np.empty(capacity, dtype=np.int64)
    out[:used] = array[:used]
    return out


def _idx_fingerprint(idx_path: Path) -> tuple[int, int, int]:
    """(size, mtime_ns, crc32 of the first and last 64 KiB): what a cache must match to be used."""
    st = os.stat(idx_path)
    with open(idx_path, "rb") as f:
        crc = zlib.crc32(f.read(1 << 16))
        if st.st_size > 1 << 16:
            f.seek(max(st.st_size - (1 << 16), 1 << 16))
            crc = zlib.crc32(f.read(), crc)
    return st.st_size, st.st_mtime_ns, crc


def cache_path_for(idx_path: str | os.PathLike) -> Path:
    """Where the binary cache of ``idx_path`` lives: beside it, named ``<idx name>.npcache``."""
    p = Path(idx_path)
    return p.with_name(p.name + CACHE_SUFFIX)


def _read_cache(cache: Path, fingerprint: tuple[int, int, int]) -> tuple[np.ndarray | None, np.ndarray, int] | None:
    """``(keys or None, offsets, key_base)`` from a cache that matches ``fingerprint`` and its checksum, else None."""
    try:
        with open(cache, "rb") as f:
            head = f.read(_CACHE_HEAD.size)
            if len(head) != _CACHE_HEAD.size:
                return None
            magic, n, key_base, size, mtime_ns, head_crc, payload_crc, nbytes = _CACHE_HEAD.unpack(head)
            dense = key_base != _NO_KEY_BASE
            if (magic != _CACHE_MAGIC or (size, mtime_ns, head_crc) != fingerprint
                    or nbytes != 8 * n * (1 if dense else 2) or os.fstat(f.fileno()).st_size != len(head) + nbytes):
                return None
            # Offsets and keys in two arrays of their own, so that dropping the keys (dense or re-sorted layouts)
            # frees them; the checksum runs over both as written.
            offsets = np.empty(n, dtype=np.int64)
            keys = None if dense else np.empty(n, dtype=np.int64)
            crc = 0
            for part in (offsets, keys):
                if part is None:
                    continue
                view = memoryview(part).cast("B")
                if f.readinto(view) != view.nbytes:
                    return None
                crc = zlib.crc32(view, crc)
            if f.read(1):
                return None
    except OSError:
        return None
    if crc != payload_crc:
        return None  # corrupt: never trusted
    return keys, offsets, key_base


def _write_cache(cache: Path, fingerprint: tuple[int, int, int], keys: np.ndarray | None, offsets: np.ndarray,
                 key_base: int) -> None:
    """Write the cache atomically (temporary file in the same folder, then rename); failures are ignored."""
    parts = [memoryview(np.ascontiguousarray(a, dtype="<i8")).cast("B") for a in (offsets, keys) if a is not None]
    crc = 0
    for view in parts:
        crc = zlib.crc32(view, crc)
    head = _CACHE_HEAD.pack(_CACHE_MAGIC, offsets.size, key_base if keys is None else _NO_KEY_BASE, *fingerprint,
                            crc, sum(v.nbytes for v in parts))
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for view in parts:
                f.write(view)
        os.replace(tmp, cache)
    except OSError:  # read-only dataset folder, disk full, ...: the cache is an optimisation only
        try:
            tmp.unlink()
        except OSError:
            pass


def load_idx(idx_path: str | os.PathLike, cache: bool = True, cache_min_records: int = CACHE_MIN_RECORDS) -> IdxIndex:
    """Load a ``.idx`` into an :class:`IdxIndex`.

    With ``cache``, a valid ``<idx>.npcache`` beside the file is used instead of parsing, and a parsed index of at
    least ``cache_min_records`` records is saved there (atomically; skipped silently where the folder is read-only).
    A cache is used only when the ``.idx`` size, mtime and a checksum of its first and last 64 KiB match, and its own
    checksum is intact; anything else is re-parsed from the ``.idx`` (and the cache rewritten).
    """
    idx_path = Path(idx_path)
    cache = cache and sys.byteorder == "little"  # the cache holds little-endian int64
    cache_file = cache_path_for(idx_path)
    fingerprint = _idx_fingerprint(idx_path) if cache else None
    if cache and cache_file.is_file():
        hit = _read_cache(cache_file, fingerprint)
        if hit is not None:
            keys, offsets, key_base = hit
            return IdxIndex(idx_path, keys, offsets, None if keys is not None else key_base)
    keys, offsets, key_base = _parse_idx(idx_path)
    dense = keys is None
    index = IdxIndex(idx_path, keys, offsets, key_base)  # raises on repeated keys
    if cache and offsets.size >= cache_min_records and _idx_fingerprint(idx_path) == fingerprint:
        _write_cache(cache_file, fingerprint, None if dense else keys, offsets, key_base if dense else _NO_KEY_BASE)
    return index


class IndexedRecordReader:
    """Random access to an MXNet indexed RecordIO pair by integer key.

    The ``.idx`` is loaded eagerly into numpy arrays (see :func:`load_idx`; ~50 MB for MS1MV2, shared copy-on-write
    with forked workers); the ``.rec`` is opened lazily per process id, so an instance created
    before ``fork`` (DataLoader workers) opens its own descriptor in each worker. Reads use ``os.pread`` which has no
    shared file position.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 index_cache: bool = True, cache_min_records: int = CACHE_MIN_RECORDS) -> None:
        self.rec_path = Path(os.path.expanduser(rec_path))
        self.idx_path = (Path(os.path.expanduser(idx_path)) if idx_path is not None
                         else self.rec_path.with_suffix(".idx"))
        for p in (self.rec_path, self.idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"RecordIO file not found: {p}")
        self._index = load_idx(self.idx_path, cache=index_cache, cache_min_records=cache_min_records)
        self._size = self.rec_path.stat().st_size
        # +8: every record has at least its magic + lrec words
        past_end = np.flatnonzero(self._index.offsets > self._size - 8)
        if past_end.size:
            pos = int(past_end[0])
            raise RecordIOError(
                f"{self.idx_path}: key {int(self._index.keys[pos])} offset {int(self._index.offsets[pos])} is past "
                f"the end of {self.rec_path} ({self._size} bytes)"
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
    def keys(self) -> np.ndarray:
        """Keys in ``.idx`` file order, as a read-only int64 array (``.tolist()`` for Python ints)."""
        return self._index.keys

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: int) -> bool:
        return self._index.position(key) >= 0

    def count_keys(self, lo: int, hi: int) -> int:
        """Number of indexed keys in ``[lo, hi)`` (no per-key work)."""
        return self._index.count_in_range(int(lo), int(hi))

    def offset(self, key: int) -> int:
        """Byte offset of ``key``'s first physical record."""
        pos = self._index.position(key)
        if pos < 0:
            raise KeyError(f"{self.idx_path}: no key {key!r}")
        return int(self._index.offsets[pos])

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
    num_classes: int | None,
    image_size: tuple[int, int] = (112, 112),
) -> int:
    """Write an InsightFace ``train.rec``/``train.idx``/``property`` from ``(label, encoded_image)`` samples.

    Samples must come grouped by label in increasing order (0..num_classes-1, every class present). Layout: header
    record 0 (flag 2, ``[num_images + 1, num_images + 1 + num_classes]``), images ``1..num_images``, then one identity
    record per class with ``[first_key, end_key)``. Returns the number of images. ``num_classes=None`` takes the
    number of identities the samples hold (a packer that skips bad images may drop a whole identity).
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
        if num_classes is None:
            num_classes = len(starts)
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
