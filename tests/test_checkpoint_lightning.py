"""Lightning / AdaFace `.ckpt` and CVLFace `.safetensors` model files (utils/model_file.py), read without executing
anything from them, and what the commands say about a file (the one detection line, channel order, contradictions).

The `.ckpt` is built as AdaFace's trainer writes it: a dict with `epoch`, `global_step`, `pytorch-lightning_version`,
`state_dict` (the backbone under `model.`, AdaFace's margin head `head.kernel` + buffers), `optimizer_states`,
`callbacks`, `hparams_name` and `hyper_parameters` pickled as classes of a fake `pytorch_lightning` package that
exists only while the file is written. Its weights are the deterministic rule weights, so its embeddings can be
compared with the outputs of AdaFace's own network in tests/fixtures/adaface (see tests/test_adaface_ir.py).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from backbones import get_model
from eval.common import load_backbone, load_backbone_choice
from tests._rule_weights import input_x, rel_err, rule_state_dict
from tests.helpers import headroom
from utils.checkpoint import CheckpointError
from utils.model_file import load_state_dict_file
from utils.model_file import InertObject, inert_load, read_model_file

from .conftest import FIXTURES, REPO_ROOT


class _Payload:
    """Unpickles to os.system("touch marker") (the classic gadget), hidden inside the hyper-parameters."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


_PL_MODULES = ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing",
               "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")


class _FakeLightning:
    """While active, `pytorch_lightning.utilities.parsing.AttributeDict` (a dict subclass, as Lightning's) and
    `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` (an object with state) exist, so that pickles
    name them; afterwards the package is gone again (and was never installed)."""

    def __init__(self) -> None:
        self.mods = {m: types.ModuleType(m) for m in _PL_MODULES}

        class AttributeDict(dict):
            pass

        class ModelCheckpoint:
            def __init__(self) -> None:
                self.monitor, self.best_model_score = "val_acc", torch.tensor(0.9)

        for cls, mod in ((AttributeDict, _PL_MODULES[2]), (ModelCheckpoint, _PL_MODULES[4])):
            cls.__module__, cls.__qualname__ = mod, cls.__name__
            setattr(self.mods[mod], cls.__name__, cls)
        self.AttributeDict, self.ModelCheckpoint = AttributeDict, ModelCheckpoint

    def __enter__(self) -> "_FakeLightning":
        assert not any(m in sys.modules for m in _PL_MODULES)
        sys.modules.update(self.mods)
        return self

    def __exit__(self, *exc: object) -> None:
        for m in _PL_MODULES:
            sys.modules.pop(m, None)


def write_adaface_ckpt(path: Path, backbone_state: dict[str, torch.Tensor], classes: int = 10,
                       marker: Path | None = None, hparams_only: bool = False) -> Path:
    """A `.ckpt` laid out as AdaFace's Lightning trainer saves it (see the module docstring)."""
    with _FakeLightning() as pl:
        hparams = pl.AttributeDict(arch="ir_101", head="adaface", m=0.4, h=0.333, s=64.0, t_alpha=0.01,
                                   args=argparse.Namespace(lr=0.1, data_root="/data"))
        if marker is not None:
            hparams["payload"] = _Payload(marker)
        if hparams_only:
            torch.save({"epoch": 1, "hyper_parameters": hparams}, path)
            return path
        state = {f"model.{k}": v for k, v in backbone_state.items()}
        state.update({"head.kernel": torch.randn(512, classes), "head.t": torch.zeros(1),
                      "head.batch_mean": torch.ones(1) * 20, "head.batch_std": torch.ones(1) * 100})
        torch.save({"epoch": 25, "global_step": 1000, "pytorch-lightning_version": "1.8.6", "state_dict": state,
                    "loops": {"fit_loop": {"state_dict": {}}},
                    "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": pl.ModelCheckpoint()},
                    "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                          "param_groups": [{"lr": 0.1}]}],
                    "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": hparams}, path)
    return path


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "adaface" / "adaface_reference.npz") as d:
        return {k: d[k] for k in d.files}


def _rule_ir18() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = get_model("ir_18")
    return rule_state_dict(model)


