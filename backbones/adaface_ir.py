"""AdaFace's IR networks (``ir_18`` ... ``ir_200``, ``ir_se_*``), state-dict compatible with AdaFace / CVLFace files.

Written for this project from a reading of AdaFace's ``net.py`` (github.com/mk-minchul/AdaFace); no code copied.
These are *not* InsightFace's IResNet (``backbones/iresnet.py``): another module tree and other blocks. The facts
that fix the layout (so AdaFace's released ``.ckpt`` weights load strictly, after the ``model.`` prefix):

* ``input_layer`` = Conv 3x3 (3 -> 64, stride 1, no bias), BatchNorm2d, PReLU.
* ``body.N`` = one block per unit, numbered through all four stages. The first unit of a stage has stride 2 (also
  the first stage, 64 -> 64). Shortcut: ``MaxPool2d(1, stride)`` (no weights) when the channels stay, else
  ``shortcut_layer`` = Conv 1x1 (stride) + BatchNorm2d.
* Depths 18/34/50/100 use ``BasicBlockIR``: ``res_layer`` = BN, Conv3x3, BN, PReLU, Conv3x3 (the stride), BN;
  stage widths 64/128/256/512. Depths 152/200 use ``BottleneckIR``: BN, Conv1x1 (-> width/4), BN, PReLU,
  Conv3x3, BN, PReLU, Conv1x1 (-> width, *the stride sits here*), BN; stage widths 256/512/1024/2048.
* ``ir_se``: the block's ``res_layer`` gets a last module ``se_block`` (squeeze-excitation, reduction 16: average
  pool, Conv1x1 ``fc1`` no bias, ReLU, Conv1x1 ``fc2`` no bias, sigmoid, times the input).
* ``output_layer`` (created before ``body``: its keys come first) = BatchNorm2d, Dropout (0.4 in AdaFace's
  training), Flatten, Linear(C*7*7 -> 512), BatchNorm1d(512, affine=False) — the final BN has running statistics
  and no weight or bias.
* Every BatchNorm has eps 1e-5 (PyTorch's default).

Forward: AdaFace returns ``(x / |x|, |x|)``; this returns the raw ``x`` (= their product), the embedding every
loss and evaluation command of this project expects (flip fusion of raw embeddings equals AdaFace's
``fuse_features_with_norm``). AdaFace models are trained on BGR input: the evaluation commands feed them BGR
(``BackboneSpec.channel_order``); ``train.py`` feeds every network RGB.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from utils.precision import low_precision_dtype

__all__ = ["AdaFaceIR", "ADAFACE_IR_CONFIGS", "BasicBlockIR", "BottleneckIR", "SEModule"]

# name -> (AdaFace's num_layers, units per stage, "ir" | "ir_se"). AdaFace names depth 100 "ir_101".
_UNITS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
# The names AdaFace's net.py defines (IR_18 ... IR_200, IR_SE_50 ... IR_SE_200); depth 100 is called 101 there.
ADAFACE_IR_CONFIGS: dict[str, dict] = {
    f"{mode}_{depth if depth != 100 else 101}": {"units": _UNITS[depth], "mode": mode, "bottleneck": depth > 100}
    for mode in ("ir", "ir_se") for depth in _UNITS if mode == "ir" or depth >= 50
}


class SEModule(nn.Module):
    """Squeeze-excitation gate: x * sigmoid(fc2(relu(fc1(avgpool(x))))), 1x1 convs without bias."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if cin == cout:
        return nn.MaxPool2d(1, stride)  # a strided pick, no weights
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlockIR(nn.Module):
    """res_layer(x) + shortcut(x); res_layer = BN, conv3x3, BN, PReLU, conv3x3 (stride), BN [, se_block]."""

    def __init__(self, cin: int, cout: int, stride: int, se: bool = False) -> None:
        super().__init__()
        self.shortcut_layer = _shortcut(cin, cout, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        if se:
            self.res_layer.add_module("se_block", SEModule(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class BottleneckIR(nn.Module):
    """res_layer(x) + shortcut(x); res_layer = BN, conv1x1 (to cout/4), BN, PReLU, conv3x3, BN, PReLU, conv1x1
    (to cout, stride), BN [, se_block]."""

    def __init__(self, cin: int, cout: int, stride: int, se: bool = False) -> None:
        super().__init__()
        mid = cout // 4
        self.shortcut_layer = _shortcut(cin, cout, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        if se:
            self.res_layer.add_module("se_block", SEModule(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIR(nn.Module):
    """AdaFace's IR backbone: input_layer -> body (all units) -> output_layer; returns the raw embedding.

    Args:
        units: blocks per stage.
        mode: "ir" or "ir_se" (squeeze-excitation in every block).
        bottleneck: BottleneckIR blocks and widths 256..2048 (AdaFace's depths 152 and 200), else BasicBlockIR
            and 64..512.
        num_features: embedding size (AdaFace: 512; CVLFace's ``output_dim``).
        dropout: dropout before the Linear (AdaFace trains with 0.4; no effect in eval mode).
        fp16: body under autocast (float16 on CUDA, bfloat16 on CPU); the Linear and the final BN stay float32.
        use_checkpoint: recompute each block in backward while training (activation memory).
        widths: stage widths, for toy variants (default AdaFace's, by ``bottleneck``; then the stem is 64 wide,
            else ``widths[0]``).
        input_size: 112 (AdaFace also offers 224); any multiple of 16.
    """

    def __init__(self, units: Sequence[int], mode: str = "ir", bottleneck: bool = False, num_features: int = 512,
                 dropout: float = 0.0, fp16: bool = False, use_checkpoint: bool = False,
                 widths: Sequence[int] | None = None, input_size: int = 112) -> None:
        super().__init__()
        if mode not in ("ir", "ir_se") or len(units) != 4:
            raise ValueError(f"AdaFaceIR needs mode ir or ir_se and 4 stages, got {mode!r}, {list(units)}")
        if input_size % 16 or input_size < 16:
            raise ValueError(f"AdaFaceIR needs an input size that is a multiple of 16, got {input_size}")
        stem = 64 if widths is None else widths[0]  # AdaFace's stem is 64 wide at every depth
        widths = tuple(widths or ((256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)))
        self.fp16, self.use_checkpoint, self.num_features = fp16, use_checkpoint, num_features
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                         nn.PReLU(stem))
        # output_layer is created before body, as in AdaFace: its keys come before body's in the state dict
        side = input_size // 16
        self.output_layer = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.Dropout(dropout), nn.Flatten(),
                                          nn.Linear(widths[-1] * side * side, num_features),
                                          nn.BatchNorm1d(num_features, affine=False))
        block = BottleneckIR if bottleneck else BasicBlockIR
        blocks: list[nn.Module] = []
        cin = stem
        for width, count in zip(widths, units):
            for i in range(count):
                blocks.append(block(cin, width, 2 if i == 0 else 1, se=mode == "ir_se"))
                cin = width
        self.body = nn.Sequential(*blocks)
        for m in self.modules():  # AdaFace's initialisation: kaiming normal (fan_out, relu) for convs and linears
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        with torch.autocast(device_type=dev, dtype=low_precision_dtype(dev)) if self.fp16 else nullcontext():
            x = self.input_layer(x)
            for unit in self.body:
                if self.use_checkpoint and self.training and torch.is_grad_enabled():
                    x = checkpoint(unit, x, use_reentrant=False)
                else:
                    x = unit(x)
            x = self.output_layer[2](self.output_layer[1](self.output_layer[0](x)))  # BN, dropout, flatten
        with torch.autocast(device_type=dev, enabled=False):  # Linear + feature BN in float32, as IResNet
            return self.output_layer[4](self.output_layer[3](x.float()))
