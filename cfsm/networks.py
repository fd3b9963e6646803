"""CFSM synthesis networks: the MUNIT-style generator with a linear style subspace, and the 3-scale discriminator.

Parameter names, order and shapes equal the released CFSM files (tests/fixtures/compat/manifests/generator.json,
discriminator.json), so `G_state_dict` / `D_state_dict` load strictly. Differences from the original code, by design:
- AdaIN receives its per-sample weight/bias as call arguments; nothing per-call is stored on modules (re-entrant,
  safe under concurrent or nested calls). Its unused running buffers are kept for strict loading.
- `encode(x)` and `decode(content, o)` are separate, so the content code can be computed once and reused.
- The discriminator trains at 112×112 (see `InstanceNorm2dSafe`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm", "AdaptiveInstanceNorm2d", "InstanceNorm2dSafe", "ResidualBlock", "ContentEncoder",
           "MLP", "Decoder", "SubspaceLayer", "NoSkip", "ColorSkip", "ImageSkip", "INPUT_SKIPS", "Generator",
           "MultiDiscriminator"]


def _instance_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-(sample, channel) normalisation with the biased variance. Statistics are computed in float32 even under
    autocast (callers cast the result back to the input dtype) so that bf16/fp16 runs stay close to float32."""
    xf = x.float()
    mean = xf.mean(dim=(2, 3), keepdim=True)
    var = (xf - mean).square().mean(dim=(2, 3), keepdim=True)
    return (xf - mean) * torch.rsqrt(var + eps)


class LayerNorm(nn.Module):
    """MUNIT LayerNorm: per sample over C·H·W, unbiased std, eps added to the std; then per-channel gamma/beta."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.affine = num_features, eps, affine
        if affine:
            self.gamma = nn.Parameter(torch.empty(num_features).uniform_())
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        flat = xf.reshape(xf.shape[0], -1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        mean = flat.mean(dim=1).view(shape)
        std = flat.std(dim=1).view(shape)
        y = (xf - mean) / (std + self.eps)
        if self.affine:
            cshape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.gamma.float().view(cshape) + self.beta.float().view(cshape)
        return y.to(x.dtype)


class AdaptiveInstanceNorm2d(nn.Module):
    """Instance norm followed by a per-sample affine map given at call time: `forward(x, weight, bias)` with
    weight/bias [B, C]. `running_mean`/`running_var` exist only so released state dicts load strictly; they are
    never read or written (the original always normalises with the current input's statistics)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if weight.shape != (b, c) or bias.shape != (b, c):
            raise ValueError(f"AdaIN({self.num_features}) needs weight/bias [{b}, {c}], got "
                             f"{list(weight.shape)} / {list(bias.shape)}")
        y = _instance_norm(x, self.eps)
        return (y * weight.float()[:, :, None, None] + bias.float()[:, :, None, None]).to(x.dtype)


class InstanceNorm2dSafe(nn.Module):
    """InstanceNorm2d (affine=False, no running stats, biased variance, eps 1e-5) that also accepts 1×1 maps.

    On a 1×1 map the statistic is the value itself, so the normalised output is exactly 0 (what PyTorch < 1.10
    computed for batch > 1, and what the released CFSM discriminators were trained with). Current PyTorch raises
    "Expected more than 1 spatial element when training" instead; we return the mathematically defined zeros.
    For 112×112 inputs this makes the discriminator's third scale output its last conv bias (no gradient to the
    generator from that scale), reproducing the legacy behaviour.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] * x.shape[-2] == 1:
            return torch.zeros_like(x)
        return _instance_norm(x, self.eps).to(x.dtype)


class ResidualBlock(nn.Module):
    """x + [pad, conv3x3, norm, ReLU, pad, conv3x3, norm](x), reflection padding; norm is "in" or "adain"."""

    def __init__(self, features: int, norm: str = "in") -> None:
        super().__init__()
        if norm not in ("in", "adain"):
            raise ValueError(f"ResidualBlock norm must be 'in' or 'adain', got {norm!r}")
        norm_layer = (lambda: InstanceNorm2dSafe(features)) if norm == "in" else (
            lambda: AdaptiveInstanceNorm2d(features))
        self.adain = norm == "adain"
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(features, features, 3), norm_layer(), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(features, features, 3), norm_layer(),
        )

    def forward(self, x: torch.Tensor, adain_params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`adain_params` (AdaIN blocks only): [w1, b1, w2, b2], each [B, features]."""
        if not self.adain:
            return x + self.block(x)
        if adain_params is None or len(adain_params) != 4:
            raise ValueError("an AdaIN ResidualBlock needs adain_params = [w1, b1, w2, b2]")
        w1, b1, w2, b2 = adain_params
        b = self.block
        out = b[3](b[2](b[1](b[0](x)), w1, b1))
        out = b[6](b[5](b[4](out)), w2, b2)
        return x + out


class ContentEncoder(nn.Module):
    """7×7 conv → n_downsample stride-2 4×4 convs (channels doubling) → n_residual residual blocks, InstanceNorm."""

    def __init__(self, in_channels: int = 3, dim: int = 64, n_residual: int = 3, n_downsample: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, dim, 7), InstanceNorm2dSafe(dim),
                                   nn.ReLU(inplace=True)]
        for _ in range(n_downsample):
            layers += [nn.Conv2d(dim, dim * 2, 4, stride=2, padding=1), InstanceNorm2dSafe(dim * 2),
                       nn.ReLU(inplace=True)]
            dim *= 2
        layers += [ResidualBlock(dim, norm="in") for _ in range(n_residual)]
        self.model = nn.Sequential(*layers)
        self.out_channels = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MLP(nn.Module):
    """latent → AdaIN parameters: Linear, ReLU, Linear, ReLU, Linear (input flattened)."""

    def __init__(self, input_dim: int, output_dim: int, dim: int = 256, n_blk: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(input_dim, dim), nn.ReLU(inplace=True)]
        for _ in range(n_blk - 2):
            layers += [nn.Linear(dim, dim), nn.ReLU(inplace=True)]
        layers += [nn.Linear(dim, output_dim)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.reshape(x.shape[0], -1))


