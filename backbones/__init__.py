"""Face-recognition backbones and the `get_model` factory.

Released architectures (checkpoint-compatible with InsightFace / CFSM files): r18 r34 r50 r100 r200 mbf.
Toy nets for CPU training (same classes, fewer channels/blocks): r_tiny, mbf_tiny.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .iresnet import IResNet
from .mobilefacenet import MobileFaceNet

__all__ = ["get_model", "BACKBONE_NAMES", "IResNet", "MobileFaceNet"]


def _iresnet(layers, widths=(64, 128, 256, 512), stem_stride: int = 1) -> Callable[..., nn.Module]:
    def build(num_features: int, dropout: float, fp16: bool, **kw: Any) -> nn.Module:
        kw.setdefault("widths", widths)
        kw.setdefault("stem_stride", stem_stride)
        return IResNet(layers, num_features=num_features, dropout=dropout, fp16=fp16, **kw)

    return build


def _mbf(blocks=(1, 4, 6, 2), channels=128) -> Callable[..., nn.Module]:
    def build(num_features: int, dropout: float, fp16: bool, **kw: Any) -> nn.Module:
        kw.pop("use_checkpoint", None)  # MobileFaceNet is small; checkpointing is not offered
        if dropout:
            raise ValueError(f"mbf has no dropout layer; got dropout={dropout}")
        kw.setdefault("blocks", blocks)
        kw.setdefault("channels", channels)
        return MobileFaceNet(fp16=fp16, num_features=num_features, **kw)

    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "r18": _iresnet((2, 2, 2, 2)),
    "r34": _iresnet((3, 4, 6, 3)),
    "r50": _iresnet((3, 4, 14, 3)),
    "r100": _iresnet((3, 13, 30, 3)),
    "r200": _iresnet((6, 26, 60, 6)),
    "mbf": _mbf(),
    # toy nets: same code path, a fraction of the width/depth, for 2-core CPU training
    "r_tiny": _iresnet((1, 1, 1, 1), widths=(16, 32, 64, 128), stem_stride=2),
    "mbf_tiny": _mbf(blocks=(1, 1, 2, 1), channels=32),
}

BACKBONE_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_model(name: str, num_features: int = 512, dropout: float = 0.0, fp16: bool = False, **kw: Any) -> nn.Module:
    """Build backbone `name` (one of BACKBONE_NAMES). Input [B,3,112,112] in [-1,1] → embeddings [B,num_features].

    Extra keywords go to the class: IResNet accepts `use_checkpoint`, `widths`, `input_size`, `stem_stride`;
    MobileFaceNet accepts `blocks`, `channels`, `input_size`.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone name {name!r}; choices: {', '.join(BACKBONE_NAMES)}")
    return _REGISTRY[name](num_features, dropout, fp16, **kw)
