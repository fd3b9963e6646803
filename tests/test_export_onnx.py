"""tools.export_onnx parity (dynamic batch) and tools.compare_faces."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tools import compare_faces, export_onnx  # onnx and onnxruntime are in requirements.txt: no skip


def _model(path: Path, network: str = "r_tiny", num_features: int = 64) -> Path:
    from backbones import get_model

    torch.manual_seed(0)
    m = get_model(network, num_features=num_features)
    # non-trivial BatchNorm statistics, so eval-mode folding is actually exercised
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    torch.save(m.state_dict(), path)
    return path


@pytest.mark.parametrize("network", ["r_tiny", "mbf_tiny", "vit_toy"])
def test_export_onnx_parity(tmp_path: Path, network: str, capsys: pytest.CaptureFixture) -> None:
    model = _model(tmp_path / "m.pt", network)
    parity = export_onnx.main(["--model", str(model), "--network", network, "--out", str(tmp_path / "onnx")])
    assert parity["relative_error"] <= 1e-4 and parity["min_cosine"] > 0.99999
    assert "relative error" in capsys.readouterr().out
    import onnx

    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["m.onnx"]  # --out is a folder
    dim0 = onnx.load(str(tmp_path / "onnx" / "m.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"  # dynamic batch axis


def test_large_embeddings_are_judged_relative_to_their_scale(tmp_path: Path) -> None:
    """A correct export of a model whose raw embeddings are ~1e5 long has abs differences far above 1e-4."""
    model = _model(tmp_path / "m.pt")
    state = torch.load(model, weights_only=True)
    state["features.weight"] = state["features.weight"] * 1e5  # the embedding BatchNorm's scale
    torch.save(state, model)
    parity = export_onnx.main(["--model", str(model), "--network", "r_tiny", "--out", str(tmp_path)])
    assert parity["max_abs_diff"] > 1e-4 and parity["relative_error"] <= 1e-4
    assert (tmp_path / "m.onnx").is_file()


def test_failed_check_exits_1_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path / "m.pt")
    real_check = export_onnx.check_onnx

    def broken_export(backbone, path):  # the real check on the written file, then a parity no tolerance accepts
        return {**real_check(backbone, path), "relative_error": 0.5}

    monkeypatch.setattr(export_onnx, "check_onnx", broken_export)
    with pytest.raises(SystemExit) as e:
        export_onnx.main(["--model", str(model), "--network", "r_tiny", "--out", str(tmp_path / "onnx")])
    assert e.value.code == 1
    assert list((tmp_path / "onnx").iterdir()) == []


def test_bgr_model_is_exported_with_an_rgb_interface(tmp_path: Path) -> None:
    import onnxruntime as ort

    from eval.common import load_backbone

    model = _model(tmp_path / "m.pt")
    export_onnx.main(["--model", str(model), "--network", "r_tiny", "--out", str(tmp_path), "--bgr", "--name",
                      "bgr.onnx"])
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    got = ort.InferenceSession(str(tmp_path / "bgr.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    backbone = load_backbone(model, "r_tiny")
    with torch.no_grad():
        want_bgr, plain = backbone(x.flip(1)).numpy(), backbone(x).numpy()
    assert np.abs(got - want_bgr).max() < 1e-4 * np.linalg.norm(want_bgr, axis=1).max()
    assert np.abs(got - plain).max() > 1e-3  # the channel order matters for this input


def test_compare_faces(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from utils.data.toyface import identity_params, render_face

    model = _model(tmp_path / "m.pt")
    a, _ = render_face(identity_params(3, 0), np.random.default_rng(0))
    b, _ = render_face(identity_params(3, 1), np.random.default_rng(1))
    cv2.imwrite(str(tmp_path / "a.jpg"), a[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "a2.jpg"), a[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "b.jpg"), b[:, :, ::-1])
    same = compare_faces.main([str(tmp_path / "a.jpg"), str(tmp_path / "a2.jpg"), "--model", str(model),
                               "--network", "r_tiny"])
    assert same == pytest.approx(1.0, abs=1e-5)
    diff = compare_faces.main([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "--model", str(model),
                               "--network", "r_tiny"])
    assert -1.0 <= diff < same
    assert capsys.readouterr().out.strip().splitlines()[-2:] == [
        f"{diff:.6f}", "no verdict: give --threshold T, or --bin SET.bin [--far F] to compute T for this model"]
    cv2.imwrite(str(tmp_path / "small.jpg"), np.zeros((64, 64, 3), np.uint8))
    from eval.common import EvalInputError

    with pytest.raises(EvalInputError, match="small.jpg is 64x64"):
        compare_faces.main([str(tmp_path / "a.jpg"), str(tmp_path / "small.jpg"), "--model", str(model),
                            "--network", "r_tiny"])
