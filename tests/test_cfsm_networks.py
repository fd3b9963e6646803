"""CFSM generator / discriminator: checkpoint layout, fixture outputs, re-entrancy, autocast, load_generator."""
import numpy as np
import pytest
import torch

from cfsm import Generator, MultiDiscriminator, generator_from_state_dict, load_generator
from cfsm.networks import AdaptiveInstanceNorm2d, InstanceNorm2dSafe, LayerNorm
from cfsm.stage1 import lsgan_loss
from tests._rule_weights import (check_digests, fixture, input_x, input_x128, input_z, layout, manifest,
                                 manifest_layout, rel_err, rule_state_dict)

# Measured on CPU (2 threads) with the rule weights, image in [-1, 1]: bf16 autocast max |Δ| 0.041, mean 0.0061;
# fp16 autocast (CPU) max 0.0050, mean 0.00077. Bounds are ~2x the measurement.
BF16_MAX_ABS, BF16_MEAN_ABS = 0.08, 0.012


@pytest.fixture(scope="module")
def gen():
    g = Generator()
    sd = rule_state_dict(g)
    check_digests(sd, "generator")
    g.load_state_dict(sd, strict=True)
    return g.eval()


@pytest.fixture(scope="module")
def gfx():
    return fixture("generator")


@pytest.fixture(scope="module")
def gen_out(gen):
    with torch.no_grad():
        return gen(input_x(), input_z()), gen.encode(input_x())


def test_generator_layout():
    g = Generator()
    assert layout(g) == manifest_layout("generator")
    m = manifest("generator")
    assert sum(p.numel() for p in g.parameters()) == m["parameter_count"]
    assert g.style_dim == 10


def test_generator_matches_fixture(gen, gfx, gen_out):
    (w, image, regu), enc = gen_out
    assert rel_err(w, gfx["gen_w"]) < 1e-5
    assert rel_err(image, gfx["gen_image"]) < 1e-4
    assert rel_err(regu, gfx["gen_regu"]) < 1e-5
    with torch.no_grad():
        assert rel_err(gen.decoder.mlp(w), gfx["gen_mlp_out"]) < 1e-5
    assert rel_err(enc[:, :64], gfx["gen_encoder_ch0to63"]) < 1e-4
    assert rel_err(enc[0, :, 0], gfx["gen_encoder_sample0_row0"]) < 1e-4
    e = enc.double()
    assert rel_err(e.mean((2, 3)), gfx["gen_encoder_chan_mean"]) < 1e-4
    assert rel_err(e.std((2, 3), unbiased=False), gfx["gen_encoder_chan_std"]) < 1e-4
    with torch.no_grad():
        w0, image0, regu0 = gen(input_x(), torch.zeros(2, 10))
    assert rel_err(w0, gfx["gen_w_z0"]) < 1e-5
    assert rel_err(image0, gfx["gen_image_z0"]) < 1e-4
    assert rel_err(regu0, gfx["gen_regu_z0"]) < 1e-5


def test_generator_grad_z_and_state_unchanged(gen, gfx):
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    z = input_z().requires_grad_()
    weights = torch.from_numpy(np.random.default_rng(7).standard_normal((2, 3, 112, 112)).astype(np.float32))
    _, image, _ = gen(input_x(), z)
    (image * weights).sum().backward()
    assert rel_err(z.grad, gfx["gen_grad_z"]) < 3e-2
    gen.zero_grad(set_to_none=True)
    for k, v in gen.state_dict().items():
        assert torch.equal(v, before[k]), k  # AdaIN running buffers are never written


def test_unit_norms(gfx):
    x = torch.from_numpy(gfx["gen_unit_in"])
    ln = LayerNorm(4)
    ln.load_state_dict(rule_state_dict(ln))
    assert rel_err(ln(x), gfx["gen_unit_layernorm_out"]) < 1e-5
    p = torch.from_numpy(gfx["gen_unit_adain_params"])
    assert rel_err(AdaptiveInstanceNorm2d(4)(x, p[:, 4:], p[:, :4]), gfx["gen_unit_adain_out"]) < 1e-5
    assert rel_err(InstanceNorm2dSafe(4)(x), gfx["gen_unit_instnorm_out"]) < 1e-5


def test_encode_decode_reuse_and_reentrancy(gen, gen_out):
    (_, image, _), enc = gen_out
    z = input_z()
    with torch.no_grad():
        # decode with another style in between: no per-call state leaks from one call into the next
        other = gen.decode(enc, torch.randn(2, 10))
        again = gen.decode(enc, z)
        # samples are independent: decoding each sample alone gives the batch result
        single = gen.decode(enc[1:], z[1:])
    assert torch.equal(again, image)
    assert not torch.allclose(other, image)
    assert rel_err(single, image[1:].numpy()) < 1e-5
    for mod in gen.modules():
        extra = [k for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]
        assert not extra, (type(mod).__name__, extra)


