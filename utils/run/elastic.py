"""Where a run's data and schedule stand, in samples, so that a resume on another number of ranks continues them.

The data position is (epoch, samples of that epoch consumed by all ranks together). `dataset.FaceSampler` deals one
permutation of the dataset per epoch round-robin over the ranks, so after b batches of B per rank on W ranks the
consumed samples are exactly the first b*B*W entries of the epoch's permutation, whatever W was. A run on W' ranks
continues from that entry (`FaceSampler.set_epoch(epoch, start_sample=...)`): no sample of the epoch is read twice
or skipped; as always the epoch's last (len - consumed) mod (B*W') samples are dropped (drop_last).

`batch_size` is per rank, so a new world size changes the global batch and the steps per epoch. The step counter
(checkpoint names) keeps counting; the lr schedule is placed by samples: its position becomes the new world's total
steps minus the steps the remaining samples give, so it ends where the data ends, as an uninterrupted run would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["DataCourse", "position_record", "saved_course", "schedule_after_change", "describe_change"]


@dataclass(frozen=True)
class DataCourse:
    """The data position `consumed` (samples of `epoch`) at step `step`, continued by this run's samplers."""
    step: int
    epoch: int
    consumed: int
    dataset_len: int
    samples_per_batch: int  # batch_size x world_size of this run
    micro_per_step: int     # loader batches per optimizer step

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_len // self.samples_per_batch

    def batches_left(self, consumed: int) -> int:
        """Loader batches (per rank) an epoch still gives after `consumed` of its samples."""
        return max(0, self.dataset_len - consumed) // self.samples_per_batch

    def at_micro(self, micro: int) -> tuple[int, int]:
        """(epoch, samples consumed in it) after `micro` loader batches of the whole run (micro >= step*micro_per)."""
        done = micro - self.step * self.micro_per_step
        if done < 0:
            raise ValueError(f"data position requested before the resumed step {self.step}")
        first = self.batches_left(self.consumed)
        if done < first:
            return self.epoch, self.consumed + done * self.samples_per_batch
        epochs, batch = divmod(done - first, self.batches_per_epoch)
        return self.epoch + 1 + epochs, batch * self.samples_per_batch

    def at_step(self, step: int) -> tuple[int, int]:
        return self.at_micro(step * self.micro_per_step)

    def steps_left(self, num_epoch: int) -> int:
        """Optimizer steps from `step` to the end of epoch `num_epoch - 1`."""
        if self.epoch >= num_epoch:
            return 0
        micro = self.batches_left(self.consumed) + (num_epoch - self.epoch - 1) * self.batches_per_epoch
        return micro // self.micro_per_step


def position_record(epoch: int, consumed: int, world_size: int, batch_size: int) -> dict[str, int]:
    """What a checkpoint stores as `data_position` (the world size and batch only say how it was reached)."""
    return {"epoch": int(epoch), "consumed": int(consumed), "world_size": int(world_size),
            "batch_size": int(batch_size)}


def saved_course(state: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, int] | None:
    """The checkpoint's data position record; for files written before records existed, derived from the step,
    the world size and the config in COMPLETE. None when neither is available."""
    if "data_position" in state:
        return dict(state["data_position"])
    cfg = meta.get("config") or {}
    try:
        world, batch = int(meta["world_size"]), int(cfg["batch_size"])
        micro, images = int(cfg.get("gradient_acc", 1)), int(cfg["num_image"])
    except (KeyError, TypeError, ValueError):
        return None
    epoch, first_batch = divmod(int(state["step"]) * micro, images // (world * batch))
    return position_record(epoch, first_batch * batch * world, world, batch)


def schedule_after_change(course: DataCourse, total_steps: int, num_epoch: int, max_steps: int) -> tuple[int, int]:
    """(the scheduler's position, the step the run stops at) for `course`: the schedule ends where the data does."""
    left = course.steps_left(num_epoch)
    stop = course.step + left
    if max_steps > 0:
        stop = min(stop, max_steps)
    return max(0, total_steps - left), stop


def describe_change(saved: Mapping[str, int], course: DataCourse, world_size: int, batch_size: int,
                    schedule_step: int, total_steps: int, stop_step: int) -> str:
    """The one log line of a resume on another world size (or batch)."""
    old_global = saved["world_size"] * saved["batch_size"]
    old_epoch_steps = course.dataset_len // old_global // course.micro_per_step
    new_epoch_steps = course.batches_per_epoch // course.micro_per_step
    return (f"world size {saved['world_size']} -> {world_size}: global batch {old_global} -> "
            f"{world_size * batch_size} samples ({batch_size} per rank), steps per epoch {old_epoch_steps} -> "
            f"{new_epoch_steps}; data: epoch {course.epoch} continues after {course.consumed} of "
            f"{course.dataset_len} samples ({course.batches_left(course.consumed)} batches of this epoch left); "
            f"lr schedule placed by samples at {schedule_step} of {total_steps} steps, {total_steps - schedule_step} "
            f"left; this run stops at step {stop_step}")
