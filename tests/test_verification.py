"""eval.verification (flip fusion, xnorm, accuracy on a model with a known answer) and the training callback
(eval.verification_callback: val_targets checked before the first step, by all ranks together; results logged)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eval import verification
from eval.verification import embed_images, evaluate_verification
from eval.verification_callback import CallBackVerification, open_verification_sets, verification_for_run
from utils.data.binfile import write_bin
from configs.loader import ConfigError


class HalfMeans(nn.Module):
    """Embedding = mean of the left half and of the right half of channel 0: a mirror swaps the two entries."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bn = nn.BatchNorm1d(2)  # makes train/eval mode observable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[3] // 2
        return torch.stack([x[:, 0, :, :w].mean((1, 2)), x[:, 0, :, w:].mean((1, 2))], 1) * self.scale


class Colour(nn.Module):
    """Embedding = per-channel mean: images of one colour are one 'identity'."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) * self.w + 0.1


def _colour_pairs(n_pairs: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n_pairs * 2, 3))
    issame = np.arange(n_pairs) % 2 == 0
    imgs = np.zeros((2 * n_pairs, 3, 16, 16), dtype=np.uint8)
    for i in range(n_pairs):
        ca = colours[2 * i]
        cb = ca if issame[i] else colours[2 * i + 1]
        imgs[2 * i] = ca[:, None, None]
        imgs[2 * i + 1] = cb[:, None, None]
    return torch.from_numpy(imgs), issame


def test_embed_images_flip_fusion_sums_raw_outputs() -> None:
    img = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    img[:, 0, :, :2] = 255  # left half white in channel 0 -> orig = [1, -1], mirror = [-1, 1]
    model = HalfMeans()
    no_flip = embed_images(model, img, batch_size=2, flip=False)
    assert np.allclose(no_flip, [[1, -1]] * 3)
    fused = embed_images(model, img, batch_size=2, flip=True)
    assert np.allclose(fused, 0.0)
    assert model.training  # mode restored


def test_evaluate_verification_known_answer_and_xnorm() -> None:
    images, issame = _colour_pairs(40)
    model = Colour()
    r = evaluate_verification(model, images, issame, batch_size=7)
    assert r["accuracy"] == 1.0 and r["std"] == 0.0
    x = images.float().div(255).sub(0.5).div(0.5).mean((2, 3)) + 0.1
    assert r["xnorm"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="80 images for 39 pairs"):
        evaluate_verification(model, images, issame[:39])


def test_load_bin_is_reexported() -> None:
    from utils.data.binfile import load_bin

    assert verification.load_bin is load_bin


def _write_toy_bin(path: Path, n_pairs: int, seed: int) -> None:
    images, issame = _colour_pairs(n_pairs, seed)
    big = torch.nn.functional.interpolate(images.float(), size=(112, 112)).round().to(torch.uint8)
    write_bin(path, big.permute(0, 2, 3, 1).numpy(), issame)


class Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, float(value), step))


def test_callback_verification(tmp_path: Path) -> None:
    _write_toy_bin(tmp_path / "toy_a.bin", 20, 1)
    _write_toy_bin(tmp_path / "toy_b.bin", 20, 2)
    writer = Writer()
    cb = CallBackVerification(open_verification_sets(["toy_a", "toy_b"], tmp_path), batch_size=16, summary_writer=writer)
    model = Colour()
    model.train()
    res = cb(100, model)
    assert set(res) == {"toy_a", "toy_b"}
    assert all(v == 1.0 for v in res.values())  # JPEG of flat colours keeps identities apart
    assert model.training
    tags = {t for t, _, _ in writer.scalars}
    assert tags == {"val/toy_a_accuracy", "val/toy_a_xnorm", "val/toy_b_accuracy", "val/toy_b_xnorm"}
    assert all(s == 100 for _, _, s in writer.scalars)
    # highest is kept when a later evaluation is worse
    with torch.no_grad():
        model.w.zero_()
    res2 = cb(200, model)
    assert res2["toy_a"] < 1.0 and cb.highest["toy_a"] == 1.0


def test_callback_with_real_backbone_runs(tmp_path: Path) -> None:
    from backbones import get_model

    _write_toy_bin(tmp_path / "v.bin", 10, 3)
    model = get_model("r_tiny", num_features=64)
    cb = CallBackVerification(open_verification_sets(["v"], str(tmp_path)), batch_size=8)
    res = cb(1, model)
    assert 0.0 <= res["v"] <= 1.0
    assert cb.last["v"]["xnorm"] > 0
    assert model.training


def test_missing_val_target_names_key_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"val_targets' names 'lfw', but {tmp_path}/lfw\.bin does not exist; put the"):
        open_verification_sets(["lfw"], tmp_path)


def test_val_target_with_too_few_pairs_for_10_folds_is_refused(tmp_path: Path) -> None:
    _write_toy_bin(tmp_path / "small.bin", 6, 1)
    with pytest.raises(ConfigError, match=r"small\.bin holds 6 pairs, 10-fold verification needs at least 10"):
        open_verification_sets(["small"], tmp_path)
    assert set(open_verification_sets(["small"], tmp_path, nfolds=3)) == {"small"}


def test_unreadable_val_target_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(ConfigError, match=r"'junk'.*junk\.bin.*remove 'junk' from val_targets"):
        open_verification_sets(["junk"], tmp_path)


def test_results_reach_the_run_log_with_dated_timestamps(tmp_path: Path) -> None:
    import re

    from utils.logging import setup_logger

    _write_toy_bin(tmp_path / "toy_a.bin", 12, 1)
    log = setup_logger(0, tmp_path / "run")
    cb = CallBackVerification(open_verification_sets(["toy_a"], tmp_path), batch_size=8, logger=log)
    cb(7, Colour())
    for handler in log.handlers:
        handler.flush()
    text = (tmp_path / "run" / "train.log").read_text()
    assert re.search(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \[rank 0\] \[toy_a\]\[7\] Accuracy-Flip: 1\.00000", text,
                     re.M), text


def test_single_process_run_gets_the_callback_or_the_error(tmp_path: Path) -> None:
    from utils.distributed import DistEnv

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    _write_toy_bin(tmp_path / "ok.bin", 12, 1)
    assert verification_for_run([], tmp_path, 8, env) is None
    assert set(verification_for_run(["ok"], tmp_path, 8, env).sets) == {"ok"}
    with pytest.raises(ConfigError, match="missing"):
        verification_for_run(["ok", "missing"], tmp_path, 8, env)


def _pre_check_worker(rank: int, folder: str, out: str) -> None:
    import datetime
    import os
    import time

    import torch.distributed as dist

    from utils.distributed import DistEnv

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'pg')}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    env = DistEnv(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"), backend="gloo")
    # each rank sees its own folder (per-node disks): rank 0, the one that verifies, has the bad file
    start = time.perf_counter()
    try:
        verification_for_run(["v"], os.path.join(folder, f"rank{rank}"), 8, env)
        outcome = "no error"
    except ConfigError as exc:
        outcome = str(exc)
    Path(out, f"rank{rank}.txt").write_text(f"{time.perf_counter() - start:.1f}\n{outcome}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_bad_val_target_on_rank_0_stops_every_rank_at_once(tmp_path: Path) -> None:
    """2 gloo ranks whose inputs differ: only rank 0 lacks enough pairs; both stop in the check, none waits."""
    import torch.multiprocessing as mp

    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank1").mkdir()
    _write_toy_bin(tmp_path / "rank0" / "v.bin", 4, 1)  # too few pairs
    _write_toy_bin(tmp_path / "rank1" / "v.bin", 12, 1)
    mp.spawn(_pre_check_worker, args=(str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    results = [(tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in range(2)]
    assert "holds 4 pairs" in results[0][1]
    assert "rank 0 could not open the verification sets" in results[1][1]
    assert all(float(seconds) < 30 for seconds, _ in results)  # agreed at once, not a process-group timeout




@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [16, 64])
def test_verification_cli_on_two_ranks_equals_one_process(tmp_path: Path, batch_size: int) -> None:
    """21 pairs = 42 images. Batches of 16: rank 0 embeds 16 + 10 images, rank 1 16; one batch of 64: rank 1 has
    nothing to embed and still takes part in the gather. Accuracy, std and xnorm equal one process's."""
    import json

    from backbones import get_model
    from tests.helpers import run_module

    _write_toy_bin(tmp_path / "v.bin", 21, 4)
    torch.manual_seed(0)
    torch.save(get_model("r_tiny", num_features=32).state_dict(), tmp_path / "m.pt")
    args = ["--model", str(tmp_path / "m.pt"), "--network", "r_tiny", "--bin", str(tmp_path / "v.bin"),
            "--device", "cpu", "--batch-size", str(batch_size), "--no-progress"]
    results = []
    for nproc, out in ((0, "one"), (2, "two")):
        proc = run_module("eval.verification", [*args, "--out", str(tmp_path / out)], nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("v: accuracy") == 1  # rank 0 alone reports
        results.append(json.loads((tmp_path / out / "verification.json").read_text()))
    assert results[0] == results[1] and results[0]["v"]["xnorm"] > 0


def test_val_targets_may_be_bin_paths_named_by_their_stem(tmp_path: Path) -> None:
    _write_toy_bin(tmp_path / "elsewhere" / "lfw_small.bin", 12, 1)
    _write_toy_bin(tmp_path / "toy_a.bin", 12, 1)
    sets = open_verification_sets(["toy_a", str(tmp_path / "elsewhere" / "lfw_small.bin")], tmp_path)
    assert set(sets) == {"toy_a", "lfw_small"}
    with pytest.raises(ConfigError, match="a second set named 'toy_a'"):
        open_verification_sets(["toy_a", str(tmp_path / "toy_a.bin")], tmp_path)
