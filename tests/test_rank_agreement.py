"""Rank agreement: every branch that one rank can take and another cannot, around a collective.

Audit (stage 2 = train.py, stage 1 = train_generator.py). "Collective" below means anything that must be issued by
every rank in the same order: Partial FC (all-gathers, all-reduces in forward and backward), DDP (gradient
all-reduce, buffer broadcast), barriers, agree_all.

Dangerous, fixed, and exercised here with 2 real gloo processes whose inputs differ:
1. CFSM attack precision retries (cfsm/attack.py `_attack_grad`): under fp16, retry at a smaller loss scale or
   fall back to fp32 was decided from this rank's gradient, and each attempt runs Partial FC's collectives -> a
   hang, or collectives paired with the wrong partner. Now every attempt's flags (non-finite, underflow) are
   combined over ranks (`adversarial_mix(agree=...)`, `utils.distributed.agree_any`): all ranks take the path of
   the worst rank. Test: one rank's gradient overflows, the other's does not.
2. Non-finite step (train.py): the skip is agreed (`agree_all` over loss and both gradient norms), but its
   forward had already written NaN into BatchNorm running stats, AdaFace's EMA and advanced Partial FC's sampling
   counter, on the rank with the NaN batch only (and DDP then broadcasts rank 0's buffers to all). Now a
   `utils.run.step_state.StepState` snapshot (buffers + module extra state) is taken before the step and restored on
   every rank when the agreed flag says skip. Test: a NaN batch on one rank of two.
3. Data errors and end of epoch (train.py / train_generator.py loops): a rank whose loader raises (bad record) or runs
   out of batches while the other still has one left the other rank blocked in its next collective until
   `dist_timeout_s`. Now `utils.distributed.agree_batches` wraps the loader: one all-reduce per batch of
   (error, exhausted); every rank raises (naming the failing rank) or stops together. Test: one rank's loader
   raises, one rank's loader is shorter.
4. Verification (train.py `run_verification`): only rank 0 verifies; an exception there left the other ranks in
   the barrier until `dist_timeout_s`. Now the outcome is agreed with `agree_all` in place of the barrier and
   every rank raises. Exercised through `utils.distributed.agree_call` with 2 gloo ranks.

Safe as they are (why):
5. Non-finite guard counter / stop (utils.run.scaffold.Run.check_finite and final_save): fed the agreed flag,
   so every rank counts and raises at the same step; its "last finite checkpoint" lookup reads marker files only
   (no collective), so ranks with different disks may name different folders but cannot hang.
6. GradScaler: scale and growth tracker stay equal on all ranks: `scaler.step` runs only when all ranks agreed the
   gradients are finite (so no rank's unscale_ found inf), and the skip path sets the same explicit scale.
7. CFSM mix split, k loop, gain forward: n_synth depends on batch_size and rs_ratio only (equal on all ranks, the
   sampler drops the last partial batch); k is a config value; the gain forward runs whenever k >= 1. Partial FC
   negative sampling: one all-gather per step on every rank; the draw itself is local.
8. Checkpointing (utils.run.run_state.save_run_checkpoint, by step count, equal on all ranks): each rank's write
   outcome is all-gathered before anyone raises, so a full disk on one rank fails every rank; only marker writers
   mark / prune, after that gather. The final save first checks finiteness on all ranks together
   (run_state.require_finite). Tested with 2 gloo ranks in tests/test_resume_policy.py (two_nodes).
9. Early stop / max_steps / end of run: the stop step comes from the config and `batches_per_epoch`, which
   FaceSampler computes identically on every rank (floor(len / world) // batch_size, drop_last); Run.step_batches
   returns at the stop step before reading another batch, on every rank.
10. Logging, TensorBoard, image grids, attack statistics' window, summary: rank 0 only, no collectives inside.
11. Stage 1 (train_generator.py): with fp16 the GradScaler decides from gradients that DDP already all-reduced
   (identical on all ranks); without fp16 each skip is agreed with `agree_all`. Its networks have no running
   statistics that a forward writes (AdaIN's running_* buffers exist for loading only; the identity network is
   frozen in eval mode), so a skip leaves nothing to restore. Its batches go through Run.step_batches (item 3).
12. The folder rules (utils.run.scaffold.Run): "already complete" (rank 0's summary decides, gathered), "another run in this
   folder" and "missing inputs" (every rank's view gathered, any rank's finding stops all) are decided from
   all-gathered facts, so ranks whose disks differ take the same branch. Tested with 2 gloo ranks whose folders
   differ in tests/test_run.py (test_two_ranks_whose_folders_differ_agree_on_the_folder_rules). Damaged steps
   found while resuming: the resume step is agreed first; only then each node's marker writer moves newer steps
   aside (file operations, no collective).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from backbones import ChannelOrder, get_model
from cfsm import Generator
from cfsm.attack import adversarial_mix, frozen_stats
from losses import ArcFace
from partial_fc import PartialFC
from tests.helpers import spawn_ranks

WORLD = 2
NUM_CLASSES = 8
PG_TIMEOUT_S = 20  # a mismatched collective sequence fails (or times out) within this, not after 10 minutes


def _spawn(fn, tmp_path, *args) -> list[dict]:
    """fn(rank, *args) on 2 gloo processes; each rank's result dict (or its error)."""
    return spawn_ranks(fn, tmp_path, *args, world=WORLD, timeout_s=PG_TIMEOUT_S)