def test_generator_bf16_autocast_tolerance(gen, gen_out):
    (_, ref, _), _ = gen_out
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        image = gen(input_x(), input_z())[1]
    d = (image.float() - ref).abs()
    assert d.max().item() < BF16_MAX_ABS and d.mean().item() < BF16_MEAN_ABS, (d.max().item(), d.mean().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generator_fp16_autocast_cuda(gen, gen_out):
    (_, ref, _), _ = gen_out
    g = Generator().cuda().eval()
    g.load_state_dict(gen.state_dict())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        image = g(input_x().cuda(), input_z().cuda())[1].float().cpu()
    d = (image - ref).abs()
    assert d.max().item() < BF16_MAX_ABS and d.mean().item() < BF16_MEAN_ABS, (d.max().item(), d.mean().item())


# ---- discriminator ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def disc():
    d = MultiDiscriminator()
    assert layout(d) == manifest_layout("discriminator")
    sd = rule_state_dict(d)
    check_digests(sd, "discriminator")
    d.load_state_dict(sd, strict=True)
    return d


def test_discriminator_fixtures(disc):
    dfx = fixture("discriminator")
    with torch.no_grad():
        out = disc(input_x128())
        for i in range(3):
            assert rel_err(out[i], dfx[f"disc128_out{i}"]) < 1e-4
        out = disc(input_x())
        assert rel_err(disc.downsample(input_x()), dfx["disc112_down1"]) < 1e-4
        assert rel_err(out[0], dfx["disc112_out0"]) < 1e-4
        assert rel_err(out[1], dfx["disc112_out1"]) < 1e-4
        # 1x1 third scale: normalised to exactly 0, so the output is the last conv bias (the legacy value)
        assert rel_err(out[2], dfx["disc112_out2_legacy"]) < 1e-3
        assert torch.equal(out[2].flatten(), disc.models.disc_2[11].bias.expand(2))


def test_discriminator_trains_at_112():
    torch.manual_seed(0)
    d = MultiDiscriminator().train()
    x = torch.randn(2, 3, 112, 112, requires_grad=True)
    loss = lsgan_loss(d(x), 1.0)  # the stage-1 objective (cfsm.stage1)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in d.named_parameters():
        if name.startswith("models.disc_2.") and name != "models.disc_2.11.bias":
            # the 1x1 scale is normalised to a constant: only its final bias learns (legacy behaviour)
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any(), name
    assert x.grad.abs().sum() > 0


# ---- load_generator --------------------------------------------------------------------------------------------
def test_load_generator_released_format(tmp_path, gen, gen_out):
    path = tmp_path / "WiderFace70K.pth"
    d = MultiDiscriminator()
    torch.save({"G_state_dict": gen.state_dict(), "D_state_dict": d.state_dict(),
                "optimizerG_state_dict": {}, "optimizerD_state_dict": {}}, path)
    g = load_generator(path)
    assert not g.training and not any(p.requires_grad for p in g.parameters())
    with torch.no_grad():
        assert torch.equal(g(input_x(), input_z())[1], gen_out[0][1])
    torch.save(gen.state_dict(), tmp_path / "bare.pth")  # bare state dicts are accepted too
    assert load_generator(tmp_path / "bare.pth").style_dim == 10


def test_load_generator_infers_dimensions(tmp_path):
    small = Generator(dim=16, n_residual=2, n_downsample=1, latent_dim=32, style_dim=4, mlp_dim=64)
    torch.save({"G_state_dict": small.state_dict()}, tmp_path / "small.pth")
    g = load_generator(tmp_path / "small.pth")
    assert g.config == small.config
    with torch.no_grad():
        assert g(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4))[1].shape == (1, 3, 32, 32)


def test_load_generator_errors(tmp_path, gen):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*train_generator\.py.*README"):
        load_generator(tmp_path / "nope.pth")
    torch.save({"state_dict": {}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(KeyError, match=r"G_state_dict.*'epoch', 'state_dict'"):
        load_generator(tmp_path / "other.pth")
    sd = dict(gen.state_dict())
    sd["decoder.model.4.bias"] = torch.zeros(100)
    torch.save({"G_state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"decoder\.model\.4\.bias.*\[100\].*\[128\]"):
        load_generator(tmp_path / "bad.pth")
    sd = dict(gen.state_dict())
    del sd["decoder.model.0.block.2.running_mean"]
    with pytest.raises(KeyError, match="running_mean"):
        generator_from_state_dict(sd)
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_generator(tmp_path / "garbage.pth")