def test_adaface_ckpt_embeds_as_adaface_network(tmp_path: Path, ref: dict[str, np.ndarray]) -> None:
    """No pytorch_lightning installed, nothing imported or called from the file (the payload in its hyper-parameters
    stays inert), the head dropped, ir_18 detected, BGR told, and the embedding equals AdaFace's own network's."""
    marker = tmp_path / "pwned"
    path = write_adaface_ckpt(tmp_path / "adaface_ir18.ckpt", _rule_ir18(), marker=marker)
    with pytest.raises(CheckpointError, match="weights_only=True"):  # what a plain torch.load-based loader says
        from utils.checkpoint import safe_load
        safe_load(path)
    model, choice = load_backbone_choice(path)
    assert not marker.exists() and "pytorch_lightning" not in sys.modules
    assert (choice.network, choice.embedding_size, choice.channel_order, choice.channel_told) == \
        ("ir_18", 512, "bgr", True)
    assert choice.file_kind == "Lightning checkpoint (pytorch-lightning 1.8.6)"
    assert any("head.kernel [512, 10]" in n for n in choice.notes) and "'model.' prefix removed" in choice.notes
    with torch.no_grad():
        y = model(input_x())
    assert rel_err(y, ref["ir_18_eval_output"] * ref["ir_18_eval_norm"]) < 1e-5
    # fine-tuning (train.py's pretrained_backbone_model) reads the same backbone
    state = load_state_dict_file(path)
    assert set(state) == set(get_model("ir_18").state_dict())


def test_inert_objects_keep_the_metadata_as_data(tmp_path: Path) -> None:
    path = write_adaface_ckpt(tmp_path / "a.ckpt", _rule_ir18(), marker=tmp_path / "pwned")
    obj = inert_load(path)
    hp = obj["hyper_parameters"]
    assert isinstance(hp, InertObject) and hp.inert_name == "pytorch_lightning.utilities.parsing.AttributeDict"
    assert hp.inert_items["arch"] == "ir_101" and hp.inert_items["m"] == 0.4
    assert isinstance(hp.inert_items["args"], InertObject)  # argparse.Namespace: not even the stdlib class is used
    assert isinstance(hp.inert_items["payload"], InertObject) and not (tmp_path / "pwned").exists()
    (callback,) = obj["callbacks"].values()
    assert callback.inert_name.endswith("ModelCheckpoint") and callback.inert_state["monitor"] == "val_acc"
    assert list(obj["state_dict"]["head.kernel"].shape) == [512, 10]  # described, never read from disk
    with _FakeLightning():  # control: loaded unsafely (with the classes importable) the payload does run
        torch.load(path, weights_only=False)
    assert (tmp_path / "pwned").exists()


def test_unreachable_tensors_are_refused_naming_what_the_file_holds(tmp_path: Path) -> None:
    write_adaface_ckpt(tmp_path / "meta_only.ckpt", {}, hparams_only=True)
    with pytest.raises(CheckpointError, match=r"meta_only\.ckpt holds no state dict of tensors .*epoch: int, "
                                              r"hyper_parameters: pytorch_lightning\.utilities\.parsing\."
                                              r"AttributeDict \(not imported\)"):
        read_model_file(tmp_path / "meta_only.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"text\.ckpt: not a torch\.save zip archive"):
        read_model_file(tmp_path / "text.ckpt")


def test_prefixes_module_model_net(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = get_model("ir_tiny", num_features=16).state_dict()
    for prefix in ("module.", "model.", "net.", "model.net."):
        torch.save({prefix + k: v for k, v in state.items()}, tmp_path / "p.pt")
        found = read_model_file(tmp_path / "p.pt")
        assert found.state.keys() == state.keys() and not any("dropped" in n for n in found.notes), prefix


def _write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """The safetensors format by hand (8-byte header length, JSON header, raw little-endian data)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, value in state.items():
        data = value.detach().contiguous().numpy().tobytes()
        dtype = {torch.float32: "F32", torch.int64: "I64"}[value.dtype]
        header[key] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


@pytest.mark.parametrize("space", ["BGR", "RGB"])
def test_cvlface_safetensors_with_its_config(tmp_path: Path, space: str) -> None:
    torch.manual_seed(0)
    net = get_model("ir_tiny", num_features=16).eval()
    _write_safetensors(tmp_path / "model.safetensors", {f"net.{k}": v for k, v in net.state_dict().items()})
    (tmp_path / "model.yaml").write_text(f"input_size: [3, 112, 112]\ncolor_space: '{space}'\nname: 'ir101'\n"
                                         "output_dim: 16\n")
    model, choice = load_backbone_choice(tmp_path / "model.safetensors")
    assert choice.network == "ir_tiny" and choice.channel_order == space.lower() and choice.channel_told
    assert "CVLFace" in choice.file_kind and str(tmp_path / "model.yaml") in choice.channel_reason
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CFSM_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                          timeout=headroom(300))


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import cv2

    folder = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        cv2.imwrite(str(folder / f"{name}.png"), rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    return folder


def test_embed_command_reads_the_ckpt_as_bgr_and_says_so(tmp_path: Path, faces: Path) -> None:
    """What a user meets: `tools.embed` on an AdaFace-shaped .ckpt, no flags: one line says what was detected, the
    rows equal embedding the BGR images with AdaFace's network; --rgb against the file is an error."""
    torch.manual_seed(0)
    state = get_model("ir_tiny", num_features=16).state_dict()
    path = write_adaface_ckpt(tmp_path / "adaface_tiny.ckpt", state)
    done = _run("tools.embed", str(faces), "--model", str(path), "--out", str(tmp_path / "emb"), "--device", "cpu",
                "--workers", "0", "--no-progress", "--no-flip")
    assert done.returncode == 0, done.stderr
    lines = [l for l in done.stderr.splitlines() if l.startswith("model: ")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"model: {path}: ir_tiny (AdaFace layout, detected from its keys and shapes; "
                               "Lightning checkpoint (pytorch-lightning 1.8.6):")
    assert "head.kernel [512, 10]" in lines[0] and lines[0].endswith(
        "16-d embeddings, BGR input (AdaFace networks are trained on BGR)")
    import cv2

    net = get_model("ir_tiny", num_features=16).eval()
    net.load_state_dict(state)
    imgs = np.stack([cv2.imread(str(faces / f"{n}.png")) for n in ("a", "b")])  # BGR as read
    x = torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()).float().div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        want = net(x).numpy()
    got = np.load(tmp_path / "emb" / "embeddings.npy")
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    wrong = _run("tools.embed", str(faces), "--model", str(path), "--out", str(tmp_path / "emb2"), "--device", "cpu",
                 "--workers", "0", "--rgb")
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1] == (
        f"error: --rgb contradicts {path}: it expects BGR input (AdaFace networks are trained on BGR); leave --rgb "
        "out (the channel order is read from the file)")
    net_flag = _run("tools.embed", str(faces), "--model", str(path), "--out", str(tmp_path / "emb3"), "--device",
                    "cpu", "--workers", "0", "--network", "r_tiny")
    assert net_flag.returncode == 2 and "error: " in net_flag.stderr
    assert "the file holds ir_tiny with 16-d embeddings: use --network ir_tiny or leave --network out" in \
        net_flag.stderr


