"""The colour-channel order a backbone is fed in training.

Every image in this project is RGB: the data loaders, the CFSM generator's input and output, the `.bin` sets of
in-training verification. AdaFace's IR networks were trained on BGR (`BackboneSpec.channel_order`), so a network
fine-tuned from an AdaFace file, or used as stage 1's identity network, must see BGR. The trainers resolve the order
once (:func:`training_order`: config key `channel_order` / `id_channel_order`, `auto` = what the file says, else the
network's registered order) and :func:`feed_in_order` makes the network flip its input itself: every caller (the
step's forward, the CFSM attack's loss, verification, the style report) keeps passing RGB, and the flip happens after
synthesis, right before the network. The order a run used goes into its summary.json, where the eval commands read
it (`utils.model_file.told_channel_order`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from utils.errors import ConfigError
from utils.model_file import told_channel_order

CHANNEL_ORDERS: tuple[str, ...] = ("auto", "rgb", "bgr")


@dataclass(frozen=True)
class ChannelOrder:
    """The order a network is fed ("rgb" / "bgr"), whether a file tells it (`told`: another explicit order is an
    error) and why, in words (start-up line, errors)."""

    order: str
    told: bool
    reason: str


def expected_order(network: str, path: str | os.PathLike | None = None) -> ChannelOrder:
    """The order network `network`, loaded from `path` (None: fresh weights), expects: what the file says (CVLFace
    `color_space`, a train.py run's record), else the network's registered order: told when a file of that layout
    is loaded (AdaFace's keys prove an AdaFace network), a default for fresh weights or for the InsightFace / CFSM
    convention (RGB), which a BGR-trained InsightFace-layout file may contradict."""
    from backbones import BACKBONES

    said = told_channel_order(path) if path else None
    if said is not None:
        return ChannelOrder(said[0], True, said[1])
    spec = BACKBONES[network]
    if spec.channel_order != "rgb":
        return ChannelOrder(spec.channel_order, path is not None,
                            f"{spec.family} networks are trained on {spec.channel_order.upper()}")
    return ChannelOrder("rgb", False, "the InsightFace / CFSM convention")


def training_order(wanted: str, network: str, path: str | os.PathLike | None, key: str,
                   file_key: str) -> ChannelOrder:
    """The order to feed network `network` (initialised from `path`, config key `file_key`) when config key `key`
    says `wanted` ("auto" | "rgb" | "bgr"). An explicit order against what the file tells is a ConfigError naming
    the key, the file and the fix: a silent override would train on swapped channels."""
    expected = expected_order(network, path)
    if wanted == "auto":
        return expected
    if expected.told and wanted != expected.order:
        raise ConfigError(f"config key '{key}' = {wanted!r} contradicts {file_key}={path}: it expects "
                          f"{expected.order.upper()} input ({expected.reason}); leave {key} out (auto reads the order "
                          f"from the file) or set {key}={expected.order}")
    return ChannelOrder(wanted, False, f"{key}={wanted}")


def backbone_order(cfg: Mapping[str, Any]) -> ChannelOrder:
    """Stage 2: the order `train.py` feeds its backbone (config key `channel_order`, the file
    `pretrained_backbone_model`)."""
    return training_order(cfg["channel_order"], cfg["network"], cfg["pretrained_backbone_model"] or None,
                          "channel_order", "pretrained_backbone_model")


def identity_order(cfg: Mapping[str, Any]) -> ChannelOrder:
    """Stage 1: the order `train_generator.py` feeds its frozen identity network (`id_channel_order`, `id_model`)."""
    return training_order(cfg["id_channel_order"], cfg["id_network"], cfg["id_model"] or None, "id_channel_order",
                          "id_model")


def _rgb_to_bgr(module: nn.Module, args: tuple) -> tuple:
    return (args[0].flip(1), *args[1:])


def feed_in_order(network: nn.Module, order: str) -> nn.Module:
    """`network`, made to take RGB images and see them in `order`: for "bgr" a forward pre-hook reverses the channels
    of its first argument (the state dict is unchanged, so model files keep their layout). Returns `network`."""
    if order not in ("rgb", "bgr"):
        raise ValueError(f"channel order {order!r}: expected 'rgb' or 'bgr'")
    if order == "bgr":
        network.register_forward_pre_hook(_rgb_to_bgr)
    return network

