"""utils.optim: which parameters are decayed; optimizers built from the registry or from a spec (stage 1's)."""
import pytest
import torch

from backbones import get_model
from utils.optim import GENERATOR_OPTIMIZER, build_optimizer, decay_param_groups


def test_default_decays_everything_as_arcface_torch() -> None:
    model = get_model("vit_toy")
    groups = decay_param_groups(model, exclude=False)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))


def test_exclusions_vit_and_iresnet() -> None:
    vit = get_model("vit_toy")
    decayed, free = decay_param_groups(vit, exclude=True)
    names = {id(p): n for n, p in vit.named_parameters()}
    free_names = {names[id(p)] for p in free["params"]}
    assert free["weight_decay"] == 0.0 and "weight_decay" not in decayed
    assert {"pos_embed", "mask_token", "patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.attn.proj.bias",
            "norm.weight", "feature.1.bias", "feature.3.weight"} <= free_names
    assert {names[id(p)] for p in decayed["params"]} == {
        "patch_embed.proj.weight", "feature.0.weight", "feature.2.weight",
        *(f"blocks.{i}.{k}.weight" for i in range(2) for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))}
    # a net without no_weight_decay_names: only the 1-d parameters (BN, PReLU, biases) are spared
    r = get_model("r_tiny")
    decayed, free = decay_param_groups(r, exclude=True)
    assert all(p.ndim == 1 for p in free["params"]) and all(p.ndim > 1 for p in decayed["params"])
    opt = build_optimizer("adamw", [decayed, free], {"lr": 1e-3, "weight_decay": 0.1})
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    for p in r.parameters():
        p.grad = torch.zeros_like(p)  # zero gradients: only the decoupled weight decay moves a weight
    before = {id(p): p.detach().clone() for p in r.parameters()}
    opt.step()
    assert all(torch.equal(p, before[id(p)]) for p in free["params"])
    assert all(not torch.equal(p, before[id(p)]) for p in decayed["params"])


def test_stage1_optimizer_is_built_from_its_spec_with_the_gen_keys() -> None:
    """Stage 1 builds G's and D's optimizers with build_optimizer too: Adam reading gen_lr / gen_betas (a config
    list becomes the tuple torch expects); the stage-2 keys lr / weight_decay are not read."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(GENERATOR_OPTIMIZER, params, {"gen_lr": 2e-4, "gen_betas": [0.5, 0.999], "lr": 0.1})
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 2e-4 and opt.param_groups[0]["betas"] == (0.5, 0.999)
    assert opt.param_groups[0]["weight_decay"] == 0
    with pytest.raises(ValueError, match="choices are 'sgd', 'adamw'"):
        build_optimizer("adam", params, {"lr": 0.1})
