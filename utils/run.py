"""The run scaffold both trainers share; each trainer owns only its step function.

`Run` does what every training run does around its steps: output folder, logger, seeds, toy data, the loader and
its step counts, resume, checkpoints, the non-finite guard agreed by all ranks, progress logs and the summary.
`train.py` (stage 2) and `train_generator.py` (stage 1) build their models, a `train_step(batch) -> stats`, and
loop over `Run.step_batches`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from easydict import EasyDict

from utils import checkpoint as ckpt
from utils import run_state
from utils.config import ConfigError
from utils.distributed import DistEnv, agreed_batches, agreed_call, all_ranks_ok, barrier
from utils.logging import SpeedMeter, format_eta, run_writer, setup_logger
from utils.optim import NonFiniteGuard


@dataclass(frozen=True)
class StepPlan:
    """Step counts of a run. A step is one optimizer step of `micro_per_step` loader batches."""
    batches_per_epoch: int  # loader batches per epoch on each rank
    micro_per_step: int     # loader batches per optimizer step (gradient accumulation)
    total_steps: int        # optimizer steps of the full schedule (what the LR schedule spans)
    warmup_steps: int
    stop_step: int          # where this run stops: total_steps, or max_steps when that is smaller

    def epoch_of(self, step: int) -> int:
        return step * self.micro_per_step // self.batches_per_epoch

    def epochs_done(self, step: int) -> float:
        return step * self.micro_per_step / self.batches_per_epoch


def plan_steps(batches_per_epoch: int, micro_per_step: int, num_epoch: int, warmup_epoch: float,
               max_steps: int, where: str) -> StepPlan:
    """The plan for `num_epoch` epochs; refuses data too small for a single optimizer step."""
    if batches_per_epoch < micro_per_step or batches_per_epoch < 1:
        raise ConfigError(f"{where}: {batches_per_epoch} batches per epoch, fewer than the {micro_per_step} of one "
                          f"optimizer step: lower batch_size / gradient_acc or use more images")
    total = batches_per_epoch * num_epoch // micro_per_step
    warmup = int(batches_per_epoch * warmup_epoch // micro_per_step)
    stop = min(total, max_steps) if max_steps > 0 else total
    return StepPlan(batches_per_epoch, micro_per_step, total, warmup, stop)


class Run:
    """One training run on one rank, used as `with Run(...) as run:`. It opens the output folder (and holds its
    lock until the block ends), the logger, seeds this rank and creates the toy data when asked, so every later
    step can log and fail with its file named."""

    def __init__(self, cfg: EasyDict, env: DistEnv, kind: str, log_name: str, tensorboard_prefix: str,
                 save_each_epoch: bool = False):
        self.cfg, self.env, self.kind = cfg, env, kind
        self.start_time = time.time()
        self.output = Path(cfg.output or Path("work_dirs") / cfg.config_name)
        self.log = setup_logger(env.rank, self.output, name=log_name)
        self.ranks = run_state.Ranks.from_env(env)
        self.lock = run_state.lock_output(self.output, self.ranks)  # a second job in this folder stops here
        self.tensorboard_prefix = tensorboard_prefix
        self.save_each_epoch = save_each_epoch
        torch.manual_seed(cfg.seed + env.rank)
        if cfg.generate_toy_data:
            from utils.toyface import ensure_toy_data

            ensure_toy_data(cfg.rec)  # safe when several ranks call it at once
        # per-rank generators saved in every checkpoint next to the global RNGs (a trainer adds its own)
        self.rngs: dict[str, torch.Generator] = {}
        self.plan: StepPlan | None = None
        self.writer = None
        self.meter: SpeedMeter | None = None
        self.saved_step = -1
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps)
        self.config = run_state.run_config(cfg, world_size=env.world_size)  # stored in every checkpoint

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    # ---- data and step counts ----

    def loader(self, dataset, micro_per_step: int = 1):
        """The training loader of this rank (CUDA prefetching on GPU) and the run's `StepPlan` (`self.plan`)."""
        from dataset import CUDAPrefetcher, get_dataloader

        cfg, env = self.cfg, self.env
        loader = get_dataloader(dataset, cfg.batch_size, cfg.seed, cfg.num_workers, env.rank, env.world_size,
                                env.device)
        if env.device.type == "cuda":
            loader = CUDAPrefetcher(loader, env.device)  # overlaps host-to-device copies with compute
        where = f"batch_size={cfg.batch_size} x {env.world_size} ranks on {dataset.num_images} images of {cfg.rec}"
        self.plan = plan_steps(loader.sampler.batches_per_epoch, micro_per_step, cfg.num_epoch, cfg.warmup_epoch,
                               cfg.max_steps, where)
        return loader

    def step_batches(self, loader, step: int,
                     open_epoch: Callable[[int, int], Iterable] | None = None) -> Iterator[tuple[int, list]]:
        """(epoch, the `micro_per_step` loader batches of one optimizer step) for the steps from `step` up to
        the plan's stop step.

        The samplers are positioned from the step count alone, so a resumed run reads what an uninterrupted one
        would. `open_epoch(epoch, first_batch)` positions the samplers and returns the epoch's iterable (default:
        the loader's sampler, then the loader)."""
        plan = self.plan
        steps_left = plan.stop_step - step
        micro = step * plan.micro_per_step
        batch: list = []
        while steps_left > 0:
            epoch, first_batch = divmod(micro, plan.batches_per_epoch)
            if open_epoch is None:
                loader.sampler.set_epoch(epoch, first_batch)
                batches = loader
            else:
                batches = open_epoch(epoch, first_batch)
            # one all-reduce per batch: a loader error or an early end on one rank stops every rank together
            for item in agreed_batches(batches, self.env):
                micro += 1
                batch.append(item)
                if len(batch) == plan.micro_per_step:
                    yield epoch, batch
                    batch = []
                    steps_left -= 1
                    if steps_left == 0:
                        return  # before reading another batch: the loader stops where the run stops

    # ---- resume and checkpoints ----

    def resume(self, load: Callable[[run_state.Resumed], None], **derived: Any) -> int:
        """The step to start from: 0, or a checkpoint's step after `load(resumed)` restored the trainer's part of
        it (`resumed.state` is this rank's file; the RNG part is restored here). `derived`: values the run read
        from its data (num_classes, ...), stored with the config and compared on resume."""
        self.config = run_state.run_config(self.cfg, world_size=self.env.world_size, **derived)
        resumed = run_state.resume(self.output, self.cfg.resume, self.ranks, self.kind, self.config, self.log)
        if resumed is None:
            return 0
        load(resumed)
        run_state.restore_rng_state(resumed.state["rng"], self.rngs)
        step = resumed.step
        epoch, batch = divmod(step * self.plan.micro_per_step, self.plan.batches_per_epoch)
        self.log.info(f"resumed from {resumed.directory} at step {step} (epoch {epoch}, batch {batch})")
        return step

    def save_due(self, step: int) -> bool:
        """A checkpoint inside the run: every `save_every` steps (stage 1 also at each epoch's end)."""
        if step >= self.plan.stop_step:
            return False  # the final save follows the loop
        every = self.cfg.save_every and step % self.cfg.save_every == 0
        return bool(every or (self.save_each_epoch and step * self.plan.micro_per_step
                              % self.plan.batches_per_epoch == 0))

    def save(self, step: int, state: dict) -> None:
        """Every rank writes `state` plus its step and RNG state; the step is marked complete once all did."""
        state = {**state, "rng": run_state.capture_rng_state(self.rngs), "step": step}
        run_state.save_run_checkpoint(self.output, step, state, self.ranks, self.cfg.keep_checkpoints, self.kind,
                                      self.config, {"config_name": self.cfg.config_name,
                                                    "epoch": self.plan.epoch_of(step)})
        self.saved_step = step

    def final_save(self, step: int, state: dict, finite_check: Mapping[str, Any]) -> None:
        """The end of the loop: all ranks refuse together when `finite_check` (final weights and buffers) holds
        NaN/Inf, before anything is written as a success; else the final checkpoint (unless just saved)."""
        run_state.require_finite(finite_check, step, self.ranks, self.output)
        if self.saved_step != step:
            self.save(step, state)

    # ---- non-finite guard ----

    def all_ranks_ok(self, ok: bool) -> bool:
        """True only when `ok` holds on every rank: a skip one rank takes, all take (one all-reduce)."""
        return all_ranks_ok(self.env, ok)

    def check_finite(self, step: int, finite: bool, values: Mapping[str, torch.Tensor | float]) -> None:
        """Count a skipped step (already agreed by all ranks); stop after `max_nonfinite_steps` in a row, naming
        the step, the first non-finite of `values` and the newest finite checkpoint."""
        if not finite:
            shown = ", ".join(f"{name} {float(v):.4g}" for name, v in values.items())
            self.log.warning(f"step {step}: non-finite {shown}: update skipped ({self.guard.count + 1} in a row)")
            numbers = [float(v) for v in values.values()]
            shown_loss = next((v for v in numbers if not math.isfinite(v)), numbers[0])  # the culprit, if a loss
            newest = run_state.last_finite_checkpoint(self.output)
            self.guard.update(False, step, shown_loss, str(newest or "none"))
        else:
            self.guard.update(True, step, 0.0, "")

    # ---- monitoring ----

    def start(self, step: int, description: str) -> None:
        """Open TensorBoard / wandb (rank 0) and the speed meter, and log what this run will do."""
        cfg, env, plan = self.cfg, self.env, self.plan
        self.writer = agreed_call(env, lambda: run_writer(self.output, cfg, resumed=step > 0) if env.is_main else None,
                                  "opening TensorBoard / wandb")  # rank 0 opens; a failure there stops every rank
        self.meter = SpeedMeter(cfg.batch_size * env.world_size * plan.micro_per_step, plan.stop_step, step)
        self.log.info(f"{cfg.config_name}: {description}, world size {env.world_size}, device {env.device}, "
                      f"{plan.total_steps} steps ({plan.batches_per_epoch} batches/epoch), stopping at "
                      f"{plan.stop_step}")

    def log_due(self, step: int) -> bool:
        """Rank 0, every `frequent` steps and at the stop step."""
        return self.env.is_main and bool(self.cfg.frequent) and (step % self.cfg.frequent == 0
                                                                 or step == self.plan.stop_step)

    def log_progress(self, step: int, epoch: int, values: Mapping[str, torch.Tensor | float]) -> None:
        """Every `frequent` steps and at the stop step (rank 0): one console line and TensorBoard scalars.
        Tensors are read (a device sync) only here."""
        if not self.log_due(step):
            return
        speed, eta = self.meter.window(step)
        numbers = {name: float(v) for name, v in values.items()}
        self.log.info(f"step {step}/{self.plan.stop_step} epoch {epoch} "
                      + " ".join(f"{name} {v:.5g}" for name, v in numbers.items())
                      + f" {speed:.1f} samples/s ETA {format_eta(eta)}")
        if self.writer is not None:
            for name, v in {**numbers, "samples_per_sec": speed}.items():
                self.writer.add_scalar(f"{self.tensorboard_prefix}/{name}", v, step)

    def image_due(self, step: int) -> bool:
        return self.writer is not None and bool(self.cfg.image_every) and step % self.cfg.image_every == 0

    # ---- the end ----

    def finish(self, step: int, results: Callable[[], dict[str, Any]]) -> dict | None:
        """After `final_save`: on rank 0 `results()` (writes the stage's model files, returns the summary's
        stage-specific entries) and `summary.json`. Every rank waits for rank 0; rank 0 returns the summary."""
        summary = None
        if self.env.is_main:
            summary = {"config": dict(self.cfg), "steps": step, "epochs": self.plan.epochs_done(step),
                       **results(), "samples_per_sec": self.meter.mean(step),
                       "wall_s": time.time() - self.start_time}
            ckpt.write_json(summary, self.output / "summary.json")
            if self.writer is not None:
                self.writer.close()
        barrier(self.env)
        return summary

    def wrap_ddp(self, module: torch.nn.Module, **ddp_options) -> torch.nn.Module:
        """`module` in DistributedDataParallel when a process group runs, else itself."""
        if not self.env.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **ddp_options)
