"""utils/elastic.py with dataset.FaceSampler: the data position by samples across a world-size change, the stop step
and the lr schedule's position."""
from __future__ import annotations

import pytest

from dataset import FaceSampler
from utils.elastic import DataCourse, describe_change, position_record, saved_course, schedule_after_change
from utils.run import plan_steps


def epoch_reads(n: int, batch: int, world: int, epoch: int, start_sample: int, batches: int | None = None) -> list:
    """Sample indices all ranks read, batch by batch (rank order inside a batch), from `start_sample` on."""
    samplers = [FaceSampler(n, batch, r, world, seed=3) for r in range(world)]
    per_rank = []
    for s in samplers:
        s.set_epoch(epoch, start_sample=start_sample)
        per_rank.append([i for i, _ in s])
    count = len(per_rank[0]) // batch if batches is None else batches
    return [i for b in range(count) for r in range(world) for i in per_rank[r][b * batch:(b + 1) * batch]]


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3), (3, 2), (4, 1)])
def test_no_sample_of_the_epoch_twice_or_skipped_across_a_world_size_change(old, new):
    n, batch, done = 101, 4, 3
    before = epoch_reads(n, batch, old, epoch=2, start_sample=0, batches=done)
    consumed = done * batch * old
    after = epoch_reads(n, batch, new, epoch=2, start_sample=consumed)
    seen = before + after
    assert len(seen) == len(set(seen))  # nothing twice
    dropped = (n - consumed) % (batch * new)  # drop_last of the new layout, as in any epoch
    reference = FaceSampler(n, 1, 0, 1, seed=3)
    reference.set_epoch(2)
    perm = [i for i, _ in reference]
    assert set(before) == set(perm[:consumed])  # the consumed samples are a prefix of the epoch's permutation
    for b in range(len(after) // (batch * new)):  # each new global batch: the next entries of the permutation
        lo = consumed + b * batch * new
        assert set(after[b * batch * new:(b + 1) * batch * new]) == set(perm[lo:lo + batch * new])
    assert sorted(seen) == sorted(perm[:n - dropped])  # nothing skipped but the new layout's last partial batch
    assert dropped < batch * new


def test_start_batch_and_start_sample_position_alike():
    a, b = FaceSampler(50, 3, 1, 2, seed=0), FaceSampler(50, 3, 1, 2, seed=0)
    a.set_epoch(4, start_batch=2)
    b.set_epoch(4, start_sample=2 * 3 * 2)
    assert list(a) == list(b) and len(a) == len(b) == (50 // 2 // 3 - 2) * 3
    with pytest.raises(ValueError, match="start_sample 51"):
        b.set_epoch(0, start_sample=51)


@pytest.mark.parametrize("micro", [1, 2])
def test_same_world_course_matches_the_step_count_plan(micro):
    """Without a change the course is what the plan says: positions, the stop step and the schedule's position."""
    n, batch, world, num_epoch = 100, 4, 2, 3
    bpe = n // world // batch
    plan = plan_steps(bpe, micro, num_epoch, warmup_epoch=0, max_steps=0, where="x")
    for step in range(plan.total_steps + 1):
        epoch, first = divmod(step * micro, bpe)
        course = DataCourse(step, epoch, first * batch * world, n, batch * world, micro)
        assert course.at_step(step) == (epoch, first * batch * world)
        later = min(plan.total_steps, step + 5)
        e2, b2 = divmod(later * micro, bpe)
        assert course.at_step(later) == (e2, b2 * batch * world)
        assert schedule_after_change(course, plan.total_steps, num_epoch, 0) == (step, plan.total_steps)


def test_schedule_is_placed_by_samples_after_a_change():
    # 2 ranks x 8 on 96 images: 6 steps per epoch; after 4 steps of epoch 1: 64 of 96 samples consumed
    course = DataCourse(step=10, epoch=1, consumed=64, dataset_len=96, samples_per_batch=8, micro_per_step=1)
    total = plan_steps(96 // 8, 1, num_epoch=2, warmup_epoch=0, max_steps=0, where="x").total_steps  # 24 on 1 rank
    assert course.steps_left(2) == 4  # 32 samples left = 4 batches of 8
    assert schedule_after_change(course, total, num_epoch=2, max_steps=0) == (20, 14)
    assert schedule_after_change(course, total, num_epoch=2, max_steps=12) == (20, 12)
    assert course.at_step(14) == (2, 0)
    line = describe_change(position_record(1, 64, 2, 8), course, 1, 8, 20, total, 14)
    assert "world size 2 -> 1: global batch 16 -> 8 samples" in line and "steps per epoch 6 -> 12" in line
    assert "20 of 24 steps, 4 left" in line


def test_saved_course_from_a_record_or_from_an_older_marker():
    assert saved_course({"step": 3, "data_position": position_record(0, 48, 2, 8)}, {}) == \
        {"epoch": 0, "consumed": 48, "world_size": 2, "batch_size": 8}
    meta = {"world_size": 2, "config": {"batch_size": 8, "gradient_acc": 1, "num_image": 96}}
    assert saved_course({"step": 8}, meta) == {"epoch": 1, "consumed": 32, "world_size": 2, "batch_size": 8}
    assert saved_course({"step": 8}, {"world_size": 2}) is None
