"""ViT backbones (backbones/vit.py) against arcface_torch's own definition.

How the reference values in tests/fixtures/vit/ were computed: InsightFace's `recognition/arcface_torch/backbones`
(`__init__.py` + `vit.py`, commit 7fadd420, with timm 1.0.31 for its DropPath/trunc_normal_ imports) was run
outside this repository, torch 2.14.1 on CPU, float32, 2 threads. For every registered name its `get_model(name,
dropout=0.0, fp16=False, num_features=512)` gave the state-dict layout (`vit_manifest.json`: key/shape/dtype list in
full for vit_t and vit_s, otherwise the non-block entries and block 0 plus a sha256 of the full layout list as
`json.dumps([[key, shape, dtype], ...])`), parameter counts, the per-block drop-path rates, and the number of tokens
its blocks see in one train-mode forward. vit_t was then loaded with the deterministic rule weights of
tests/_rule_weights.py (`rule_state_dict`) and run on `input_x()` (2×3×112×112) in eval mode (`vit_t_eval`), in
train mode after `torch.manual_seed(123)` under no_grad (`vit_t_train_seed123`, plus the feature-head BatchNorm
running statistics after it), and, reloaded, in train mode after `torch.manual_seed(7)` with the backward of
sum(y * linspace(-1, 1)) (`vit_t_train_seed7`, the first 1024 values of the input and pos_embed gradients, the
mask_token gradient). Train mode draws the masking noise (torch.rand) and the drop-path masks (bernoulli_) from the
global CPU generator; our model draws the same numbers in the same order, so train mode matches too.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from backbones import BACKBONES, get_model
from backbones.vit import VIT_CONFIGS, VisionTransformer
from tests._rule_weights import input_x, layout, rel_err, rule_array, rule_state_dict
from utils.checkpoint import CheckpointError, load_state_dict_strict

from .conftest import FIXTURES

ARCFACE_VITS = ["vit_t", "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005",
                "vit_l_dp005_mask_005", "vit_h"]


def manifest(name: str) -> dict:
    return json.loads((FIXTURES / "vit" / "vit_manifest.json").read_text())["networks"][name]


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "vit" / "vit_reference.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture()
def vit_t() -> VisionTransformer:
    model = get_model("vit_t")
    model.load_state_dict(rule_state_dict(model), strict=True)
    return model


def _weighted_sum(y: torch.Tensor) -> torch.Tensor:
    return (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()


@pytest.mark.parametrize("name", ARCFACE_VITS)
def test_layout_equals_arcface_torch(name: str) -> None:
    want = manifest(name)
    with torch.device("meta"):  # shapes only: vit_h has 756 M parameters
        model = get_model(name)
    got = [[k, shape, dtype] for k, shape, dtype in layout(model)]
    assert len(got) == want["num_entries"]
    assert hashlib.sha256(json.dumps(got).encode()).hexdigest() == want["layout_sha256"]
    listed = {e[0] for e in want["entries"]}
    assert [e for e in got if e[0] in listed] == want["entries"]
    assert sum(p.numel() for p in model.parameters()) == want["parameter_count"]
    frozen = model.embed_dim if model.mask_ratio == 0 else 0  # mask_token, unused without masking (see the class)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want["trainable_parameter_count"] - frozen
    assert (model.embed_dim, len(model.blocks), model.num_patches) == (want["embed_dim"], want["depth"], 144)
    assert [b.drop_path.p for b in model.blocks] == want["drop_path"]  # float32 linspace, bit for bit
    kept = int(model.num_patches * (1 - model.mask_ratio)) if model.mask_ratio > 0 else model.num_patches
    assert kept == want["train_tokens_seen_by_blocks"]


def test_released_layout_loads_strictly() -> None:
    """A state dict with exactly the reference keys and shapes (as in arcface_torch's vit_t files) loads strictly;
    one of another size is refused with a message naming the key."""
    lay = manifest("vit_t")["entries"]
    state = {k: torch.from_numpy(rule_array(k, shape, dtype)) for k, shape, dtype in lay}
    model = get_model("vit_t")
    load_state_dict_strict(model, state, source="vit_t.pt")
    assert torch.equal(model.pos_embed, state["pos_embed"])
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_state_dict_strict(get_model("vit_s"), state, source="vit_t.pt")


def test_vit_t_eval_matches_reference(vit_t: VisionTransformer, ref: dict) -> None:
    vit_t.eval()
    with torch.no_grad():
        y = vit_t(input_x())
        assert rel_err(y, ref["vit_t_eval"]) < 1e-5
        cl = vit_t.to(memory_format=torch.channels_last)  # train.py's channels_last option
        assert rel_err(cl(input_x().contiguous(memory_format=torch.channels_last)), ref["vit_t_eval"]) < 1e-5


# Train-mode tolerance. Train mode ends in BatchNorm1d over a batch of two, which maps each feature to about ±1
# whatever the two values were: where a feature's two values nearly agree, a last-bit difference from another
# CPU's kernels (summation order, SIMD width, thread count) becomes a visible one. Measured relative errors against
# the reference for the *right* draws: < 1e-5 on the machine that wrote it, 2.5e-3 (outputs) and 1.1e-3 (gradients)
# on a 2-core AMD EPYC, 3.1e-3 / 7.3e-3 on a 2-core Intel Xeon at 1, 2 and 4 threads (torch 2.14.1). Measured for
# *wrong* draws (seed 124 / 8 instead of 123 / 7, no masking, 20 % masking, no drop path, drop path 0.2): 0.99 to
# 2.2, because one different token kept or one block dropped changes every feature. TRAIN_TOL sits ~7x above the
# worst rounding seen and ~20x below the smallest wrong-draw error; test_wrong_draws_fail_at_train_tol keeps the
# second margin checked on every machine. BatchNorm running statistics are averages (no ±1 amplification):
# 2e-5 seen, 1e-3 allowed, a wrong draw moves them by more (checked below too).
TRAIN_TOL = 5e-2
BN_STATS_TOL = 1e-3
HEAD_BN_STATS = ("feature.1.running_mean", "feature.1.running_var", "feature.3.running_mean", "feature.3.running_var")


def _train_forward(seed: int, **overrides) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """vit_t with rule weights, one no-grad train-mode forward after torch.manual_seed(seed); `overrides` set
    mask_ratio / drop_path_rate on the built model (to make a wrong draw on purpose)."""
    model = get_model("vit_t")
    model.load_state_dict(rule_state_dict(model))
    if "mask_ratio" in overrides:
        model.mask_ratio = overrides["mask_ratio"]
    if "drop_path_rate" in overrides:
        for block in model.blocks:
            block.drop_path.p = overrides["drop_path_rate"]
    model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        y = model(input_x())
    return y, model.state_dict()


def test_vit_t_train_mode_matches_reference(ref: dict) -> None:
    """Masking and drop path with the same random draws as arcface_torch; the head's BN statistics move alike."""
    y, sd = _train_forward(123)
    assert rel_err(y, ref["vit_t_train_seed123"]) < TRAIN_TOL
    for k in HEAD_BN_STATS:
        assert rel_err(sd[k], ref[f"vit_t_train_after__{k}"]) < BN_STATS_TOL, k


@pytest.mark.parametrize("wrong", [dict(seed=124), dict(mask_ratio=0.0), dict(mask_ratio=0.2),
                                   dict(drop_path_rate=0.0), dict(drop_path_rate=0.2)],
                         ids=["other_seed", "no_mask", "mask_0.2", "no_drop_path", "drop_path_0.2"])
def test_wrong_draws_fail_at_train_tol(ref: dict, wrong: dict) -> None:
    """The tolerance above still tells a wrong draw, mask or drop path from the right one, by a wide margin."""
    y, sd = _train_forward(wrong.pop("seed", 123), **wrong)
    assert rel_err(y, ref["vit_t_train_seed123"]) > 10 * TRAIN_TOL
    if "seed" in wrong or wrong.get("mask_ratio") == 0.0:  # statistics of other tokens
        assert max(rel_err(sd[k], ref[f"vit_t_train_after__{k}"]) for k in HEAD_BN_STATS) > 10 * BN_STATS_TOL


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_vit_t_gradients_match_reference(ref: dict, use_checkpoint: bool) -> None:
    """Backward through masking, drop path and the head; with checkpointing the recompute replays the draws.
    Same tolerance and reasoning as the train-mode forward (gradients flow back through the same batch-of-two BN;
    a wrong draw gives errors of 1.0-2.2 here too: seed 8, or drop path off)."""
    model = get_model("vit_t", use_checkpoint=use_checkpoint)
    model.load_state_dict(rule_state_dict(model))
    model.train()
    torch.manual_seed(7)
    x = input_x().requires_grad_()
    y = model(x)
    _weighted_sum(y).backward()
    assert rel_err(y, ref["vit_t_train_seed7"]) < TRAIN_TOL
    assert rel_err(x.grad.reshape(-1)[:1024], ref["vit_t_train_seed7_grad_x_first1024"]) < TRAIN_TOL
    grad_pos = model.pos_embed.grad.reshape(-1)[:1024]
    assert rel_err(grad_pos, ref["vit_t_train_seed7_grad_pos_embed_first1024"]) < TRAIN_TOL
    assert rel_err(model.mask_token.grad.reshape(-1), ref["vit_t_train_seed7_grad_mask_token"]) < TRAIN_TOL


def test_masking_is_training_only() -> None:
    model = get_model("vit_toy").eval()
    seen: list[int] = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        a, b = model(x), model(x)
        model.train()
        model(x)
    assert torch.equal(a, b) and seen == [144, 144, 129]  # eval is deterministic; training keeps int(144·0.9)


def test_attention_softmax_in_float32_under_autocast() -> None:
    """Under autocast (and with fp16=True) the projections run in low precision, q·kᵀ/softmax/attn·v in float32,
    and the embedding comes out float32 (the head runs outside autocast)."""
    class Dtypes(torch.overrides.TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.softmax: list[torch.dtype] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") == "softmax":
                self.softmax.append(out.dtype)
            return out

    for fp16, autocast in ((False, True), (True, False)):
        model = get_model("vit_toy", fp16=fp16).eval()
        qkv: list[torch.dtype] = []
        model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: qkv.append(o.dtype))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), Dtypes() as mode:
            y = model(torch.rand(2, 3, 112, 112))
        assert qkv == [torch.bfloat16] and mode.softmax == [torch.float32] * 2 and y.dtype == torch.float32
    with torch.no_grad():
        full = model.float()(torch.zeros(1, 3, 112, 112))
        model.fp16 = False
        assert rel_err(model(torch.zeros(1, 3, 112, 112)), full) > 0  # fp16 flag changes the arithmetic


