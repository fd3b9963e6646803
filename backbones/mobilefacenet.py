"""MobileFaceNet (InsightFace `get_mbf`), checkpoint-compatible with the released files.

Layout: tests/fixtures/compat/manifests/mobilefacenet.json. `channels` scales every width, so the toy net
`mbf_tiny` is the same code with fewer channels and blocks.
"""
from __future__ import annotations

from typing import Sequence

from contextlib import nullcontext

import torch
from torch import nn

from .iresnet import autocast_dtype

__all__ = ["ConvBlock", "LinearBlock", "DepthWise", "Residual", "GDC", "MobileFaceNet"]


class Flatten(nn.Module):
    """Flatten to (B, -1); a module so that `features.layers` keeps the released indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class ConvBlock(nn.Module):
    """Conv (no bias) → BatchNorm2d → PReLU(out_c)."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) → BatchNorm2d, no activation."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """1×1 expand (in→g) → k×k depthwise (g groups, stride s) → 1×1 linear projection (g→out), optional residual."""

    def __init__(self, in_c: int, out_c: int, residual: bool = False, kernel=(3, 3), stride=(2, 2),
                 padding=(1, 1), groups: int = 1) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups, kernel=(1, 1)),
            ConvBlock(groups, groups, kernel=kernel, stride=stride, padding=padding, groups=groups),
            LinearBlock(groups, out_c, kernel=(1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """`num_block` residual DepthWise blocks at constant width."""

    def __init__(self, c: int, num_block: int, groups: int, kernel=(3, 3), stride=(1, 1), padding=(1, 1)) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: 7×7 depthwise LinearBlock → flatten → Linear (no bias) → BatchNorm1d."""

    def __init__(self, in_c: int, embedding_size: int, spatial: int = 7) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(in_c, in_c, kernel=(spatial, spatial), groups=in_c),
            Flatten(),
            nn.Linear(in_c, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet. `channels=128` and `blocks=(1, 4, 6, 2)` are the released `mbf` (arcface_torch scale=2).

    fp16 autocast (float16 on CUDA, bfloat16 on CPU) covers only `layers`; `conv_sep` and `features` run in float32.
    """

    def __init__(self, fp16: bool = False, num_features: int = 512, blocks: Sequence[int] = (1, 4, 6, 2),
                 channels: int = 128, input_size: int = 112) -> None:
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"MobileFaceNet needs 4 block counts, got {list(blocks)}")
        if channels % 2 != 0:
            raise ValueError(f"MobileFaceNet channels must be even, got {channels}")
        c = channels
        self.fp16 = fp16
        self.num_features = num_features
        stem: list[nn.Module] = [ConvBlock(3, c, kernel=(3, 3), stride=(2, 2), padding=(1, 1))]
        if blocks[0] == 1:
            # released layout: grouped conv with 2 input channels per group (groups=64 at c=128)
            stem.append(ConvBlock(c, c, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=c // 2))
        else:
            stem.append(Residual(c, num_block=blocks[0], groups=c))
        self.layers = nn.Sequential(
            *stem,
            DepthWise(c, c, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=c),
            Residual(c, num_block=blocks[1], groups=c),
            DepthWise(c, 2 * c, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=2 * c),
            Residual(2 * c, num_block=blocks[2], groups=2 * c),
            DepthWise(2 * c, 2 * c, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=4 * c),
            Residual(2 * c, num_block=blocks[3], groups=2 * c),
        )
        self.conv_sep = ConvBlock(2 * c, 4 * c, kernel=(1, 1))
        self.features = GDC(4 * c, num_features, spatial=input_size // 16)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        # fp16=False must not switch off a caller's autocast (train.py autocasts the whole model)
        with torch.autocast(device_type=dev, dtype=autocast_dtype(dev)) if self.fp16 else nullcontext():
            x = self.layers(x)
        with torch.autocast(device_type=dev, enabled=False):
            x = self.features(self.conv_sep(x.float()))
        return x
