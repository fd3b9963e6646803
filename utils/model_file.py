"""Reading a backbone's weights out of any model file users bring: plain state dicts, arcface_torch and our own run
checkpoints, PyTorch Lightning / AdaFace ``.ckpt`` files and CVLFace ``.safetensors`` files — without executing
anything from the file.

Why a reader of our own for Lightning checkpoints: ``torch.load(weights_only=True)`` refuses them (their
``hyper_parameters`` and callbacks are pickled as ``pytorch_lightning`` / ``argparse`` classes), and
``weights_only=False`` would import those packages and let the file call any function. Here the pickle inside the
zip archive is read by an unpickler whose only real globals are torch's tensor-rebuild functions (replaced by our
own lazy versions), ``collections.OrderedDict`` and torch's dtypes and storage types; every other class or function
the file names becomes an :class:`InertObject` subclass — never imported, never called, its arguments and state kept
as plain data. Tensors are read lazily (only the backbone's; a 617,970-class head and optimizer state stay on disk).
A file whose tensors cannot be reached is refused, naming what it holds.

Safetensors files (CVLFace) are read by a small reader of the format itself (8-byte header length, JSON header,
raw little-endian data), so the ``safetensors`` package is not needed. CVLFace saves its model config as
``<name>.yaml`` beside the weights; its ``color_space`` says which channel order the network expects.

Prefixes: a state dict whose keys all start with ``module.`` (DDP), ``model.`` (Lightning) or ``net.`` (CVLFace) is
stripped; where only part of the keys has such a prefix (AdaFace: ``model.*`` beside the margin head's
``head.kernel``), that part is the backbone and the rest is dropped with a note.
"""
from __future__ import annotations

import json
import os
import sys
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from utils.checkpoint import CheckpointError, safe_load

BACKBONE_PREFIXES: tuple[str, ...] = ("module.", "model.", "net.")

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


