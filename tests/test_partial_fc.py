"""PartialFC: fixture equality, equivalence with F.cross_entropy, a real 2-process gloo run equal to 1 rank,
class-sample reuse, and per-rank checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from losses import AdaFace, ArcFace, CombinedMarginLoss, CosFace
from partial_fc import DistCrossEntropy, PartialFC
from tests._rule_weights import fixture, rel_err
from tests.helpers import spawn_ranks
from utils.distributed import shard_range

MARGINS = {
    "cfsm_arcface": lambda: ArcFace(64.0, 0.5),
    "cfsm_cosface": lambda: CosFace(64.0, 0.4),
    "if_combined_arc": lambda: CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0),
    "if_combined_cos": lambda: CombinedMarginLoss(64, 1.0, 0.0, 0.4, 0),
}


@pytest.fixture(scope="module")
def fx():
    out = fixture("partial_fc")
    out["in_labels"] = fixture("margin_losses")["in_labels"]
    out["in_cos"] = fixture("margin_losses")["in_cos"]
    return out


def _shard(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s rows of a full [C, D] matrix under the class split."""
    start, n = shard_range(full.shape[0], rank, world)
    return full[start:start + n].clone()


def test_shard_range():
    assert [shard_range(11, r, 3) for r in range(3)] == [(0, 4), (4, 4), (8, 3)]
    assert sum(shard_range(93431, r, 8)[1] for r in range(8)) == 93431


@pytest.mark.parametrize("labels", ["valid", "spec"])
def test_dist_cross_entropy_fixture(labels, fx):
    y = torch.from_numpy(fx["in_labels_valid"] if labels == "valid" else fx["in_labels"])
    for g in (1.0, 2.5):
        logits = (torch.from_numpy(fx["in_cos"]) * 10.0).requires_grad_()
        loss = DistCrossEntropy.apply(logits, y, 1)
        (loss * g).backward()
        assert rel_err(loss, fx[f"distce_cfsm_{labels}_loss"]) < 1e-5
        key = f"distce_cfsm_{labels}_grad" + ("_x2.5" if g != 1.0 else "")
        assert rel_err(logits.grad, fx[key]) < 1e-5


@pytest.mark.parametrize("tag", list(MARGINS))
@pytest.mark.parametrize("labels", ["valid", "spec"])
def test_pipeline_fixture(tag, labels, fx):
    pfc = PartialFC(MARGINS[tag](), 512, 20, rank=0, world_size=1)
    pfc.weight.data.copy_(torch.from_numpy(fx["in_pfc_weight"]))
    emb = torch.from_numpy(fx["in_pfc_embeddings"]).clone().requires_grad_()
    y = torch.from_numpy(fx["in_labels_valid"] if labels == "valid" else fx["in_labels"])
    y_before = y.clone()
    loss = pfc(emb, y[:, None])  # (N, 1) labels are accepted and not squeezed in place
    assert y.shape == y_before.shape
    assert rel_err(loss, fx[f"pfc_{tag}_{labels}_loss"]) < 1e-5
    if labels == "valid":
        loss.backward()
        assert rel_err(emb.grad, fx[f"pfc_{tag}_valid_grad_embeddings"]) < 1e-5
        assert rel_err(pfc.weight.grad, fx[f"pfc_{tag}_valid_grad_weight"]) < 1e-5


@pytest.mark.parametrize("tag", list(MARGINS))
def test_equals_plain_cross_entropy(tag):
    """(a) sample_rate 1, 1 rank: loss and gradients equal F.cross_entropy on the margin logits."""
    torch.manual_seed(0)
    pfc = PartialFC(MARGINS[tag](), 32, 13, rank=0, world_size=1)
    emb = torch.randn(10, 32, requires_grad=True)
    y = torch.randint(0, 13, (10,))
    loss = pfc(emb, y)
    loss.backward()
    g_emb, g_w = emb.grad.clone(), pfc.weight.grad.clone()
    emb.grad = None
    w = pfc.weight.detach().clone().requires_grad_()
    logits = F.linear(F.normalize(emb), F.normalize(w)).clamp(-1, 1)
    ref = F.cross_entropy(MARGINS[tag]()(logits, y), y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_emb, emb.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_w, w.grad, rtol=1e-5, atol=1e-7)


