"""backbones.detect and `--network auto`: a model file says what it is (run summary, else its keys and shapes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import backbones
from backbones import BACKBONE_NAMES, get_model
from backbones.detect import SAME_EVAL_NETWORK, detect_network, embedding_size_of
from eval.common import choose_backbone, load_backbone, load_backbone_choice
from utils.checkpoint import CheckpointError


def _meta_state(name: str, size: int) -> dict[str, torch.Tensor]:
    """A state dict with the real keys and shapes and no memory (detection only reads shapes)."""
    with torch.device("meta"):
        return get_model(name, num_features=size).state_dict()


def _save(path: Path, name: str, size: int) -> Path:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(get_model(name, num_features=size).state_dict(), path)
    return path


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_every_registered_network_is_told_apart(name: str) -> None:
    """Each registry entry (ViT included once registered) is found from a bare file's layout, at two embedding
    sizes; a new entry that shares another's layout must be named in SAME_EVAL_NETWORK or this test fails."""
    for size in (128, 512):
        found = detect_network(_meta_state(name, size))
        assert found.networks == (SAME_EVAL_NETWORK.get(name, name),), found.describe()
        assert found.embedding_size == size


def test_iresnet_depths_differ_only_in_block_counts() -> None:
    """r50 vs r100: same stem and widths; the layer3 block count (14 vs 30) decides."""
    r50, r100 = _meta_state("r50", 512), _meta_state("r100", 512)
    assert {k for k in r50 if k.startswith("layer3.13.")} and not {k for k in r50 if k.startswith("layer3.14.")}
    assert {k for k in r100 if k.startswith("layer3.29.")}
    assert detect_network(r50).network == "r50" and detect_network(r100).network == "r100"


def test_unknown_and_ambiguous_layouts_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    state = _meta_state("r_tiny", 64)
    state.pop("fc.weight")
    found = detect_network(state)
    assert found.network is None and "no registered network's layout" in found.describe()
    with pytest.raises(CheckpointError, match=r"x\.pt: cannot tell its architecture .* no registered network's "
                                              r"layout \(\d+ tensors, 64-d embeddings\); pass --network"):
        choose_backbone(tmp_path / "x.pt", state)
    # a second registry entry with r_tiny's layout: ambiguous, unless the table says it computes the same
    monkeypatch.setitem(backbones.BACKBONES, "r_tiny_copy", backbones.BACKBONES["r_tiny"])
    monkeypatch.setattr(backbones, "BACKBONE_NAMES", (*BACKBONE_NAMES, "r_tiny_copy"))
    full = _meta_state("r_tiny", 64)
    assert detect_network(full).describe() == "a layout shared by r_tiny, r_tiny_copy (64-d embeddings)"
    with pytest.raises(CheckpointError, match="a layout shared by r_tiny, r_tiny_copy"):
        choose_backbone(tmp_path / "x.pt", full)
    monkeypatch.setitem(SAME_EVAL_NETWORK, "r_tiny_copy", "r_tiny")
    assert detect_network(full).networks == ("r_tiny",)


def test_bare_file_loads_without_network(tmp_path: Path) -> None:
    path = _save(tmp_path / "released" / "backbone.pth", "mbf_tiny", 48)
    model, choice = load_backbone_choice(path)
    assert (choice.network, choice.embedding_size, choice.source) == ("mbf_tiny", 48, "its keys and shapes")
    assert type(model).__name__ == "MobileFaceNet" and not model.training
    assert embedding_size_of(model.state_dict()) == 48


def test_run_summary_beside_model_pt_decides(tmp_path: Path) -> None:
    """train.py writes summary.json ({"config": {...}}) beside model.pt: its network is used, the file checked."""
    run = tmp_path / "run"
    path = _save(run / "model.pt", "r_tiny", 64)
    (run / "summary.json").write_text(json.dumps({"config": {"network": "r_tiny", "embedding_size": 64}, "steps": 2}))
    _, choice = load_backbone_choice(path)
    assert choice.network == "r_tiny" and choice.source == str(run / "summary.json")
    # a summary that disagrees with the file: the error names both
    (run / "summary.json").write_text(json.dumps({"config": {"network": "mbf_tiny", "embedding_size": 64}}))
    with pytest.raises(CheckpointError) as info:
        load_backbone(path)
    text = str(info.value)
    assert f"{run / 'summary.json'} says network=mbf_tiny" in text
    assert "the file holds r_tiny with 64-d embeddings: use --network r_tiny" in text
    # only model.pt is described by the summary: another file in the folder is detected from its keys
    other = _save(run / "other.pt", "mbf_tiny", 64)
    assert load_backbone_choice(other)[1].source == "its keys and shapes"


def test_wrong_network_error_names_what_the_file_holds(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pt", "mbf_tiny", 64)
    with pytest.raises(CheckpointError) as info:
        load_backbone(path, "r_tiny")
    text = str(info.value)
    assert "first mismatching key" in text  # the strict-load detail stays
    assert "--network says network=r_tiny, embedding size 64, but the file holds mbf_tiny with 64-d embeddings: " \
           "use --network mbf_tiny" in text
    with pytest.raises(CheckpointError, match=r"holds mbf_tiny with 64-d embeddings: use --network mbf_tiny "
                                              r"--embedding-size 64 \(or leave it out\)"):
        load_backbone(path, "mbf_tiny", 128)


def test_cli_without_network_and_its_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cv2
    import numpy as np

    from tools import embed

    path = _save(tmp_path / "m.pt", "r_tiny", 32)
    faces = tmp_path / "faces"
    faces.mkdir()
    cv2.imwrite(str(faces / "a.png"), np.full((112, 112, 3), 90, np.uint8))
    embed.main([str(faces), "--model", str(path), "--out", str(tmp_path / "emb"), "--device", "cpu", "--workers", "0",
                "--no-progress"])
    assert np.load(tmp_path / "emb" / "embeddings.npy").shape == (1, 32)
    with pytest.raises(SystemExit):
        embed.main(["--help"])
    assert "auto (the run's summary.json beside model.pt, else detected" in " ".join(capsys.readouterr().out.split())