# ----------------------------------------------------------------------------------------------------------------
# Inert stand-ins for everything the file names that is not a tensor
# ----------------------------------------------------------------------------------------------------------------
class InertObject:
    """An object of a class this reader never imports (``pytorch_lightning.…``, ``argparse.Namespace``, …).

    It stands in for the class itself (a subclass per name, so the pickle's NEWOBJ/REDUCE work) and for its
    instances, keeping what the file gave as plain data: constructor arguments, state, items. Nothing of the named
    class runs."""

    inert_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.setdefault("inert_args", args)
        if kwargs:
            self.__dict__["inert_kwargs"] = kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__["inert_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses (Lightning's AttributeDict)
        self.__dict__.setdefault("inert_items", {})[key] = value

    def append(self, value: Any) -> None:  # list subclasses
        self.__dict__.setdefault("inert_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("inert_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<{self.inert_name} (not imported)>"

    def __reduce__(self) -> Any:
        raise TypeError(f"{self!r} is an inert stand-in read from a file; it cannot be saved")


_INERT_CLASSES: dict[str, type] = {}


def inert_class(module: str, name: str) -> type:
    """The stand-in class for global ``module.name`` (one per name; nothing is imported)."""
    full = f"{module}.{name}"
    if full not in _INERT_CLASSES:
        _INERT_CLASSES[full] = type(f"Inert[{full}]", (InertObject,), {"inert_name": full, "__module__": __name__})
    return _INERT_CLASSES[full]


class _StorageKind:
    """A torch storage type named in the file (``torch.FloatStorage``): only its dtype matters."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a storage type cannot carry state")


class LazyTensor:
    """A tensor of the file, read from disk only when :meth:`load` is called (the dropped head never is)."""

    __slots__ = ("_read", "nbytes_stored", "dtype", "numel_stored", "offset", "shape", "stride_", "where")

    def __init__(self, read: Any, dtype: torch.dtype, numel_stored: int, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...] | None, where: str) -> None:
        self._read, self.dtype, self.numel_stored = read, dtype, int(numel_stored)
        self.offset, self.shape, self.stride_, self.where = int(offset), torch.Size(shape), stride, where

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a tensor cannot carry pickled state")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def load(self) -> torch.Tensor:
        """The tensor itself (CPU). A storage whose size does not match what the file declares is refused."""
        data = self._read()
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        if len(data) != self.numel_stored * itemsize:
            raise CheckpointError(f"{self.where}: the stored data has {len(data)} bytes, the file declares "
                                  f"{self.numel_stored} x {itemsize}; the file is damaged")
        flat = torch.frombuffer(bytearray(data), dtype=self.dtype) if data else torch.empty(0, dtype=self.dtype)
        stride = self.stride_ if self.stride_ is not None else _contiguous_strides(tuple(self.shape))
        try:
            return flat.as_strided(self.shape, stride, self.offset)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.where}: shape {list(self.shape)} does not fit its stored data "
                                  f"({exc}); the file is damaged") from None


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, *rest: Any) -> LazyTensor:
    if not isinstance(storage, LazyTensor):
        raise pickle.UnpicklingError(f"a tensor refers to {type(storage).__name__}, not to a stored buffer")
    dtype = next((r for r in rest if isinstance(r, torch.dtype)), None)
    if dtype is not None and dtype != storage.dtype:  # _rebuild_tensor_v3: an untyped (byte) storage and a dtype
        itemsize = torch.empty(0, dtype=dtype).element_size()
        storage = LazyTensor(storage._read, dtype, storage.numel_stored // itemsize, 0, (), None, storage.where)
    return LazyTensor(storage._read, storage.dtype, storage.numel_stored, offset, tuple(size), tuple(stride),
                      storage.where)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data  # a Parameter is its data here (requires_grad and any pickled state are not kept)


_ALLOWED_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _InertUnpickler(pickle.Unpickler):
    """Unpickler of a torch zip archive's ``data.pkl``: globals resolve to the table above, dtypes, storage kinds
    or inert stand-ins; nothing is ever imported."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, source: str) -> None:
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, LazyTensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _ALLOWED_FUNCTIONS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return inert_class(module, name)

    def persistent_load(self, pid: Any) -> LazyTensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageKind)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if key not in self.storages:
            member = f"{self.prefix}data/{key}"
            if member not in self.archive.NameToInfo:
                raise pickle.UnpicklingError(f"storage {key} is not in the archive")
            self.storages[key] = LazyTensor(lambda m=member: self.archive.read(m), kind.dtype, numel, 0, (numel,),
                                            None, f"{self.source} (storage {key})")
        return self.storages[key]


def inert_load(path: str | os.PathLike) -> Any:
    """The object a ``torch.save`` zip archive holds, read without executing anything from it: tensors as
    :class:`LazyTensor`, unknown classes as :class:`InertObject` stand-ins. Refuses other formats."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: not a torch.save zip archive ({exc}); legacy (pre-1.6) "
                              "checkpoints are not supported: re-save it with a current torch") from None
    pickles = sorted((n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1), key=len)
    if not pickles:
        raise CheckpointError(f"cannot read {path}: a zip file without a torch data.pkl (not a torch checkpoint)")
    prefix = pickles[0][: -len("data.pkl")]
    order = archive.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in archive.NameToInfo else "little"
    if order != "little":
        raise CheckpointError(f"cannot read {path}: its tensors are stored {order}-endian; re-save it on a "
                              "little-endian machine")
    import io

    try:
        return _InertUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, str(path)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged or hostile pickle: say so, never run anything
        raise CheckpointError(f"cannot read {path}: its pickle is malformed ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------------------------
# Safetensors (CVLFace)
# ----------------------------------------------------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file; tensors lazy. Damaged headers are refused naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"cannot read {path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"cannot read {path}: header length {n} does not fit the file; not safetensors")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"cannot read {path}: its safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {path}: its safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    tensors: dict[str, LazyTensor] = {}
    for key, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"cannot read {path}: tensor {key!r} has an unsupported header entry "
                                  f"{info!r}") from None
        if not 0 <= begin <= end <= size - 8 - n:
            raise CheckpointError(f"cannot read {path}: tensor {key!r} lies outside the file")

        def read(b: int = begin, e: int = end) -> bytes:
            with open(path, "rb") as g:
                g.seek(8 + n + b)
                return g.read(e - b)

        numel = 1
        for s in shape:
            numel *= s
        tensors[key] = LazyTensor(read, dtype, numel, 0, shape, None, f"{path} ({key})")
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _cvlface_config(path: Path) -> tuple[dict[str, str], Path] | None:
    """CVLFace's ``<name>.yaml`` beside ``<name>.safetensors`` (flat ``key: value`` lines), or None."""
    config = path.with_suffix(".yaml")
    if not config.is_file():
        return None
    values: dict[str, str] = {}
    for line in config.read_text(errors="replace").splitlines():
        if ":" in line and not line.startswith((" ", "#", "-")):
            key, _, value = line.partition(":")
            values[key.strip()] = value.split("#")[0].strip().strip("'\"")
    return values, config


# ----------------------------------------------------------------------------------------------------------------
# The channel order a file says its network was fed
# ----------------------------------------------------------------------------------------------------------------
CHANNEL_ORDER_KEY = "channel_order"  # train.py's config key and summary.json entry: the order the backbone was fed


def _recorded_order(record: Any) -> str | None:
    return record.get(CHANNEL_ORDER_KEY) if isinstance(record, Mapping) and record.get(CHANNEL_ORDER_KEY) in (
        "rgb", "bgr") else None


def told_channel_order(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(order, reason)`` when the file itself (or what its run wrote beside it) says which channel order its
    network was fed, else None: CVLFace's ``<name>.yaml`` ``color_space``; a ``train.py`` run's ``model.pt`` (its
    ``summary.json``: ``channel_order``) or checkpoint ``rank_N.pt`` (the ``COMPLETE`` marker's config). A run
    written before ``channel_order`` existed was fed RGB (train.py then fed every network RGB)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        config = _cvlface_config(path)
        space = config[0].get("color_space", "").upper() if config is not None else ""
        return (space.lower(), f"color_space in {config[1]}") if space in ("RGB", "BGR") else None
    if path.name == "model.pt":
        record, where, entry = path.parent / "summary.json", "its summary.json", "summary"
    elif path.name.startswith("rank_") and path.suffix == ".pt":
        record, where, entry = path.parent / "COMPLETE", "its checkpoint's COMPLETE marker", "meta"
    else:
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("network"), str) or (
            entry == "meta" and data.get("kind") != "recognition"):
        return None  # not a train.py run (a stage-1 run, another tool's file): the file's layout decides
    order = (_recorded_order(data) if entry == "summary" else None) or _recorded_order(config)
    if order is None:
        return "rgb", "a train.py run from before channel_order: train.py fed RGB"
    return order, f"a train.py run fed {order.upper()}, as {where} records"


# ----------------------------------------------------------------------------------------------------------------
# From a file to a backbone state dict
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFile:
    """A backbone state dict and what the file said about it.

    ``kind``: what the file is ("state dict", "Lightning checkpoint (pytorch-lightning 1.8.6)", "safetensors");
    ``notes``: what was done to reach the backbone (prefix removed, head dropped); ``channel_order``: "rgb"/"bgr"
    when the file's own metadata says it (CVLFace's ``color_space``), else None; ``channel_source``: which file."""

    state: dict[str, torch.Tensor]
    kind: str = "state dict"
    notes: tuple[str, ...] = ()
    channel_order: str | None = None
    channel_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, LazyTensor))