def test_adaface_gets_norms_and_update_stats_flag():
    pfc = PartialFC(AdaFace(), 16, 7, rank=0, world_size=1)
    emb, y = torch.randn(6, 16) * 10, torch.randint(0, 7, (6,))
    before = pfc.margin_softmax.batch_mean.clone()
    pfc(emb, y, update_stats=False)
    assert torch.equal(pfc.margin_softmax.batch_mean, before)
    pfc(emb, y)
    assert not torch.equal(pfc.margin_softmax.batch_mean, before)
    # CFSM file keys (AdaFace buffers + weight) plus our shard metadata
    assert set(pfc.state_dict()) == {"weight", "margin_softmax.t", "margin_softmax.batch_mean",
                                     "margin_softmax.batch_std", "_extra_state"}


# ---- 2-process gloo run ----------------------------------------------------------------------------------------
N_GLOBAL, DIM, CLASSES, WORLD = 8, 16, 11, 2


def _problem():
    g = torch.Generator().manual_seed(123)
    emb = torch.randn(N_GLOBAL, DIM, generator=g) * 5
    labels = torch.randint(0, CLASSES, (N_GLOBAL,), generator=g)
    weight = torch.randn(CLASSES, DIM, generator=g) * 0.01
    return emb, labels, weight


def _margins():
    return {"arcface": lambda: ArcFace(), "adaface": lambda: AdaFace(), "combined": lambda: CombinedMarginLoss(
        64, 1.0, 0.5, 0.0)}


def _run(rank, world, emb, labels, weight, margin, compensate=False, sample_rate=1.0):
    pfc = PartialFC(_margins()[margin](), DIM, CLASSES, sample_rate=sample_rate, rank=rank, world_size=world,
                    ddp_grad_compensation=compensate)
    pfc.weight.data.copy_(_shard(weight, rank, world))
    n = N_GLOBAL // world
    e = emb[rank * n:(rank + 1) * n].clone().requires_grad_()
    y = labels[rank * n:(rank + 1) * n]
    sample = pfc.sample_negatives(y)
    loss = pfc(e, y, class_sample=sample)
    loss2 = pfc(e, y, class_sample=sample, update_stats=False)  # same negatives, same loss
    loss.backward()
    out = {"loss": loss.detach(), "loss2": loss2.detach(), "g_emb": e.grad, "g_w": pfc.weight.grad,
           "sd": pfc.state_dict()}
    if sample is not None:
        out["index"] = sample.index
    return out


def _worker(rank, world):
    emb, labels, weight = _problem()
    res = {}
    for margin in _margins():
        res[margin] = _run(rank, world, emb, labels, weight, margin)
    res["compensated"] = _run(rank, world, emb, labels, weight, "arcface", compensate=True)
    res["sampled"] = _run(rank, world, emb, labels, weight, "arcface", sample_rate=0.5)
    # a PartialFC built without rank/world takes them from the process group
    res["auto"] = (PartialFC(ArcFace(), DIM, CLASSES).rank, PartialFC(ArcFace(), DIM, CLASSES).world_size)
    return res


@pytest.mark.slow
def test_two_process_gloo_equals_one_rank(tmp_path):
    """(b) 2 gloo ranks on the global batch == 1 rank: same loss on both ranks, weight-shard gradients are the
    1-rank rows, embedding gradients are the 1-rank rows (×W with ddp_grad_compensation)."""
    res = spawn_ranks(_worker, tmp_path, WORLD, world=WORLD)
    emb, labels, weight = _problem()
    n = N_GLOBAL // WORLD
    for margin in list(_margins()) + ["compensated"]:
        ref = _run(0, 1, emb, labels, weight, "arcface" if margin == "compensated" else margin)
        scale = WORLD if margin == "compensated" else 1
        for r in range(WORLD):
            got = res[r][margin]
            start, num = shard_range(CLASSES, r, WORLD)
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["loss2"], ref["loss"], rtol=1e-6, atol=1e-6)
            # float tolerance, README metric: the sums over ranks run in another order
            assert rel_err(got["g_w"], ref["g_w"][start:start + num].numpy()) < 1e-5
            assert rel_err(got["g_emb"], (ref["g_emb"][r * n:(r + 1) * n] * scale).numpy()) < 1e-5
            if margin == "adaface":  # EMA from the all-gathered norms: identical on every rank and to 1 rank
                for k in ("margin_softmax.batch_mean", "margin_softmax.batch_std"):
                    torch.testing.assert_close(got["sd"][k], ref["sd"][k])
    for r in range(WORLD):
        s = res[r]["sampled"]
        start, num = shard_range(CLASSES, r, WORLD)
        pos = {int(c) - start for c in labels if start <= int(c) < start + num}
        assert pos <= set(s["index"].tolist())  # every positive of the global batch kept
        assert len(s["index"]) == max(len(pos), int(0.5 * num))
        torch.testing.assert_close(s["loss"], s["loss2"])
        assert s["sd"]["_extra_state"]["world_size"] == WORLD and s["sd"]["_extra_state"]["rank"] == r
        assert res[r]["auto"] == (r, WORLD)
    torch.testing.assert_close(res[0]["sampled"]["loss"], res[1]["sampled"]["loss"])


