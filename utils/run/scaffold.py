"""The run scaffold both trainers share; each trainer owns only its step function.

`Run` does what every training run does around its steps: output folder, logger, seeds, the step counts of the
loader its trainer built, resume, checkpoints, the non-finite guard agreed by all ranks, progress logs and
the summary. `train.py` (stage 2) and `train_generator.py` (stage 1) make their data ready (`dataset.ensure_rec`:
toy data when asked), build their models, their loaders (through `dataset`), a `train_step(batch) -> result`, and
loop over `Run.step_batches`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from easydict import EasyDict

from utils import checkpoint as ckpt
from utils.run import config_policy, elastic, output_lock, rng_state, run_folder, run_state
from utils.distributed import DistEnv, Ranks, agree_batches, agree_call, barrier
from utils.errors import ConfigError, RunFailedError, UserError
from utils.logging import SpeedMeter, format_eta, open_log_file, run_writer, setup_logger


class MissingInputError(UserError, FileNotFoundError):
    """Input files named by config keys do not exist; the message lists every one of them."""


INPUT_HINTS = {  # what a missing input key should point at (the trainers' input files)
    "rec": "the folder holding train.rec/train.idx, or an image folder",
    "pretrained_synthesis_model": "a CFSM generator file; train one with stage 1: python train_generator.py "
                                  "configs/cfsm_toy (or a released one)",
    "pretrained_backbone_model": "an InsightFace backbone state dict or a model.pt",
    "target": "a folder of target-domain faces or a .txt list of their paths",
    "id_model": "the identity network's weights (InsightFace backbone.pth or a train.py model.pt)",
    "init_generator": "a generator file (stage 1's generator.pth or a released one)",
}


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


def precision_name(autocast: Mapping[str, Any], fp16_asked: bool = False) -> str:
    """What a trainer's autocast arguments (utils.precision.mixed_precision) compute in, in words."""
    if not autocast.get("enabled"):
        return "fp32"
    if autocast["dtype"] == torch.float16:
        return "fp16 autocast with loss scaling"
    # fp16=True means bf16 off CUDA (utils.precision): say so, or a user reads "bf16" as a config mistake
    return "bf16 autocast" + (f" (fp16=True on {autocast['device_type']})" if fp16_asked else "")


def startup_line(cfg: Mapping[str, Any], env: DistEnv, plan: StepPlan, network: str, loss: str,
                 autocast: Mapping[str, Any], channel: Any = None, fed: str = "backbone") -> str:
    """Both trainers' first line: network, loss, world size, device, precision, the channel order when a network is
    fed BGR (`channel`: a `backbones.ChannelOrder` of network `fed`; RGB, every image's order, goes unsaid), the
    effective batch of one optimizer step (per rank x ranks x accumulated micro-batches) and the step counts."""
    per_rank, ranks, micro = int(cfg["batch_size"]), env.world_size, plan.micro_per_step
    bgr = f", {fed} fed BGR ({channel.reason})" if channel is not None and channel.order == "bgr" else ""
    return (f"{cfg['config_name']}: network {network}, loss {loss}, world size {ranks}, device {env.device}, "
            f"precision {precision_name(autocast, bool(cfg.get('fp16')))}{bgr}, "
            f"effective batch {per_rank * ranks * micro} "
            f"({per_rank} per rank x {ranks} rank{'s' * (ranks > 1)} x {micro} micro-batch{'es' * (micro > 1)}); "
            f"{plan.total_steps} steps ({plan.batches_per_epoch} batches/epoch), stopping at {plan.stop_step}")


SIGNIFICANT_DIGITS = 4  # a summary's losses, accuracies, speeds and seconds: noise sits beyond the 4th digit


