"""eval.common's N-process pieces: the batch split and the index-carrying gather (2 real gloo ranks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eval.common import gather_rows, shard_batches, single_process_env
from tests.helpers import spawn_ranks
from utils.distributed import DistEnv


def test_shard_batches_deal_whole_batches_without_dropping() -> None:
    shards = [shard_batches(36, 16, r, 2) for r in range(2)]
    assert shards == [[range(0, 16), range(32, 36)], [range(16, 32)]]  # uneven: 20 and 16 images
    assert shard_batches(5, 8, 1, 2) == []  # fewer batches than ranks: rank 1 has none
    for total, batch, world in ((36, 16, 2), (5, 2, 3), (3, 4, 3), (0, 4, 2), (1000, 7, 8)):
        got = sorted(i for r in range(world) for b in shard_batches(total, batch, r, world) for i in b)
        assert got == list(range(total))


def _rows(indices: np.ndarray) -> np.ndarray:
    return np.stack([indices * 10.0, -indices - 0.5], axis=1).astype(np.float32)


def _gather_worker(rank: int) -> dict:
    env = DistEnv(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"), backend="gloo")
    results = {}
    # 11 rows dealt unevenly (6 / 5), gathered 2 rows per chunk; rank 1 also sends row 0 again (de-duplicated)
    mine = np.arange(rank, 11, 2)
    if rank == 1:
        mine = np.concatenate([mine, [0]])
    results["ok"] = gather_rows(env, mine, _rows(mine), 11, chunk_rows=2)
    try:  # index 11 is never sent: rank 0 names the shortfall
        gather_rows(env, np.arange(rank, 11, 2), _rows(np.arange(rank, 11, 2)), 12, chunk_rows=4)
        results["missing"] = None
    except RuntimeError as e:
        results["missing"] = str(e)
    empty = np.zeros((0, 0), np.float32)  # a rank with no batch still joins the gather
    results["empty"] = gather_rows(env, np.arange(3) if rank == 0 else np.zeros(0, np.int64),
                                   _rows(np.arange(3)) if rank == 0 else empty, 3)
    return results


def test_gather_rows_orders_deduplicates_and_checks_completeness(tmp_path: Path) -> None:
    rank0, rank1 = spawn_ranks(_gather_worker, tmp_path, timeout_s=30)
    assert np.array_equal(rank0["ok"], _rows(np.arange(11)))
    assert rank0["missing"].startswith("gathered 11 distinct rows of 12 from 2 ranks")
    assert np.array_equal(rank0["empty"], _rows(np.arange(3)))
    assert rank1 == {"ok": None, "missing": None, "empty": None}  # only rank 0 receives


def test_single_process_env_has_no_group() -> None:
    env = single_process_env(torch.device("cpu"))
    assert not env.distributed and env.is_main and env.world_size == 1


@pytest.mark.parametrize("device", ["cuda:0", "tpu"])
def test_bad_device_under_a_launcher_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    from eval.common import eval_ranks
    from utils.cli import UsageError

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=f"--device '{device}'"):
        with eval_ranks(device):
            pass


def test_an_unwritable_out_folder_is_found_before_any_work(tmp_path, monkeypatch):
    """Root writes anywhere, so the read-only folder is simulated: the probe write fails as on a read-only mount."""
    import errno
    import tempfile

    from eval.common import EvalInputError, check_output_folder

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(EvalInputError, match=r"--out .*ro: cannot create or write the folder \(Read-only file system\)"):
        check_output_folder(tmp_path / "ro")


def test_load_rgb_backbone_feeds_a_bgr_trained_network_its_order(tmp_path):
    """The helper the pipeline and style report share: RGB images in, the order the network was trained on fed."""
    from backbones import get_model
    from eval.common import load_backbone, load_rgb_backbone

    torch.manual_seed(0)
    for network, order in (("ir_tiny", "bgr"), ("r_tiny", "rgb")):
        path = tmp_path / f"{network}.pt"
        torch.save(get_model(network, num_features=16).state_dict(), path)
        fed, choice = load_rgb_backbone(path, embedding_size=16)
        plain = load_backbone(path, embedding_size=16)
        x = torch.rand(2, 3, 112, 112) * 2 - 1
        with torch.no_grad():
            expected = plain(x.flip(1) if order == "bgr" else x)
            assert choice.channel_order == order and torch.allclose(fed(x), expected, atol=1e-6), network
