"""Process-group setup from the launcher's environment (torchrun, torch.distributed.launch, or none).

The same code runs on CPU/gloo and GPU/NCCL: the backend and device follow from what the machine has.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 600.0, local_rank_arg: int | None = None) -> DistEnv:
    """Create the process group when a launcher started us (WORLD_SIZE set), else run single-process.

    `local_rank_arg` is the `--local-rank`/`--local_rank` value passed by the legacy launcher; the environment
    (LOCAL_RANK) wins when both exist, since torch >= 2 launchers always set it.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("config device='cuda' but CUDA is not available on this machine")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")

    backend = None
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:  # a launcher started us: same path even with 1 rank
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            kwargs = {"device_id": dev} if use_cuda else {}
            timeout = datetime.timedelta(seconds=timeout_s)
            dist.init_process_group(backend=backend, store=_attempt_store(rank, world_size, timeout), rank=rank,
                                    world_size=world_size, timeout=timeout, **kwargs)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, namespaced by torchrun's restart count.

    After an elastic restart the workers reuse the agent's store; without a fresh namespace the new ranks can
    read the dead ranks' gloo addresses and fail with "connection refused".
    """
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(f"WORLD_SIZE={world_size} but {name} is not set: start with torchrun or "
                               f"torch.distributed.launch, or export {name}")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 0), world_size,
                          is_master=rank == 0 and not agent_store, timeout=timeout)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    return dist.PrefixStore(f"cfsm/{run}/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.local_rank])
        else:
            dist.barrier()


def all_ranks_ok(env: DistEnv, ok: bool) -> bool:
    """True only if `ok` on every rank: lets ranks agree to stop together instead of hanging."""
    if not env.distributed:
        return ok
    flag = torch.tensor([0 if ok else 1], device=env.device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def broadcast_object(env: DistEnv, obj):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
