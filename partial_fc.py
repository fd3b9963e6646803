"""Partial FC (arcface_torch v2 style): class centres sharded across ranks + distributed softmax cross-entropy.

Conventions (collectives run on every rank in the same order; all ranks must pass the same local batch size):
- Classes are split contiguously: rank r owns `num_local = C // W + (r < C % W)` classes starting at
  `class_start = (C // W) * r + min(r, C % W)`.
- The loss returned on every rank is the same number: the mean over the **global** batch (all ranks' rows).
- Gradients: the class-centre shard gets exactly the rows of the 1-rank gradient. The all-gather's backward
  sums the embedding gradient over ranks and returns this rank's rows, so by default the gradient of the local
  embeddings equals the corresponding rows of the 1-rank gradient on the same global batch (the true gradient of the
  global loss). DDP then **averages** backbone gradients over ranks, which gives 1/W of the 1-rank backbone
  gradient; pass `ddp_grad_compensation=True` to multiply the embedding gradient by W (what arcface_torch does) so
  that a DDP step equals a 1-rank step on the global batch.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from utils.distributed import shard_range  # the class split (the checkpoint re-sharder reads it back)

__all__ = ["PartialFC", "ClassSample", "DistCrossEntropy", "AllGather"]


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


class AllGather(torch.autograd.Function):
    """Concatenate equal-sized tensors from all ranks along dim 0.

    Backward: sum the incoming gradient over ranks (all-reduce; gloo has no reduce-scatter) and keep this rank's
    rows, times `grad_scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, world_size: int, rank: int, grad_scale: float) -> torch.Tensor:
        ctx.world_size, ctx.rank, ctx.grad_scale, ctx.n = world_size, rank, grad_scale, x.shape[0]
        if world_size == 1:
            return x.clone()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if ctx.world_size > 1:
            grad = grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        out = grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None, None


def _all_gather_nograd(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class DistCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over classes sharded across ranks.

    Row max (MAX) and exp-sum (SUM) are all-reduced; the target probability is summed over ranks (only the owner
    has it). loss = −mean over **all** rows of log(max(p, 1e-30)); a row whose class is on no rank (label −1
    everywhere) therefore adds −log(1e-30)/N, as in the reference. Backward: (P − onehot)/N · g (clamp ignored).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, world_size: int) -> torch.Tensor:
        n = logits.shape[0]
        with torch.no_grad():
            m = logits.max(dim=1, keepdim=True)[0]
            if world_size > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX)
            e = torch.exp(logits - m)
            s = e.sum(dim=1, keepdim=True)
            if world_size > 1:
                dist.all_reduce(s, op=dist.ReduceOp.SUM)
            p = e / s
            rows = torch.nonzero(labels != -1, as_tuple=True)[0]
            cols = labels[rows]
            target = torch.zeros(n, 1, dtype=p.dtype, device=p.device)
            target[rows, 0] = p[rows, cols]
            if world_size > 1:
                dist.all_reduce(target, op=dist.ReduceOp.SUM)
            loss = target.clamp_min(1e-30).log().mean() * -1
        ctx.save_for_backward(p, rows, cols)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, rows, cols = ctx.saved_tensors
        g = p.clone()
        g[rows, cols] -= 1.0
        return g * (grad / p.shape[0]), None, None


@dataclass(frozen=True)
class ClassSample:
    """The class centres one step uses (sample_rate < 1), shared by every forward of that step.

    index: sorted local class ids kept on this rank [num_sample]; mapping: local class id → position in `index`
    (−1 when not kept) [num_local]; step: the sampling counter it was drawn with.
    """

    index: torch.Tensor
    mapping: torch.Tensor
    step: int


class PartialFC(nn.Module):
    """Sharded class centres + margin head + distributed softmax CE.

    Args:
        margin_loss: a `losses.MarginLoss` (kept as submodule `margin_softmax`, so AdaFace buffers save as
            `margin_softmax.*` like the CFSM files).
        embedding_size, num_classes: sizes.
        sample_rate: share of this rank's centres used per step (positives always kept), 1.0 = all.
        rank, world_size: default from torch.distributed when initialised, else 0 / 1.
        ddp_grad_compensation: multiply the embedding gradient by world_size (see module docstring).
        seed: base seed of the negative sampling (combined with rank and the step counter).
    """

    def __init__(self, margin_loss: nn.Module, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 rank: int | None = None, world_size: int | None = None, ddp_grad_compensation: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        if rank is None or world_size is None:
            on = _dist_on()
            rank = (dist.get_rank() if on else 0) if rank is None else rank
            world_size = (dist.get_world_size() if on else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"PartialFC: rank {rank} not in [0, world_size={world_size})")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"PartialFC: sample_rate must be in (0, 1], got {sample_rate}")
        if num_classes < world_size:
            raise ValueError(f"PartialFC: num_classes={num_classes} < world_size={world_size}")
        self.margin_softmax = margin_loss
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.rank, self.world_size = rank, world_size
        self.sample_rate = sample_rate
        self.class_start, self.num_local = shard_range(num_classes, rank, world_size)
        self.num_sample = max(1, int(sample_rate * self.num_local))
        self.ddp_grad_compensation = ddp_grad_compensation
        self.seed = seed
        self.sample_step = 0  # advances once per sample_negatives call; saved for reproducible resume
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))

    # ---- negative sampling -------------------------------------------------------------------------------------
    def _local_labels(self, global_labels: torch.Tensor) -> torch.Tensor:
        """Global class ids → local ids, −1 for classes of other ranks."""
        local = global_labels - self.class_start
        return torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))

    def sample_negatives(self, labels: torch.Tensor) -> ClassSample | None:
        """Choose this step's class centres (collective: all-gathers the labels). None when sample_rate == 1.

        All positive classes of the global batch in this shard are kept, plus random negatives up to num_sample.
        The draw uses a CPU torch.Generator seeded from (seed, rank, step counter), so reruns and resumes repeat it.
        """
        if self.sample_rate >= 1.0:
            return None
        labels = labels.reshape(-1).long()
        glabels = _all_gather_nograd(labels, self.world_size)
        local = self._local_labels(glabels)
        positive = torch.unique(local[local >= 0]).cpu()
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.rank}:{self.sample_step}".encode()))
        step = self.sample_step
        self.sample_step += 1
        if positive.numel() >= self.num_sample:
            index = positive
        else:
            score = torch.rand(self.num_local, generator=gen)
            score[positive] = 2.0  # positives rank above every negative
            index = torch.topk(score, self.num_sample).indices.sort().values
        mapping = torch.full((self.num_local,), -1, dtype=torch.long)
        mapping[index] = torch.arange(index.numel())
        dev = self.weight.device
        return ClassSample(index=index.to(dev), mapping=mapping.to(dev), step=step)

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, class_sample: ClassSample | None = None,
                update_stats: bool = True) -> torch.Tensor:
        """Scalar loss (mean over the global batch; collective). `class_sample` from `sample_negatives` reuses a
        step's negatives (drawn here when None and sample_rate < 1). `update_stats=False` leaves the margin head's
        statistics (AdaFace EMA) alone."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"PartialFC: embeddings must be [N, {self.embedding_size}], got {list(embeddings.shape)}")
        labels = labels.reshape(-1).long()  # a new tensor: the caller's labels are not squeezed in place
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"PartialFC: {labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
        if self.sample_rate < 1.0 and class_sample is None:
            class_sample = self.sample_negatives(labels)
        scale = float(self.world_size) if self.ddp_grad_compensation else 1.0
        dev_type = embeddings.device.type
        with torch.autocast(device_type=dev_type, enabled=False):  # logits and CE in float32 (AMP-safe)
            emb = AllGather.apply(embeddings.float(), self.world_size, self.rank, scale)
            glabels = _all_gather_nograd(labels.to(embeddings.device), self.world_size)
            local = self._local_labels(glabels)
            weight = self.weight.float()
            if class_sample is not None:
                weight = weight[class_sample.index]
                mapped = class_sample.mapping[local.clamp_min(0)]
                missing = (local >= 0) & (mapped < 0)
                if bool(missing.any()):
                    bad = glabels[missing][:5].tolist()
                    raise ValueError(f"PartialFC: labels {bad} are not in class_sample (step {class_sample.step}); "
                                     "sample_negatives must see every label used with that sample")
                local = torch.where(local >= 0, mapped, local)
            norms = emb.norm(p=2, dim=1, keepdim=True)
            logits = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
            logits = self.margin_softmax(logits, local, norms=norms, update_stats=update_stats)
            return DistCrossEntropy.apply(logits, local, self.world_size)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "num_classes": self.num_classes,
                "class_start": self.class_start, "num_local": self.num_local, "sample_step": self.sample_step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = self.get_extra_state()
        for k in ("world_size", "num_classes", "rank"):
            if state.get(k) != mine[k]:
                raise ValueError(
                    f"PartialFC checkpoint shard mismatch: saved {k}={state.get(k)} but this run has {k}={mine[k]} "
                    f"(saved shard: rank {state.get('rank')} of {state.get('world_size')}, "
                    f"{state.get('num_classes')} classes). Resume through train.py, which re-shards a checkpoint "
                    "of another world size, or re-shard the files with `python -m tools.reshard`.")
        self.sample_step = int(state.get("sample_step", 0))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w = state_dict.get(prefix + "weight")
        if w is not None and tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(f"PartialFC checkpoint key {prefix}weight has shape {list(w.shape)} but this rank's shard "
                             f"is {list(self.weight.shape)} (rank {self.rank} of {self.world_size}, "
                             f"{self.num_classes} classes)")
        if prefix + "_extra_state" not in state_dict:
            # reference files ({weight} or AdaFace buffers + weight) carry no shard metadata: accept them, the shape
            # check above is then the only guard
            state_dict = dict(state_dict)
            state_dict[prefix + "_extra_state"] = self.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