def test_class_sample_reuse_and_subset():
    """(c) one sample per step: two forwards (e.g. the attack on a sub-batch and the update) use the same centres;
    the draw is deterministic in (seed, rank, step)."""
    torch.manual_seed(0)
    pfc = PartialFC(ArcFace(), 16, 50, sample_rate=0.2, rank=0, world_size=1)
    emb, y = torch.randn(6, 16), torch.tensor([1, 5, 5, 30, 44, 2])
    s = pfc.sample_negatives(y)
    assert len(s.index) == 10 and set(y.tolist()) <= set(s.index.tolist())
    full1 = pfc(emb, y, class_sample=s)
    sub = pfc(emb[3:], y[3:], class_sample=s)  # a sub-batch scores against the same centres
    full2 = pfc(emb, y, class_sample=s)
    assert torch.equal(full1, full2)
    assert pfc.sample_step == 1  # forwards with a given sample draw nothing
    # equals scoring against exactly those centres with remapped labels
    ref_pfc = PartialFC(ArcFace(), 16, 10, rank=0, world_size=1)
    ref_pfc.weight.data.copy_(pfc.weight.data[s.index])
    remap = {int(c): i for i, c in enumerate(s.index)}
    torch.testing.assert_close(sub, ref_pfc(emb[3:], torch.tensor([remap[int(c)] for c in y[3:]])))
    # labels outside the sample are an error, not a silent mismatch
    with pytest.raises(ValueError, match="class_sample"):
        pfc(emb[:1], torch.tensor([next(c for c in range(50) if c not in remap)]), class_sample=s)
    # deterministic redraw for the same step counter (what resume restores)
    other = PartialFC(ArcFace(), 16, 50, sample_rate=0.2, rank=0, world_size=1)
    assert torch.equal(other.sample_negatives(y).index, s.index)
    assert not torch.equal(pfc.sample_negatives(y).index, s.index)  # next step, new negatives
    assert PartialFC(ArcFace(), 16, 50).sample_negatives(y) is None


def test_state_dict_per_rank_and_mismatch(tmp_path):
    """(d) save/load per rank; loading another shard layout raises a clear error."""
    a = PartialFC(AdaFace(), 8, 11, sample_rate=0.5, rank=1, world_size=2)
    a.sample_step = 1  # as after one sample_negatives call (which needs a process group at world_size 2)
    path = tmp_path / "softmax_fc_gpu_1.pt"
    torch.save(a.state_dict(), path)
    b = PartialFC(AdaFace(), 8, 11, sample_rate=0.5, rank=1, world_size=2)
    b.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(a.weight, b.weight) and b.sample_step == 1
    with pytest.raises(ValueError, match=r"shape \[5, 8\].*\[4, 8\]"):
        PartialFC(AdaFace(), 8, 11, rank=1, world_size=3).load_state_dict(torch.load(path, weights_only=True))
    with pytest.raises(ValueError, match="world_size=2.*world_size=4"):
        PartialFC(AdaFace(), 8, 10, rank=1, world_size=4).load_state_dict(
            {**torch.load(path, weights_only=True), "weight": torch.zeros(3, 8)}, strict=False)
    # a reference file (just {'weight'}) still loads
    c = PartialFC(ArcFace(), 8, 11, rank=0, world_size=1)
    c.load_state_dict({"weight": torch.ones(11, 8)})
    assert torch.equal(c.weight.data, torch.ones(11, 8))
