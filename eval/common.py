"""Shared pieces of the evaluation CLIs: model loading, face alignment, batched flip embedding, CLI arguments.

Preprocessing follows ``docs/eval_protocols.md`` §1: a least-squares similarity (scikit-image, Umeyama) from the
five landmarks to the 112x112 ArcFace template, ``cv2.warpAffine`` with bilinear interpolation and a black border,
then ``(x / 255 - 0.5) / 0.5``. The mirror image is the horizontal flip of the aligned crop.

Channel order: InsightFace / CFSM / arcface_torch models are trained on RGB; AdaFace-family files (AdaFace's IR
layout, its ``.ckpt`` files, CVLFace files whose ``color_space`` is BGR) are fed BGR without a flag, and a
``train.py`` run in the order its ``summary.json`` records (``channel_order``; :meth:`BackboneChoice.channels`).
``--bgr`` / ``--rgb`` say it where the file does not; against the file they are an error.

Network: ``--network auto`` (the default) takes it from the run's ``summary.json`` beside a ``model.pt``, else
detects it from the file's keys and shapes (``backbones/detect.py``; ``docs/evaluation.md``).
Embedding size: taken from the model file (the length of its last BatchNorm's ``running_var``) unless
``--embedding-size`` is given; every buffer uses the real size, so 128-d or 1024-d models work (the reference
hard-codes 1024 = 2 x 512 columns).

N processes (``torchrun --nproc_per_node=N -m eval.<cmd> ...``, ``docs/evaluation.md``): :func:`eval_ranks` sets
up the process group from the launcher's environment; :func:`embed_dataset` / :func:`embed_sharded` give each rank
whole batches (round robin, none dropped, none padded), carry every row's index, gather to rank 0 and check that
every index arrives exactly once. Each batch holds the same images as in one process, so the embeddings (and every
metric) equal the single-process ones. Rank 0 computes and writes; the other ranks return None and exit 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from dataset import seed_worker
from utils.checkpoint import write_json as _write_json
from utils.cli import UsageError, positive_int, resolve_device
from utils.distributed import DistEnv, agree_call, cleanup, init_distributed
from utils.errors import UserError
from utils.precision import low_precision_dtype  # resolve_device re-exported: one meaning of --device

if TYPE_CHECKING:
    from utils.model_file import ModelFile

IMAGE_SIZE = 112

# ArcFace 112x112 template (left eye, right eye, nose tip, left / right mouth corner), x already shifted by +8.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


class EvalInputError(UserError, ValueError):
    """A benchmark file or image is missing or malformed; the message names it."""


# ----------------------------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------------------------
def landmarks_68_to_5(lmk68: np.ndarray) -> np.ndarray:
    """68-point landmarks -> the 5 template points: eye centres (36,39) and (42,45), nose 30, mouth corners 48, 54."""
    p = np.asarray(lmk68, dtype=np.float64).reshape(68, 2)
    return np.stack(
        [(p[36] + p[39]) / 2, (p[42] + p[45]) / 2, p[30], p[48], p[54]]
    ).astype(np.float32)


def similarity_matrix(lmk5: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """2x3 matrix of the least-squares similarity mapping ``lmk5`` onto the template (scaled by ``image_size/112``)."""
    from skimage.transform import SimilarityTransform

    src = np.asarray(lmk5, dtype=np.float64).reshape(5, 2)
    dst = ARCFACE_TEMPLATE.astype(np.float64) * (image_size / IMAGE_SIZE)
    if not np.all(np.isfinite(src)):
        raise EvalInputError(f"landmarks contain NaN/inf: {src.tolist()}")
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26; same result as .estimate
        tf = SimilarityTransform.from_estimate(src, dst)
        if not tf:
            raise EvalInputError(f"similarity estimation failed for landmarks {src.tolist()}")
    else:  # pragma: no cover - older scikit-image
        tf = SimilarityTransform()
        if not tf.estimate(src, dst):
            raise EvalInputError(f"similarity estimation failed for landmarks {src.tolist()}")
    return tf.params[0:2, :]


def align_face(img: np.ndarray, lmk5: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Warp ``img`` (HxWxC) so that ``lmk5`` lands on the ArcFace template: an ``image_size`` square crop."""
    m = similarity_matrix(lmk5, image_size)
    return cv2.warpAffine(img, m, (image_size, image_size), borderValue=0.0)


