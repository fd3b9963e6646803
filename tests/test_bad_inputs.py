"""The bad-input matrix: every row is one wrong file, config value, checkpoint or CLI argument fed to the public
entry point that meets it first. Each row asserts the exception type AND that the message names the file / key /
value, so a user can fix the input from the message alone. README "Troubleshooting" mirrors this table.

The rows run the module-level functions (``train.main``, ``dataset.*``, ``utils.binfile.load_bin``,
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
from eval.common import EvalInputError
from losses import ArcFace
from partial_fc import PartialFC
from tests.test_train import tiny_args
from utils.binfile import BinFileError, load_bin
from utils.checkpoint import COMPLETE, CheckpointError, safe_load, step_dir
from utils.config import ConfigError
from utils.recordio import IndexedRecordReader, IndexedRecordWriter, RecordIOError, pack_record, unpack_record


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
        CheckpointError, lambda c: [str(c.tmp / "mbf_tiny_32.pt"), "first mismatching key"]),
    Row("eval_model_missing", lambda c: _ijb(c, c.tmp / "model.pt"), CheckpointError,
        lambda c: [str(c.tmp / "model.pt"), "not found"]),
    Row("eval_bad_target", lambda c: _ijb(c, c.tmp / "model.pt", target="IJBX"), SystemExit,
        lambda c: ["--target", "'IJBX'"]),
]


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
