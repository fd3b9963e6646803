"""Loading released / stage-1 CFSM generators (`torch.save` dicts whose 'G_state_dict' is the generator)."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from .networks import Generator

__all__ = ["load_generator", "generator_from_state_dict", "infer_generator_config"]

_HOW_TO_GET = ("Train one with stage 1 (`python -m cfsm.train configs/cfsm_<name>`), or download a released "
               "generator (e.g. WiderFace70K.pth, IJB-S.pth) listed in the CFSM repository README "
               "(github.com/liufeng2915/CFSM).")


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in sd if (m := rx.fullmatch(k))}


def infer_generator_config(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, int]:
    """Generator constructor arguments read from the tensor shapes of a generator state dict."""
    need = ["encoder.model.1.weight", "pca.U", "decoder.mlp.model.0.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise KeyError(f"{source}: not a CFSM generator state dict, missing {missing}; "
                       f"first keys found: {list(sd)[:8]}")
    conv0 = sd["encoder.model.1.weight"]
    u = sd["pca.U"]
    enc_convs = _indices(sd, r"encoder\.model\.(\d+)\.weight")
    return dict(
        in_channels=int(conv0.shape[1]),
        dim=int(conv0.shape[0]),
        n_downsample=len(enc_convs) - 1,
        n_residual=len(_indices(sd, r"decoder\.model\.(\d+)\.block\.1\.weight")),
        n_residual_encoder=len(_indices(sd, r"encoder\.model\.(\d+)\.block\.1\.weight")),
        latent_dim=int(u.shape[1]),
        style_dim=int(u.shape[0]),
        mlp_dim=int(sd["decoder.mlp.model.0.weight"].shape[0]),
    )


def generator_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<state dict>",
                              freeze: bool = True) -> Generator:
    """Build a Generator whose dimensions match `sd`, load it strictly, and (by default) freeze it in eval mode.

    Raises KeyError for missing/unexpected keys and ValueError for a shape mismatch, naming the key and both shapes.
    """
    cfg = infer_generator_config(sd, source)
    gen = Generator(**cfg)
    own = gen.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise KeyError(f"{source}: generator state dict does not match Generator({cfg}): "
                       f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    for k, t in own.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise ValueError(f"{source}: key {k!r} has shape {list(sd[k].shape)} in the file but "
                             f"{list(t.shape)} in Generator({cfg})")
    gen.load_state_dict(dict(sd), strict=True)
    if freeze:
        gen.requires_grad_(False)
        gen.eval()
    return gen


def load_generator(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Generator:
    """Load a generator file: a dict with 'G_state_dict' (released models, stage-1 checkpoints).

    A bare generator state dict (keys like 'encoder.model.1.weight', 'pca.U') is also accepted, since it is
    unambiguous. The result is frozen (`requires_grad_(False)`) and in eval mode; it is not wrapped in DDP.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CFSM generator file not found: {path}. {_HOW_TO_GET}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, not a torch file, or pickled objects beyond tensors/dicts
        # torch's own text suggests weights_only=False; for a file of unknown origin that would run its code
        raise ValueError(f"cannot read CFSM generator file {path} with weights_only=True (do not retry with "
                         f"weights_only=False unless you trust its source): {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict with 'G_state_dict', got {type(obj).__name__}")
    if "G_state_dict" in obj:
        sd = obj["G_state_dict"]
    elif "pca.U" in obj and "encoder.model.1.weight" in obj:
        sd = obj
    else:
        raise KeyError(f"{path}: no 'G_state_dict' in the file; keys found: {sorted(map(str, obj))[:20]}. "
                       "Expected a CFSM synthesis checkpoint (G_state_dict, D_state_dict, ...).")
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: 'G_state_dict' is a {type(sd).__name__}, not a state dict")
    return generator_from_state_dict(sd, source=path)
