"""The global and per-rank RNG states saved in every checkpoint, in a form `weights_only` loading accepts."""
from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_random_state(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


def _as_python_random_state(obj):
    # pickling round-trips random's state tuple as tuple/list mixes; random.setstate needs tuples
    version, internal, gauss = obj
    return version, tuple(internal), gauss
