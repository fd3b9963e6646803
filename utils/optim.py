"""Optimizer and the polynomial learning-rate schedule with linear warm-up (as arcface_torch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: its constructor and the config keys it reads (config key -> constructor keyword)."""

    build: Callable[..., torch.optim.Optimizer]
    config_keys: dict[str, str]


# The registry behind config key `optimizer`: config validation and train.py derive the choices and keys from it, so
# a new optimizer is one entry here plus its tests. A key an optimizer does not read (e.g. `momentum` for AdamW) is
# not passed to it.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(torch.optim.SGD, {"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay"}),
    "adamw": OptimizerSpec(torch.optim.AdamW, {"lr": "lr", "weight_decay": "weight_decay"}),
}
# Stage 1's optimizer (train_generator.py): Adam for G and D, reading gen_lr / gen_betas
GENERATOR_OPTIMIZER = OptimizerSpec(torch.optim.Adam, {"gen_lr": "lr", "gen_betas": "betas"})


def build_optimizer(name: str | OptimizerSpec, param_groups: Iterable, config: Mapping[str, Any]) \
        -> torch.optim.Optimizer:
    """Optimizer `name` (a registered name, or a spec such as stage 1's) over `param_groups` (groups or parameters),
    reading its declared config keys from `config` (any key -> value map; a list value is passed as a tuple)."""
    if isinstance(name, OptimizerSpec):
        spec = name
    elif name in OPTIMIZERS:
        spec = OPTIMIZERS[name]
    else:
        raise ValueError(f"config key 'optimizer' = {name!r}: choices are {', '.join(map(repr, OPTIMIZERS))}")
    kwargs = {kw: tuple(config[key]) if isinstance(config[key], list) else config[key]
              for key, kw in spec.config_keys.items()}
    return spec.build(list(param_groups), **kwargs)


def decay_param_groups(module: torch.nn.Module, exclude: bool) -> list[dict]:
    """`module`'s parameters as optimizer groups. exclude=False: one group, everything decayed (arcface_torch).
    exclude=True: a second group with weight_decay 0 holding the biases and norm scales (every parameter of at most
    one dimension) plus the names `module.no_weight_decay_names()` lists, if it has that method (the ViTs:
    pos_embed, mask_token). Frozen parameters stay where they are; an empty group is left out."""
    params = list(module.named_parameters())
    if not exclude:
        return [{"params": [p for _, p in params]}]
    listed = getattr(module, "no_weight_decay_names", lambda: set())()
    skip = [p for n, p in params if p.ndim <= 1 or n in listed]
    keep = [p for n, p in params if not (p.ndim <= 1 or n in listed)]
    return [g for g in ({"params": keep}, {"params": skip, "weight_decay": 0.0}) if g["params"]]


class PolyScheduler(torch.optim.lr_scheduler.LRScheduler):
    """lr = base * step / warmup during warm-up, then base * (1 - progress) ** power; one step per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, power: float = 2.0,
                 last_epoch: int = -1):
        if total_steps <= 0:
            raise ValueError(f"PolyScheduler: total_steps must be > 0, got {total_steps}")
        self.total_steps = total_steps
        self.warmup_steps = min(warmup_steps, total_steps)
        self.power = power
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return (1.0 - progress) ** self.power

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]
