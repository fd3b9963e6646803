"""Style control grids (cfsm/visualize.py) and the tools/style_grid.py CLI."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cfsm import Generator, load_generator
from cfsm.visualize import (DEFAULT_COEFFICIENTS, DEFAULT_MAGNITUDES, direction_grid, random_style_row,
                            style_grid_image, tile_rows, training_samples_grid)

TILE, PAD = 112, 2


def _gen(style_dim: int = 3) -> Generator:
    torch.manual_seed(0)
    return Generator(dim=4, latent_dim=16, style_dim=style_dim).eval()


def _extent(n: int) -> int:
    return n * (TILE + PAD) - PAD


def test_direction_grid_uses_one_basis_direction_per_row():
    gen, face = _gen(), torch.rand(3, TILE, TILE) * 2 - 1
    rows = direction_grid(gen, face, coefficients=(-3, 0, 3))
    assert len(rows) == 3 and all(len(r) == 3 for r in rows)
    # coefficient 0 is the same style (o = 0) in every row; +-3 along different directions differ
    with torch.no_grad():
        ref = gen.decode(gen.encode(face[None]), torch.zeros(1, 3))
    ref_tile = ((ref[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    for r in rows:
        assert np.abs(r[1][20:].astype(int) - ref_tile[20:].astype(int)).max() <= 1  # below the label
    assert not np.array_equal(rows[0][2], rows[1][2])


def test_style_grid_image_layout_and_reproducible():
    gen, face = _gen(), torch.rand(3, TILE, TILE) * 2 - 1
    a = style_grid_image(gen, face, rng=torch.Generator().manual_seed(1))
    b = style_grid_image(gen, face, rng=torch.Generator().manual_seed(1))
    # input row + style_dim direction rows + random row; input column + 7 coefficients
    assert a.shape == (_extent(1 + 3 + 1), _extent(1 + 7), 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    row = random_style_row(gen, face, magnitudes=(0.0, 6.0), rng=torch.Generator().manual_seed(1))
    assert len(row) == 2


def test_training_samples_grid_and_tile_errors():
    gen = _gen()
    src, tgt = torch.rand(5, 3, TILE, TILE) * 2 - 1, torch.rand(2, 3, TILE, TILE) * 2 - 1
    grid = training_samples_grid(gen, src, tgt, magnitudes=(0, 3), max_rows=4)
    assert grid.shape == (_extent(2), _extent(1 + 2 + 1), 3)  # rows limited by the targets
    with pytest.raises(ValueError, match="tile"):
        tile_rows([[np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)]])


def test_cli_from_toy_rec_and_image_folder(tmp_path):
    from tools import style_grid
    from utils.data.toyface import ensure_toy_data

    gen = _gen(style_dim=2)
    torch.save({"G_state_dict": gen.state_dict(), "D_state_dict": {}}, tmp_path / "g.pth")
    data = ensure_toy_data(tmp_path / "toy", num_identities=2, images_per_identity=2, num_eval_identities=2,
                           num_pairs=2, num_target_faces=3, workers=1)
    paths = style_grid.main([str(tmp_path / "g.pth"), "--faces", str(data / "train.rec"), "--out",
                             str(tmp_path / "out"), "--num-faces", "2", "--tensorboard", str(tmp_path / "tb")])
    assert [p.name for p in paths] == ["style_grid_00.png", "style_grid_01.png"]
    img = cv2.imread(str(paths[0]))
    assert img.shape == (_extent(1 + 2 + 1), _extent(1 + 7), 3)
    # the files hold the grids of the two faces the CLI picked (first and last record), not just any image
    faces = style_grid.load_faces(data / "train.rec", 2)
    expected = style_grid.make_style_grids(load_generator(tmp_path / "g.pth"), faces, DEFAULT_COEFFICIENTS,
                                           DEFAULT_MAGNITUDES, seed=0)
    for path, grid in zip(paths, expected):
        assert np.array_equal(cv2.imread(str(path))[:, :, ::-1], grid)  # PNG is lossless
    assert not np.array_equal(expected[0], expected[1])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["style_grid/face_00", "style_grid/face_01"]
    tb_image = events.Images("style_grid/face_01")[0]
    assert (tb_image.height, tb_image.width) == expected[1].shape[:2]
    paths = style_grid.main([str(tmp_path / "g.pth"), "--faces", str(data / "target_faces"), "--out",
                             str(tmp_path / "out2"), "--coefficients", "-1", "1", "--magnitudes", "2", "4"])
    assert cv2.imread(str(paths[0])).shape == (_extent(4), _extent(3), 3)
    with pytest.raises(FileNotFoundError, match="--faces"):
        style_grid.main([str(tmp_path / "g.pth"), "--faces", str(tmp_path / "nope"), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        style_grid.main([str(tmp_path / "nope.pth"), "--faces", str(data), "--out", str(tmp_path)])


def test_clean_vs_synth_grid_rows_and_labels():
    from cfsm.visualize import clean_vs_synth_grid

    clean = torch.full((3, 3, 112, 112), -1.0)
    synth = torch.full((3, 3, 112, 112), 1.0)
    grid = clean_vs_synth_grid(clean, synth, torch.tensor([0.5, 1.0, 2.0]))
    assert grid.shape == (2 * 112 + 2, 3 * 112 + 2 * 2, 3) and grid.dtype == np.uint8
    assert (grid[:112, :112] == 0).all()  # clean row untouched
    assert (grid[114:, :112] != 255).any()  # label drawn on the synthesized tile
