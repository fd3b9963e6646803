"""IResNet backbones (ArcFace "improved ResNet"), checkpoint-compatible with InsightFace / CFSM releases.

The module layout (names, order, shapes) matches the released `backbone.pth` files exactly so they load with
`strict=True`; see tests/fixtures/compat/manifests/iresnet*.json. Width-reduced variants (toy nets for CPU
training) use the same classes with other `widths`.
"""
from __future__ import annotations

from typing import Sequence

from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# the fp16 flag follows the project's one mixed-precision policy: float16 on CUDA, bfloat16 on CPU
from utils.precision import low_precision_dtype as autocast_dtype

__all__ = ["IBasicBlock", "IResNet", "IRESNET_LAYERS", "autocast_dtype"]

# Blocks per stage of the released depths (backbones.BACKBONES builds r18 ... r200 from it).
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}

_BN_EPS = 1e-5


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """out = bn3(conv2(prelu(bn2(conv1(bn1(x)))))) + shortcut(x); the stride sits on conv2, no activation after add."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        # Attribute creation order defines state_dict order; it must match the released files.
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet: stem → 4 stages (first block of each stage has stride 2) → bn2 → flatten → dropout → fc → BN1d.

    Args:
        layers: blocks per stage.
        num_features: embedding size.
        dropout: dropout probability before `fc`.
        fp16: run conv1..flatten under autocast (float16 on CUDA, bfloat16 on CPU); `fc`/`features` stay float32.
        widths: channels of the four stages (64, 128, 256, 512 for the released nets); the stem uses widths[0].
        use_checkpoint: recompute each block in backward while training (saves activation memory). Caveat, as in
            arcface_torch: the recompute re-runs BatchNorm in train mode, so running statistics move twice per step.
        input_size: spatial input size (112); fixes the `fc` input size.
        stem_stride: stride of the stem conv (1 in the released nets). The toy net `r_tiny` uses 2 so that no
            layer runs at full 112×112 resolution, which is what dominates CPU time at small widths.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_features: int = 512,
        dropout: float = 0.0,
        fp16: bool = False,
        widths: Sequence[int] = (64, 128, 256, 512),
        use_checkpoint: bool = False,
        input_size: int = 112,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"IResNet needs 4 stages, got layers={list(layers)} widths={list(widths)}")
        if input_size < 16 or stem_stride not in (1, 2):
            raise ValueError(f"IResNet needs input_size >= 16 and stem_stride 1 or 2, got {input_size}, {stem_stride}")
        self.fp16 = fp16
        self.use_checkpoint = use_checkpoint
        self.num_features = num_features
        self.inplanes = widths[0]
        self.conv1 = _conv3x3(3, self.inplanes, stem_stride)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=_BN_EPS)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(widths[0], layers[0], stride=2)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(widths[3], eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        spatial = -(-input_size // stem_stride)
        for _ in range(4):  # each stage: 3x3 conv, stride 2, padding 1 -> ceil(s / 2)
            spatial = -(-spatial // 2)
        self.fc = nn.Linear(widths[3] * spatial * spatial, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=_BN_EPS)
        # The released nets fix the final BN scale at 1 (still a saved parameter, just not trained).
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=_BN_EPS),
            )
        mods = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        mods += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for block in stage:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        # fp16=False must not switch off a caller's autocast (train.py autocasts the whole model)
        with torch.autocast(device_type=dev, dtype=autocast_dtype(dev)) if self.fp16 else nullcontext():
            x = self.prelu(self.bn1(self.conv1(x)))
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = self._run_stage(stage, x)
            x = self.bn2(x)
            # flatten in logical (C, H, W) order, which also holds for channels_last tensors
            x = torch.flatten(x, 1)
            x = self.dropout(x)
        # fc and features always in float32, even inside a caller's autocast region.
        with torch.autocast(device_type=dev, enabled=False):
            x = self.features(self.fc(x.float()))
        return x
