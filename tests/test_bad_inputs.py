"""The bad-input matrix: every row is one wrong file, config value, checkpoint or CLI argument fed to the public
entry point that meets it first. Each row asserts the exception type AND that the message names the file / key /
value, so a user can fix the input from the message alone. README "Troubleshooting" mirrors this table.

The rows run the module-level functions (``train.main``, ``dataset.*``, ``utils.data.binfile.load_bin``,
``cfsm.load_generator``, ``eval.ijb.main``) in-process; nothing trains, so the whole table takes seconds.
"""
from __future__ import annotations

import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch

import train
from backbones import get_model
from cfsm import load_generator
from dataset import DataError, ImageFolderDataset, MXFaceDataset, build_dataset
from eval import ijb
from eval.align import NoFaceError
from eval.common import EvalInputError
from losses import ArcFace
from partial_fc import PartialFC
from tests.helpers import headroom, tiny_args
from utils.data.binfile import BinFileError, load_bin
from utils.checkpoint import CheckpointError, safe_load
from utils.cli import UsageError
from configs.loader import ConfigError
from utils.data.recordio import IndexedRecordReader, IndexedRecordWriter, RecordIOError, pack_record, unpack_record
from utils.run.run_folder import COMPLETE, step_dir


@dataclass
class Ctx:
    """What a row may use: the session fixtures and a fresh folder of its own."""

    toy: Path  # miniature toy data (16 identities x 6 images)
    generator: Path  # tiny generator in the released {'G_state_dict': ...} format
    tmp: Path


@dataclass(frozen=True)
class Row:
    id: str
    run: Callable[[Ctx], object]  # feeds the bad input to the entry point; must raise
    error: type[BaseException]
    names: Callable[[Ctx], list[str]]  # substrings the message must contain (file / key / value)
    covers: str = ""  # "<command> <input>" this row feeds a bad value to (see test_every_cli_input_has_a_row)


# ---- helpers that build one bad input each ----------------------------------------------------------------------

def _rec_copy(ctx: Ctx, *names: str) -> Path:
    """A folder holding copies of the given toy files (so a row can damage them)."""
    d = ctx.tmp / "rec"
    d.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(ctx.toy / name, d / name)
    return d


def _offset(d: Path, key: int) -> int:
    return IndexedRecordReader(d / "train.rec", d / "train.idx").offset(key)


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _rewrite_record(ctx: Ctx, key: int, edit: Callable[[bytes], bytes]) -> Path:
    """Re-pack the toy .rec with record `key` replaced by edit(payload): framing stays valid, content is bad."""
    d = ctx.tmp / "rec"
    d.mkdir(exist_ok=True)
    reader = IndexedRecordReader(ctx.toy / "train.rec", ctx.toy / "train.idx")
    with IndexedRecordWriter(d / "train.rec", d / "train.idx") as w:
        for k in reader.keys:
            payload = reader.read(k)
            w.write(k, edit(payload) if k == key else payload)
    shutil.copy(ctx.toy / "property", d / "property")
    return d


def _relabel(label: float) -> Callable[[bytes], bytes]:
    def edit(payload: bytes) -> bytes:
        header, _, body = unpack_record(payload)
        return pack_record(header._replace(flag=0, label=label), body)
    return edit


def _garble_image(payload: bytes) -> bytes:
    header, _, body = unpack_record(payload)
    return pack_record(header._replace(flag=0), b"\xff" * len(body))


def _bad_magic(ctx: Ctx) -> None:
    """Overwrite the frame magic of one record (a bit flip / wrong offset in a hand-made .idx)."""
    d = _rec_copy(ctx, "train.rec", "train.idx", "property")
    _patch(d / "train.rec", _offset(d, TINY_TOY_KEY), b"\0\0\0\0")
    MXFaceDataset(d)[TINY_TOY_KEY - 1]


def _truncated_rec(ctx: Ctx) -> None:
    """A .rec cut off inside its last image record (an interrupted copy; the .idx lists images only)."""
    d = _rec_copy(ctx, "train.rec", "property")
    last = 96  # 16 identities x 6 images: keys 1..96 are images, 97.. identity ranges
    lines = [ln for ln in (ctx.toy / "train.idx").read_text().splitlines() if int(ln.split("\t")[0]) <= last]
    (d / "train.idx").write_text("\n".join(lines) + "\n")
    rec = d / "train.rec"
    rec.write_bytes(rec.read_bytes()[:_offset(d, last) + 100])
    MXFaceDataset(d)[last - 1]


def _bad_idx(ctx: Ctx, line: str) -> Path:
    d = _rec_copy(ctx, "train.rec", "property")
    (d / "train.idx").write_text(line)
    return d


def _bin_with_pair_mismatch(ctx: Ctx) -> Path:
    _, jpg = cv2.imencode(".jpg", np.zeros((112, 112, 3), np.uint8))
    path = ctx.tmp / "mismatch.bin"
    path.write_bytes(pickle.dumps(([jpg.tobytes()] * 3, [True]), protocol=4))  # 3 images for 1 pair
    return path


def _config_file(ctx: Ctx, body: str) -> Path:
    path = ctx.tmp / "my_job.py"
    path.write_text("from configs.toy import config\n" + body)
    return path


def _generator_variant(ctx: Ctx, name: str, edit: Callable[[dict], object]) -> Path:
    obj = torch.load(ctx.generator, weights_only=True)
    path = ctx.tmp / name
    torch.save(edit(obj), path)
    return path


def _reshape_key(obj: dict) -> dict:
    obj["G_state_dict"]["decoder.model.2.weight"] = torch.zeros(32, 64, 3, 3)  # released: 5x5 kernels
    return obj


def _backbone_file(ctx: Ctx, network: str, num_features: int) -> Path:
    path = ctx.tmp / f"{network}_{num_features}.pt"
    torch.save(get_model(network, num_features=num_features).state_dict(), path)
    return path


def _truncated_backbone(ctx: Ctx) -> Path:
    path = _backbone_file(ctx, "r_tiny", 32)
    path.write_bytes(path.read_bytes()[:1000])  # a copy that stopped half-way
    return path


def _pfc_shard_into_other_world(ctx: Ctx, saved_world: int, saved_classes: int, classes: int) -> None:
    """Round-trip a Partial FC shard through a file and load it into a run of another world size."""
    path = ctx.tmp / "pfc_rank0.pt"
    torch.save(PartialFC(ArcFace(), 8, saved_classes, rank=0, world_size=saved_world).state_dict(), path)
    PartialFC(ArcFace(), 8, classes, rank=0, world_size=1).load_state_dict(safe_load(path))


def _resume_other_world(ctx: Ctx) -> None:
    out = ctx.tmp / "run"
    d = step_dir(out, 4)
    d.mkdir(parents=True)
    (d / COMPLETE).write_text('{"step": 4, "world_size": 2}')  # what a 2-rank job leaves behind
    train.main(tiny_args(ctx.toy, out, "max_steps=8", "resume=True"))


