"""Process-group setup from the launcher's environment (torchrun, torch.distributed.launch, or none).

The same code runs on CPU/gloo and GPU/NCCL: the backend and device follow from what the machine has.

Cross-rank agreement, one family (`agree_*`): a branch one rank could take alone is agreed before a collective.

    agree_all(env, ok)            True only if `ok` on every rank (AND)
    agree_any(flags)              int flags OR-ed over the ranks (a tensor of several flags, one all-reduce)
    agree_call(env, fn, what)     fn() on every rank; if it raised on any rank, every rank raises
    agree_batches(env, batches)   the batches while every rank has one; an error or early end stops all ranks
    gather_objects(env, obj)      every rank's picklable object, by rank (what Ranks below is built from)

`shard_range` is the one split of rows over ranks (Partial FC's class centres; the checkpoint re-sharder's cuts).
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

from utils.errors import LaunchError, UserError

T = TypeVar("T")


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
        raise LaunchError(f"environment variable {name}={value!r} is not an integer: unset it, or start with torchrun "
                          f"(which sets it)") from None


def init_distributed(device: str = "auto", timeout_s: float = 600.0, local_rank_arg: int | None = None) -> DistEnv:
    """Create the process group when a launcher started us (WORLD_SIZE set), else run single-process.

    `local_rank_arg` is the `--local-rank`/`--local_rank` value passed by the legacy launcher; the environment
    (LOCAL_RANK) wins when both exist, since torch >= 2 launchers always set it.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0)
    if not 0 <= rank < world_size:
        raise LaunchError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size}): unset RANK/WORLD_SIZE for one "
                          f"process, or start with torchrun (which sets both)")

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise LaunchError("config device='cuda' but CUDA is not available on this machine: use device=auto or "
                          "device=cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices: start at "
                              f"most that many processes per node (--nproc_per_node)")
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
            raise LaunchError(f"WORLD_SIZE={world_size} but {name} is not set: start with torchrun or "
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


def agree_all(env: DistEnv, ok: bool) -> bool:
    """True only if `ok` on every rank: lets ranks agree to stop together instead of hanging."""
    if not env.distributed:
        return ok
    flag = torch.tensor([0 if ok else 1], device=env.device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def agree_any(flags: torch.Tensor) -> torch.Tensor:
    """Per-rank int flags OR-ed over the ranks of the default process group (all-reduce MAX); without one (single
    process) the flags as they are. A branch that one rank could take alone is then taken by every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    flags = flags.clone()
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def gather_objects(env: DistEnv, obj: T) -> list[T]:
    """Every rank's `obj` (picklable), indexed by rank; `[obj]` without a process group."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


class PeerRankError(UserError, RuntimeError):
    """Raised on the ranks that did not fail when another rank failed at a point all ranks agreed on (one line: the
    failing rank prints its own error)."""


def _stop_together(env: DistEnv, error: BaseException | None, what: str, more_flags: tuple[bool, ...] = ()) \
        -> tuple[bool, ...]:
    """One all-reduce of (failing rank + 1, *more_flags); raise on every rank if any rank failed, else return the
    extra flags OR-ed over ranks. The failing rank re-raises its own error, the others a PeerRankError naming it."""
    values = [env.rank + 1 if error is not None else 0, *(int(f) for f in more_flags)]
    agreed = agree_any(torch.tensor(values, dtype=torch.int64, device=env.device)).tolist() if env.distributed \
        else values
    if error is not None:
        raise error
    if agreed[0]:
        raise PeerRankError(f"rank {agreed[0] - 1} failed during {what} (its error is in its own log / output); "
                            f"rank {env.rank} stops with it instead of waiting in the next collective")
    return tuple(bool(v) for v in agreed[1:])


def agree_call(env: DistEnv, fn: Callable[[], T], what: str) -> T:
    """fn() on this rank, then an agreement in place of a barrier: if fn raised on any rank, every rank raises
    (instead of the others waiting at the next collective until the process-group timeout)."""
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks were told
        result, error = None, exc
    _stop_together(env, error, what)
    return result


def agree_batches(env: DistEnv, batches: Iterable[T]) -> Iterator[T]:
    """Yield the items of `batches` while every rank has one, with one all-reduce per item of (error, exhausted,
    not exhausted). A rank whose loader raises (a bad record) re-raises, the others raise PeerRankError; when
    every rank is exhausted all stop together; when only some are (uneven shards) every rank raises, instead of
    the longer ranks waiting in their next collective."""
    iterator = iter(batches)
    while True:
        item, error, exhausted = None, None, False
        try:
            item = next(iterator)
        except StopIteration:
            exhausted = True
        except Exception as exc:  # noqa: BLE001 - re-raised by _stop_together on this rank
            error = exc
        any_exhausted, any_not_exhausted = _stop_together(env, error, "data loading", (exhausted, not exhausted))
        if any_exhausted and any_not_exhausted:
            raise RuntimeError(f"rank {env.rank}: the ranks' loaders ran out of batches at different points (uneven "
                               f"shards: this rank {'had no' if exhausted else 'still had a'} batch); every rank "
                               f"must get the same number of batches per epoch (drop_last sampler)")
        if exhausted:
            return
        yield item


def shard_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, count) of `rank`'s contiguous share of `total` rows split over `world_size` ranks, the first
    `total % world_size` ranks holding one more: Partial FC's split of the class centres, which the checkpoint
    re-sharder (utils/run/reshard.py) cuts and joins by."""
    base, rem = divmod(total, world_size)
    return base * rank + min(rank, rem), base + int(rank < rem)


# The ranks as the few collectives the run's file handling needs (utils.run.run_state, utils.run.output_lock); a test
# passes plain functions for a fake world.
@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    agree_all: Callable[[bool], bool] = field(default=lambda ok: ok)  # True only if True on every rank
    gather: Callable[[Any], list] = field(default=lambda obj: [obj])  # every rank's object, by rank

    @property
    def writes_markers(self) -> bool:
        """Rank 0 and the first rank of every node: each node's folder gets its markers and pruning."""
        return self.rank == 0 or self.local_rank == 0

    @classmethod
    def from_env(cls, env) -> "Ranks":
        """`agree_all` / `gather_objects` over the default process group of `env`."""
        if not env.distributed:
            return cls(env.rank, env.world_size, env.local_rank)
        return cls(env.rank, env.world_size, env.local_rank, lambda ok: agree_all(env, ok),
                   lambda obj: gather_objects(env, obj))


def cleanup(env: DistEnv) -> None:
    """Destroy the process group while the interpreter is fully alive. DDP reducers left in reference cycles are
    collected first, so no gloo work they hold is torn down during interpreter finalization (a rare SIGABRT,
    "terminate called without an active exception", seen once after a finished elastic restart)."""
    if env.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
