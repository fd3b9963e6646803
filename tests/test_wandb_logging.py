"""Optional wandb logging: the same scalars and images as TensorBoard (read back from WANDB_MODE=offline run
files), resume continuing the wandb run, artifacts, and the config error when wandb is not installed."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from configs.loader import ConfigError, load_config
from tests.helpers import headroom

# ---- reading an offline run back: wandb's .wandb file is a LevelDB-style log of protobuf Record messages ----
# (7-byte file header ":W&B" + magic + version; 32 KiB blocks; each chunk: crc32, uint16 length, type 1 full /
# 2 first / 3 middle / 4 last)


def _records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left  # block trailer
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _read_run(folder: Path) -> dict:
    run = {"id": folder.name.rsplit("-", 1)[-1], "rows": [], "artifacts": 0, "complete": False}
    for record in _records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, name=record.run.display_name, notes=record.run.notes,
                       project=record.run.project)
        elif kind == "history":
            run["rows"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                for i in record.history.item})
        elif kind == "artifact":
            run["artifacts"] += 1
        elif kind == "exit":
            run["complete"] = True
    return run


def offline_runs(output: Path, timeout_s: float | None = None) -> list[dict]:
    """Each offline run under output/wandb (oldest first): its id, name, notes and history rows {key: value}.
    wandb's service may still be writing a finished run's file on a loaded machine: read until every run holds its
    exit record."""
    deadline = time.monotonic() + (headroom(30) if timeout_s is None else timeout_s)
    while True:
        runs = [_read_run(folder) for folder in sorted((output / "wandb").glob("offline-run-*"))]
        if all(r["complete"] for r in runs) or time.monotonic() > deadline:
            assert all(r["complete"] for r in runs), [(r["id"], len(r["rows"])) for r in runs]
            return runs
        time.sleep(0.2)


def _values(run: dict) -> dict[str, list[tuple[int, object]]]:
    """tag -> [(global_step, value)] of the rows (images: their wandb descriptor)."""
    out: dict[str, list] = {}
    for row in run["rows"]:
        images = {k.split("/_type")[0] for k, v in row.items() if k.endswith("/_type") and v == "image-file"}
        for key, value in row.items():
            if key.startswith("_") or key == "global_step" or any(key.startswith(i + "/") for i in images):
                continue
            out.setdefault(key, []).append((row["global_step"], value))
        for image in images:
            out.setdefault(image, []).append((row["global_step"], (row[f"{image}/width"], row[f"{image}/height"])))
    return out


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # no skip: the README's test command (and CI) installs requirements-test.txt, which holds wandb
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def _cfg(output: Path, *extra: str):
    return load_config("configs/toy", [f"output={output}", "wandb=True", "wandb_project=cfsm-test",
                                       "wandb_notes=offline test", *extra])


def test_writer_logs_each_step_as_one_row_and_resumes_its_run(tmp_path: Path, offline: None) -> None:
    from utils.logging import run_writer
    from utils.wandb_logging import RUN_FILE, FanOutWriter

    cfg = _cfg(tmp_path, "tensorboard=True", "wandb_run_suffix=try1")
    writer = run_writer(tmp_path, cfg, resumed=False)
    assert isinstance(writer, FanOutWriter)  # TensorBoard and wandb behind one writer
    writer.add_scalar("train/loss", 2.5, 1)
    writer.add_scalar("train/lr", 0.1, 1)
    writer.add_scalar("train/loss", 2.0, 2)
    writer.add_image("cfsm/grid", np.zeros((3, 8, 6), np.uint8), 2)  # CHW, TensorBoard's default
    writer.add_image("cfsm/hwc", np.full((5, 4, 3), 200, np.uint8), 2, dataformats="HWC")
    writer.close()
    saved = json.loads((tmp_path / RUN_FILE).read_text())
    (run,) = offline_runs(tmp_path)
    assert run["id"] == saved["id"] and run["name"] == saved["name"] and run["name"].startswith("toy_")
    assert run["name"].endswith("_try1") and run["notes"] == "offline test" and run["project"] == "cfsm-test"
    assert [r["global_step"] for r in run["rows"]] == [1, 2]  # one row per step
    values = _values(run)
    assert values == {"train/loss": [(1, 2.5), (2, 2.0)], "train/lr": [(1, 0.1)], "cfsm/grid": [(2, (6, 8))],
                      "cfsm/hwc": [(2, (4, 5))]}

    # a resumed training run continues the wandb run of its folder; a fresh one starts another
    time.sleep(1.1)  # offline folders are named offline-run-<second>-<id>: the same id in the same second collides
    again = run_writer(tmp_path, cfg, resumed=True)
    again.add_scalar("train/loss", 1.5, 3)
    again.close()
    assert json.loads((tmp_path / RUN_FILE).read_text())["id"] == saved["id"]
    assert [r["id"] for r in offline_runs(tmp_path)] == [saved["id"], saved["id"]]
    fresh = run_writer(tmp_path, cfg, resumed=False)
    fresh.close()
    assert json.loads((tmp_path / RUN_FILE).read_text())["id"] != saved["id"]
    off = run_writer(tmp_path, _cfg(tmp_path, "tensorboard=False", "wandb_resume=False"), resumed=True)
    assert not isinstance(off, FanOutWriter)  # wandb alone
    off.close()
    assert len({r["id"] for r in offline_runs(tmp_path)}) == 3


def test_artifact_of_the_final_model(tmp_path: Path, offline: None) -> None:
    from utils.logging import run_writer

    (tmp_path / "model.pt").write_bytes(b"weights")
    writer = run_writer(tmp_path, _cfg(tmp_path, "tensorboard=False", "wandb_save_artifacts=True"))
    writer.add_scalar("train/loss", 1.0, 1)
    writer.close()
    assert offline_runs(tmp_path)[0]["artifacts"] == 1


def test_wandb_requested_but_not_installed_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import utils.wandb_logging

    monkeypatch.setattr(utils.wandb_logging, "wandb_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"config key 'wandb' = True: the wandb package is not installed: "
                                          r"`pip install wandb`.*or set wandb=False"):
        load_config("configs/toy", ["wandb=True"])
    load_config("configs/toy", ["wandb=False"])  # not asked for: no error
    with pytest.raises(ConfigError, match="'wandb_project' = ''"):
        load_config("configs/toy", ["wandb_project="])


@pytest.mark.slow
def test_training_run_logs_the_tensorboard_scalars_and_images(mini_toy: Path, tmp_path: Path,
                                                               tiny_generator_file: Path, offline: None) -> None:
    """train.py with CFSM, verification and image grids: every TensorBoard tag and value is in the wandb run, at the
    same steps; resuming the run (2 more steps) continues the same wandb run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train
    from tests.helpers import tiny_args

    out = tmp_path / "run"
    args = tiny_args(mini_toy, out, f"pretrained_synthesis_model={tiny_generator_file}", "rs_ratio=0.5", "k=1",
                     "tensorboard=True", "wandb=True", "save_every=1", "image_every=1")
    train.main([*args, "max_steps=2"])
    train.main([*args, "max_steps=4"])  # resumes from step 2
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    runs = offline_runs(out)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    logged: dict[str, list] = {}
    for run in runs:
        for tag, points in _values(run).items():
            logged.setdefault(tag, []).extend(points)
    scalar_tags = events.Tags()["scalars"]
    assert {"train/loss", "val/toy_clean_accuracy", "cfsm/attack_gain"} <= set(scalar_tags)
    for tag in scalar_tags:
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)] == logged[tag], tag
    (image_tag,) = events.Tags()["images"]
    assert [e.step for e in events.Images(image_tag)] == [s for s, _ in logged[image_tag]] == [1, 2, 3, 4]
    assert {(e.width, e.height) for e in events.Images(image_tag)} == {size for _, size in logged[image_tag]}
    assert set(logged) == set(scalar_tags) | {image_tag}
