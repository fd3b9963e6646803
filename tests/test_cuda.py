"""The CUDA path: train.py under torchrun on one GPU (AMP fp16 / bf16, CFSM on), train.py's NCCL code path in a
1-rank NCCL process group, the CUDA prefetcher, nvJPEG decoding and the fp16 backbone.

Every test is marked `cuda` and skipped (with the reason) on machines without a CUDA device; `bench/gpu_check.sh`
runs them with `pytest -m cuda -q tests/test_cuda.py` on a lent GPU.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import headroom

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False): run bench/gpu_check.sh on a GPU machine"

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


def cuda_args(rec: Path, output: Path, *extra: str) -> list[str]:
    """A few-step toy run on the GPU; TensorBoard off so a machine without it still runs the test."""
    return ["configs/toy", f"rec={rec}", f"output={output}", "generate_toy_data=False", "network=r_tiny",
            "embedding_size=32", "batch_size=16", "num_workers=1", "num_epoch=2", "warmup_epoch=0", "frequent=1",
            "verbose=0", "val_targets=['toy_clean']", "val_batch_size=16", "tensorboard=False", "device=cuda",
            "max_steps=3", "save_every=2", *extra]


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_torchrun_single_gpu_amp_with_cfsm(mini_toy: Path, tiny_generator_file: Path, tmp_path: Path,
                                           amp: str) -> None:
    """`python -m torch.distributed.run --nproc_per_node=1 train.py ...` with AMP and the CFSM attack on."""
    out = tmp_path / amp
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
           *cuda_args(mini_toy, out, f"{amp}=True", "rs_ratio=0.75", "k=1",
                      f"pretrained_synthesis_model={tiny_generator_file}")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=headroom(300))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert summary["config"][amp] is True and 0.0 <= summary["val"]["toy_clean"] <= 1.0
    assert "device cuda:0" in (out / "train.log").read_text()
    from backbones import get_model

    get_model("r_tiny", num_features=32).load_state_dict(torch.load(out / "model.pt", weights_only=True))


def test_nccl_process_group_train_step(mini_toy: Path, tiny_generator_file: Path, tmp_path: Path) -> None:
    """train.train in a real 1-rank NCCL group: DDP wrapper, NCCL barrier and all_reduce run (torchrun with one
    process starts no group, so this is the only way one GPU reaches that code)."""
    import torch.distributed as dist

    import train
    from configs.loader import load_config
    from utils.distributed import DistEnv

    cfg = load_config("configs/toy", cuda_args(mini_toy, tmp_path / "nccl", "fp16=True", "rs_ratio=0.75",
                                               f"pretrained_synthesis_model={tiny_generator_file}")[1:])
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=device)
    try:
        summary = train.train(cfg, DistEnv(rank=0, local_rank=0, world_size=1, device=device, backend="nccl"))
    finally:
        dist.destroy_process_group()
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])


def test_cuda_prefetcher_yields_the_plain_loader_batches(mini_toy: Path) -> None:
    """Same images (flips included) and labels, in the same order, over two epochs, when consumed on the GPU."""
    from dataset import CUDAPrefetcher, MXFaceDataset, get_dataloader

    device = torch.device("cuda", 0)
    ds = MXFaceDataset(mini_toy, augment=True)
    plain = get_dataloader(ds, 16, seed=5, num_workers=0, device=device)
    fetch = CUDAPrefetcher(get_dataloader(ds, 16, seed=5, num_workers=1, device=device), device)
    assert fetch.sampler.batches_per_epoch == plain.sampler.batches_per_epoch
    for epoch in range(2):
        plain.sampler.set_epoch(epoch)
        fetch.sampler.set_epoch(epoch)
        n = 0
        for (a, la), (b, lb) in zip(plain, fetch, strict=True):
            assert b.device == device and lb.device == device
            _ = (b * 2).sum()  # use it on the main stream while the next copy runs on the side stream
            assert torch.equal(a, b.cpu()) and torch.equal(la, lb.cpu())
            n += 1
        assert n == plain.sampler.batches_per_epoch


def test_nvjpeg_decode_matches_opencv(mini_toy: Path) -> None:
    """torchvision.io.decode_jpeg(device="cuda") decodes a toy JPEG to OpenCV's pixels within +-2 levels (IDCT and
    chroma upsampling differ slightly between nvJPEG and libjpeg-turbo)."""
    cv2 = pytest.importorskip("cv2")
    tvio = pytest.importorskip("torchvision.io")
    path = sorted((Path(mini_toy) / "target_faces").glob("*.jpg"))[0]
    data = path.read_bytes()
    try:
        gpu = tvio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), device="cuda")
    except (RuntimeError, TypeError) as e:  # torchvision built without nvJPEG
        pytest.skip(f"torchvision CUDA JPEG decode unavailable: {e}")
    assert gpu.is_cuda and gpu.dtype == torch.uint8
    ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    got = gpu.permute(1, 2, 0).cpu().numpy()
    assert got.shape == ref.shape, (got.shape, ref.shape, path)
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    assert np.percentile(diff, 99.5) <= 2 and diff.mean() < 1.0, (path, diff.max(), diff.mean())


def test_r18_fp16_close_to_fp32() -> None:
    """The backbone's fp16 flag (float16 autocast trunk, float32 head) gives nearly the fp32 embedding."""
    from backbones import get_model

    torch.manual_seed(0)
    # Train mode (batch statistics), as in training: with random weights the eval-mode running stats are the
    # identity and activations reach ~1e8, beyond float16's 65504, which says nothing about trained models.
    ref = get_model("r18", num_features=512).cuda().train()
    amp = get_model("r18", num_features=512, fp16=True).cuda().train()
    amp.load_state_dict(ref.state_dict())
    x = torch.rand(8, 3, 112, 112, device="cuda") * 2 - 1
    with torch.no_grad():
        y, y16 = ref(x), amp(x)
    assert y16.dtype == torch.float32 and torch.isfinite(y16).all()
    cos = torch.nn.functional.cosine_similarity(y, y16, dim=1)
    assert cos.min() > 0.999, cos
    assert ((y - y16).norm() / y.norm()) < 0.02
