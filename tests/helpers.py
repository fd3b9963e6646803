"""What several test modules share: the repository root, a free port, one launcher for multi-process runs (torchrun,
or N plain processes that meet through MASTER_ADDR/MASTER_PORT), the tiny train.py command line, and `headroom`,
the one place a subprocess timeout is sized."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
TIMEOUT_SCALE_ENV = "CFSM_TEST_TIMEOUT_SCALE"  # a slower machine than any measured: multiply every limit by this
HEADROOM = 3.0  # fixed limits (1x) failed 6 subprocess tests on 2 cores at a load of 2


def headroom(base_s: float) -> float:
    """The timeout for a subprocess that takes well under `base_s` seconds on an idle machine: `base_s` x 3, x the
    load per core when above 1 (measured now: the suite shares the machine), x $CFSM_TEST_TIMEOUT_SCALE (default 1).
    A timeout only stops a hung test; a generous one costs nothing when the test passes."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        load = 1.0
    return base_s * HEADROOM * max(1.0, load) * float(os.environ.get(TIMEOUT_SCALE_ENV) or 1)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's variables (a test run inside torchrun must not join its group), one
    thread per process and no GPU (the same CPU kernels in every process), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def torchrun(args: Sequence[str], nproc: int = 2, options: Sequence[str] | None = None,
             launcher: str = "torch.distributed.run") -> list[str]:
    """The command `python -m <launcher> --nproc_per_node=N <options> <args>`; `options` default to a free
    master port (pass rendezvous options for elastic runs)."""
    options = [f"--master_port={free_port()}"] if options is None else list(options)
    return [sys.executable, "-m", launcher, f"--nproc_per_node={nproc}", *options, *args]


def run(cmd: Sequence[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """`cmd` in the repository root with `launch_env()`, output captured as text (timeout: `headroom(600)`)."""
    return subprocess.run(list(cmd), cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=headroom(600) if timeout is None else timeout)


def run_module(module: str, args: Sequence[str], nproc: int = 1,
               timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` (nproc 0: no launcher) or the same under torchrun with `nproc` CPU ranks
    (timeout: `headroom(120)`)."""
    cmd = [sys.executable, "-m", module, *args] if nproc == 0 else torchrun(["-m", module, *args], nproc)
    return run(cmd, headroom(120) if timeout is None else timeout)


def start_ranks(argv: Sequence[Sequence[str]]) -> list[subprocess.Popen]:
    """One process per rank (`argv[r]` is rank r's command), meeting at a free port on 127.0.0.1 (each calls
    `init_process_group` itself); stdout and stderr merged as text."""
    env = launch_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return [subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for cmd in argv]


def tiny_args(rec, output, *extra: str) -> list[str]:
    """train.py's command line for a few seconds' run on the miniature toy data (later overrides win)."""
    return ["configs/toy", f"rec={rec}", f"output={output}", "generate_toy_data=False", "network=r_tiny",
            "embedding_size=32", "batch_size=16", "num_workers=0", "num_epoch=2", "warmup_epoch=0", "frequent=1",
            "verbose=0", "val_targets=['toy_clean']", "val_batch_size=16", "image_every=2", *extra]


def load_model(path) -> dict:
    """A train.py model.pt, checked to load strictly into r_tiny (a plain state dict, as InsightFace tools expect)."""
    from backbones import get_model

    state = torch.load(path, weights_only=True)
    get_model("r_tiny", num_features=32).load_state_dict(state, strict=True)
    return state


def spawn_ranks(fn, folder, *args, world: int = 2, timeout_s: float = 60.0) -> list:
    """`fn(rank, *args)` on `world` gloo CPU processes (torch.multiprocessing; `fn` defined at module level), which
    meet through a file store in `folder`; each rank's return value, by rank. An error on any rank fails the call
    with that rank's traceback."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_entry, args=(fn, str(folder), world, timeout_s, args), nprocs=world, join=True)
    return [torch.load(Path(folder) / f"rank{r}.result.pt", weights_only=False) for r in range(world)]


def _rank_entry(rank: int, fn, folder: str, world: int, timeout_s: float, args: tuple) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'pg_init')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        torch.save(fn(rank, *args), os.path.join(folder, f"rank{rank}.result.pt"))
    finally:
        dist.destroy_process_group()