# ---- 1. CFSM attack: precision retries decided together -------------------------------------------------------

class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times `factor`: stands for a rank whose activation gradients are very large."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _attack_worker(rank: int, use_agree: bool) -> dict:
    torch.manual_seed(0)  # same weights on every rank
    gen = Generator(dim=8, n_residual=1, n_downsample=2, latent_dim=16, style_dim=6).eval().requires_grad_(False)
    backbone = get_model("r_tiny", num_features=16).train()
    pfc = PartialFC(ArcFace(s=16.0, margin=0.3), 16, NUM_CLASSES, rank=rank, world_size=WORLD)
    images = torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(rank)) * 2 - 1  # rank's own batch
    labels = torch.arange(4) + 4 * rank
    # rank 1's fp16 gradient overflows at every loss scale, rank 0's does not: the ranks would choose differently
    factor = 1e6 if rank == 1 else 1.0
    calls = []

    def loss_fn(x, y):
        calls.append(x.shape[0])
        with frozen_stats(backbone):  # as train.py: the attack's own autocast sets each attempt's precision
            emb = _ScaleGrad.apply(backbone(x), factor)
        return pfc(emb.float(), y, update_stats=False)

    kwargs = {}
    if use_agree:  # False: how train.py called the attack before ranks agreed (the bug's reproduction)
        from utils.distributed import agree_any
        kwargs = dict(agree=agree_any)
    mix = adversarial_mix(images, labels, gen, loss_fn, rs_ratio=0.5, epsilon=0.3, alpha=0.3, k=2,
                          rng=torch.Generator().manual_seed(10 + rank), autocast_dtype=torch.float16,
                          grad_scale=2.0 ** 16, **kwargs)
    # after the attack, the step's real Partial FC forward: must pair with the other rank's, not with a retry
    loss = pfc(backbone(mix.images), labels)
    return {"grad_scale_used": mix.grad_scale_used, "loss_calls": len(calls), "loss": loss.detach(),
            "moved": (mix.style - mix.style0).abs().max().item(), "gain": mix.attack_gain}


@pytest.mark.slow
def test_attack_precision_retries_are_agreed_by_all_ranks(tmp_path):
    """One rank's fp16 attack gradient overflows, the other's does not: both take the same attempts (fp32
    fallback), issue the same number of Partial FC calls, and the step's loss afterwards is the same number."""
    res = _spawn(_attack_worker, tmp_path, True)
    assert res[0]["grad_scale_used"] == res[1]["grad_scale_used"] == 0.0  # both fell back to fp32 together
    # per attack step: scale 2^16, scale 2^8, fp32; plus the one no-grad gain forward
    assert res[0]["loss_calls"] == res[1]["loss_calls"] == 2 * 3 + 1
    torch.testing.assert_close(res[0]["loss"], res[1]["loss"])  # Partial FC's loss is the global mean
    torch.testing.assert_close(res[0]["gain"], res[1]["gain"])
    assert res[0]["moved"] > 0.29 and res[1]["moved"] > 0.29


# ---- 2. a skipped non-finite step leaves no trace ----------------------------------------------------------------

def _model_state(backbone: torch.nn.Module, pfc: PartialFC, optimizer: torch.optim.Optimizer) -> dict:
    state = {f"backbone.{k}": v.detach().clone() for k, v in backbone.state_dict().items()}
    state.update({f"pfc.{k}": (v.detach().clone() if isinstance(v, torch.Tensor) else dict(v))
                  for k, v in pfc.state_dict().items()})
    for i, s in optimizer.state_dict()["state"].items():
        state[f"optimizer.{i}"] = s["momentum_buffer"].clone()
    return state