def test_no_weight_decay_names() -> None:
    names = get_model("vit_toy").no_weight_decay_names()
    assert {"pos_embed", "mask_token", "patch_embed.proj.bias", "blocks.0.norm1.weight", "norm.bias",
            "blocks.1.mlp.fc2.bias", "feature.1.weight", "feature.3.bias"} <= names
    assert not names & {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "feature.0.weight", "feature.2.weight"}


def test_errors_and_registry() -> None:
    assert set(ARCFACE_VITS) | {"vit_toy"} <= set(BACKBONES)
    assert BACKBONES["vit_t"].config_keys == ("embedding_size", "use_checkpoint")
    with pytest.raises(ValueError, match="dropout"):
        get_model("vit_t", dropout=0.2)
    with pytest.raises(ValueError, match="112"):
        get_model("vit_toy")(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformer(embed_dim=60, depth=1)
    assert get_model("vit_toy", num_features=32)(torch.zeros(2, 3, 112, 112)).shape == (2, 32)
    assert VIT_CONFIGS["vit_b_dp005_mask_005"]["mask_ratio"] == 0.1  # what arcface_torch does, see backbones/vit.py


def test_vit_toy_train_step() -> None:
    model = get_model("vit_toy", num_features=64, use_checkpoint=True).train()
    out = model(torch.rand(4, 3, 112, 112) * 2 - 1)
    assert out.shape == (4, 64) and out.dtype == torch.float32
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def _ddp_worker(rank: int, init_file: str, mask_ratio: float) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(get_model("vit_toy", mask_ratio=mask_ratio, use_checkpoint=True),
                                        find_unused_parameters=False)  # as train.py wraps backbones
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(3):  # DDP reports a parameter without gradient at the step after it
            opt.zero_grad()
            model(torch.rand(2, 3, 112, 112) * 2 - 1).square().mean().backward()
            opt.step()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mask_ratio", [0.0, 0.1])
def test_ddp_training_with_and_without_masking(tmp_path, mask_ratio: float) -> None:
    """Without masking (vit_t_dp005_mask0, vit_h) mask_token takes no part in training; it is frozen there, so DDP
    without find_unused_parameters (train.py) trains; with masking it is trained."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "pg"), mask_ratio), nprocs=2, join=True)
    assert get_model("vit_toy", mask_ratio=mask_ratio).mask_token.requires_grad == (mask_ratio > 0)


def test_gmacs_equal_arcface_torch_readme() -> None:
    """bench.modules counts forward MACs on the meta device; rounded they are the GFLOPs arcface_torch's README
    lists for its ViTs (ViT-T 1.5, ViT-S 5.7, ViT-B 11.4, ViT-L 25.3)."""
    from bench.modules import vit_gmacs

    g = vit_gmacs()
    assert set(g) == set(ARCFACE_VITS) | {"vit_toy"}
    assert [round(g[n], 1) for n in ("vit_t", "vit_s", "vit_b", "vit_l_dp005_mask_005")] == [1.5, 5.7, 11.4, 25.3]
    assert g["vit_t"] == g["vit_t_dp005_mask0"] and g["vit_h"] > 80
