"""Face-recognition backbones and the `get_model` factory.

Released architectures (checkpoint-compatible with InsightFace / CFSM files): r18 r34 r50 r100 r200 mbf, and
arcface_torch's ViTs vit_t vit_t_dp005_mask0 vit_s vit_s_dp005_mask_0 vit_b vit_b_dp005_mask_005
vit_l_dp005_mask_005 vit_h; AdaFace's IR networks (AdaFace / CVLFace files, fed BGR) ir_18 ir_34 ir_50 ir_101
ir_152 ir_200 and ir_se_* of the same depths.
Toy nets for CPU training (same classes, fewer channels/blocks): r_tiny, mbf_tiny, vit_toy, ir_tiny.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .adaface_ir import ADAFACE_IR_CONFIGS, AdaFaceIR
from .channel_order import ChannelOrder, backbone_order, feed_in_order, identity_order
from .iresnet import IRESNET_LAYERS, IResNet
from .mobilefacenet import MobileFaceNet
from .vit import VIT_CONFIGS, VisionTransformer

__all__ = ["get_model", "BACKBONES", "BACKBONE_NAMES", "BACKBONE_CONFIG_KEYS", "BackboneSpec",
           "IResNet", "MobileFaceNet", "VisionTransformer", "AdaFaceIR", "channel_order_of",
           "ChannelOrder", "backbone_order", "identity_order", "feed_in_order"]

# Config keys a backbone may read (config key -> get_model keyword). Each registered network declares the subset it
# honours; config validation refuses a non-default value of a key the chosen network would ignore.
BACKBONE_CONFIG_KEYS: dict[str, str] = {"embedding_size": "num_features", "dropout": "dropout",
                                        "use_checkpoint": "use_checkpoint"}


@dataclass(frozen=True)
class BackboneSpec:
    """A registered network: its builder, the config keys (of BACKBONE_CONFIG_KEYS) it honours, and the channel
    order its released weights were trained on ("rgb": InsightFace / CFSM; "bgr": AdaFace family). The evaluation
    commands feed a file of that layout in that order unless the file's own metadata says otherwise."""

    build: Callable[..., nn.Module]
    config_keys: tuple[str, ...]
    channel_order: str = "rgb"
    family: str = "InsightFace"


def _iresnet(layers, widths=(64, 128, 256, 512), stem_stride: int = 1) -> BackboneSpec:
    def build(num_features: int, dropout: float, fp16: bool, **kw: Any) -> nn.Module:
        kw.setdefault("widths", widths)
        kw.setdefault("stem_stride", stem_stride)
        return IResNet(layers, num_features=num_features, dropout=dropout, fp16=fp16, **kw)

    return BackboneSpec(build, ("embedding_size", "dropout", "use_checkpoint"))


def _mbf(blocks=(1, 4, 6, 2), channels=128) -> BackboneSpec:
    def build(num_features: int, dropout: float, fp16: bool, use_checkpoint: bool = False, **kw: Any) -> nn.Module:
        if dropout:
            raise ValueError(f"mbf has no dropout layer; got dropout={dropout}")
        if use_checkpoint:
            raise ValueError("mbf does not offer activation checkpointing (it is small); got use_checkpoint=True")
        kw.setdefault("blocks", blocks)
        kw.setdefault("channels", channels)
        return MobileFaceNet(fp16=fp16, num_features=num_features, **kw)

    return BackboneSpec(build, ("embedding_size",))


def _vit(name: str) -> BackboneSpec:
    def build(num_features: int, dropout: float, fp16: bool, use_checkpoint: bool = False, **kw: Any) -> nn.Module:
        if dropout:
            raise ValueError(f"{name} has no dropout layer (arcface_torch's ViT ignores it); got dropout={dropout}")
        return VisionTransformer(num_features=num_features, fp16=fp16, use_checkpoint=use_checkpoint,
                                 **{**VIT_CONFIGS[name], **kw})

    return BackboneSpec(build, ("embedding_size", "use_checkpoint"))


def _adaface_ir(name: str, **kw_defaults: Any) -> BackboneSpec:
    def build(num_features: int, dropout: float, fp16: bool, **kw: Any) -> nn.Module:
        return AdaFaceIR(num_features=num_features, dropout=dropout, fp16=fp16,
                         **{**ADAFACE_IR_CONFIGS[name], **kw_defaults, **kw})

    return BackboneSpec(build, ("embedding_size", "dropout", "use_checkpoint"), channel_order="bgr", family="AdaFace")


# The registry behind config keys `network` / `id_network`: a new architecture is one entry plus its tests.
BACKBONES: dict[str, BackboneSpec] = {
    "r18": _iresnet(IRESNET_LAYERS[18]),
    "r34": _iresnet(IRESNET_LAYERS[34]),
    "r50": _iresnet(IRESNET_LAYERS[50]),
    "r100": _iresnet(IRESNET_LAYERS[100]),
    "r200": _iresnet(IRESNET_LAYERS[200]),
    "mbf": _mbf(),
    **{name: _vit(name) for name in VIT_CONFIGS if name != "vit_toy"},
    **{name: _adaface_ir(name) for name in ADAFACE_IR_CONFIGS},
    # toy nets: same code path, a fraction of the width/depth, for 2-core CPU training
    "r_tiny": _iresnet((1, 1, 1, 1), widths=(16, 32, 64, 128), stem_stride=2),
    "mbf_tiny": _mbf(blocks=(1, 1, 2, 1), channels=32),
    "vit_toy": _vit("vit_toy"),
    "ir_tiny": _adaface_ir("ir_18", units=(1, 1, 1, 1), widths=(16, 32, 64, 128)),
}

BACKBONE_NAMES: tuple[str, ...] = tuple(BACKBONES)


def get_model(name: str, num_features: int = 512, dropout: float = 0.0, fp16: bool = False, **kw: Any) -> nn.Module:
    """Build backbone `name` (one of BACKBONE_NAMES). Input [B,3,112,112] in [-1,1] → embeddings [B,num_features].

    Extra keywords go to the class: IResNet accepts `use_checkpoint`, `widths`, `input_size`, `stem_stride`;
    MobileFaceNet accepts `blocks`, `channels`, `input_size`; AdaFaceIR accepts `units`, `widths`, `input_size`,
    `use_checkpoint`; the ViTs accept the VisionTransformer arguments
    (`mask_ratio`, `drop_path_rate`, ...), overriding the registered values.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone name {name!r}; choices: {', '.join(BACKBONE_NAMES)}")
    return BACKBONES[name].build(num_features, dropout, fp16, **kw)


def channel_order_of(name: str) -> str:
    """"rgb" or "bgr": the channel order network ``name``'s released weights expect (``BackboneSpec``)."""
    return BACKBONES[name].channel_order
