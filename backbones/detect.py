"""Which registered network a bare state dict is, from its keys and shapes alone.

Every network of the registry (`backbones.BACKBONES`) is built on the meta device (no memory, no weights) at the
file's embedding size, and its key -> shape table is compared with the file's through the strict-load check
(`utils.checkpoint.state_dict_mismatch`). So a network added to the registry (ViT, ...) is detected without an entry
here. The IResNet depths differ in their blocks per stage (`layer<k>.<i>` keys), r_tiny / mbf / mbf_tiny in their
channel widths; the embedding size is the length of the last BatchNorm.

`SAME_EVAL_NETWORK` is the one table to extend: registry names that build the same layout *and* compute the same
function at evaluation (they differ only in training-time options such as drop path or patch masking). A file that
matches several of them is the first-named one; a file that matches two networks not related here is ambiguous
and the caller must be told (`--network`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import torch

# network -> the network it equals at evaluation (same keys, shapes and eval-mode forward). Example for the ViT
# family: {"vit_t_dp005_mask0": "vit_t", "vit_s_dp005_mask_0": "vit_s", "vit_b_dp005_mask_005": "vit_b"}.
SAME_EVAL_NETWORK: dict[str, str] = {  # arcface_torch's ViT variants: drop path / masking act in training only
    "vit_t_dp005_mask0": "vit_t",
    "vit_s_dp005_mask_0": "vit_s",
    "vit_b_dp005_mask_005": "vit_b",
}


def embedding_size_of(state: Mapping[str, torch.Tensor]) -> int | None:
    """Embedding size of a backbone state dict: the length of its last BatchNorm ``running_var`` (the feature BN of
    IResNet / MobileFaceNet / arcface_torch's ViT head), or None when there is none. AdaFace's IR networks list
    their ``output_layer`` before the ``body``, so there the feature BN is ``output_layer.4`` by name."""
    adaface = state.get("output_layer.4.running_var")
    if adaface is not None and adaface.ndim == 1:
        return int(adaface.shape[0])
    last = None
    for key, value in state.items():
        if key.endswith("running_var") and value.ndim == 1:
            last = int(value.shape[0])
    return last


@dataclass(frozen=True)
class Detected:
    """What a state dict holds: the registered networks whose layout it matches (after SAME_EVAL_NETWORK) and its
    embedding size."""

    networks: tuple[str, ...]
    embedding_size: int | None
    num_keys: int

    @property
    def network(self) -> str | None:
        """The network, when exactly one matches."""
        return self.networks[0] if len(self.networks) == 1 else None

    def describe(self) -> str:
        """``"r50 with 512-d embeddings"`` / ``"one of r50, x (512-d)"`` / ``"no registered network ..."``."""
        size = f"{self.embedding_size}-d" if self.embedding_size else "unknown-size"
        if len(self.networks) == 1:
            return f"{self.networks[0]} with {size} embeddings"
        if self.networks:
            return f"a layout shared by {', '.join(self.networks)} ({size} embeddings)"
        return f"no registered network's layout ({self.num_keys} tensors, {size} embeddings)"


@functools.lru_cache(maxsize=64)
def layout(name: str, embedding_size: int) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape table of registered network ``name`` at ``embedding_size`` (None when it cannot be built so).

    Built on the meta device (no memory, no init); a constructor that cannot run there (one that reads a tensor's
    value, e.g. ``torch.linspace(...).item()`` for drop-path rates) is built on the CPU instead."""
    from backbones import get_model

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = get_model(name, num_features=embedding_size)
        except (ValueError, TypeError, NotImplementedError):
            return None  # the network does not take this embedding size
        except RuntimeError:
            continue  # meta tensors have no values: try the CPU
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return None


def detect_network(state: Mapping[str, torch.Tensor]) -> Detected:
    """The registered networks whose state-dict layout equals ``state``'s (keys and shapes)."""
    from backbones import BACKBONE_NAMES
    from utils.checkpoint import state_dict_mismatch

    size = embedding_size_of(state)
    matches: list[str] = []
    if size is not None:
        for name in BACKBONE_NAMES:
            table = layout(name, size)
            if table is not None and state_dict_mismatch(table, state) is None:
                matches.append(name)
    kept = tuple(m for m in matches if SAME_EVAL_NETWORK.get(m) not in matches)
    return Detected(kept, size, len(state))
