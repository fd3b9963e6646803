"""What a training step changes besides parameters and optimizer state, saved before the step and put back when
the step is skipped.

A forward writes BatchNorm running statistics and `num_batches_tracked`, margin-loss statistics (AdaFace's
`batch_mean` / `batch_std`) and module state kept outside tensors (Partial FC's negative-sampling counter, exposed
through `get_extra_state`). When the non-finite guard skips a step, the optimizer step is skipped but these were
already written — with NaN, if the batch held NaN. `StepState` copies every buffer and every module's extra state
of the given modules into storage allocated once, and copies them back on `restore()`: a skipped step then leaves
no trace. Parameters are not copied: a skipped step never runs the optimizer.

Every rank must call `restore()` alike (the skip decision is agreed by all ranks before it is taken), so ranks stay
identical where they were (DDP broadcasts rank 0's buffers; the AdaFace EMA comes from all-gathered norms).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class StepState:
    """Buffers and module extra state of `modules`: `capture()` before a step, `restore()` when it is skipped.

    Buffers are looked up by (module, name) on every call, so a module that reassigns a buffer is still covered;
    values are copied in place, so references held elsewhere (DDP's buffer list) stay valid.
    """

    def __init__(self, *modules: nn.Module) -> None:
        self._buffer_slots: list[tuple[nn.Module, str]] = []
        seen: set[int] = set()
        self._extra_modules: list[nn.Module] = []
        for root in modules:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                self._buffer_slots += [(module, name) for name, buf in module._buffers.items() if buf is not None]
                if type(module).get_extra_state is not nn.Module.get_extra_state:
                    self._extra_modules.append(module)
        # storage allocated once: a capture per step is one multi-tensor copy, not an allocation per buffer
        self._saved = [torch.empty_like(t) for t in self._live()]
        self._saved_extra: list[Any] = []
        self._captured = False

    def _live(self) -> list[torch.Tensor]:
        return [getattr(module, name) for module, name in self._buffer_slots]

    @property
    def num_buffers(self) -> int:
        return len(self._buffer_slots)

    @torch.no_grad()
    def capture(self) -> None:
        """Remember the current buffers and extra state (call before the step's first forward)."""
        live = self._live()
        if live:
            torch._foreach_copy_(self._saved, live)
        self._saved_extra = [copy.deepcopy(m.get_extra_state()) for m in self._extra_modules]
        self._captured = True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back what `capture()` saw, bitwise."""
        if not self._captured:
            raise RuntimeError("StepState.restore() before capture(): nothing to restore")
        live = self._live()
        if live:
            torch._foreach_copy_(live, self._saved)
        for module, state in zip(self._extra_modules, self._saved_extra):
            module.set_extra_state(copy.deepcopy(state))