def _skip_worker(rank: int, nan_rank: int) -> dict:
    import train
    from losses import AdaFace
    from configs.loader import base_config
    from utils.distributed import DistEnv
    from utils.optim import PolyScheduler
    from utils.precision import mixed_precision

    cfg = base_config()
    cfg.update(rs_ratio=0.5, k=1, epsilon=0.3, alpha=0.3, fp16=False, clip_grad_norm=5.0, channels_last=False)
    env = DistEnv(rank=rank, local_rank=rank, world_size=WORLD, device=torch.device("cpu"), backend="gloo")
    torch.manual_seed(0)  # same weights on every rank
    gen = Generator(dim=8, n_residual=1, n_downsample=2, latent_dim=16, style_dim=6).eval().requires_grad_(False)
    backbone = get_model("r_tiny", num_features=16).train()
    pfc = PartialFC(AdaFace(m=0.4, h=0.333, s=16.0, t_alpha=0.5), 16, 24, sample_rate=0.5, rank=rank,
                    world_size=WORLD, ddp_grad_compensation=True)
    model = torch.nn.parallel.DistributedDataParallel(backbone)
    optimizer = torch.optim.SGD(list(backbone.parameters()) + list(pfc.parameters()), lr=0.01, momentum=0.9)
    scheduler = PolyScheduler(optimizer, 10, 0, 2.0)
    _, scaler, autocast = mixed_precision(False, False, "cpu")
    nets = train.Stage2(backbone, pfc, gen, optimizer, scheduler, scaler, autocast,
                        ChannelOrder("rgb", told=False, reason="fresh weights"))
    train_step = train.make_train_step(cfg, env, nets, model, torch.Generator().manual_seed(rank))

    def batch(index: int, nan: bool = False) -> list:
        g = torch.Generator().manual_seed(100 * rank + index)  # each rank its own images
        images = torch.rand(4, 3, 112, 112, generator=g) * 2 - 1
        if nan:
            images[1] = float("nan")
        return [(images, torch.randint(0, 24, (4,), generator=g))]

    finite = [train_step(batch(0)).finite]
    before = _model_state(backbone, pfc, optimizer)
    finite.append(train_step(batch(1, nan=rank == nan_rank)).finite)
    after_skip = _model_state(backbone, pfc, optimizer)
    result = train_step(batch(2))
    finite.append(result.finite)
    return {"finite": finite, "before": before, "after_skip": after_skip, "loss3": result.loss,
            "after3": _model_state(backbone, pfc, optimizer)}


@pytest.mark.slow
def test_nan_batch_on_one_rank_leaves_no_trace_on_any_rank(tmp_path):
    """Rank 1's second batch holds NaN. Both ranks skip that step together, and afterwards every buffer (BatchNorm
    running stats and num_batches_tracked, AdaFace batch_mean / batch_std), Partial FC's sampling counter, every
    weight and momentum buffer is bitwise what it was before the step, on both ranks; the next step is finite."""
    res = _spawn(_skip_worker, tmp_path, 1)
    for rank, r in enumerate(res):
        assert r["finite"] == [True, False, True], (rank, r["finite"])
        assert r["before"].keys() == r["after_skip"].keys()
        for key, value in r["before"].items():
            after = r["after_skip"][key]
            same = value == after if isinstance(value, dict) else torch.equal(value, after)
            assert same, f"rank {rank}: the skipped step changed {key}"
        assert torch.isfinite(r["loss3"])
        assert all(torch.isfinite(v).all() for v in r["after3"].values() if isinstance(v, torch.Tensor))
    assert any("running_mean" in k for k in res[0]["before"]) and "pfc.margin_softmax.batch_mean" in res[0]["before"]


# ---- 3./4. data errors, uneven shards, verification: every rank stops together -----------------------------------

class _BadRecord(ValueError):
    """Stands for dataset.DataError: a record this rank cannot decode."""


def _batches(count: int, fail_at: int | None = None):
    for index in range(count):
        if index == fail_at:
            raise _BadRecord("train.rec: key 7 is not a decodable image")
        yield torch.full((2,), float(index))


def _outcome(fn) -> dict:
    """What happened on this rank: the steps it took, or the error it raised (type and message)."""
    try:
        return {"steps": fn(), "error": None}
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        return {"steps": None, "error": type(exc).__name__, "message": str(exc)}


