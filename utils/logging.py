"""Console logging, TensorBoard and the throughput/ETA meter."""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Iterator


def setup_logger(rank: int, output: str | Path | None, name: str = "train", defer_file: bool = False
                 ) -> logging.Logger:
    """Rank 0 logs INFO to console and `output/<name>.log`; other ranks only warnings (prefixed with the rank).

    `defer_file`: create no folder or file yet; records are kept in memory until `open_log_file` writes them (a run
    that fails its input checks leaves nothing on disk)."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")  # runs last days
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if rank == 0 and defer_file:
        logger.addHandler(logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1))
    elif rank == 0 and output is not None:
        _add_file_handler(logger, output, name)
    return logger


def _add_file_handler(logger: logging.Logger, output: str | Path, name: str) -> logging.FileHandler:
    Path(output).mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(Path(output) / f"{name}.log")
    fh.setFormatter(logger.handlers[0].formatter)
    logger.addHandler(fh)
    return fh


def open_log_file(logger: logging.Logger, output: str | Path, name: str) -> logging.FileHandler | None:
    """Attach `output/<name>.log` (appending) to a logger made by `setup_logger`, writing the records kept in memory
    first; None on ranks that keep no log file."""
    buffers = [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]
    if not buffers:
        return None
    for buffer in buffers:
        logger.removeHandler(buffer)
    fh = _add_file_handler(logger, output, name)
    for buffer in buffers:
        buffer.setTarget(fh)
        buffer.flush()
        buffer.close()
    return fh


def summary_writer(output: str | Path, enabled: bool = True, purge_step: int | None = None):
    """A TensorBoard SummaryWriter in `output/tensorboard` (None when disabled). `purge_step`: the first step a
    resumed run logs; TensorBoard hides the earlier attempt's events from that step on, so one curve stays one run."""
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(output) / "tensorboard"), purge_step=purge_step)


def run_writer(output: str | Path, cfg, resumed: bool = False, purge_step: int | None = None):
    """The writer of a training run (rank 0): TensorBoard (`tensorboard`), wandb (`wandb`, utils/wandb_logging.py),
    both behind one `FanOutWriter`, or None. `resumed`: the run continues from a checkpoint (wandb continues its
    run); `purge_step`: the first step it logs (TensorBoard hides the replaced attempt's later events)."""
    writers = [w for w in (summary_writer(output, cfg.tensorboard, purge_step),) if w is not None]
    if cfg.get("wandb"):
        from utils.wandb_logging import WandbWriter

        writers.append(WandbWriter(output, cfg, resumed))
    if len(writers) > 1:
        from utils.wandb_logging import FanOutWriter

        return FanOutWriter(writers)
    return writers[0] if writers else None


class SpeedMeter:
    """Samples/s over the last logging window, the run's mean, and an ETA for the remaining steps; training time
    only: what runs inside `paused()` (verification) and after the last `mark` (final files) is not counted."""

    def __init__(self, global_batch: int, total_steps: int, start_step: int):
        self.global_batch = global_batch
        self.total_steps = total_steps
        self.window_start = time.perf_counter()
        self.window_start_step = start_step
        self.run_start = self.window_start
        self.run_start_step = start_step
        self.paused_s = 0.0  # time spent in `paused()` so far
        self.end: tuple[float, float] | None = None  # (time, paused_s) when the newest step ended

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.paused_s += spent
            self.window_start += spent  # the current window's speed leaves it out too

    def mark(self) -> None:
        """A step ended now: the run's mean is measured up to here."""
        self.end = (time.perf_counter(), self.paused_s)

    def window(self, step: int) -> tuple[float, float]:
        """(samples/s since the last call, ETA in seconds)."""
        now = time.perf_counter()
        steps = max(1, step - self.window_start_step)
        speed = steps * self.global_batch / max(1e-9, now - self.window_start)
        self.window_start, self.window_start_step = now, step
        eta = (self.total_steps - step) * self.global_batch / max(speed, 1e-9)
        return speed, eta

    def mean(self, step: int) -> float:
        end, paused = self.end or (time.perf_counter(), self.paused_s)
        elapsed = end - self.run_start - paused
        return (step - self.run_start_step) * self.global_batch / max(elapsed, 1e-9)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"
