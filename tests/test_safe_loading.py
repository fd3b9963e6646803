"""Safe loading: a crafted `.pth` whose unpickling would run a shell command is refused by every loader that
reads checkpoints (CFSM generator, train.py fine-tuning and resume, the evaluation model loader), and the command
never runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import train
from cfsm import load_generator
from eval.common import load_backbone
from tests.helpers import tiny_args
from utils.checkpoint import CheckpointError
from utils.checkpoint import file_sha256
from utils.run.run_folder import COMPLETE, rank_file, step_dir


class _Payload:
    """Unpickles to `os.system("touch <marker>")`: the classic pickle code-execution gadget."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path, wrap: str) -> Path:
    """torch.save a file that looks like the expected kind but carries the payload where a tensor should be."""
    payload = _Payload(marker)
    obj = {
        "generator": {"G_state_dict": {"pca.U": payload}},
        "state_dict": {"conv1.weight": torch.zeros(1), "fc.weight": payload},
        "run": {"backbone": payload, "step": 1},
    }[wrap]
    torch.save(obj, path)
    return path


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def test_payload_is_armed(tmp_path: Path, marker: Path) -> None:
    """Control: the same file loaded *unsafely* does run the command, so the refusals below mean something."""
    path = _crafted(tmp_path / "evil.pth", marker, "state_dict")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_generator_loader_refuses_payload(tmp_path: Path, marker: Path) -> None:
    path = _crafted(tmp_path / "evil_generator.pth", marker, "generator")
    with pytest.raises(ValueError, match=r"evil_generator\.pth.*(Unpickling|weights_only|Weights only)"):
        load_generator(path)
    assert not marker.exists()


def test_train_pretrained_backbone_refuses_payload(mini_toy: Path, tmp_path: Path, marker: Path) -> None:
    path = _crafted(tmp_path / "evil_backbone.pth", marker, "state_dict")
    with pytest.raises(CheckpointError, match=r"evil_backbone\.pth.*weights_only=True"):
        train.main(tiny_args(mini_toy, tmp_path / "out", "max_steps=1", f"pretrained_backbone_model={path}"))
    assert not marker.exists()


def test_train_resume_refuses_payload(mini_toy: Path, tmp_path: Path, marker: Path) -> None:
    """A tampered rank file inside an otherwise complete checkpoint directory is refused on resume."""
    out = tmp_path / "out"
    directory = step_dir(out, 1)
    directory.mkdir(parents=True)
    _crafted(rank_file(directory, 0), marker, "run")
    (directory / COMPLETE).write_text(json.dumps({"step": 1, "world_size": 1, "kind": "recognition"}))
    with pytest.raises(CheckpointError, match=r"rank_0\.pt.*weights_only=True"):
        train.main(tiny_args(mini_toy, out, "max_steps=2", "resume=True"))
    assert not marker.exists()


def test_auto_resume_skips_a_tampered_newest_checkpoint(mini_toy: Path, tmp_path: Path, marker: Path) -> None:
    """resume="auto": a newest rank file that cannot be loaded safely is refused (the command never runs) and the
    run continues from the older intact checkpoint, with a warning naming the refused folder."""
    out = tmp_path / "out"
    train.main(tiny_args(mini_toy, out, "max_steps=2", "save_every=1", "keep_checkpoints=5", "val_targets=[]"))
    newest = step_dir(out, 2)
    _crafted(rank_file(newest, 0), marker, "run")
    meta = json.loads((newest / COMPLETE).read_text())
    meta["sizes"]["0"] = rank_file(newest, 0).stat().st_size  # size and checksum as recorded: found only by loading
    meta["sha256"]["0"] = file_sha256(rank_file(newest, 0))
    (newest / COMPLETE).write_text(json.dumps(meta))
    summary = train.main(tiny_args(mini_toy, out, "max_steps=3", "val_targets=[]"))
    assert summary["steps"] == 3 and not marker.exists()
    log = (out / "train.log").read_text()
    assert f"{newest} could not be loaded on every rank" in log and "step_00000001 at step 1" in log


def test_eval_model_loader_refuses_payload(tmp_path: Path, marker: Path) -> None:
    path = _crafted(tmp_path / "evil_model.pt", marker, "state_dict")
    with pytest.raises(CheckpointError, match=r"evil_model\.pt.*weights_only=True"):
        load_backbone(path, "r_tiny")
    assert not marker.exists()


def test_a_refused_pickle_is_one_line_naming_the_file_and_what_it_would_run(tmp_path: Path, marker: Path) -> None:
    """Through a command (tools.style_grid loads a generator): one `error:` line naming the file and the function
    the pickle would have called, not torch's paragraph about weights_only=False."""
    import subprocess
    import sys

    from tests.helpers import REPO, headroom, launch_env

    path = _crafted(tmp_path / "evil_generator.pth", marker, "generator")
    faces = tmp_path / "faces"
    faces.mkdir()
    proc = subprocess.run([sys.executable, "-m", "tools.style_grid", str(path), "--faces", str(faces), "--out",
                           str(tmp_path / "grid")], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=headroom(60))
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.splitlines() == [
        f"error: refused to load {path}: unpickling it would run posix.system (code, not tensors; torch.load with "
        f"weights_only=True stopped it). Re-save its state dict of tensors where you trust its source"], proc.stderr


class _Plain:
    """A harmless class: weights_only refuses it all the same, and the line names it."""


def test_a_refused_class_is_named(tmp_path: Path) -> None:
    from utils.checkpoint import safe_load

    path = tmp_path / "object.pt"
    torch.save({"w": torch.zeros(1), "extra": _Plain()}, path)
    with pytest.raises(CheckpointError) as caught:
        safe_load(path)
    assert str(caught.value) == (f"refused to load {path}: unpickling it would run tests.test_safe_loading._Plain "
                                 f"(code, not tensors; torch.load with weights_only=True stopped it). Re-save its "
                                 f"state dict of tensors where you trust its source")