def _ijb_root(ctx: Ctx, with_meta: bool = True) -> Path:
    """The smallest IJB-C layout load_meta accepts: two crops, one pair, no 1:N files."""
    d = ctx.tmp / "IJB_release" / "IJBC"
    (d / "meta").mkdir(parents=True)
    (d / "loose_crop").mkdir()
    for name in ("1.jpg", "2.jpg"):
        cv2.imwrite(str(d / "loose_crop" / name), np.full((120, 120, 3), 128, np.uint8))
    if with_meta:
        (d / "meta" / "ijbc_face_tid_mid.txt").write_text("1.jpg 1 1\n2.jpg 2 2\n")
        lmk = "38 51 73 51 56 71 41 92 70 92"
        (d / "meta" / "ijbc_name_5pts_score.txt").write_text(f"1.jpg {lmk} 0.9\n2.jpg {lmk} 0.9\n")
        (d / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 0\n")
    return d.parent


def _ijb(ctx: Ctx, model: Path, network: str = "r_tiny", root: Path | None = None, target: str = "IJBC") -> None:
    ijb.main(["--model", str(model), "--network", network, "--root", str(root or _ijb_root(ctx)), "--target", target,
              "--out", str(ctx.tmp / "results"), "--device", "cpu", "--workers", "0", "--no-progress"])


def _train(ctx: Ctx, *extra: str) -> None:
    train.main(tiny_args(ctx.toy, ctx.tmp / "run", "max_steps=1", *extra))


def _unknown_layout_backbone(ctx: Ctx) -> Path:
    """An r_tiny file with one tensor removed: the layout of no registered network."""
    state = get_model("r_tiny", num_features=32).state_dict()
    state.pop("fc.weight")
    path = ctx.tmp / "unknown_layout.pt"
    torch.save(state, path)
    return path


def _train_without_wandb_package(ctx: Ctx) -> None:
    from unittest import mock

    with mock.patch("utils.wandb_logging.wandb_installed", return_value=False):
        _train(ctx, "wandb=True")


TINY_TOY_KEY = 5  # a training image record (key 0 is the header record)
MISSING = "/no/such/dir"

ROWS: list[Row] = [
    # ---- data ----
    Row("rec_missing_idx", lambda c: MXFaceDataset(_rec_copy(c, "train.rec", "property")), FileNotFoundError,
        lambda c: [str(c.tmp / "rec" / "train.idx")]),
    Row("rec_missing_rec", lambda c: build_dataset(_rec_copy(c, "train.idx", "property")), FileNotFoundError,
        lambda c: [str(c.tmp / "rec" / "train.rec")]),
    Row("rec_folder_missing", lambda c: _train(c, f"rec={MISSING}"), FileNotFoundError, lambda c: [MISSING]),
    Row("rec_bad_magic", _bad_magic, RecordIOError,
        lambda c: [str(c.tmp / "rec" / "train.rec"), f"key {TINY_TOY_KEY}", "bad magic 0x00000000"]),
    Row("rec_truncated", _truncated_rec, RecordIOError,
        lambda c: [str(c.tmp / "rec" / "train.rec"), "key 96", "truncated record"]),
    Row("idx_offset_past_eof", lambda c: MXFaceDataset(_bad_idx(c, "0\t0\n3\t999999999\n")), RecordIOError,
        lambda c: [str(c.tmp / "rec" / "train.idx"), "key 3", "offset 999999999", "past the end"]),
    Row("idx_malformed_line", lambda c: MXFaceDataset(_bad_idx(c, "0\t0\n3 12 x\n")), RecordIOError,
        lambda c: [str(c.tmp / "rec" / "train.idx"), "line 2", "'3 12 x'"]),
    Row("undecodable_image", lambda c: MXFaceDataset(_rewrite_record(c, TINY_TOY_KEY, _garble_image))[
        TINY_TOY_KEY - 1], DataError,
        lambda c: [str(c.tmp / "rec" / "train.rec"), f"key {TINY_TOY_KEY}", "could not decode"]),
    Row("label_out_of_range", lambda c: MXFaceDataset(_rewrite_record(c, TINY_TOY_KEY, _relabel(99.0)))[
        TINY_TOY_KEY - 1], DataError,
        lambda c: [str(c.tmp / "rec" / "train.rec"), f"key {TINY_TOY_KEY}", "label 99", "[0, 16)"]),
    Row("empty_image_folder", lambda c: (c.tmp.joinpath("faces").mkdir(), build_dataset(c.tmp / "faces")),
        DataError, lambda c: [str(c.tmp / "faces"), "no identity sub-folders"]),
    Row("identity_folder_without_images",
        lambda c: (c.tmp.joinpath("faces", "alice").mkdir(parents=True), ImageFolderDataset(c.tmp / "faces")),
        DataError, lambda c: [str(c.tmp / "faces" / "alice"), "'alice'", "has no images"]),
    Row("bin_pair_count_mismatch", lambda c: load_bin(_bin_with_pair_mismatch(c)), BinFileError,
        lambda c: [str(c.tmp / "mismatch.bin"), "3 images", "1 pairs"]),
    Row("num_classes_mismatch", lambda c: _train(c, "num_classes=17"), DataError,
        lambda c: [str(c.toy), "num_classes=17", "16 classes"]),
    Row("num_image_mismatch", lambda c: build_dataset(c.toy, num_image=5), DataError,
        lambda c: [str(c.toy), "num_image=5", "96 images"]),
    # ---- configs ----
    Row("override_unknown_key", lambda c: _train(c, "lrr=0.05"), ConfigError,
        lambda c: ["'lrr'", "Did you mean: lr"]),
    Row("config_file_unknown_key", lambda c: train.main([str(_config_file(c, "config.batchsize = 8\n"))]),
        ConfigError, lambda c: [str(c.tmp / "my_job.py"), "'batchsize'", "batch_size"]),
    Row("config_not_found", lambda c: train.main(["configs/toy_typo"]), ConfigError,
        lambda c: ["toy_typo", "available configs", "toy_ours"]),
    Row("bad_value_type", lambda c: _train(c, "batch_size=big"), ConfigError, lambda c: ["'batch_size'", "'big'"]),
    Row("bad_bool", lambda c: _train(c, "fp16=maybe"), ConfigError, lambda c: ["fp16=maybe", "boolean"]),
    Row("rs_ratio_out_of_range", lambda c: _train(c, "rs_ratio=1.5"), ConfigError, lambda c: ["'rs_ratio'", "1.5"]),
    Row("k_negative", lambda c: _train(c, "k=-1"), ConfigError, lambda c: ["'k'", "-1"]),
    Row("unknown_loss", lambda c: _train(c, "loss=sphereface"), ConfigError,
        lambda c: ["'loss'", "sphereface", "arcface"]),
    Row("synthesis_without_generator", lambda c: _train(c, "rs_ratio=0.5"), ConfigError,
        lambda c: ["'pretrained_synthesis_model'", "rs_ratio < 1"]),
    # ---- checkpoints ----
    Row("generator_missing", lambda c: _train(c, "rs_ratio=0.5", f"pretrained_synthesis_model={MISSING}/g.pth"),
        FileNotFoundError, lambda c: [f"{MISSING}/g.pth", "train_generator.py"]),
    Row("generator_without_G_state_dict",
        lambda c: load_generator(_generator_variant(c, "sd_only.pth", lambda o: {"state_dict": o["G_state_dict"]})),
        KeyError, lambda c: [str(c.tmp / "sd_only.pth"), "G_state_dict", "state_dict"]),
    Row("generator_wrong_shapes", lambda c: load_generator(_generator_variant(c, "reshaped.pth", _reshape_key)),
        ValueError, lambda c: [str(c.tmp / "reshaped.pth"), "'decoder.model.2.weight'", "[32, 64, 3, 3]",
                               "[32, 64, 5, 5]"]),
    Row("generator_not_a_torch_file",
        lambda c: (c.tmp.joinpath("g.pth").write_text("<html>404</html>"), load_generator(c.tmp / "g.pth")),
        ValueError, lambda c: [str(c.tmp / "g.pth"), "cannot read CFSM generator file"]),
    Row("backbone_other_architecture",
        lambda c: _train(c, f"pretrained_backbone_model={_backbone_file(c, 'mbf_tiny', 32)}"), CheckpointError,
        lambda c: [str(c.tmp / "mbf_tiny_32.pt"), "first mismatching key", "another architecture"]),
    Row("backbone_other_embedding_size",
        lambda c: _train(c, f"pretrained_backbone_model={_backbone_file(c, 'r_tiny', 64)}"), CheckpointError,
        lambda c: [str(c.tmp / "r_tiny_64.pt"), "key 'fc.weight'", "embedding size"]),
    Row("backbone_truncated_file", lambda c: _train(c, f"pretrained_backbone_model={_truncated_backbone(c)}"),
        CheckpointError, lambda c: [str(c.tmp / "r_tiny_32.pt"), "cannot load"]),
    Row("pfc_shard_count_mismatch", lambda c: _pfc_shard_into_other_world(c, 2, 12, 12), ValueError,
        lambda c: ["weight", "[6, 8]", "[12, 8]", "rank 0 of 1"]),
    Row("pfc_shard_metadata_mismatch", lambda c: _pfc_shard_into_other_world(c, 2, 24, 12), ValueError,
        lambda c: ["shard mismatch", "world_size=2", "world_size=1"]),
    Row("resume_other_world_size", _resume_other_world, CheckpointError,
        lambda c: [str(step_dir(c.tmp / "run", 4)), "written by 2 ranks", "this run has 1"]),
    # ---- CLI arguments ----
    Row("train_without_config", lambda c: train.main([]), SystemExit,
        lambda c: ["the following arguments are required: config"]),
    Row("override_without_equals", lambda c: _train(c, "lr0.05"), ConfigError, lambda c: ["'lr0.05'", "key=value"]),
    Row("eval_missing_meta_file", lambda c: _ijb(c, _backbone_file(c, "r_tiny", 32), root=_ijb_root(c, False)),
        EvalInputError, lambda c: [str(c.tmp / "IJB_release" / "IJBC" / "meta" / "ijbc_face_tid_mid.txt")]),
    Row("eval_wrong_architecture", lambda c: _ijb(c, _backbone_file(c, "mbf_tiny", 32), network="r_tiny"),
        CheckpointError, lambda c: [str(c.tmp / "mbf_tiny_32.pt"), "first mismatching key"], "eval --network"),
    Row("eval_model_missing", lambda c: _ijb(c, c.tmp / "model.pt"), CheckpointError,
        lambda c: [str(c.tmp / "model.pt"), "not found"], "eval --model"),
    Row("eval_bad_target", lambda c: _ijb(c, c.tmp / "model.pt", target="IJBX"), SystemExit,
        lambda c: ["--target", "'IJBX'"], "eval.ijb --target"),
    Row("eval_network_not_detectable", lambda c: _ijb(c, _unknown_layout_backbone(c), network="auto"),
        CheckpointError, lambda c: [str(c.tmp / "unknown_layout.pt"), "cannot tell its architecture",
                                    "no registered network's layout", "pass --network"]),
    Row("wandb_not_installed", lambda c: _train_without_wandb_package(c), ConfigError,
        lambda c: ["config key 'wandb' = True", "not installed", "pip install wandb", "wandb=False"]),
    # ---- data, second matrix (issue 11); helpers at the end of the module ----
    Row("idx_utf8_bom", lambda c: MXFaceDataset(_idx_bytes(c, b"\xef\xbb\xbf")), RecordIOError,
        lambda c: [str(c.tmp / "rec" / "train.idx"), "line 1", "UTF-8 byte-order mark"]),
    Row("idx_non_ascii", lambda c: MXFaceDataset(_idx_bytes(c, b"", "3\t1\u00b2\n".encode())), RecordIOError,
        lambda c: [str(c.tmp / "rec" / "train.idx"), "line 114", "non-ASCII byte 0xC2"]),
    Row("header_covers_identity_records", lambda c: MXFaceDataset(_rewrite_record(c, 0, _header(99, 115))),
        DataError, lambda c: [str(c.tmp / "rec" / "train.rec"), "keys 1..98", "key 98 is an identity record"]),
    Row("empty_image_record", lambda c: MXFaceDataset(_rewrite_record(c, TINY_TOY_KEY, _empty_image))[
        TINY_TOY_KEY - 1], DataError,
        lambda c: [str(c.tmp / "rec" / "train.rec"), f"key {TINY_TOY_KEY}", "could not decode image (0 bytes)"]),
    Row("empty_image_file", lambda c: ImageFolderDataset(_faces_with_empty_file(c))[0], DataError,
        lambda c: [str(c.tmp / "faces" / "amy" / "0.jpg"), "could not decode image (0 bytes)"]),
    Row("label_nan", lambda c: MXFaceDataset(_rewrite_record(c, TINY_TOY_KEY, _relabel(float("nan"))))[
        TINY_TOY_KEY - 1], DataError,
        lambda c: [str(c.tmp / "rec" / "train.rec"), f"key {TINY_TOY_KEY}", "label nan is not an integer"]),
    Row("rec_is_the_rec_file", lambda c: build_dataset(c.toy / "train.rec"), DataError,
        lambda c: [str(c.toy / "train.rec"), "rec is the folder holding train.rec and train.idx", str(c.toy)]),
    Row("bin_issame_strings", lambda c: load_bin(_bin_with_issame(c, ["True", "False"])), BinFileError,
        lambda c: [str(c.tmp / "issame.bin"), "issame_list[0]", "'True'"]),
    Row("bin_empty_image", lambda c: load_bin(_bin_with_issame(c, [True], empty_image=True)), BinFileError,
        lambda c: [str(c.tmp / "issame.bin"), "image 1 (0 bytes) could not be decoded"]),
    Row("pack_rec_bad_image", lambda c: _pack(c, _faces_with_empty_file(c)), DataError,
        lambda c: [str(c.tmp / "faces" / "amy" / "0.jpg"), "0 bytes"]),
    Row("pack_rec_over_existing_pack", lambda c: _pack(c, _faces(c), _pack(c, _faces(c))), FileExistsError,
        lambda c: [str(c.tmp / "packed"), "already holds a pack", "--overwrite"]),
]


# ---- stage 1 and every CLI under tools/ and eval/ (issue 11): one bad value per input --------------------------
# `covers` names "<command> <input>"; test_every_cli_input_has_a_row checks each command's parser against them.

def _stage1(ctx: Ctx, **over: object) -> None:
    import train_generator

    keys = dict(rec=ctx.toy, target=ctx.toy / "target_faces", generate_toy_data=False,
                id_model=_backbone_file(ctx, "r_tiny", 32), id_network="r_tiny", id_embedding_size=32, gen_dim=4,
                gen_latent_dim=16, gen_style_dim=4, batch_size=4, max_steps=1, num_workers=0, tensorboard=False,
                image_every=0, output=ctx.tmp / "stage1_run")
    keys.update(over)
    try:
        train_generator.main(["configs/cfsm_toy"] + [f"{k}={v}" for k, v in keys.items()])
    finally:  # refused before training starts: not even the output folder (log, lock) was created
        assert not (ctx.tmp / "stage1_run").exists(), "stage 1 started before refusing its input"


def _targets(ctx: Ctx, damage: dict[int, bytes]) -> Path:
    """A copy of the toy target faces with the files at the given sorted positions overwritten."""
    d = ctx.tmp / "targets"
    shutil.copytree(ctx.toy / "target_faces", d)
    files = sorted(p for p in d.rglob("*") if p.is_file())
    for i, data in damage.items():
        files[i].write_bytes(data)
    return d


def _empty_dir(ctx: Ctx) -> Path:
    (ctx.tmp / "empty").mkdir()
    return ctx.tmp / "empty"


def _target_list(ctx: Ctx) -> Path:
    good = sorted(p for p in (ctx.toy / "target_faces").rglob("*") if p.is_file())[:2]
    path = ctx.tmp / "targets.txt"
    path.write_text(f"{good[0]}\n# comment\n{ctx.tmp / 'gone_1.jpg'}\n{good[1]}\ngone_2.jpg\n")
    return path


def _generator_of_shape(ctx: Ctx, **shape: int) -> Path:
    from cfsm import Generator

    path = ctx.tmp / "other_shape_generator.pth"
    torch.save({"G_state_dict": Generator(**shape).state_dict()}, path)
    return path


def _image(ctx: Ctx, name: str, size: int = 112, data: bytes | None = None) -> Path:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    else:
        cv2.imwrite(str(path), np.full((size, size, 3), 90, np.uint8))
    return path


def _a_file(ctx: Ctx) -> Path:
    return _image(ctx, "not_a_folder.txt", data=b"x")


EVAL = ("--device", "cpu", "--workers", "0", "--no-progress")


def _eval_main(module: str, ctx: Ctx, *args: str, model: Path | None = None, network: str = "r_tiny",
               extra: tuple[str, ...] = EVAL) -> None:
    import importlib

    main = importlib.import_module(module).main
    main(["--model", str(model or _backbone_file(ctx, "r_tiny", 32)), "--network", network, *extra, *args])


def _ijb_args(ctx: Ctx, *extra: str, root: Path | None = None, **kw: object) -> None:
    _eval_main("eval.ijb", ctx, "--root", str(root or _ijb_root(ctx)), "--out", str(ctx.tmp / "results"), *extra,
               **kw)


def _ijb_edit(ctx: Ctx, name: str, text: str) -> Path:
    root = _ijb_root(ctx)
    (root / "IJBC" / "meta" / name).write_text(text)
    return root


def _tinyface_root(ctx: Ctx, probe: str = "1_1.jpg", probe_size: int = 112) -> Path:
    root = ctx.tmp / "tinyface"
    al = root / "aligned_pad_0.1_pad_high"
    _image(ctx, str((al / "Probe" / probe).relative_to(ctx.tmp)), probe_size)
    _image(ctx, str((al / "Gallery_Match" / "1_2.jpg").relative_to(ctx.tmp)))
    _image(ctx, str((al / "Gallery_Distractor" / "0_1.jpg").relative_to(ctx.tmp)))
    return root


def _tinyface(ctx: Ctx, *extra: str, root: Path | None = None) -> None:
    _eval_main("eval.tinyface", ctx, "--root", str(root or _tinyface_root(ctx)), "--out", str(ctx.tmp / "results"),
               *extra)


def _ijbs(ctx: Ctx, *extra: str, protocol_dir: Path | None = None, frames: Path | None = None) -> None:
    pdir, frames = protocol_dir or ctx.tmp / "protocols", frames or ctx.tmp / "frames"
    for folder in (pdir, frames):
        if str(folder) != MISSING:
            folder.mkdir(exist_ok=True)
    _eval_main("eval.ijbs", ctx, "--protocol-dir", str(pdir), "--frames-dir", str(frames), "--out",
               str(ctx.tmp / "results"), *extra)


def _empty_bin(ctx: Ctx) -> Path:
    path = ctx.tmp / "empty.bin"
    path.write_bytes(pickle.dumps(([], []), protocol=4))
    return path


def _compare(ctx: Ctx, *args: str, a: Path | None = None, b: Path | None = None) -> None:
    from tools import compare_faces

    compare_faces.main([str(a or _image(ctx, "a.jpg")), str(b or _image(ctx, "b.jpg")), "--device", "cpu", *args])


def _compare_model(ctx: Ctx, *args: str, **kw: Path) -> None:
    _compare(ctx, "--model", str(_backbone_file(ctx, "r_tiny", 32)), "--network", "r_tiny", *args, **kw)


def _style_grid(ctx: Ctx, *args: str, generator: Path | None = None, faces: Path | None = None) -> None:
    from tools import style_grid

    style_grid.main([str(generator or ctx.generator), "--faces", str(faces or ctx.toy), "--out",
                     str(ctx.tmp / "grids"), "--device", "cpu", *args])


def _similarity(ctx: Ctx, *args: str) -> None:
    from tools import dataset_similarity

    dataset_similarity.main(list(args))


def _export(ctx: Ctx, *args: str, model: Path | None = None) -> None:
    from tools import export_onnx

    export_onnx.main(["--model", str(model or _backbone_file(ctx, "r_tiny", 32)), "--network", "r_tiny", "--out",
                      str(ctx.tmp / "onnx"), *args])
    raise AssertionError("export_onnx accepted the input")  # a row must raise (main returns on success)


def _embed(ctx: Ctx, *args: str, images: Path | None = None) -> None:
    from tools import embed

    embed.main([str(images or ctx.toy / "target_faces"), "--model", str(_backbone_file(ctx, "r_tiny", 32)),
                "--network", "r_tiny", "--device", "cpu", "--workers", "0", "--out", str(ctx.tmp / "emb"), *args])


def _align(ctx: Ctx, *args: str, photos: Path | None = None) -> None:
    from tools import align

    align.main([str(photos or _image(ctx, "grey.png")), "--out", str(ctx.tmp / "aligned"), "--no-progress", *args])


def _report(ctx: Ctx, *args: str, generator: Path | None = None) -> None:
    from tools import style_report

    style_report.main([str(generator or ctx.generator), "--faces", str(ctx.toy), "--id-model",
                       str(_backbone_file(ctx, "r_tiny", 32)), "--id-network", "r_tiny", "--target-faces",
                       str(ctx.toy / "target_faces"), "--out", str(ctx.tmp / "report"), "--num-faces", "2",
                       "--num-target-faces", "2", "--directions", "1", "--device", "cpu", *args])


def _pipeline(ctx: Ctx, *args: str) -> None:
    from tools import pipeline

    try:
        pipeline.main(["--out", str(ctx.tmp / "pipeline"), "--data", str(ctx.toy), *args])
    finally:  # refused before the first stage: no stage log was written
        assert not (ctx.tmp / "pipeline" / "logs").exists()


def _toy(ctx: Ctx, *args: str) -> None:
    from tools import make_toy_data

    make_toy_data.main(["--out", str(ctx.tmp / "toy_out"), *args])


ROWS += [
    # ---- stage 1 (train_generator.py): refused before any process group, output folder or training step ----
    Row("stage1_empty_target_folder", lambda c: _stage1(c, target=_empty_dir(c)), FileNotFoundError,
        lambda c: ["'target'", str(c.tmp / "empty"), "no images"], "train_generator target"),
    Row("stage1_partly_corrupt_target_folder",
        lambda c: _stage1(c, target=_targets(c, {3: b"", 7: b"\xff\xd8 garbage"})), ValueError,
        lambda c: ["'target'", str(c.tmp / "targets"), "2 of 20 target images cannot be decoded"],
        "train_generator target"),
    Row("stage1_target_list_missing_files", lambda c: _stage1(c, target=_target_list(c)), FileNotFoundError,
        lambda c: [str(c.tmp / "targets.txt"), "2 of 4 listed images do not exist",
                   f"line 3: {c.tmp / 'gone_1.jpg'}", f"line 5: {c.tmp / 'gone_2.jpg'}"], "train_generator target"),
    Row("stage1_id_model_other_architecture", lambda c: _stage1(c, id_model=_backbone_file(c, "mbf_tiny", 32)),
        CheckpointError,
        lambda c: ["'id_model'", str(c.tmp / "mbf_tiny_32.pt"), "id_network=r_tiny",
                   "the file holds a mbf_tiny with 32-d embeddings: set id_network=mbf_tiny id_embedding_size=32"],
        "train_generator id_model"),
    Row("stage1_id_model_other_embedding_size", lambda c: _stage1(c, id_embedding_size=64), CheckpointError,
        lambda c: ["'id_model'", "id_embedding_size=64", "set id_network=r_tiny id_embedding_size=32"],
        "train_generator id_embedding_size"),
    Row("stage1_id_network_unknown", lambda c: _stage1(c, id_network="r51"), ConfigError,
        lambda c: ["'id_network'", "'r51'", "r_tiny"], "train_generator id_network"),
    Row("stage1_init_generator_other_shape",
        lambda c: _stage1(c, init_generator=_generator_of_shape(c, dim=8, latent_dim=16, style_dim=4)),
        CheckpointError, lambda c: ["'init_generator'", str(c.tmp / "other_shape_generator.pth"),
                                    "gen_dim=8 (this config: 4)"], "train_generator init_generator"),
    Row("stage1_init_generator_not_a_generator",
        lambda c: _stage1(c, init_generator=_backbone_file(c, "r_tiny", 32)), CheckpointError,
        lambda c: ["'init_generator'", str(c.tmp / "r_tiny_32.pt"), "no 'G_state_dict'"],
        "train_generator init_generator"),
    # ---- eval.ijb (model arguments are shared by every eval CLI through eval.common.add_model_args) ----
    Row("ijb_unknown_network", lambda c: _ijb_args(c, network="r51"), SystemExit,
        lambda c: ["--network", "'r51'", "r_tiny"], "eval --network"),
    Row("ijb_model_embedding_size", lambda c: _ijb_args(c, "--embedding-size", "64"), CheckpointError,
        lambda c: [str(c.tmp / "r_tiny_32.pt"), "fc.weight", "embedding size"], "eval --embedding-size"),
    Row("ijb_device_not_a_device", lambda c: _ijb_args(c, "--device", "gpu"), UsageError,
        lambda c: ["--device 'gpu'", "cpu"], "eval --device"),
    Row("ijb_batch_size_zero", lambda c: _ijb_args(c, "--batch-size", "0"), SystemExit,
        lambda c: ["--batch-size", "0"], "eval --batch-size"),
    Row("ijb_workers_negative", lambda c: _ijb_args(c, "--workers", "-1"), SystemExit,
        lambda c: ["--workers", "-1"], "eval --workers"),
    Row("ijb_root_missing", lambda c: _ijb_args(c, root=Path(MISSING)), EvalInputError,
        lambda c: ["no IJBC benchmark at", MISSING], "eval.ijb --root"),
    Row("ijb_out_is_a_file", lambda c: _ijb_args(c, "--out", str(_a_file(c))), EvalInputError,
        lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"], "eval.ijb --out"),
    Row("ijb_degenerate_landmarks", lambda c: _ijb_args(c, root=_ijb_edit(
        c, "ijbc_name_5pts_score.txt", "1.jpg 38 51 73 51 56 71 41 92 70 92 0.9\n2.jpg " + "5 5 " * 5 + "0.9\n")),
        EvalInputError, lambda c: ["ijbc_name_5pts_score.txt:2", "image 2.jpg", "same point"], "eval.ijb --root"),
    Row("ijb_pair_label_not_binary", lambda c: _ijb_args(c, root=_ijb_edit(c, "ijbc_template_pair_label.txt",
                                                                            "1 2 7\n")),
        EvalInputError, lambda c: ["ijbc_template_pair_label.txt", "labels must be 0 or 1", "7"], "eval.ijb --root"),
    Row("ijb_crop_missing", lambda c: _ijb_args(c, root=(lambda r: (r / "IJBC" / "loose_crop" / "2.jpg").unlink()
                                                          or r)(_ijb_root(c))),
        EvalInputError, lambda c: ["1 loose crop(s) missing", "2.jpg"], "eval.ijb --root"),
    # ---- eval.tinyface ----
    Row("tinyface_root_missing", lambda c: _tinyface(c, root=Path(MISSING)), EvalInputError,
        lambda c: [f"{MISSING}/aligned_pad_0.1_pad_high/Probe", "not found"], "eval.tinyface --root"),
    Row("tinyface_aligned_dir_wrong", lambda c: _tinyface(c, "--aligned-dir", "aligned_typo"), EvalInputError,
        lambda c: [str(c.tmp / "tinyface" / "aligned_typo" / "Probe"), "not found"], "eval.tinyface --aligned-dir"),
    Row("tinyface_ranks_not_integers", lambda c: _tinyface(c, "--ranks", "1,x"), EvalInputError,
        lambda c: ["--ranks '1,x'", "1,5,20"], "eval.tinyface --ranks"),
    Row("tinyface_out_is_a_file", lambda c: _tinyface(c, "--out", str(_a_file(c))), EvalInputError,
        lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"], "eval.tinyface --out"),
    Row("tinyface_image_not_aligned", lambda c: _tinyface(c, root=_tinyface_root(c, probe_size=100)),
        EvalInputError, lambda c: ["1_1.jpg is 100x100", "aligned 112x112"], "eval.tinyface --root"),
    Row("tinyface_name_without_identity", lambda c: _tinyface(c, root=_tinyface_root(c, probe="face.jpg")),
        EvalInputError, lambda c: ["face.jpg", "cannot read the identity", "<id>_<n>.jpg"], "eval.tinyface --root"),
    # ---- eval.ijbs ----
    Row("ijbs_protocol_dir_missing", lambda c: _ijbs(c, protocol_dir=Path(MISSING)), EvalInputError,
        lambda c: ["--protocol-dir", MISSING, "folder not found"], "eval.ijbs --protocol-dir"),
    Row("ijbs_protocol_file_missing", lambda c: _ijbs(c), EvalInputError,
        lambda c: ["missing IJB-S protocol file", str(c.tmp / "protocols" / "cs6_metadata.csv")],
        "eval.ijbs --protocol-dir"),
    Row("ijbs_frames_dir_missing", lambda c: _ijbs(c, frames=Path(MISSING)), EvalInputError,
        lambda c: ["--frames-dir", MISSING, "folder not found"], "eval.ijbs --frames-dir"),
    Row("ijbs_frame_list_missing", lambda c: _ijbs(c, "--frame-list", str(c.tmp / "kept.csv")), EvalInputError,
        lambda c: ["--frame-list", str(c.tmp / "kept.csv"), "not found"], "eval.ijbs --frame-list"),
    Row("ijbs_protocol_unknown", lambda c: _ijbs(c, "--protocols", "V2S,V2X"), EvalInputError,
        lambda c: ["--protocols 'V2S,V2X'", "'V2X'", "V2B"], "eval.ijbs --protocols"),
    Row("ijbs_out_is_a_file", lambda c: _ijbs(c, "--out", str(_a_file(c))), EvalInputError,
        lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"], "eval.ijbs --out"),
    # ---- eval.verification ----
    Row("verification_bin_missing", lambda c: _eval_main("eval.verification", c, "--bin", f"{MISSING}/lfw.bin",
                                                                extra=("--device", "cpu")),
        FileNotFoundError, lambda c: [f"{MISSING}/lfw.bin"], "eval.verification --bin"),
    Row("verification_bin_without_pairs", lambda c: _eval_main("eval.verification", c, "--bin", str(_empty_bin(c)),
                                                                      extra=("--device", "cpu")),
        BinFileError, lambda c: [str(c.tmp / "empty.bin"), "holds no pairs"], "eval.verification --bin"),
    Row("verification_out_is_a_file", lambda c: _eval_main("eval.verification", c, "--bin", str(_empty_bin(c)),
                                                            "--out", str(_a_file(c)), extra=("--device", "cpu")),
        EvalInputError, lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"], "eval.verification --out"),
    # ---- tools.compare_faces ----
    Row("compare_image_missing", lambda c: _compare_model(c, a=c.tmp / "nope.jpg"), EvalInputError,
        lambda c: [str(c.tmp / "nope.jpg"), "does not exist"], "tools.compare_faces image_a"),
    Row("compare_image_not_aligned", lambda c: _compare_model(c, b=_image(c, "big.jpg", 100)), EvalInputError,
        lambda c: [str(c.tmp / "big.jpg"), "100x100", "aligned 112x112"], "tools.compare_faces image_b"),
    Row("compare_model_missing", lambda c: _compare(c, "--model", str(c.tmp / "m.pt"), "--network", "r_tiny"),
        CheckpointError, lambda c: [str(c.tmp / "m.pt"), "not found"], "tools.compare_faces --model"),
    Row("compare_network_unknown", lambda c: _compare_model(c, "--network", "r51"), SystemExit,  # argparse choices
        lambda c: ["'r51'", "r_tiny"], "tools.compare_faces --network"),
    Row("compare_embedding_size_wrong", lambda c: _compare_model(c, "--embedding-size", "64"), CheckpointError,
        lambda c: [str(c.tmp / "r_tiny_32.pt"), "embedding size"], "tools.compare_faces --embedding-size"),
    Row("compare_device_not_a_device", lambda c: _compare_model(c, "--device", "gpu"), UsageError,
        lambda c: ["--device 'gpu'"], "tools.compare_faces --device"),
    Row("compare_align_no_face", lambda c: _compare_model(c, "--align"), NoFaceError,
        lambda c: [f"photo {c.tmp / 'a.jpg'}: no face found"], "tools.compare_faces --align"),
    Row("compare_face_all", lambda c: _compare_model(c, "--align", "--face", "all"), UsageError,
        lambda c: ["--face all", "one face per photo"], "tools.compare_faces --face"),
    Row("compare_min_face_size_too_small", lambda c: _compare_model(c, "--align", "--min-face-size", "8"),
        SystemExit, lambda c: ["--min-face-size", "must be >= 12", "got 8"], "tools.compare_faces --min-face-size"),
    Row("compare_min_score_not_a_probability", lambda c: _compare_model(c, "--align", "--min-score", "1.5"),
        SystemExit, lambda c: ["--min-score", "[0, 1)", "got 1.5"], "tools.compare_faces --min-score"),
    Row("compare_threshold_not_a_number", lambda c: _compare_model(c, "--threshold", "high"), SystemExit,
        lambda c: ["--threshold", "'high'"], "tools.compare_faces --threshold"),
    Row("compare_bin_missing", lambda c: _compare_model(c, "--bin", MISSING + "/lfw.bin"), UsageError,
        lambda c: [f"--bin {MISSING}/lfw.bin does not exist"], "tools.compare_faces --bin"),
    Row("compare_far_out_of_range", lambda c: _compare_model(c, "--far", "0"), SystemExit,
        lambda c: ["--far", "must be in (0, 1]", "got 0"], "tools.compare_faces --far"),
    # ---- tools.align ----
    Row("align_photo_missing", lambda c: _align(c, photos=Path(MISSING) / "me.jpg"), EvalInputError,
        lambda c: [f"{MISSING}/me.jpg", "does not exist"], "tools.align photos"),
    Row("align_no_face", lambda c: _align(c), NoFaceError,
        lambda c: ["no face aligned from any of the 1 photo", f"photo {c.tmp / 'grey.png'}: no face found"]),
    Row("align_photo_undecodable", lambda c: _align(c, photos=_image(c, "cut.jpg", data=b"\xff\xd8 garbage")),
        NoFaceError, lambda c: [f"photo {c.tmp / 'cut.jpg'} cannot be decoded"]),
    Row("align_out_is_a_file", lambda c: _align(c, "--out", str(_a_file(c))), EvalInputError,
        lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"], "tools.align --out"),
    Row("align_face_unknown", lambda c: _align(c, "--face", "biggest"), SystemExit,
        lambda c: ["--face", "largest, all or a face index", "'biggest'"], "tools.align --face"),
    Row("align_min_face_size_too_small", lambda c: _align(c, "--min-face-size", "4"), SystemExit,
        lambda c: ["--min-face-size", "must be >= 12", "got 4"], "tools.align --min-face-size"),
    Row("align_min_score_not_a_probability", lambda c: _align(c, "--min-score", "-0.1"), SystemExit,
        lambda c: ["--min-score", "[0, 1)", "got -0.1"], "tools.align --min-score"),
    # ---- tools.style_grid ----
    Row("style_grid_not_a_generator", lambda c: _style_grid(c, generator=_backbone_file(c, "r_tiny", 32)),
        KeyError, lambda c: [str(c.tmp / "r_tiny_32.pt"), "G_state_dict"], "tools.style_grid generator"),
    Row("style_grid_faces_missing", lambda c: _style_grid(c, faces=Path(MISSING)), FileNotFoundError,
        lambda c: ["--faces", MISSING], "tools.style_grid --faces"),
    Row("style_grid_out_is_a_file", lambda c: _style_grid(c, "--out", str(_a_file(c))), EvalInputError,
        lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"], "tools.style_grid --out"),
    Row("style_grid_num_faces_zero", lambda c: _style_grid(c, "--num-faces", "0"), ValueError,
        lambda c: ["--num-faces", "0"], "tools.style_grid --num-faces"),
    Row("style_grid_coefficient_not_a_number", lambda c: _style_grid(c, "--coefficients", "1", "x"), SystemExit,
        lambda c: ["--coefficients", "'x'"], "tools.style_grid --coefficients"),
    Row("style_grid_negative_magnitude", lambda c: _style_grid(c, "--magnitudes", "1", "-2"), ValueError,
        lambda c: ["--magnitudes", "-2"], "tools.style_grid --magnitudes"),
    Row("style_grid_seed_not_an_integer", lambda c: _style_grid(c, "--seed", "1.5"), SystemExit,
        lambda c: ["--seed", "'1.5'"], "tools.style_grid --seed"),
    Row("style_grid_tensorboard_is_a_file", lambda c: _style_grid(c, "--tensorboard", str(_a_file(c))), ValueError,
        lambda c: ["--tensorboard", str(c.tmp / "not_a_folder.txt"), "is a file"], "tools.style_grid --tensorboard"),
    Row("style_grid_device_not_a_device", lambda c: _style_grid(c, "--device", "gpu"), UsageError,
        lambda c: ["--device 'gpu'"], "tools.style_grid --device"),
    # ---- tools.dataset_similarity ----
    Row("similarity_one_generator", lambda c: _similarity(c, f"a={c.generator}"), ValueError,
        lambda c: ["at least two generators", str(c.generator)], "tools.dataset_similarity generators"),
    Row("similarity_name_without_path", lambda c: _similarity(c, "a=", f"b={c.generator}"), ValueError,
        lambda c: ["'a='", "NAME=PATH"], "tools.dataset_similarity generators"),
    Row("similarity_not_a_generator", lambda c: _similarity(c, f"a={c.generator}",
                                                            f"b={_backbone_file(c, 'r_tiny', 32)}"),
        CheckpointError, lambda c: [str(c.tmp / "r_tiny_32.pt"), "'pca.U'"], "tools.dataset_similarity generators"),
    Row("similarity_out_is_a_file", lambda c: _similarity(c, f"a={c.generator}", f"b={c.generator}x", "--out",
                                                          str(_a_file(c))),
        EvalInputError, lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"],
        "tools.dataset_similarity --out"),
    # ---- tools.export_onnx (refused before anything is exported) ----
    Row("export_model_missing", lambda c: _export(c, model=c.tmp / "m.pt"), CheckpointError,
        lambda c: [str(c.tmp / "m.pt"), "not found"], "tools.export_onnx --model"),
    Row("export_network_unknown", lambda c: _export(c, "--network", "r51"), SystemExit,
        lambda c: ["--network", "'r51'"], "tools.export_onnx --network"),
    Row("export_embedding_size_wrong", lambda c: _export(c, "--embedding-size", "64"), CheckpointError,
        lambda c: [str(c.tmp / "r_tiny_32.pt"), "embedding size"], "tools.export_onnx --embedding-size"),
    Row("export_out_is_a_file", lambda c: _export(c, "--out", str(_a_file(c))), EvalInputError,
        lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"], "tools.export_onnx --out"),
    Row("export_name_with_folder", lambda c: _export(c, "--name", "sub/model.onnx"), SystemExit,
        lambda c: ["--name", "'sub/model.onnx'", "without folders"], "tools.export_onnx --name"),
    Row("export_opset_too_low", lambda c: _export(c, "--opset", "0"), SystemExit,
        lambda c: ["--opset", "got 0"], "tools.export_onnx --opset"),
    Row("export_tolerance_negative", lambda c: _export(c, "--tolerance", "-1"), SystemExit,
        lambda c: ["--tolerance", "must be > 0", "-1"], "tools.export_onnx --tolerance"),
    # ---- tools.embed (model arguments: eval.common.add_model_args, covered by the "eval" rows) ----
    Row("embed_images_missing", lambda c: _embed(c, images=Path(MISSING)), EvalInputError,
        lambda c: [MISSING, "does not exist", "a folder, a .txt list of image paths or a"], "tools.embed images"),
    Row("embed_align_no_face", lambda c: _embed(c, "--align", images=_image(c, "grey.png")), NoFaceError,
        lambda c: ["no face aligned from any of the 1 photo", f"photo {c.tmp / 'grey.png'}: no face found"],
        "tools.embed --align"),
    Row("embed_face_negative", lambda c: _embed(c, "--align", "--face", "-1"), SystemExit,
        lambda c: ["--face", "largest, all or a face index", "got -1"], "tools.embed --face"),
    Row("embed_min_face_size_not_a_number", lambda c: _embed(c, "--align", "--min-face-size", "big"), SystemExit,
        lambda c: ["--min-face-size", "'big'"], "tools.embed --min-face-size"),
    Row("embed_min_score_not_a_probability", lambda c: _embed(c, "--align", "--min-score", "2"), SystemExit,
        lambda c: ["--min-score", "[0, 1)", "got 2"], "tools.embed --min-score"),
    Row("embed_out_is_a_file", lambda c: _embed(c, "--out", str(_a_file(c))), EvalInputError,
        lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"], "tools.embed --out"),
    # ---- tools.style_report ----
    Row("report_not_a_generator", lambda c: _report(c, generator=_backbone_file(c, "r_tiny", 32)), KeyError,
        lambda c: [str(c.tmp / "r_tiny_32.pt"), "G_state_dict"], "tools.style_report generator"),
    Row("report_faces_missing", lambda c: _report(c, "--faces", MISSING), FileNotFoundError,
        lambda c: ["--faces", MISSING], "tools.style_report --faces"),
    Row("report_id_model_missing", lambda c: _report(c, "--id-model", str(c.tmp / "id.pt")), CheckpointError,
        lambda c: [str(c.tmp / "id.pt"), "not found"], "tools.style_report --id-model"),
    Row("report_id_network_other", lambda c: _report(c, "--id-network", "mbf_tiny"), CheckpointError,
        lambda c: [str(c.tmp / "r_tiny_32.pt"), "first mismatching key"], "tools.style_report --id-network"),
    Row("report_id_embedding_size_wrong", lambda c: _report(c, "--id-embedding-size", "64"), CheckpointError,
        lambda c: [str(c.tmp / "r_tiny_32.pt"), "embedding size"], "tools.style_report --id-embedding-size"),
    Row("report_target_faces_missing", lambda c: _report(c, "--target-faces", MISSING), FileNotFoundError,
        lambda c: ["--target-faces", MISSING], "tools.style_report --target-faces"),
    Row("report_out_is_a_file", lambda c: _report(c, "--out", str(_a_file(c))), EvalInputError,
        lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"], "tools.style_report --out"),
    Row("report_one_face", lambda c: _report(c, "--num-faces", "1"), SystemExit,
        lambda c: ["--num-faces", "got 1"], "tools.style_report --num-faces"),
    Row("report_no_target_faces", lambda c: _report(c, "--num-target-faces", "0"), UsageError,
        lambda c: ["--num-target-faces", "got 0"], "tools.style_report --num-target-faces"),
    Row("report_one_gap_face", lambda c: _report(c, "--gap-faces", "1"), UsageError,
        lambda c: ["--gap-faces", "got 1", "0 (off) or >= 2"], "tools.style_report --gap-faces"),
    Row("report_no_directions", lambda c: _report(c, "--directions", "0"), UsageError,
        lambda c: ["--directions", "got 0"], "tools.style_report --directions"),
    Row("report_distance_range_degenerate", lambda c: _report(c, "--distance-range", "2", "2", "0.1", "0.5"),
        UsageError, lambda c: ["--distance-range", "[2.0, 2.0, 0.1, 0.5]", "LA and UA must differ"],
        "tools.style_report --distance-range"),
    Row("report_seed_not_an_integer", lambda c: _report(c, "--seed", "x"), SystemExit,
        lambda c: ["--seed", "'x'"], "tools.style_report --seed"),
    Row("report_device_not_a_device", lambda c: _report(c, "--device", "gpu"), UsageError,
        lambda c: ["--device 'gpu'"], "tools.style_report --device"),
    # ---- tools.pipeline (checked before its first stage starts) ----
    Row("pipeline_set_without_equals", lambda c: _pipeline(c, "--set", "lr0.05"), ConfigError,
        lambda c: ["'lr0.05'", "key=value"], "tools.pipeline --set"),
    Row("pipeline_generator_set_unknown_key", lambda c: _pipeline(c, "--generator-set", "gen_lrr=1e-3"),
        ConfigError, lambda c: ["'gen_lrr'", "gen_lr"], "tools.pipeline --generator-set"),
    Row("pipeline_negative_steps", lambda c: _pipeline(c, "--steps", "-1"), SystemExit,
        lambda c: ["--steps", "-1"], "tools.pipeline --steps"),
    Row("pipeline_negative_generator_steps", lambda c: _pipeline(c, "--generator-steps", "-2"), SystemExit,
        lambda c: ["--generator-steps", "-2"], "tools.pipeline --generator-steps"),
    # ---- tools.make_toy_data (all refused before anything is rendered) ----
    Row("toy_out_is_a_file", lambda c: _toy(c, "--out", str(_a_file(c))), SystemExit,
        lambda c: ["--out", str(c.tmp / "not_a_folder.txt"), "is a file"], "tools.make_toy_data --out"),
    Row("toy_zero_identities", lambda c: _toy(c, "--num-identities", "0"), SystemExit,
        lambda c: ["--num-identities", ">= 2", "got 0"], "tools.make_toy_data --num-identities"),
    Row("toy_one_image_per_identity", lambda c: _toy(c, "--images-per-identity", "1"), SystemExit,
        lambda c: ["--images-per-identity", "got 1"], "tools.make_toy_data --images-per-identity"),
    Row("toy_one_eval_identity", lambda c: _toy(c, "--num-eval-identities", "1"), SystemExit,
        lambda c: ["--num-eval-identities", "got 1"], "tools.make_toy_data --num-eval-identities"),
    Row("toy_odd_pairs", lambda c: _toy(c, "--num-pairs", "3"), ValueError, lambda c: ["num_pairs", "3", "even"],
        "tools.make_toy_data --num-pairs"),
    Row("toy_no_target_faces", lambda c: _toy(c, "--num-target-faces", "0"), SystemExit,
        lambda c: ["--num-target-faces", "got 0"], "tools.make_toy_data --num-target-faces"),
    Row("toy_seed_not_an_integer", lambda c: _toy(c, "--seed", "x"), SystemExit, lambda c: ["--seed", "'x'"],
        "tools.make_toy_data --seed"),
    Row("toy_workers_negative", lambda c: _toy(c, "--workers", "-1"), SystemExit, lambda c: ["--workers", "got -1"],
        "tools.make_toy_data --workers"),  # 0 = render in this process, as --workers means for every command
    Row("toy_unknown_domain", lambda c: _toy(c, "--domains", "bogus"), SystemExit,
        lambda c: ["--domains", "'bogus'", "camera"], "tools.make_toy_data --domains"),
]

# Commands whose every non-flag input must have a row above ("eval" rows cover eval.common.add_model_args once).
CLI_MODULES = ("eval.ijb", "eval.tinyface", "eval.ijbs", "eval.verification", "tools.compare_faces",
               "tools.style_grid", "tools.dataset_similarity", "tools.make_toy_data", "tools.export_onnx",
               "tools.embed", "tools.style_report", "tools.align")
SHARED_MODEL_ARGS = ("--model", "--network", "--embedding-size", "--device", "--batch-size", "--workers")
MODEL_ARG_MODULES = ("eval.ijb", "eval.tinyface", "eval.ijbs", "eval.verification", "tools.embed")  # add_model_args
NOT_YET_COVERED: set[str] = set()  # "<command> <input>" pairs waiting for a row (none)


def _parser_inputs(module: str) -> list[str]:
    """The inputs a command's parser takes: positionals by name, options by their long flag; flags that take no
    value (--help, store_true) have no bad value and are left out. The parser is caught as main() parses."""
    import argparse
    import importlib
    from unittest import mock

    class Parsed(Exception):
        pass

    captured = {}

    def grab(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        captured["parser"] = self
        raise Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", grab), pytest.raises(Parsed):
        importlib.import_module(module).main([])
    return [next((s for s in a.option_strings if s.startswith("--")), a.dest)
            for a in captured["parser"]._actions if a.nargs != 0]


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_cli_input_has_a_row(module: str) -> None:
    covered = {r.covers for r in ROWS} | NOT_YET_COVERED
    inputs = _parser_inputs(module)
    assert len(inputs) >= 2, inputs  # the parser was found
    missing = [i for i in inputs if f"{module} {i}" not in covered
               and not (module in MODEL_ARG_MODULES and i in SHARED_MODEL_ARGS and f"eval {i}" in covered)]
    assert not missing, f"{module}: no bad-input row for {missing}"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_named(row: Row, mini_toy: Path, tiny_generator_file: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    ctx = Ctx(toy=Path(mini_toy), generator=tiny_generator_file, tmp=tmp_path)
    with pytest.raises(row.error) as info:
        row.run(ctx)
    # argparse reports on stderr and exits; everything else carries the message on the exception
    message = str(info.value) + (capsys.readouterr().err if row.error is SystemExit else "")
    for fragment in row.names(ctx):
        assert fragment in message, f"{row.id}: {fragment!r} not in message:\n{message}"


def test_matrix_covers_every_area() -> None:
    """At least 15 rows, and each area of issue 7 item 6 is present."""
    ids = {r.id for r in ROWS}
    assert len(ROWS) >= 15 and len(ids) == len(ROWS)
    for needed in ("rec_missing_idx", "rec_bad_magic", "rec_truncated", "idx_offset_past_eof", "undecodable_image",
                   "label_out_of_range", "empty_image_folder", "bin_pair_count_mismatch", "num_classes_mismatch",
                   "override_unknown_key", "bad_value_type", "rs_ratio_out_of_range", "k_negative", "unknown_loss",
                   "generator_missing", "generator_without_G_state_dict", "generator_wrong_shapes",
                   "backbone_other_architecture", "pfc_shard_count_mismatch", "resume_other_world_size",
                   "train_without_config", "override_without_equals", "eval_missing_meta_file",
                   "eval_wrong_architecture"):
        assert needed in ids, needed


# ---- helpers of the second data matrix (issue 11) -----------------------------------------------------------------

def _idx_bytes(ctx: Ctx, prefix: bytes, suffix: bytes = b"") -> Path:
    """A copy of the toy pack whose .idx gets bytes before / after its lines (an editor's BOM, a stray character)."""
    d = _rec_copy(ctx, "train.rec", "train.idx", "property")
    (d / "train.idx").write_bytes(prefix + (d / "train.idx").read_bytes() + suffix)
    return d


def _header(a: int, b: int) -> Callable[[bytes], bytes]:
    return lambda payload: pack_record(unpack_record(payload)[0], b"", label_array=[a, b])


def _empty_image(payload: bytes) -> bytes:
    return pack_record(unpack_record(payload)[0]._replace(flag=0), b"")


def _faces(ctx: Ctx) -> Path:
    root = ctx.tmp / "faces"
    (root / "amy").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "amy" / "1.jpg"), np.zeros((112, 112, 3), np.uint8))
    return root


def _faces_with_empty_file(ctx: Ctx) -> Path:
    root = _faces(ctx)
    (root / "amy" / "0.jpg").write_bytes(b"")  # a 0-byte file: an interrupted copy
    return root


def _pack(ctx: Ctx, faces: Path, *_: object) -> object:
    from tools.pack_rec import pack_folder

    return pack_folder(faces, ctx.tmp / "packed", workers=1, progress=False)


def _bin_with_issame(ctx: Ctx, issame: list, empty_image: bool = False) -> Path:
    _, jpg = cv2.imencode(".jpg", np.zeros((112, 112, 3), np.uint8))
    images = [jpg.tobytes()] * (2 * len(issame))
    if empty_image:
        images[1] = b""
    path = ctx.tmp / "issame.bin"
    path.write_bytes(pickle.dumps((images, issame), protocol=4))
    return path


def test_header_listing_fewer_images_warns_with_both_counts(mini_toy: Path, tmp_path: Path) -> None:
    """Not an error (the header's images are valid), but the user learns that part of the .idx is unused."""
    ctx = Ctx(toy=Path(mini_toy), generator=Path(), tmp=tmp_path)
    d = _rewrite_record(ctx, 0, _header(91, 107))  # 90 of the 96 images; keys 91..106 are read as identities
    with pytest.warns(UserWarning, match=r"lists 90 images \(keys 1\.\.90\) but .*train\.idx holds 96 image records"):
        assert MXFaceDataset(d).num_images == 90


# ---- stage 1 with 2 real gloo ranks whose inputs differ --------------------------------------------------------

def _stage1_rank(rank: int, port: int, argvs: list[list[str]], out_dir: str) -> None:
    """One rank of a 2-rank stage-1 launch (what torchrun sets up), reporting how train_generator.main ended."""
    import os
    import time

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import train_generator

    start = time.time()
    try:
        train_generator.main(argvs[rank])
        outcome = {"error": None}
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    outcome["seconds"] = time.time() - start
    torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_stage1_bad_target_on_one_rank_stops_both_ranks(mini_toy: Path, tiny_generator_file: Path,
                                                        tmp_path: Path) -> None:
    """Each node reads its own disk: rank 1's copy of the target folder has an undecodable image, rank 0's is fine.
    Rank 1 reports the file, rank 0 stops with it at once (not after dist_timeout_s), and no output folder exists."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    ctx = Ctx(toy=Path(mini_toy), generator=tiny_generator_file, tmp=tmp_path)
    bad_targets = _targets(ctx, {4: b"\x00" * 10})
    common = dict(rec=ctx.toy, generate_toy_data=False, id_model=_backbone_file(ctx, "r_tiny", 32),
                  id_network="r_tiny", id_embedding_size=32, gen_dim=4, gen_latent_dim=16, gen_style_dim=4,
                  batch_size=2, max_steps=1, num_workers=0, tensorboard=False, image_every=0, device="cpu",
                  dist_timeout_s=300, output=tmp_path / "stage1_run")
    argvs = [["configs/cfsm_toy"] + [f"{k}={v}" for k, v in {**common, "target": target}.items()]
             for target in (ctx.toy / "target_faces", bad_targets)]
    mp.spawn(_stage1_rank, args=(free_port(), argvs, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert rank1["error"] == "ValueError" and "1 of 20 target images cannot be decoded" in rank1["message"], rank1
    assert str(bad_targets) in rank1["message"]
    assert rank0["error"] == "PeerRankError" and "rank 1 failed during the stage-1 input file check" in \
        rank0["message"], rank0
    assert rank0["seconds"] < 300  # agreed at once; without the agreement rank 0 waits out dist_timeout_s
    assert not (tmp_path / "stage1_run").exists()


# ---- the probe table through the real command line: one `error:` line, exit 2, no traceback ----

def _probe_rows(tmp: Path, mini_toy: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    import sys

    import torch

    from backbones import get_model
    from utils.data.binfile import write_bin

    (tmp / "a_file").write_text("not a folder")
    torch.save(get_model("r_tiny", num_features=32).state_dict(), tmp / "backbone.pt")
    face = cv2.imencode(".jpg", np.zeros((112, 112, 3), np.uint8))[1].tobytes()
    write_bin(tmp / "nine.bin", [face] * 18, [True, False] * 4 + [True])
    (tmp / "syntax.py").write_text("from configs.toy import config\nconfig.lr = (\n")
    (tmp / "raises.py").write_text("from configs.toy import config\nconfig.lr = 1 / 0\n")
    toy = [f"rec={mini_toy}", "generate_toy_data=False", f"output={tmp / 'out'}", "num_workers=0"]
    train = [sys.executable, "train.py", "configs/toy"]
    rows = [
        ("output is a file", [*train, *toy, f"output={tmp / 'a_file'}"], {}),
        ("RANK outside WORLD_SIZE", [*train, *toy], {"RANK": "3", "WORLD_SIZE": "2"}),
        ("no MASTER_ADDR", [*train, *toy], {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": ""}),
        ("WORLD_SIZE not a number", [*train, *toy], {"WORLD_SIZE": "abc"}),
        ("empty output", [*train, *toy, "output="], {}),
        ("space-padded rec", [*train, "rec= ", "generate_toy_data=False"], {}),
        ("batch_size 1", [*train, *toy, "batch_size=1"], {}),
        ("batch_size larger than the data", [*train, *toy, "batch_size=100000"], {}),
        ("a stage-1 key given to stage 2", [*train, *toy, "gen_dim=32"], {}),
        ("a degradation out of its range", [*train, *toy, "degrade_noise_std=(1.0, 500.0)"], {}),
        ("a backbone as the generator", [*train, *toy, "rs_ratio=0.5",
                                         f"pretrained_synthesis_model={tmp / 'backbone.pt'}"], {}),
        ("a config with a syntax error", [sys.executable, "train.py", str(tmp / "syntax.py")], {}),
        ("a config that raises", [sys.executable, "train.py", str(tmp / "raises.py")], {}),
        ("--opset 99", [sys.executable, "-m", "tools.export_onnx", "--model", str(tmp / "backbone.pt"), "--out",
                        str(tmp / "onnx"), "--opset", "99"], {}),
        ("a 9-pair .bin", [sys.executable, "-m", "eval.verification", "--model", str(tmp / "backbone.pt"),
                           "--bin", str(tmp / "nine.bin"), "--device", "cpu"], {}),
        ("make_toy_data negative count", [sys.executable, "-m", "tools.make_toy_data", "--out", str(tmp / "t"),
                                          "--num-identities", "-3"], {}),
    ]
    if not torch.cuda.is_available():
        rows.append(("device=cuda without CUDA", [*train, *toy, "device=cuda"], {}))
    return rows


@pytest.mark.slow
def test_probe_table_through_the_real_command_line(mini_toy: Path, tmp_path: Path) -> None:
    """Each mistake, run as a user runs it (a subprocess), ends in exactly one `error:` line and exit 2."""
    import os
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers import REPO

    def run(row):
        name, cmd, extra = row
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT", "CFSM_TRACEBACK")}
        env.update({k: v for k, v in extra.items() if v}, OMP_NUM_THREADS="1")
        return name, subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=headroom(300))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, _probe_rows(tmp_path, mini_toy)))
    for name, proc in results:
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), (name, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-1500:])
    assert not (REPO / " ").exists()  # the space-padded rec made no folder named ' '