def rounded(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """`value` with every float (in dicts and lists too) rounded to `digits` significant digits, for logs and
    summaries; ints, strings and non-finite floats unchanged."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rounded(v, digits) for v in value)
    return value


VERBATIM_SUMMARY_KEYS = ("style_report",)  # copies of a report's own file (cfsm/style_report.py): its digits stand
LEGACY_LOG_NAMES = ("cfsm_train",)  # stage 1's log before both stages wrote train.log: a resume continues it


class Run:
    """One training run on one rank, used as `with Run(...) as run:`.

    The folder rules: nothing is written to `output` until `resume` opens it (a run that fails its input checks
    leaves no folder behind); a re-run of a finished command finds `finished` set and touches nothing; a new run
    (resume=False, or nothing to resume) never starts in a folder that holds another run's checkpoints or results;
    an error or Ctrl-C is written to the log as one line naming the step and the newest checkpoint."""

    def __init__(self, cfg: EasyDict, env: DistEnv, policy: config_policy.ConfigPolicy, log_name: str,
                 tensorboard_prefix: str, save_each_epoch: bool = False):
        self.cfg, self.env, self.policy, self.kind = cfg, env, policy, policy.kind
        self.start_time = time.time()
        self.output = Path(cfg.output or Path("work_dirs") / cfg.config_name)
        if self.output.exists() and not self.output.is_dir():
            raise ConfigError(f"output={str(self.output)!r} is a file, not a folder: set output= to a folder")
        self.log_name = log_name
        self.log = setup_logger(env.rank, self.output, name=log_name, defer_file=True)
        self.ranks = Ranks.from_env(env)
        self.lock: output_lock.OutputLock | None = None  # taken when the folder is opened (`resume`)
        self.log_file = None
        self.tensorboard_prefix = tensorboard_prefix
        self.save_each_epoch = save_each_epoch
        # per-rank generators saved in every checkpoint next to the global RNGs (a trainer adds its own)
        self.rngs: dict[str, torch.Generator] = {}
        self.plan: StepPlan | None = None
        self.course: elastic.DataCourse | None = None  # set on resume: the data position by samples (elastic)
        self.dataset_len = 0
        self.writer = None
        self.meter: SpeedMeter | None = None
        self.saved_step = -1
        self.start_step = self.step = 0
        self.skipped = self.skipped_in_a_row = 0  # non-finite updates skipped, over the whole run (resumes too)
        self.config = config_policy.run_config(cfg, world_size=env.world_size)  # stored in every checkpoint
        # rank 0's folder decides (with a folder per node only it holds the summary)
        finished = config_policy.finished_summary(self.output, cfg, policy) if env.is_main else None
        self.finished = self.ranks.gather(finished)[0]
        if self.finished is not None:
            self.log.info(f"already complete at step {self.finished['steps']} ({self.output}): nothing to do; "
                          f"raise max_steps / num_epoch to train on, or set another output")
            return
        if cfg.resume is False:
            self.refuse_other_run("resume=False")
        torch.manual_seed(cfg.seed + env.rank)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is KeyboardInterrupt and self.env.is_main:
                newest = run_folder.latest_complete(self.output) if self.lock is not None else None
                self.log.warning(
                    f"interrupted at step {self.step}; newest checkpoint: {newest[1] if newest else 'none'}; "
                    f"continue with the same command ({'it resumes from there' if newest else 'it starts over'}): "
                    f"{shlex.join(['python', *sys.argv])}")
            elif exc is not None and self.log_file is not None:
                from utils.cli import one_line

                # the console shows the error already (utils.cli); the log file gets the same line
                self.log_file.handle(self.log.makeRecord(self.log.name, 40, "", 0, one_line(exc), None, None))
        finally:
            if self.lock is not None:
                self.lock.release()

    def refuse_other_run(self, why: str) -> None:
        """All ranks raise when any rank's folder holds another run's checkpoints or results."""
        held = self.ranks.gather(run_folder.run_files(self.output))
        listing = "; ".join(f"rank {r}: {', '.join(files)}" for r, files in enumerate(held) if files)
        if listing:
            raise ConfigError(
                f"output folder {self.output} already holds a run ({listing}); {why} would mix a new run into it. "
                f"Continue that run with resume=auto, set output= to a new folder, or move {self.output} aside")

    def require_inputs(self, paths: Mapping[str, str | None]) -> None:
        """Every config key -> path given (None: not needed) must exist on every rank; one error lists them all."""
        missing = [f"{key}={value!r}" for key, value in paths.items()
                   if value is not None and not Path(os.path.expanduser(str(value))).exists()]
        every = self.ranks.gather(missing)
        listing = sorted({f"{item}{f' (rank {r})' if self.env.world_size > 1 else ''}"
                          for r, items in enumerate(every) for item in items})
        if listing:
            hints = "; ".join(f"{key}: {INPUT_HINTS[key]}" for key in sorted({i.split("=")[0] for i in listing})
                              if key in INPUT_HINTS)
            raise MissingInputError(f"missing input(s): {', '.join(listing)}: no such file or folder. Set each key "
                                    f"to an existing path (KEY=PATH after the config on the command line): {hints}")

    def open_folder(self) -> None:
        """Create the output folder, take its lock (a second job stops here) and start the log file."""
        self.lock = output_lock.lock_output(self.output, self.ranks)
        log_path = self.output / f"{self.log_name}.log"
        for old in (self.output / f"{name}.log" for name in LEGACY_LOG_NAMES):
            if self.env.is_main and old.is_file() and not log_path.exists():
                old.rename(log_path)  # one log per folder, named alike in both stages
        self.log_file = open_log_file(self.log, self.output, self.log_name)

    # ---- data and step counts ----

    def use_loader(self, loader, dataset, micro_per_step: int = 1) -> StepPlan:
        """Plan the run's steps (`self.plan`) on the loader the trainer built (`dataset.training_loader`): its
        sampler's batches per epoch, `micro_per_step` loader batches per optimizer step."""
        cfg, env = self.cfg, self.env
        self.dataset_len = len(dataset)
        where = f"batch_size={cfg.batch_size} x {env.world_size} ranks on {dataset.num_images} images of {cfg.rec}"
        self.plan = plan_steps(loader.sampler.batches_per_epoch, micro_per_step, cfg.num_epoch, cfg.warmup_epoch,
                               cfg.max_steps, where)
        return self.plan

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
            position: dict = {}
            if self.course is not None:  # positioned by samples (a checkpoint of another world size continues)
                epoch, position["start_sample"] = self.course.at_micro(micro)
                first_batch = position["start_sample"] // self.course.samples_per_batch
            if open_epoch is None:
                loader.sampler.set_epoch(epoch, first_batch, **position)
                batches = loader
            else:
                batches = open_epoch(epoch, first_batch)
            # one all-reduce per batch: a loader error or an early end on one rank stops every rank together
            for item in agree_batches(self.env, batches):
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
        self.open_folder()
        self.config = config_policy.run_config(self.cfg, world_size=self.env.world_size, **derived)
        resumed = run_state.resume(self.output, self.cfg.resume, self.ranks, self.kind, self.config, self.log,
                                   self.policy)
        if resumed is None:
            self.refuse_other_run("starting at step 0")
            return 0
        elastic_line = self._continue_course(resumed)  # another world size: stop step, schedule placed by samples
        step = resumed.step
        if step > self.plan.stop_step:
            raise ckpt.CheckpointError(
                f"checkpoint {resumed.directory} is at step {step}, past this run's stop step {self.plan.stop_step} "
                f"(max_steps={self.cfg.max_steps}, num_epoch={self.cfg.num_epoch}): raise them to continue that "
                f"run, or set output= to a new folder")
        epochs = self.epochs_done(step)  # a course's stop step never precedes its checkpoint: the data tells
        if epochs > self.cfg.num_epoch:
            raise ckpt.CheckpointError(
                f"checkpoint {resumed.directory} is at step {step}, {epochs:.4g} epochs into the data, past this "
                f"run's num_epoch={self.cfg.num_epoch}: raise num_epoch to {math.ceil(epochs)} or more to continue "
                f"that run, or set output= to a new folder")
        for line in (resumed.change_line(), elastic_line):  # accepted: now say what changes, in that order
            if line is not None:
                self.log.warning(line)
        load(resumed)
        rng_state.restore_rng_state(resumed.state["rng"], self.rngs)
        counters = resumed.state.get("run_counters", {})
        self.skipped, self.skipped_in_a_row = int(counters.get("skipped", 0)), int(counters.get("in_a_row", 0))
        self.start_step = self.step = self.saved_step = step  # that checkpoint is this step's: not written again
        epoch, consumed = self.position(step)
        self.log.info(f"resumed from {resumed.directory} at step {step} (epoch {epoch}, batch "
                      f"{consumed // (self.cfg.batch_size * self.env.world_size)}); {consumed} samples of the epoch "
                      f"consumed")
        return step

    def _continue_course(self, resumed: run_state.Resumed) -> str | None:
        """Place the data by the samples the checkpoint consumed. When its world size (or batch) differs from this
        run's: set the stop step and the lr schedule's position (in `resumed.state['scheduler']`) by samples and
        return the line saying what changed (utils/run/elastic.py; logged once the resume is accepted)."""
        saved = elastic.saved_course(resumed.state, resumed.meta)
        if saved is None:
            return None  # an old checkpoint without a record: positions follow from the step count, as written
        cfg, env = self.cfg, self.env
        self.course = elastic.DataCourse(resumed.step, saved["epoch"], saved["consumed"], self.dataset_len,
                                         cfg.batch_size * env.world_size, self.plan.micro_per_step)
        schedule_step, stop = elastic.schedule_after_change(self.course, self.plan.total_steps, cfg.num_epoch,
                                                            cfg.max_steps)
        self.plan = dataclasses.replace(self.plan, stop_step=stop)  # the same as planned unless a change happened
        if (saved["world_size"], saved["batch_size"]) == (env.world_size, cfg.batch_size):
            return None  # the saved schedule position is already by samples
        if "scheduler" in resumed.state:
            resumed.state["scheduler"] = {**resumed.state["scheduler"], "last_epoch": schedule_step}
        return "resume: " + elastic.describe_change(saved, self.course, env.world_size, cfg.batch_size,
                                                    schedule_step, self.plan.total_steps, stop)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, samples of it consumed by all ranks) at `step`."""
        if self.course is not None:
            return self.course.at_step(step)
        epoch, batch = divmod(step * self.plan.micro_per_step, self.plan.batches_per_epoch)
        return epoch, batch * self.cfg.batch_size * self.env.world_size

    def epochs_done(self, step: int) -> float:
        """Epochs of data consumed at `step` (by samples when resumed from a record: any world size)."""
        epoch, consumed = self.position(step)
        return epoch + consumed / (self.plan.batches_per_epoch * self.cfg.batch_size * self.env.world_size)

    def save_due(self, step: int) -> bool:
        """A checkpoint inside the run: every `save_every` steps (stage 1 also at each epoch's end)."""
        if step >= self.plan.stop_step:
            return False  # the final save follows the loop
        every = self.cfg.save_every and step % self.cfg.save_every == 0
        return bool(every or (self.save_each_epoch and step * self.plan.micro_per_step
                              % self.plan.batches_per_epoch == 0))

    def save(self, step: int, state: dict) -> None:
        """Every rank writes `state` plus its step and RNG state; the step is marked complete once all did."""
        epoch, consumed = self.position(step)
        counters = {"skipped": self.skipped, "in_a_row": self.skipped_in_a_row}
        state = {**state, "rng": rng_state.capture_rng_state(self.rngs), "step": step, "run_counters": counters,
                 "data_position": elastic.position_record(epoch, consumed, self.env.world_size, self.cfg.batch_size)}
        run_state.save_run_checkpoint(self.output, step, state, self.ranks, self.cfg.keep_checkpoints, self.kind,
                                      self.config, {"config_name": self.cfg.config_name, "epoch": epoch,
                                                    "skipped_steps": self.skipped})
        self.saved_step = step

    def final_save(self, step: int, state: dict, finite_check: Mapping[str, Any]) -> None:
        """The end of the loop: all ranks refuse together when most updates were skipped or `finite_check` (final
        weights and buffers) holds NaN/Inf, before anything is written as a success; else the final checkpoint
        (unless just saved). The skip counts are agreed already: every rank raises alike."""
        if step > 0 and 2 * self.skipped > step:
            raise RunFailedError(
                f"{self.skipped} of {step} updates were skipped as non-finite: the model is not trained, so no final "
                f"checkpoint or model file was written. Last finite checkpoint: "
                f"{run_folder.last_finite_checkpoint(self.output) or 'none'}. Lower lr, check the data or the "
                f"pretrained weights, or disable fp16")
        run_state.require_finite(finite_check, step, self.ranks, self.output)
        if self.saved_step != step:
            self.save(step, state)

    # ---- non-finite guard ----

    def check_finite(self, step: int, finite: bool, values: Mapping[str, torch.Tensor | float]) -> None:
        """Count a skipped step (already agreed by all ranks); stop after `max_nonfinite_steps` in a row, naming
        the step, the first non-finite of `values` and the newest finite checkpoint."""
        self.step = step
        if self.meter is not None:
            self.meter.mark()  # called after every step: the run's mean speed ends at its last step
        if finite:
            self.skipped_in_a_row = 0
            return
        self.skipped += 1
        self.skipped_in_a_row += 1
        shown = ", ".join(f"{name} {float(v):.4g}" for name, v in values.items())
        self.log.warning(f"step {step}: non-finite {shown}: update skipped ({self.skipped_in_a_row} in a row, "
                         f"{self.skipped} in all)")
        if self.skipped_in_a_row >= self.cfg.max_nonfinite_steps:
            numbers = [float(v) for v in values.values()]
            loss = next((v for v in numbers if not math.isfinite(v)), numbers[0])  # the culprit, if a loss
            raise RunFailedError(
                f"{self.skipped_in_a_row} consecutive non-finite steps (max_nonfinite_steps="
                f"{self.cfg.max_nonfinite_steps}) at step {step}, loss {loss:.4g}; last good checkpoint: "
                f"{run_folder.last_finite_checkpoint(self.output) or 'none'}. Lower lr, check the data, or disable fp16.")

    # ---- monitoring ----

    def start(self, step: int, description: str, autocast: Mapping[str, Any], channel: Any = None,
              network: str | None = None, loss: str | None = None, fed: str = "backbone") -> None:
        """Open TensorBoard / wandb (rank 0) and the speed meter, and log what this run will do (`startup_line`;
        network and loss default to the config's `network` and `loss`, stage 2's; `channel`: the order network
        `fed` sees)."""
        cfg, env, plan = self.cfg, self.env, self.plan
        self.writer = agree_call(env, lambda: run_writer(self.output, cfg, resumed=step > 0, purge_step=step + 1)
                                  if env.is_main else None, "opening TensorBoard / wandb")  # a failure stops all ranks
        self.meter = SpeedMeter(cfg.batch_size * env.world_size * plan.micro_per_step, plan.stop_step, step)
        self.log.info(startup_line(cfg, env, plan, network or cfg.network, loss or cfg.loss, autocast, channel,
                                   fed)
                      + f"; {description}")

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

    def untimed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` with its time left out of the speeds (verification: summary.json's samples_per_sec is training)."""
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.meter is None:
                return fn(*args, **kwargs)
            with self.meter.paused():
                return fn(*args, **kwargs)
        return call

    def image_due(self, step: int) -> bool:
        """Every `image_every` steps and at the stop step: a run shorter than `image_every` still shows its faces."""
        return self.writer is not None and bool(self.cfg.image_every) and (step % self.cfg.image_every == 0
                                                                           or step == self.plan.stop_step)

    def add_image(self, step: int, tag: str, picture: Callable[[], Any]) -> None:
        """An HWC picture for TensorBoard at `tag` when `image_due`; `picture()` (None: nothing to show) is only
        drawn then."""
        if self.image_due(step) and (grid := picture()) is not None:
            self.writer.add_image(tag, grid, step, dataformats="HWC")

    # ---- the end ----

    def finish(self, step: int, results: Callable[[], dict[str, Any]]) -> dict | None:
        """After `final_save`: on rank 0 `results()` (writes the stage's model files, returns the summary's
        stage-specific entries) and `summary.json`. Every rank waits for rank 0; rank 0 returns the summary."""
        summary = None
        if self.env.is_main:
            trained = step > self.start_step
            stage = results()
            verbatim = {k: stage.pop(k) for k in VERBATIM_SUMMARY_KEYS if k in stage}
            summary = {"config": dict(self.cfg), "steps": step, **rounded({
                "epochs": self.epochs_done(step), **stage, "skipped_steps": self.skipped,
                "samples_per_sec": self.meter.mean(step) if trained else None,  # training steps only
                "wall_s": time.time() - self.start_time}), **verbatim}  # wall_s: the whole command, verification too
            path = self.output / run_folder.SUMMARY
            before = run_folder.read_summary(self.output) if not trained else None
            if before is not None:  # finishing a run whose last step was saved: keep its figures
                summary.update({k: before[k] for k, v in summary.items() if v is None and k in before})
            ckpt.write_json(summary, path)
            self.log.info(f"finished at step {step}: {self.skipped} of {step} updates skipped as non-finite; "
                          f"summary {path}")
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