def _stop_worker(rank: int, out_dir: str) -> dict:
    from configs.loader import base_config, resume_policy
    from utils.distributed import DistEnv, agree_call
    from utils.run.scaffold import Run, plan_steps

    env = DistEnv(rank=rank, local_rank=rank, world_size=WORLD, device=torch.device("cpu"), backend="gloo")
    cfg = base_config()
    cfg.update(output=os.path.join(out_dir, "run"), config_name="rank_agreement", max_steps=0)

    def train_over(loader_of_rank) -> int:
        """The trainers' loop: Run.step_batches, then a collective per step (as Partial FC / DDP issue)."""
        with Run(cfg, env, resume_policy("recognition"), log_name="rank_agreement", tensorboard_prefix="t") as run:
            run.plan = plan_steps(3, 1, 1, 0, 0, "test")
            steps = 0
            for _, batch in run.step_batches(None, 0, open_epoch=lambda epoch, first: loader_of_rank):
                total = batch[0].sum()
                dist.all_reduce(total)
                steps += 1
            return steps

    out = {
        # rank 1 cannot decode its second record: rank 1 raises its error, rank 0 stops at once too
        "data_error": _outcome(lambda: train_over(_batches(3, fail_at=1 if rank == 1 else None))),
        # rank 0's shard has one batch more than rank 1's: both raise instead of rank 0 waiting in a collective
        "uneven": _outcome(lambda: train_over(_batches(3 if rank == 0 else 2))),
        # equal shards: both run the 3 steps
        "even": _outcome(lambda: train_over(_batches(3))),
        # rank 0's verification fails (a bad .bin): rank 1 stops with it rather than at a barrier's timeout
        "verification": _outcome(lambda: agree_call(
            env, (lambda: (_ for _ in ()).throw(_BadRecord("lfw.bin: 3 pairs, 10 folds need 20"))) if rank == 0
            else (lambda: {}), "verification")),
    }
    t = torch.ones(1)
    dist.all_reduce(t)  # the process group is still usable: both ranks issued the same collectives
    out["after"] = float(t)
    return out


@pytest.mark.slow
def test_data_error_uneven_shards_and_verification_stop_every_rank(tmp_path):
    res = _spawn(_stop_worker, tmp_path, str(tmp_path))
    r0, r1 = res
    assert r1["data_error"]["error"] == "_BadRecord" and "key 7" in r1["data_error"]["message"]
    assert r0["data_error"]["error"] == "PeerRankError" and "rank 1" in r0["data_error"]["message"]
    for r in res:
        assert r["uneven"]["error"] == "RuntimeError" and "uneven shards" in r["uneven"]["message"], r["uneven"]
        assert r["even"] == {"steps": 3, "error": None}
        assert r["after"] == WORLD
    assert r0["verification"]["error"] == "_BadRecord"
    assert r1["verification"]["error"] == "PeerRankError" and "rank 0 failed during verification" in \
        r1["verification"]["message"]


def test_step_state_restores_buffers_and_extra_state_bitwise():
    """Single process: a NaN forward through BatchNorm, AdaFace and Partial FC sampling, then restore()."""
    from losses import AdaFace
    from utils.run.step_state import StepState

    torch.manual_seed(0)
    backbone = get_model("r_tiny", num_features=16).train()
    pfc = PartialFC(AdaFace(m=0.4, h=0.333, s=16.0, t_alpha=0.5), 16, 24, sample_rate=0.5, rank=0, world_size=1)
    state = StepState(backbone, pfc)
    with pytest.raises(RuntimeError, match="before capture"):
        state.restore()
    labels = torch.arange(4)
    pfc(backbone(torch.rand(4, 3, 112, 112)), labels)  # a normal step first: the snapshot is not the initial state
    before = {k: v.clone() for k, v in {**backbone.state_dict(), **pfc.margin_softmax.state_dict()}.items()}
    counter = pfc.sample_step
    state.capture()
    images = torch.rand(4, 3, 112, 112)
    images[0] = float("nan")
    pfc(backbone(images), labels)  # draws negatives and writes NaN into BN stats and the AdaFace EMA
    assert pfc.sample_step == counter + 1 and torch.isnan(pfc.margin_softmax.batch_mean).all()
    pfc.margin_softmax.batch_std = torch.full((1,), float("nan"))  # a module that reassigns a buffer is covered
    state.restore()
    after = {**backbone.state_dict(), **pfc.margin_softmax.state_dict()}
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert pfc.sample_step == counter and state.num_buffers == len(list(backbone.buffers())) + 3