def test_run_model_and_insightface_file_lines(tmp_path: Path, faces: Path) -> None:
    """A train.py run's model.pt from before `channel_order` (its summary.json records none): RGB told, what train.py
    fed then (--bgr is an error); a bare InsightFace-layout file: detected, RGB by convention (--bgr allowed)."""
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    torch.save(get_model("r_tiny", num_features=32).state_dict(), run / "model.pt")
    (run / "summary.json").write_text(json.dumps({"config": {"network": "r_tiny", "embedding_size": 32}}))
    done = _run("tools.compare_faces", str(faces / "a.png"), str(faces / "b.png"), "--model", str(run / "model.pt"),
                "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == (
        f"model: {run / 'model.pt'}: r_tiny (InsightFace layout, from {run / 'summary.json'}; state dict), 32-d "
        "embeddings, RGB input (a train.py run from before channel_order: train.py fed RGB)")
    float(done.stdout.splitlines()[0])  # stdout keeps the cosine first
    bgr = _run("tools.compare_faces", str(faces / "a.png"), str(faces / "b.png"), "--model", str(run / "model.pt"),
               "--device", "cpu", "--bgr")
    assert bgr.returncode == 2 and "error: --bgr contradicts" in bgr.stderr and "train.py fed RGB" in bgr.stderr
    bare = tmp_path / "backbone.pth"
    torch.save(get_model("r_tiny", num_features=32).state_dict(), bare)
    out = _run("tools.export_onnx", "--model", str(bare), "--out", str(tmp_path / "onnx"), "--bgr")
    assert out.returncode == 0, out.stderr
    assert f"model: {bare}: r_tiny (InsightFace layout, detected from its keys and shapes; state dict), 32-d " \
           "embeddings, BGR input (--bgr)" in out.stderr  # the file does not tell: the flag decides, and is said
    assert "reversed to BGR inside the graph" in out.stdout


