"""Vision Transformer backbones as arcface_torch defines them (`vit_t` ... `vit_h`), checkpoint-compatible.

The module layout (names, creation order, shapes) equals arcface_torch's `backbones/vit.py` (InsightFace 7fadd420),
so its released ViT files load with `strict=True`; tests/fixtures/vit/ holds the reference layouts and outputs.

Architecture (facts read from arcface_torch, code written here):
    112×112 input → 9×9 patch conv, stride 9 (12×12 = 144 tokens; the last 4 pixel rows/columns are never seen)
    → + learned `pos_embed` (no class token) → [training only: random patch masking] → `depth` pre-norm blocks
    x += drop_path(attn(norm1(x))); x += drop_path(mlp(norm2(x)))   (LayerNorm eps 1e-5, 8 heads, qkv without bias,
    MLP fc1 → ReLU6 → fc2 at ratio 4) → final LayerNorm (in float32) → [training only: masked tokens replaced by
    `mask_token`, original order restored] → flatten token-major (index token·dim + channel)
    → Linear(144·dim → dim, no bias) → BN1d(eps 2e-5) → Linear(dim → num_features, no bias) → BN1d(eps 2e-5).

Precision: the patch embedding, the final norm and the feature head run in float32 even inside a caller's autocast
(arcface_torch runs them outside autocast); the blocks' linear layers follow autocast; q·kᵀ, the softmax and
attn·v always run in float32 (autocast switched off around them, as arcface_torch does).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from utils.precision import low_precision_dtype as autocast_dtype

__all__ = ["VisionTransformer", "VIT_CONFIGS", "drop_path_rates"]

_LN_EPS = 1e-5   # nn.LayerNorm default, as arcface_torch
_BN_EPS = 2e-5   # the feature head's BatchNorms


def _float32_region(device_type: str):
    """Autocast switched off (a no-op context on devices without autocast, e.g. meta for shape/MAC counting)."""
    return torch.autocast(device_type=device_type, enabled=False) if torch.amp.is_autocast_available(
        device_type) else nullcontext()


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Per-block drop-path probabilities rising linearly from 0 to `max_rate`, computed in float32 like arcface_torch
    (so that train-mode random draws match it bit for bit). Always on the CPU: also works under a meta device."""
    return [float(r) for r in torch.linspace(0.0, max_rate, depth, device="cpu")]


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability `p`, scale the rest by
    1/(1-p). One Bernoulli draw per sample from the global generator (the same draws as timm's DropPath)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}"


class Mlp(nn.Module):
    """fc1 → ReLU6 → fc2 (keys `fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; the projections follow autocast, the attention itself runs in float32."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [3, B, heads, tokens, head_dim]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # float16 logits overflow/underflow in the softmax; arcface_torch keeps this part in float32 under AMP
        with _float32_region(x.device.type):
            q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
            weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            x = (weights @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block. Attribute order (norm1, norm2, attn, mlp) fixes the state-dict order."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, qkv_bias: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping `patch`×`patch` conv (key `proj`) → tokens [B, N, dim]."""

    def __init__(self, img_size: int, patch: int, dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.img_size = img_size
        self.grid = img_size // patch
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (under ONNX/TorchScript tracing the sizes are tensors; the traced graph has the fixed size anyway)
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"ViT: input is {tuple(x.shape[-2:])} pixels, the model takes "
                             f"{self.img_size}×{self.img_size}")
        # flatten in logical (C, H, W) order, which also holds for channels_last tensors
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """arcface_torch's face ViT (see the module docstring).

    Args:
        embed_dim, depth, num_heads, mlp_ratio: transformer size (arcface_torch: 8 heads, ratio 4 for every name).
        num_features: embedding size (the last Linear/BN of the feature head).
        drop_path_rate: drop-path probability of the last block (linear from 0 at the first).
        mask_ratio: share of patch tokens dropped at random before the blocks, in training only (0 = off).
        fp16: run the blocks under autocast (float16 on CUDA, bfloat16 on CPU); without it a caller's autocast
            still applies to them. The attention core, patch embedding, final norm and head stay float32.
        use_checkpoint: recompute each block in backward while training (saves activation memory); the random
            drop-path draws are replayed, so results do not change.
        img_size, patch_size: 112 and 9 in every arcface_torch network.
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int = 8, mlp_ratio: float = 4.0,
                 num_features: int = 512, drop_path_rate: float = 0.0, mask_ratio: float = 0.0,
                 fp16: bool = False, use_checkpoint: bool = False, img_size: int = 112, patch_size: int = 9,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0 or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"ViT: mask_ratio and drop_path_rate must lie in [0, 1), got {mask_ratio}, "
                             f"{drop_path_rate}")
        if img_size < patch_size:
            raise ValueError(f"ViT: img_size {img_size} is smaller than patch_size {patch_size}")
        self.embed_dim = embed_dim
        self.num_features = num_features
        self.mask_ratio = mask_ratio
        self.fp16 = fp16
        self.use_checkpoint = use_checkpoint
        # State-dict order, as in the released files: own parameters first in creation order (pos_embed, then
        # mask_token), then the submodules in creation order (patch_embed, blocks, norm, feature).
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.grid ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, p, qkv_bias)
                                    for p in drop_path_rates(drop_path_rate, depth))
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=_BN_EPS),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Without masking the token is never used: frozen, so that DDP without find_unused_parameters (train.py)
        # does not wait for its gradient. It stays in the state dict; training is unchanged (it would get no
        # gradient, hence no optimizer update, anyway).
        self.mask_token.requires_grad_(mask_ratio > 0)
        self._init_weights()

    def _init_weights(self) -> None:
        # arcface_torch's init: truncated normal (std 0.02, cut at ±2) for Linear weights and pos_embed, zero
        # biases, unit LayerNorms, N(0, 0.02²) mask token; the patch conv and BatchNorms keep PyTorch's defaults.
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names that conventionally get no weight decay: position embedding, mask token, norms, biases."""
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name in ("pos_embed", "mask_token")}

    def _mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random int(N·(1-mask_ratio)) tokens per sample: (kept tokens, permutation restoring the order)."""
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        order = torch.argsort(torch.rand(b, n, device=x.device), dim=1)  # ascending noise: first `keep` stay
        restore = torch.argsort(order, dim=1)
        return torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, d)), restore

    def _run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, 112, 112] → normalised tokens flattened to [B, num_patches·embed_dim] (float32)."""
        dev = x.device.type
        masking = self.training and self.mask_ratio > 0
        with _float32_region(dev):
            x = self.patch_embed(x.float()) + self.pos_embed
            if masking:
                x, restore = self._mask(x)
        low = self.fp16 and torch.amp.is_autocast_available(dev)
        with torch.autocast(device_type=dev, dtype=autocast_dtype(dev)) if low else nullcontext():
            for block in self.blocks:
                x = self._run_block(block, x)
        with _float32_region(dev):
            x = self.norm(x.float())
            if masking:
                b, kept, d = x.shape
                filler = self.mask_token.expand(b, self.num_patches - kept, d)
                x = torch.gather(torch.cat([x, filler], dim=1), 1, restore[..., None].expand(-1, -1, d))
            return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        with _float32_region(x.device.type):
            return self.feature(x)