def describe_value(value: Any) -> str:
    """A short description of a value of the file: ``tensor [512, 10]``, ``int``, ``pytorch_lightning.X (not
    imported)``, ``dict of 3``."""
    if _is_tensor(value):
        return f"tensor {list(value.shape)}"
    if isinstance(value, InertObject):
        return f"{value.inert_name} (not imported)"
    if isinstance(value, type) and issubclass(value, InertObject):
        return f"class {value.inert_name} (not imported)"
    if isinstance(value, Mapping):
        return f"dict of {len(value)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _describe_holdings(obj: Any) -> str:
    if isinstance(obj, Mapping):
        parts = [f"{k!s}: {describe_value(v)}" for k, v in list(obj.items())[:8]]
        more = f", ... ({len(obj)} entries)" if len(obj) > 8 else ""
        return "a dict {" + ", ".join(parts) + more + "}"
    return describe_value(obj)


def _shape_text(state: Mapping[str, Any], keys: list[str]) -> str:
    shown = ", ".join(f"{k} {list(state[k].shape)}" for k in keys[:2])
    return shown + (f" and {len(keys) - 2} more" if len(keys) > 2 else "")


def strip_prefixes(state: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """(backbone state, notes, dropped keys): ``module.`` / ``model.`` / ``net.`` prefixes removed (repeatedly:
    ``model.net.``); where only some keys carry one, those are the backbone and the others are dropped."""
    notes: list[str] = []
    dropped: list[str] = []
    changed = True
    while changed and state:
        changed = False
        for prefix in BACKBONE_PREFIXES:
            inside = [k for k in state if k.startswith(prefix)]
            if not inside:
                continue
            outside = [k for k in state if not k.startswith(prefix)]
            if outside:
                notes.append(f"dropped {len(outside)} tensors outside '{prefix}' (the training head: "
                             f"{_shape_text(state, outside)})")
                dropped += outside
            notes.append(f"'{prefix}' prefix removed")
            state = {k[len(prefix):]: state[k] for k in inside}
            changed = True
            break
    return state, notes, dropped


def read_model_file(path: str | os.PathLike) -> ModelFile:
    """The backbone state dict in ``path`` and what the file said (see the module docstring). Every failure is a
    :class:`CheckpointError` naming the file and what it holds."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    kind, channel, channel_source, extra = "state dict", None, None, {}
    inert_because = ""
    if path.suffix == ".safetensors":
        obj, meta = read_safetensors(path)
        kind = "safetensors file"
        config = _cvlface_config(path)
        if config is not None:
            values, config_path = config
            space = values.get("color_space", "").upper()
            if space in ("RGB", "BGR"):
                channel, channel_source = space.lower(), str(config_path)
            kind = f"CVLFace safetensors file ({config_path.name}: name {values.get('name', '?')})"
    else:
        try:
            obj = safe_load(path) if path.suffix != ".ckpt" else None
        except CheckpointError as exc:
            if not isinstance(exc.__cause__, pickle.UnpicklingError):
                raise
            obj = None  # classes weights_only refuses (Lightning's hyper-parameters, ...): read it inertly
            inert_because = (" (torch.load with weights_only=True refused its classes, so it was read with every "
                             "class inert: nothing in it ran)")
        if obj is None:
            obj = inert_load(path)
    obj, kind, extra = _unwrap(obj, kind, path)
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) and _is_tensor(v) for k, v in
                                                          obj.items()):
        bad = next(((k, v) for k, v in obj.items() if not _is_tensor(v)), None) if isinstance(obj, Mapping) else None
        where = f" (entry '{bad[0]}' is {describe_value(bad[1])})" if bad else ""
        raise CheckpointError(f"{path}{inert_because} holds no state dict of tensors{where}: it holds "
                              f"{_describe_holdings(obj)}; "
                              "give a backbone state dict, a train.py model.pt, an arcface_torch checkpoint, a "
                              "Lightning/AdaFace .ckpt or a CVLFace .safetensors")
    state, notes, dropped = strip_prefixes(dict(obj))
    extra["dropped"] = dropped
    loaded = {k: (v.load() if isinstance(v, LazyTensor) else v) for k, v in state.items()}
    return ModelFile(loaded, kind, tuple(notes), channel, channel_source, extra)


def _unwrap(obj: Any, kind: str, path: Path) -> tuple[Any, str, dict[str, Any]]:
    """The state dict inside the known checkpoint wrappers, with the file's kind."""
    extra: dict[str, Any] = {}
    if not isinstance(obj, Mapping):
        return obj, kind, extra
    if "state_dict_backbone" in obj:  # arcface_torch full checkpoint
        return obj["state_dict_backbone"], "arcface_torch checkpoint", extra
    if isinstance(obj.get("backbone"), Mapping):  # our run checkpoint (rank_0.pt)
        return obj["backbone"], "train.py checkpoint", extra
    if isinstance(obj.get("state_dict"), Mapping) and not _is_tensor(obj.get("state_dict")):
        version = obj.get("pytorch-lightning_version")
        kind = "Lightning checkpoint" + (f" (pytorch-lightning {version})" if isinstance(version, str) else "")
        extra["lightning_keys"] = [str(k) for k in obj]
        return obj["state_dict"], kind, extra
    return obj, kind, extra


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The backbone state dict of a model file: a plain state dict (InsightFace backbone.pth / model.pt), an
    arcface_torch or train.py checkpoint, a Lightning / AdaFace ``.ckpt`` or a CVLFace ``.safetensors``, read without
    executing anything from it (``utils.model_file``); ``module.`` / ``model.`` / ``net.`` prefixes stripped, a
    training head dropped. Dropped tensors are named in one ``note:`` line (rank 0), so fine-tuning from a
    Lightning file says what it left out."""
    found = read_model_file(path)
    if any("dropped" in n for n in found.notes) and os.environ.get("RANK", "0") == "0":
        print(f"note: {path}: {found.kind}; {'; '.join(found.notes)}", file=sys.stderr)
    return found.state