def test_told_channel_order_reads_what_a_train_py_run_recorded(tmp_path: Path) -> None:
    """utils.model_file.told_channel_order: a run's summary.json (its `channel_order`, else RGB: a run from before
    the key), a checkpoint's COMPLETE marker (the resolved order in its config), CVLFace's color_space; a stage-1
    summary or a file without a record tells nothing."""
    from utils.model_file import told_channel_order

    run = tmp_path / "run"
    run.mkdir()
    summary = {"config": {"network": "ir_tiny", "channel_order": "auto"}, "channel_order": "bgr"}
    (run / "summary.json").write_text(json.dumps(summary))
    assert told_channel_order(run / "model.pt") == ("bgr", "a train.py run fed BGR, as its summary.json records")
    (run / "summary.json").write_text(json.dumps({"config": {"network": "ir_tiny", "channel_order": "rgb"}}))
    assert told_channel_order(run / "model.pt")[0] == "rgb"
    (run / "summary.json").write_text(json.dumps({"config": {"network": "ir_tiny"}}))
    assert told_channel_order(run / "model.pt") == ("rgb", "a train.py run from before channel_order: train.py fed RGB")
    (run / "summary.json").write_text(json.dumps({"config": {"id_network": "ir_tiny"}, "id_channel_order": "bgr"}))
    assert told_channel_order(run / "model.pt") is None  # a stage-1 run's summary
    step = tmp_path / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text(json.dumps({"kind": "recognition", "config": {"network": "ir_tiny",
                                                                                 "channel_order": "bgr"}}))
    assert told_channel_order(step / "rank_0.pt") == (
        "bgr", "a train.py run fed BGR, as its checkpoint's COMPLETE marker records")
    assert told_channel_order(tmp_path / "backbone.pth") is None
    (tmp_path / "w.yaml").write_text("name: ir50\ncolor_space: BGR\n")
    assert told_channel_order(tmp_path / "w.safetensors") == ("bgr", f"color_space in {tmp_path / 'w.yaml'}")


def test_export_onnx_of_an_adaface_ckpt_reverses_channels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = write_adaface_ckpt(tmp_path / "tiny.ckpt", get_model("ir_tiny", num_features=16).state_dict())
    from tools import export_onnx

    export_onnx.main(["--model", str(path), "--out", str(tmp_path / "onnx")])
    assert (tmp_path / "onnx" / "tiny.onnx").is_file()
    model = load_backbone(path)
    import onnxruntime as ort

    x = torch.rand(2, 3, 112, 112) * 2 - 1
    got = ort.InferenceSession(str(tmp_path / "onnx" / "tiny.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x.flip(1)).numpy()
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_eval_verification_prints_the_line_and_records_the_channel_order(tmp_path: Path) -> None:
    """An eval command (eval.verification on a .bin) on an AdaFace-shaped .ckpt: the same one line on stderr, BGR fed
    without a flag and recorded; a second rank would not print it (rank 0 only, see model_from_args)."""
    torch.manual_seed(0)
    path = write_adaface_ckpt(tmp_path / "tiny.ckpt", get_model("ir_tiny", num_features=16).state_dict())
    done = _run("eval.verification", "--model", str(path), "--bin", str(FIXTURES / "mxrec" / "tiny_ver.bin"),
                "--device", "cpu", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert [l for l in done.stderr.splitlines() if l.startswith("model: ")] == [
        f"model: {path}: ir_tiny (AdaFace layout, detected from its keys and shapes; Lightning checkpoint "
        "(pytorch-lightning 1.8.6): dropped 4 tensors outside 'model.' (the training head: head.kernel [512, 10], "
        "head.t [1] and 2 more); 'model.' prefix removed), 16-d embeddings, BGR input (AdaFace networks are trained "
        "on BGR)"]
    from eval.common import load_backbone_choice as load
    from eval.verification import evaluate_verification
    from utils.data.binfile import load_bin

    images, issame = load_bin(FIXTURES / "mxrec" / "tiny_ver.bin")
    model, _ = load(path)
    bgr = evaluate_verification(model, images.flip(1), issame, batch_size=16, device=torch.device("cpu"))
    rgb = evaluate_verification(model, images, issame, batch_size=16, device=torch.device("cpu"))
    assert f"xnorm {bgr['xnorm']:.3f}" in done.stdout and f"{bgr['xnorm']:.3f}" != f"{rgb['xnorm']:.3f}"


def test_damaged_archives_are_refused_not_crashed(tmp_path: Path) -> None:
    """A storage shorter than the file declares, a truncated safetensors file: each a CheckpointError naming the
    file (one `error:` line in a command), never a crash or a read past the data."""
    import zipfile

    torch.save({"w": torch.zeros(4, 4)}, tmp_path / "ok.pt")
    src = zipfile.ZipFile(tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "short.ckpt", "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:8] if info.filename.endswith("data/0") else data)
    with pytest.raises(CheckpointError, match=r"short\.ckpt \(storage 0\): the stored data has 8 bytes"):
        read_model_file(tmp_path / "short.ckpt")
    net = {f"net.{k}": v for k, v in get_model("ir_tiny", num_features=16).state_dict().items()}
    _write_safetensors(tmp_path / "m.safetensors", net)
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: tensor '.*' lies outside the file"):
        read_model_file(tmp_path / "cut.safetensors")