# The registered networks, as arcface_torch's get_model builds them (8 heads, MLP ratio 4, patch 9 throughout).
# mask_ratio: arcface_torch calls its masking function without the configured ratio, so every network with a
# non-zero ratio (0.1 or 0.05) in fact masks 10% of the tokens; we reproduce what it does.
VIT_CONFIGS: dict[str, dict] = {
    "vit_t": dict(embed_dim=256, depth=12, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_t_dp005_mask0": dict(embed_dim=256, depth=12, drop_path_rate=0.05, mask_ratio=0.0),
    "vit_s": dict(embed_dim=512, depth=12, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_s_dp005_mask_0": dict(embed_dim=512, depth=12, drop_path_rate=0.05, mask_ratio=0.0),
    "vit_b": dict(embed_dim=512, depth=24, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_b_dp005_mask_005": dict(embed_dim=512, depth=24, drop_path_rate=0.05, mask_ratio=0.1),
    "vit_l_dp005_mask_005": dict(embed_dim=768, depth=24, drop_path_rate=0.05, mask_ratio=0.1),
    "vit_h": dict(embed_dim=1024, depth=48, drop_path_rate=0.1, mask_ratio=0.0),
    # toy net for CPU training and tests: same code path, 64-d tokens, 2 blocks
    "vit_toy": dict(embed_dim=64, depth=2, drop_path_rate=0.1, mask_ratio=0.1),
}