def read_image_bgr(path: str | os.PathLike) -> np.ndarray:
    """cv2.imread in colour (BGR); raises EvalInputError naming the file when it is missing or undecodable."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        reason = "does not exist" if not Path(path).exists() else "cannot be decoded"
        raise EvalInputError(f"image {path} {reason}")
    return img


class FaceImages(torch.utils.data.Dataset):
    """Images by path, optionally aligned from 5 landmarks; items are uint8 [3, S, S] tensors (RGB unless ``bgr``).

    Without landmarks the images must already be aligned ``image_size`` squares (an error names any other size:
    resizing a non-aligned crop would give a silently wrong feature).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        landmarks: np.ndarray | None = None,
        bgr: bool = False,
        image_size: int = IMAGE_SIZE,
        unaligned_hint: str = "",
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.unaligned_hint = unaligned_hint  # appended to the wrong-size error: a command's way to align (--align)
        if landmarks is not None:
            landmarks = np.asarray(landmarks, dtype=np.float32).reshape(len(self.paths), 5, 2)
        self.landmarks = landmarks
        self.bgr = bgr
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = read_image_bgr(self.paths[i])
        if self.landmarks is not None:
            try:
                img = align_face(img, self.landmarks[i], self.image_size)
            except EvalInputError as e:  # the landmarks alone do not tell the user which image it was
                raise EvalInputError(f"image {self.paths[i]}: {e}") from None
        elif img.shape[:2] != (self.image_size, self.image_size):
            raise EvalInputError(
                f"image {self.paths[i]} is {img.shape[1]}x{img.shape[0]}, expected an aligned "
                f"{self.image_size}x{self.image_size} face{self.unaligned_hint}"
            )
        if not self.bgr:
            img = img[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------------------
def infer_embedding_size(state: dict[str, torch.Tensor]) -> int | None:
    """Embedding size of a backbone state dict: the length of its last BatchNorm ``running_var`` (the feature BN of
    IResNet / MobileFaceNet), or None when there is none."""
    from backbones.detect import embedding_size_of

    return embedding_size_of(state)


AUTO_NETWORK = "auto"


@dataclass(frozen=True)
class BackboneChoice:
    """The network a model file is loaded as, and where that came from (``--network``, the run's summary.json, or
    its keys and shapes); the channel order its weights expect and whether the file tells it (``channel_told``: an
    explicit ``--bgr`` / ``--rgb`` against it is an error) or it is only the convention of its family (RGB for
    InsightFace / CFSM layouts: ``--bgr`` may say otherwise); what the file was and what was done to reach the
    backbone (``file_kind``, ``notes``)."""

    network: str
    embedding_size: int
    source: str
    channel_order: str = "rgb"
    channel_told: bool = False
    channel_reason: str = "the InsightFace / CFSM convention"
    file_kind: str = "state dict"
    notes: tuple[str, ...] = ()

    def line(self, model_path: str | os.PathLike, bgr: bool | None = None) -> str:
        """The one line every command prints about its model: network, source, embedding size and the channel order
        fed (``bgr``: what :meth:`channels` resolved; a flag that chose another order than the file's says so)."""
        from backbones import BACKBONES

        family = BACKBONES[self.network].family if self.network in BACKBONES else "?"
        source = {"--network": "as --network says", "its keys and shapes": "detected from its keys and shapes"}.get(
            self.source, f"from {self.source}")
        what = self.file_kind + (f": {'; '.join(self.notes)}" if self.notes else "")
        order, reason = self.channel_order, self.channel_reason
        if bgr is not None and bgr != (order == "bgr"):
            order, reason = ("bgr", "--bgr") if bgr else ("rgb", "--rgb")
        return (f"model: {model_path}: {self.network} ({family} layout, {source}; {what}), {self.embedding_size}-d "
                f"embeddings, {order.upper()} input ({reason})")

    def channels(self, bgr: bool = False, rgb: bool = False, model_path: str | os.PathLike = "the model") -> bool:
        """True to feed BGR: the file's order unless the user's ``--bgr`` / ``--rgb`` says otherwise; a flag that
        contradicts what the file tells is an error (not a silent override)."""
        if bgr and rgb:
            raise UsageError("--bgr and --rgb contradict each other; give at most one (default: the file's order)")
        wanted = "bgr" if bgr else "rgb" if rgb else None
        if wanted and wanted != self.channel_order and self.channel_told:
            raise UsageError(f"--{wanted} contradicts {model_path}: it expects {self.channel_order.upper()} input "
                             f"({self.channel_reason}); leave --{wanted} out (the channel order is read from the "
                             f"file)")
        return (wanted or self.channel_order) == "bgr"


def run_files_network(model_path: str | os.PathLike) -> tuple[str, int | None, Path] | None:
    """(network, embedding_size, summary path) from the ``summary.json`` that ``train.py`` writes beside the run's
    ``model.pt`` (its ``config``); None for another file name, no summary, or a summary without a known network."""
    from backbones import BACKBONE_NAMES

    path = Path(model_path)
    summary = path.parent / "summary.json"
    if path.name != "model.pt" or not summary.is_file():
        return None
    try:
        config = json.loads(summary.read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return None  # not ours / unreadable: the file's own keys decide
    network, size = config.get("network"), config.get("embedding_size")
    if not isinstance(network, str) or network not in BACKBONE_NAMES:
        return None
    return network, size if isinstance(size, int) and size > 0 else None, summary


def choose_backbone(model_path: str | os.PathLike, state: dict[str, torch.Tensor], network: str = AUTO_NETWORK,
                    embedding_size: int | None = None, model_file: "ModelFile | None" = None) -> BackboneChoice:
    """The network, embedding size and channel order to use for ``state`` (read from ``model_path``).

    ``network`` other than "auto" is used as given. "auto": the run's ``summary.json`` beside a ``model.pt``, else
    the one registered network whose layout the file has (:mod:`backbones.detect`); none or several is an error
    naming what the file holds. The embedding size: ``embedding_size``, else the file's last BatchNorm, else the
    summary's, else 512. The channel order: the file's own metadata (CVLFace's ``color_space``), else what a
    ``train.py`` run records (its ``summary.json`` / checkpoint marker: ``channel_order``; RGB for a run from before
    that key), else the network family's (``backbones.BackboneSpec.channel_order``: BGR for AdaFace's IR layout,
    which the file's keys prove; RGB by convention otherwise)."""
    from backbones import BACKBONE_NAMES, BACKBONES
    from backbones.detect import detect_network
    from utils.checkpoint import CheckpointError
    from utils.model_file import told_channel_order

    size = embedding_size or infer_embedding_size(state)
    kind, notes = (model_file.kind, model_file.notes) if model_file is not None else ("state dict", ())
    if network != AUTO_NETWORK:
        picked, source, size = network, "--network", size or 512
    elif (run := run_files_network(model_path)) is not None:
        picked, source, size = run[0], str(run[2]), size or run[1] or 512
    else:
        found = detect_network(state)
        if found.network is None:
            raise CheckpointError(f"{model_path}: cannot tell its architecture from its keys and shapes: it holds "
                                  f"{found.describe()}; pass --network (one of {', '.join(BACKBONE_NAMES)})")
        picked, source, size = found.network, "its keys and shapes", size or found.embedding_size or 512
    spec = BACKBONES.get(picked)
    if model_file is not None and model_file.channel_order is not None:
        order, told, reason = model_file.channel_order, True, f"color_space in {model_file.channel_source}"
    elif (said := told_channel_order(model_path)) is not None:  # a train.py run says what it fed its backbone
        order, told, reason = said[0], True, said[1]
    elif spec is not None and spec.channel_order != "rgb":
        order, told = spec.channel_order, True
        reason = f"{spec.family} networks are trained on {order.upper()}"
    else:
        order, told, reason = "rgb", False, "the InsightFace / CFSM convention; --bgr for a BGR-trained one"
    return BackboneChoice(picked, size, source, order, told, reason, kind, notes)


def load_backbone_choice(
    model_path: str | os.PathLike,
    network: str = AUTO_NETWORK,
    embedding_size: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, BackboneChoice]:
    """:func:`load_backbone` that also returns the :class:`BackboneChoice` it built."""
    from backbones import get_model
    from backbones.detect import detect_network
    from utils.checkpoint import CheckpointError, load_state_dict_strict
    from utils.model_file import read_model_file
    from utils.run.run_state import first_nonfinite

    found_file = read_model_file(model_path)
    state = found_file.state
    bad = first_nonfinite(state)
    if bad is not None:
        raise EvalInputError(f"{model_path}: weight '{bad}' holds NaN/Inf: a non-finite model cannot be evaluated "
                             f"(its scores would be meaningless); use the run's last finite checkpoint")
    choice = choose_backbone(model_path, state, network, embedding_size, found_file)
    model = get_model(choice.network, num_features=choice.embedding_size)
    try:
        load_state_dict_strict(model, state, source=str(model_path))
    except CheckpointError as e:  # say what the file holds and how to load it
        found = detect_network(state)
        fix = f"use --network {found.network}" if found.network else "pass the --network it was trained with"
        if found.network and embedding_size and found.embedding_size != embedding_size:
            fix += f" --embedding-size {found.embedding_size} (or leave it out)"
        if choice.source == "--network" and found.network:
            fix += " or leave --network out (auto reads it from the file)"
        said = f"{choice.source} says network={choice.network}, embedding size {choice.embedding_size}"
        raise CheckpointError(f"{e} {said}, but the file holds {found.describe()}: {fix}") from None
    model.source_file = str(model_path)  # named when its embeddings turn out non-finite (embed_batches)
    return model.to(device).eval(), choice


def load_rgb_backbone(
    model_path: str | os.PathLike,
    network: str = AUTO_NETWORK,
    embedding_size: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, BackboneChoice]:
    """:func:`load_backbone_choice` for callers that hold RGB images ([-1, 1] tensors: the toy .bin pairs, a
    generator's output): the network flips them to the channel order it was trained on (an AdaFace or BGR-trained
    ``ir_*`` run sees BGR, as in training)."""
    from backbones import feed_in_order

    model, choice = load_backbone_choice(model_path, network, embedding_size, device)
    feed_in_order(model, choice.channel_order)
    return model, choice


def load_backbone(
    model_path: str | os.PathLike,
    network: str = AUTO_NETWORK,
    embedding_size: int | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build ``backbones.get_model(network, num_features=...)`` and strictly load a plain state dict into it.

    ``network="auto"`` (the CLIs' default): the run's ``summary.json`` beside ``model.pt``, else detected from the
    file's keys and shapes (:func:`choose_backbone`). The file is read without executing anything from it
    (``utils.model_file``: plain state dicts, arcface_torch / train.py checkpoints, Lightning and AdaFace ``.ckpt``,
    CVLFace ``.safetensors``; ``module.`` / ``model.`` / ``net.`` prefixes stripped, a training head dropped). A file
    of another architecture raises an error that names the first mismatching key and what the file holds. Returns
    the model in eval mode on ``device``.
    """
    return load_backbone_choice(model_path, network, embedding_size, device)[0]


# ----------------------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def embed_batches(
    backbone: nn.Module,
    batches: Iterable[torch.Tensor],
    total: int,
    device: torch.device,
    flip: bool = True,
    amp: bool | None = None,
    progress: bool = False,
    desc: str = "embed",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``backbone`` over uint8 [B, 3, H, W] batches; returns raw float32 embeddings ``(orig, flipped or None)``.

    Normalisation is ``(x / 255 - 0.5) / 0.5``; the mirror is a flip along W, and both go through one forward of size
    2B (identical in eval mode, half the launches). ``amp`` (default: on for CUDA) runs under float16 autocast.
    The caller sets eval mode.
    """
    from tqdm import tqdm

    use_amp = (device.type == "cuda") if amp is None else (amp and device.type == "cuda")
    orig: np.ndarray | None = None
    flipped: np.ndarray | None = None
    pos = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="img", dynamic_ncols=True)
    for batch in batches:
        x = batch.to(device, non_blocking=True).float().div_(255.0).sub_(0.5).div_(0.5)
        b = x.shape[0]
        if flip:
            x = torch.cat([x, torch.flip(x, dims=[3])], dim=0)
        with torch.autocast(device_type=device.type, dtype=low_precision_dtype(device.type), enabled=use_amp):
            emb = backbone(x)
        if isinstance(emb, (tuple, list)):  # models returning (embedding, norm) -- use the embedding
            emb = emb[0]
        emb = emb.float().cpu().numpy()
        if orig is None:
            orig = np.empty((total, emb.shape[1]), dtype=np.float32)
            flipped = np.empty((total, emb.shape[1]), dtype=np.float32) if flip else None
        if pos + b > total:
            raise EvalInputError(f"got more than the announced {total} images")
        orig[pos : pos + b] = emb[:b]
        if flip:
            flipped[pos : pos + b] = emb[b:]
        pos += b
        bar.update(b)
    bar.close()
    if pos != total or orig is None:
        raise EvalInputError(f"embedded {pos} images, expected {total}")
    require_finite_embeddings(orig if flipped is None else np.concatenate([orig, flipped]),
                              getattr(backbone, "source_file", "the model"))
    return orig, flipped


def require_finite_embeddings(embeddings: np.ndarray, source: str) -> None:
    """Refuse NaN/Inf embeddings: every metric would turn them into a meaningless (often perfect) score."""
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        raise EvalInputError(f"{source}: {int(bad.sum())} of {len(bad)} embeddings hold NaN/Inf (weights that "
                             f"overflow or are not finite): refusing to score them; use a finite model")


def launched_by_torchrun() -> bool:
    """True when a launcher started this process (it set WORLD_SIZE > 1 or a torchrun run id)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def single_process_env(device: torch.device) -> DistEnv:
    return DistEnv(rank=0, local_rank=0, world_size=1, device=device, backend=None)


@contextlib.contextmanager
def eval_ranks(device: str | None = "auto") -> Iterator[DistEnv]:
    """The process environment of an eval command: one process, or one rank of ``torchrun --nproc_per_node=N``
    (backend from the machine: NCCL with CUDA, else gloo; rank r uses ``cuda:<LOCAL_RANK>``). ``device`` is the
    ``--device`` value; under a launcher ``cuda:N`` means CUDA, each rank on its own local device. The process
    group is closed when the block ends."""
    if not launched_by_torchrun():
        yield single_process_env(resolve_device(device))
        return
    name = device or "auto"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu or auto")
    if name not in ("auto", "cpu") and not name.startswith("cuda"):
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    env = init_distributed("cuda" if name.startswith("cuda") else name)
    try:
        yield env
    finally:
        cleanup(env)


def shard_batches(total: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """This rank's batches of ``range(total)``: the single-process batches dealt round robin (batch b to rank
    b % world_size), so no index is dropped or repeated and each batch holds what it holds in one process. The
    ranks' shares differ by at most one batch (the uneven last shard)."""
    batches = [range(s, e) for s, e in iter_chunks(total, batch_size)]
    return batches[rank::world_size]


def gather_rows(env: DistEnv, indices: np.ndarray, rows: np.ndarray, total: int,
                chunk_rows: int = 16384) -> np.ndarray | None:
    """Rows [n, D] of ``indices`` from every rank, assembled on rank 0 in index order (others: None).

    The ranks agree on the width and the longest shard, pad to it (index -1 marks padding) and ``dist.gather``
    ``chunk_rows`` at a time (bounded memory on the device). Rank 0 de-duplicates by index and checks that every
    index of ``range(total)`` arrived exactly once (a missing one is an error naming how many)."""
    import torch.distributed as dist

    sizes = torch.tensor([len(indices), rows.shape[1] if rows.ndim == 2 and len(indices) else 0],
                         dtype=torch.int64, device=env.device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    longest, width = (int(v) for v in sizes.tolist())
    idx_parts: list[np.ndarray] = []
    row_parts: list[np.ndarray] = []
    for start in range(0, max(longest, 1), chunk_rows):
        stop = min(longest, start + chunk_rows)
        n = max(stop - start, 0)
        idx = torch.full((n,), -1, dtype=torch.int64)
        val = torch.zeros((n, width), dtype=torch.float32)
        mine = slice(start, min(stop, len(indices)))
        k = max(mine.stop - mine.start, 0)
        if k:
            idx[:k] = torch.from_numpy(np.ascontiguousarray(indices[mine], dtype=np.int64))
            val[:k] = torch.from_numpy(np.ascontiguousarray(rows[mine], dtype=np.float32))
        idx, val = idx.to(env.device), val.to(env.device)
        idx_list = [torch.empty_like(idx) for _ in range(env.world_size)] if env.is_main else None
        val_list = [torch.empty_like(val) for _ in range(env.world_size)] if env.is_main else None
        dist.gather(idx, idx_list, dst=0)
        dist.gather(val, val_list, dst=0)
        if env.is_main:
            idx_parts += [t.cpu().numpy() for t in idx_list]
            row_parts += [t.cpu().numpy() for t in val_list]
    if not env.is_main:
        return None
    all_idx = np.concatenate(idx_parts)
    all_rows = np.concatenate(row_parts).reshape(-1, width)
    real = all_idx >= 0
    all_idx, all_rows = all_idx[real], all_rows[real]
    unique, first = np.unique(all_idx, return_index=True)  # de-duplicate: the first copy of an index wins
    if unique.size != total or (total and (unique[0] != 0 or unique[-1] != total - 1)):
        raise RuntimeError(f"gathered {unique.size} distinct rows of {total} from {env.world_size} ranks "
                           f"(indices {unique[:3].tolist()}...): the ranks' shards do not cover the data")
    out = np.empty((total, width), dtype=np.float32)
    out[unique] = all_rows[first]
    return out


def embed_sharded(
    embed_part: Callable[[list[range]], tuple[np.ndarray, np.ndarray | None]],
    total: int,
    batch_size: int,
    env: DistEnv | None,
    flip: bool,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The one split of the eval commands: ``embed_part(batches)`` embeds the given index batches on this rank;
    with a process group each rank takes :func:`shard_batches`, the rows are gathered to rank 0 and checked by
    :func:`gather_rows`. Returns ``(orig, flipped or None)`` on rank 0 / a single process, None on other ranks.

    An error on any rank (a bad image) stops every rank at one agreed point before the gather: the failing rank
    raises its own error, the others a PeerRankError naming it -- no rank waits in a collective."""
    if env is None or not env.distributed:
        return embed_part(shard_batches(total, batch_size, 0, 1))
    mine = shard_batches(total, batch_size, env.rank, env.world_size)
    indices = np.fromiter((i for b in mine for i in b), dtype=np.int64, count=sum(len(b) for b in mine))

    def part() -> tuple[np.ndarray, np.ndarray | None]:
        if not len(indices):  # fewer batches than ranks: nothing to embed here
            return np.zeros((0, 0), np.float32), (np.zeros((0, 0), np.float32) if flip else None)
        return embed_part(mine)

    orig, flipped = agree_call(env, part, "embedding")
    rows = orig if flipped is None else np.concatenate([orig, flipped], axis=1)
    gathered = gather_rows(env, indices, rows, total)
    if gathered is None:
        return None
    if not flip:
        return gathered, None
    width = gathered.shape[1] // 2
    return gathered[:, :width], gathered[:, width:]


def embed_dataset(
    backbone: nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 128,
    workers: int = 0,
    device: torch.device | None = None,
    flip: bool = True,
    amp: bool | None = None,
    progress: bool = False,
    desc: str = "embed",
    env: DistEnv | None = None,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """:func:`embed_batches` over a dataset of uint8 images read by ``workers`` DataLoader processes, in order.

    With ``env`` of a process group the batches are split across the ranks (:func:`embed_sharded`); rank 0
    returns everything, the other ranks None."""
    device = device or next(backbone.parameters()).device
    backbone.eval()
    main_rank = env is None or env.is_main

    def embed_part(batches: list[range]) -> tuple[np.ndarray, np.ndarray | None]:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=[list(b) for b in batches],  # exactly these batches, in order
            num_workers=workers,
            pin_memory=device.type == "cuda",
            # the project's one worker-init; one OpenCV thread each (spawned workers, see below)
            worker_init_fn=partial(seed_worker, opencv_threads=1) if workers > 0 else None,
            # Workers are spawned, not forked: a forked child inherits OpenCV's thread pool in a broken state once
            # the parent has run a parallel cv2 call, and then hangs in imread / warpAffine (seen on this machine).
            multiprocessing_context="spawn" if workers > 0 else None,
            persistent_workers=False,
        )
        count = sum(len(b) for b in batches)
        return embed_batches(backbone, loader, count, device, flip=flip, amp=amp, progress=progress and main_rank,
                             desc=desc)

    return embed_sharded(embed_part, len(dataset), batch_size, env, flip)


def flip_fuse(orig: np.ndarray, flipped: np.ndarray | None) -> np.ndarray:
    """Flip fusion of the reference tools: raw ``orig + flipped`` (no normalisation before the sum)."""
    return orig if flipped is None else orig + flipped


# ----------------------------------------------------------------------------------------------------------------
# CLI helpers
# ----------------------------------------------------------------------------------------------------------------
def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder that exists or can be created, checked before any work (a file of that name found
    after hours of embedding would lose the results)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise EvalInputError(f"{flag} {folder} is a file; give a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # writable now, not only after the work (read-only mounts, ACLs)
            pass
    except OSError as e:
        raise EvalInputError(f"{flag} {folder}: cannot create or write the folder ({e.strerror})") from None
    return folder


def add_network_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--network`` (default auto) and ``--embedding-size`` of a model file; ``prefix`` e.g. "id-"."""
    from backbones import BACKBONE_NAMES

    parser.add_argument(f"--{prefix}network", default=AUTO_NETWORK, choices=(AUTO_NETWORK, *BACKBONE_NAMES),
                        metavar="NETWORK",
                        help="backbone architecture: auto (the run's summary.json beside model.pt, else detected "
                             f"from the file's keys and shapes) or one of {', '.join(BACKBONE_NAMES)}")
    parser.add_argument(f"--{prefix}embedding-size", type=positive_int, default=None,
                        help="default: read from the model file (last BatchNorm size)")


def add_model_args(parser: argparse.ArgumentParser, image_workers: bool = True) -> None:
    """Arguments shared by the benchmark CLIs: model file, network, device, batching, channel order, AMP, progress.

    ``image_workers=False`` for commands whose images are already in memory (``.bin`` sets): no ``--workers``."""
    from utils.cli import add_bgr_arg, add_device_arg, add_workers_arg

    parser.add_argument("--model", required=True,
                        help="model file: a state dict (.pt/.pth), a train.py run's model.pt, an arcface_torch "
                             "checkpoint, a Lightning / AdaFace .ckpt or a CVLFace .safetensors")
    add_network_args(parser)
    add_device_arg(parser)
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per forward (x2 with the mirror)")
    if image_workers:
        add_workers_arg(parser, min(8, os.cpu_count() or 1), "reading and aligning images")
    add_bgr_arg(parser)
    parser.add_argument("--no-amp", action="store_true", help="disable float16 autocast on CUDA (default: on with CUDA)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def model_from_args(args: argparse.Namespace, env: DistEnv | None = None) -> tuple[nn.Module, torch.device]:
    """The ``--model`` backbone on ``env``'s device (default: ``--device``), for every command that loads one.

    ``args.network`` becomes the network it was loaded as ("auto" resolved) and ``args.bgr`` the channel order to
    feed (the file's, unless ``--bgr`` / ``--rgb`` say otherwise where the file does not tell; a contradiction is an
    error). Rank 0 prints the one line saying what was loaded and why (:meth:`BackboneChoice.line`). With a process
    group every rank loads it and all ranks agree that it loaded (a rank that cannot read it stops them all)."""
    import sys

    if env is None:
        env = single_process_env(resolve_device(getattr(args, "device", "auto")))

    def load() -> tuple[nn.Module, BackboneChoice, bool]:
        model, choice = load_backbone_choice(args.model, args.network, args.embedding_size, env.device)
        return model, choice, choice.channels(bool(getattr(args, "bgr", False)), bool(getattr(args, "rgb", False)),
                                              args.model)

    model, choice, bgr = agree_call(env, load, "model loading")
    if env.is_main:
        print(choice.line(args.model, bgr), file=sys.stderr, flush=True)
    args.network = choice.network  # what the results files record
    args.bgr = bgr
    return model, env.device


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Results file of the eval CLIs through the project's one JSON writer (utils.checkpoint.write_json)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_json(obj, path)


def iter_chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(n, s + size)
