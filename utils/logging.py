"""Console logging, TensorBoard and the throughput/ETA meter."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path


def setup_logger(rank: int, output: str | Path | None, name: str = "train") -> logging.Logger:
    """Rank 0 logs INFO to console and `output/<name>.log`; other ranks only warnings (prefixed with the rank)."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")  # runs last days
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if rank == 0 and output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output) / f"{name}.log")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def summary_writer(output: str | Path, enabled: bool = True):
    """A TensorBoard SummaryWriter in `output/tensorboard` (None when disabled)."""
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(output) / "tensorboard"))


def run_writer(output: str | Path, cfg, resumed: bool = False):
    """The writer of a training run (rank 0): TensorBoard (`tensorboard`), wandb (`wandb`, utils/wandb_logging.py),
    both behind one `FanOutWriter`, or None. `resumed`: the run continues from a checkpoint (wandb continues its
    run)."""
    writers = [w for w in (summary_writer(output, cfg.tensorboard),) if w is not None]
    if cfg.get("wandb"):
        from utils.wandb_logging import WandbWriter

        writers.append(WandbWriter(output, cfg, resumed))
    if len(writers) > 1:
        from utils.wandb_logging import FanOutWriter

        return FanOutWriter(writers)
    return writers[0] if writers else None


class SpeedMeter:
    """Samples/s over the last logging window, the run's mean, and an ETA for the remaining steps."""

    def __init__(self, global_batch: int, total_steps: int, start_step: int):
        self.global_batch = global_batch
        self.total_steps = total_steps
        self.window_start = time.perf_counter()
        self.window_start_step = start_step
        self.run_start = self.window_start
        self.run_start_step = start_step

    def window(self, step: int) -> tuple[float, float]:
        """(samples/s since the last call, ETA in seconds)."""
        now = time.perf_counter()
        steps = max(1, step - self.window_start_step)
        speed = steps * self.global_batch / max(1e-9, now - self.window_start)
        self.window_start, self.window_start_step = now, step
        eta = (self.total_steps - step) * self.global_batch / max(speed, 1e-9)
        return speed, eta

    def mean(self, step: int) -> float:
        elapsed = time.perf_counter() - self.run_start
        return (step - self.run_start_step) * self.global_batch / max(elapsed, 1e-9)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"
