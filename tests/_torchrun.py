"""Launch a command module as one process or as N gloo ranks under torchrun (the eval N-process tests)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(module: str, args: list[str], nproc: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m module args` (nproc 0: no launcher) or `torchrun --nproc_per_node=nproc -m module args`, on CPU
    with one thread per process (the same kernels in both, so results can be compared bit for bit)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launcher = [] if nproc == 0 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                      f"--master_port={free_port()}"]
    cmd = [sys.executable, *launcher, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