class Decoder(nn.Module):
    """AdaIN residual blocks → n_upsample × [nearest ×2, 5×5 conv, LayerNorm, ReLU] → 7×7 conv → tanh.

    The AdaIN parameters come from `mlp(latent)`: 2·C columns per AdaIN layer in module order, bias first then
    weight (no activation on the weight).
    """

    def __init__(self, out_channels: int = 3, dim: int = 64, n_residual: int = 3, n_upsample: int = 2,
                 style_dim: int = 128, mlp_dim: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = [ResidualBlock(dim, norm="adain") for _ in range(n_residual)]
        for _ in range(n_upsample):
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(dim, dim // 2, 5, stride=1, padding=2),
                       LayerNorm(dim // 2), nn.ReLU(inplace=True)]
            dim //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(dim, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.n_residual = n_residual
        self.mlp = MLP(style_dim, self.num_adain_params(), dim=mlp_dim, n_blk=3)

    def num_adain_params(self) -> int:
        return sum(2 * m.num_features for m in self.model.modules() if isinstance(m, AdaptiveInstanceNorm2d))

    def split_adain_params(self, params: torch.Tensor) -> list[list[torch.Tensor]]:
        """MLP output [B, P] → per residual block [w1, b1, w2, b2] (column layout of the released model)."""
        out, col = [], 0
        for block in self.model[: self.n_residual]:
            per_block = []
            for norm in (block.block[2], block.block[6]):
                c = norm.num_features
                bias, weight = params[:, col:col + c], params[:, col + c:col + 2 * c]
                per_block += [weight, bias]
                col += 2 * c
            out.append(per_block)
        return out

    def forward(self, content: torch.Tensor, latent: torch.Tensor,
                pre_tanh_offset: torch.Tensor | None = None) -> torch.Tensor:
        """``pre_tanh_offset`` (optional, broadcastable to the image) is added just before the final tanh."""
        per_block = self.split_adain_params(self.mlp(latent))
        x = content
        last = len(self.model) - 1
        for i, layer in enumerate(self.model):
            if i == last and pre_tanh_offset is not None:
                x = x + pre_tanh_offset.to(x.dtype)
            x = layer(x, per_block[i]) if i < self.n_residual else layer(x)
        return x


class SubspaceLayer(nn.Module):
    """z = o @ U + mu: the learned linear style subspace (U has orthogonal rows at init)."""

    def __init__(self, dim: int = 128, n_basis: int = 10) -> None:
        super().__init__()
        self.U = nn.Parameter(torch.empty(n_basis, dim))
        nn.init.orthogonal_(self.U)
        self.mu = nn.Parameter(torch.zeros(dim))

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return o @ self.U + self.mu

    def orthogonality(self) -> torch.Tensor:
        """mean((U Uᵀ − I)²), the regulariser of the released model."""
        u = self.U.float()
        eye = torch.eye(u.shape[0], device=u.device, dtype=u.dtype)
        return (u @ u.t() - eye).square().mean()


class NoSkip:
    """Input skip ``"none"`` (the released models): the content code alone, nothing added before the final tanh.

    An input skip is chosen once, when the generator is built (`INPUT_SKIPS`); `Generator.encode` hands it the
    content code and the input (`append`), `Generator.decode` takes the code apart again (`split`). No parameters,
    no buffers: skips leave the state dict alone (the generator adds its marker buffer, see `Generator`)."""

    def __init__(self, in_channels: int, n_downsample: int) -> None:
        self.in_channels, self.grid = in_channels, 2 ** n_downsample  # the content grid: H / 2^n_downsample
        self.channels = 0  # channels appended to the content code

    def append(self, content: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return content

    def split(self, content: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the encoder's content code, the pre-tanh offset or None)."""
        return content, None


class ColorSkip(NoSkip):
    """``"color"``: x's per-channel mean as constant channels of the content code; atanh(mean) added before tanh."""

    def __init__(self, in_channels: int, n_downsample: int) -> None:
        super().__init__(in_channels, n_downsample)
        self.channels = in_channels

    def append(self, content: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        skip = x.float().mean(dim=(2, 3), keepdim=True).expand(-1, -1, *content.shape[2:])
        return torch.cat([content, skip.to(content.dtype)], dim=1)

    def split(self, content: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        skip = content[:, -self.channels:].float()
        return content[:, :-self.channels], torch.atanh(skip[:, :, :1, :1].clamp(-0.999, 0.999))


class ImageSkip(NoSkip):
    """``"image"`` / ``"half"`` / ``"lowpass"``: x average-pooled by ``pool``, pixel-unshuffled onto the content grid
    (lossless); atanh(it, bilinearly upsampled) added before tanh."""

    def __init__(self, in_channels: int, n_downsample: int, pool: int) -> None:
        super().__init__(in_channels, n_downsample)
        self.pool = pool
        self.channels = in_channels * (self.grid // pool) ** 2

    def append(self, content: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        small = F.avg_pool2d(x.float(), self.pool) if self.pool > 1 else x.float()
        skip = F.pixel_unshuffle(small, self.grid // self.pool)
        return torch.cat([content, skip.to(content.dtype)], dim=1)

    def split(self, content: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = F.pixel_shuffle(content[:, -self.channels:].float(), self.grid // self.pool)
        if self.pool > 1:
            image = F.interpolate(image, scale_factor=self.pool, mode="bilinear", align_corners=False)
        # pixels at +-1 clamped harder: the decoder can still move them both ways with a modest residual
        return content[:, :-self.channels], torch.atanh(image.clamp(-0.99, 0.99))


# The input skips, name -> constructor(in_channels, n_downsample): the one list of `gen_input_skip`'s choices
INPUT_SKIPS: dict[str, Callable[[int, int], NoSkip]] = {
    "none": NoSkip,
    "color": ColorSkip,
    "image": lambda channels, n_downsample: ImageSkip(channels, n_downsample, pool=1),
    "half": lambda channels, n_downsample: ImageSkip(channels, n_downsample, pool=2),
    "lowpass": lambda channels, n_downsample: ImageSkip(channels, n_downsample, pool=2 ** n_downsample),
}


class Generator(nn.Module):
    """CFSM generator: `forward(x, o) -> (z, image, regu)`, x in [-1, 1], o [B, style_dim].

    `n_residual` is the decoder's block count; the encoder uses `n_residual_encoder` (3, as the released model,
    whose encoder ignores n_residual).

    `input_skip` (``"none"`` in the released models; a stage-1 option, see docs/research/toy_record.md):
    * ``"color"``: the content encoder's InstanceNorm makes G blind to each image's mean colour
      (G(a x + b, o) = G(x, o) for any per-channel shift b and scale a > 0) and CFSM has no style encoder to carry
      it, so G(x, 0) cannot reconstruct x when mean colours vary (toy faces: L1 >= 0.24 whatever the training).
      `encode` appends x's per-channel mean as constant channels to the content code, `decode` adds atanh(mean)
      before the final tanh.
    * ``"image"`` / ``"half"`` / ``"lowpass"``: the same for the input itself at full resolution / average-pooled 2x /
      pooled to the content grid (2^n_downsample): `encode` appends it, pixel-unshuffled onto the content code's
      grid (lossless), and `decode` adds atanh(it, bilinearly upsampled) before the final tanh, so the decoder
      learns a residual on the input. G(x, 0) = x is then close at hand instead of having to be rebuilt from the
      content code, and styles still change colour, blur and noise freely (pre-tanh, any output is reachable).
      The pooling sets the default sharpness: toy faces through "image" keep their detail (styles must learn to
      remove it), through "lowpass" lose more than the toy target style does, "half" sits at the target's.
    Each is a small object chosen at construction (`INPUT_SKIPS`: `NoSkip`, `ColorSkip`, `ImageSkip`), `self.skip`.
    No parameters in any mode: the state dict gains only the marker buffer `input_<mode>_skip_marker`, by which
    `cfsm.load_generator` recognises the option (released files lack it and load unchanged).
    """

    def __init__(self, in_channels: int = 3, dim: int = 64, n_residual: int = 3, n_downsample: int = 2,
                 latent_dim: int = 128, style_dim: int = 10, mlp_dim: int = 256, n_residual_encoder: int = 3,
                 input_skip: str = "none") -> None:
        super().__init__()
        if input_skip not in INPUT_SKIPS:
            raise ValueError(f"Generator input_skip must be one of {tuple(INPUT_SKIPS)}, got {input_skip!r}")
        self.style_dim, self.latent_dim = style_dim, latent_dim
        self.in_channels, self.input_skip, self.n_downsample = in_channels, input_skip, n_downsample
        self.config = dict(in_channels=in_channels, dim=dim, n_residual=n_residual, n_downsample=n_downsample,
                           latent_dim=latent_dim, style_dim=style_dim, mlp_dim=mlp_dim,
                           n_residual_encoder=n_residual_encoder)
        if input_skip != "none":  # only then: released state dicts keep their exact key set
            self.config["input_skip"] = input_skip
            self.register_buffer(f"input_{input_skip}_skip_marker", torch.ones(()))
        self.encoder = ContentEncoder(in_channels, dim, n_residual_encoder, n_downsample)
        self.decoder = Decoder(in_channels, self.encoder.out_channels, n_residual, n_downsample, latent_dim, mlp_dim)
        self.pca = SubspaceLayer(dim=latent_dim, n_basis=style_dim)
        self.skip = INPUT_SKIPS[input_skip](in_channels, n_downsample)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Content code [B, dim·2^n_downsample (+ the skip channels of `input_skip`), H/2^n, W/2^n]; independent of
        the style code."""
        return self.skip.append(self.encoder(x), x)

    def style_to_latent(self, o: torch.Tensor) -> torch.Tensor:
        if o.dim() != 2 or o.shape[1] != self.style_dim:
            raise ValueError(f"style code must be [B, {self.style_dim}], got {list(o.shape)}")
        return self.pca(o)

    def decode(self, content: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Image [B, C, H, W] in [-1, 1] from a content code and a style code o."""
        content, offset = self.skip.split(content)
        return self.decoder(content, self.style_to_latent(o), pre_tanh_offset=offset)

    def regularizer(self) -> torch.Tensor:
        return self.pca.orthogonality()

    def forward(self, x: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.style_to_latent(o)
        image = self.decode(self.encode(x), o)
        return z, image, self.regularizer()


class MultiDiscriminator(nn.Module):
    """3-scale PatchGAN (LSGAN) discriminator; scale k sees the image average-pooled k times.

    At 112×112 the third scale reaches a 1×1 map before its last InstanceNorm; see `InstanceNorm2dSafe` for how it
    is treated (exactly zero, the legacy value, so that scale outputs its last conv bias).
    """

    def __init__(self, in_channels: int = 3, num_scales: int = 3, dim: int = 64) -> None:
        """``dim``: first-layer width (doubling per layer); 64 = the released discriminators."""
        super().__init__()

        def block(cin: int, cout: int, normalize: bool = True) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, stride=2, padding=1)]
            if normalize:
                layers.append(InstanceNorm2dSafe(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        self.models = nn.ModuleList()
        for i in range(num_scales):
            self.models.add_module(f"disc_{i}", nn.Sequential(
                *block(in_channels, dim, normalize=False), *block(dim, 2 * dim), *block(2 * dim, 4 * dim),
                *block(4 * dim, 8 * dim), nn.Conv2d(8 * dim, 1, 3, padding=1)))
        self.downsample = nn.AvgPool2d(in_channels, stride=2, padding=[1, 1], count_include_pad=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for m in self.models:
            outputs.append(m(x))
            x = self.downsample(x)
        return outputs
