"""utils.optim.decay_param_groups: which parameters are decayed."""
import torch

from backbones import get_model
from utils.optim import build_optimizer, decay_param_groups


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
