"""Loading released / stage-1 CFSM generators (`torch.save` dicts whose 'G_state_dict' is the generator), and the
checks of stage 1's input files (identity network, ``init_generator``, target images) that run before training."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from utils.checkpoint import state_dict_mismatch  # the strict-load check the backbones use too
from utils.errors import UserError

from .networks import INPUT_SKIPS, Generator

__all__ = ["load_generator", "generator_from_state_dict", "infer_generator_config", "identify_backbone",
           "load_identity_network", "check_identity_network_file", "check_init_generator_file",
           "init_generator_from_file", "stage1_generator_config", "check_stage1_files", "GENERATOR_CONFIG_KEYS"]

# Generator constructor argument -> the stage-1 config key that sets it (the others are fixed by the trainer)
GENERATOR_CONFIG_KEYS = {"dim": "gen_dim", "n_downsample": "gen_n_downsample", "n_residual": "gen_n_residual",
                         "latent_dim": "gen_latent_dim", "style_dim": "gen_style_dim",
                         "input_skip": "gen_input_skip"}

_HOW_TO_GET = ("Train one with stage 1 (`python train_generator.py configs/cfsm_<name>`), or download a released "
               "generator (e.g. WiderFace70K.pth, IJB-S.pth) listed in the CFSM repository README "
               "(github.com/liufeng2915/CFSM).")


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in sd if (m := rx.fullmatch(k))}


class GeneratorFileError(UserError, ValueError):
    """A file or state dict that is not a usable CFSM generator; the message names it and what it holds."""


class GeneratorKeysError(GeneratorFileError, KeyError):
    """The generator's keys are missing or differ (a KeyError, as documented; printed without KeyError's quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def infer_generator_config(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, int]:
    """Generator constructor arguments read from the tensor shapes of a generator state dict."""
    need = ["encoder.model.1.weight", "pca.U", "decoder.mlp.model.0.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise GeneratorKeysError(f"{source}: not a CFSM generator state dict, missing {missing}; "
                       f"first keys found: {list(sd)[:8]}")
    conv0 = sd["encoder.model.1.weight"]
    u = sd["pca.U"]
    enc_convs = _indices(sd, r"encoder\.model\.(\d+)\.weight")
    return dict(
        in_channels=int(conv0.shape[1]),
        dim=int(conv0.shape[0]),
        n_downsample=len(enc_convs) - 1,
        n_residual=len(_indices(sd, r"decoder\.model\.(\d+)\.block\.1\.weight")),
        n_residual_encoder=len(_indices(sd, r"encoder\.model\.(\d+)\.block\.1\.weight")),
        latent_dim=int(u.shape[1]),
        style_dim=int(u.shape[0]),
        mlp_dim=int(sd["decoder.mlp.model.0.weight"].shape[0]),
        # stage-1 option; released generators lack the markers
        input_skip=next((mode for mode in INPUT_SKIPS if f"input_{mode}_skip_marker" in sd), "none"),
    )


def generator_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<state dict>",
                              freeze: bool = True) -> Generator:
    """Build a Generator whose dimensions match `sd`, load it strictly, and (by default) freeze it in eval mode.

    Raises KeyError for missing/unexpected keys and ValueError for a shape mismatch, naming the key and both shapes.
    """
    cfg = infer_generator_config(sd, source)
    gen = Generator(**cfg)
    problem = state_dict_mismatch({k: v.shape for k, v in gen.state_dict().items()}, sd)
    if problem is not None:  # KeyError for a key-set mismatch, ValueError for a shape mismatch (as documented)
        error = GeneratorKeysError if problem.startswith("first mismatching key") else GeneratorFileError
        raise error(f"{source}: generator state dict does not match Generator({cfg}): {problem}")
    gen.load_state_dict(dict(sd), strict=True)
    if freeze:
        gen.requires_grad_(False)
        gen.eval()
    return gen


def load_generator(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Generator:
    """Load a generator file: a dict with 'G_state_dict' (released models, stage-1 checkpoints).

    A bare generator state dict (keys like 'encoder.model.1.weight', 'pca.U') is also accepted, since it is
    unambiguous. The result is frozen (`requires_grad_(False)`) and in eval mode; it is not wrapped in DDP.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CFSM generator file not found: {path}. {_HOW_TO_GET}")
    from utils.checkpoint import CheckpointError, safe_load  # the one weights_only load path (backbones too)
    from utils.errors import unsafe_pickle_refusal

    try:
        obj = safe_load(path, map_location)
    except CheckpointError as wrapped:  # corrupt file, not a torch file, or pickled objects beyond tensors/dicts
        e = wrapped.__cause__ or wrapped
        if unsafe_pickle_refusal(path, e) is not None:  # already one line naming the file and the class
            raise GeneratorFileError(str(wrapped)) from e
        # torch's own text suggests weights_only=False; for a file of unknown origin that would run its code
        raise GeneratorFileError(f"cannot read CFSM generator file {path} with weights_only=True (do not retry with "
                         f"weights_only=False unless you trust its source): {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise GeneratorFileError(f"{path}: expected a dict with 'G_state_dict', got {type(obj).__name__}")
    if "G_state_dict" in obj:
        sd = obj["G_state_dict"]
    elif "pca.U" in obj and "encoder.model.1.weight" in obj:
        sd = obj
    else:
        raise GeneratorKeysError(f"{path}: no 'G_state_dict' in the file; keys found: {sorted(map(str, obj))[:8]}. "
                                 "Expected a CFSM synthesis checkpoint (G_state_dict, D_state_dict, ...): a released "
                                 "generator or stage 1's generator.pth")
    if not isinstance(sd, Mapping):
        raise GeneratorFileError(f"{path}: 'G_state_dict' is a {type(sd).__name__}, not a state dict")
    return generator_from_state_dict(sd, source=path)


# ---- stage-1 input files ------------------------------------------------------------------------------------------

def _backbone_shapes(network: str, embedding_size: int) -> dict[str, torch.Size]:
    """Key -> shape of a backbone's state dict, built on the meta device (no memory, no init cost)."""
    from backbones import get_model

    with torch.device("meta"):
        return {k: v.shape for k, v in get_model(network, num_features=embedding_size).state_dict().items()}


def identify_backbone(state: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """``(network, embedding_size)`` of the registered backbone whose keys and shapes equal ``state``'s, or None
    (none or several match): :func:`backbones.detect.detect_network`, the one detection of the project."""
    from backbones.detect import detect_network

    found = detect_network(state)
    return (found.network, found.embedding_size) if found.network else None


def _identity_state(path: str | os.PathLike, network: str, embedding_size: int,
                    key: str = "id_model") -> dict[str, torch.Tensor]:
    """The identity network's state dict, checked against ``network`` / ``embedding_size``; errors say what the
    file holds and which config keys to set."""
    from backbones import BACKBONE_NAMES
    from utils.checkpoint import CheckpointError
    from utils.model_file import load_state_dict_file

    if network not in BACKBONE_NAMES:
        raise CheckpointError(f"config key 'id_network' = {network!r}: not a backbone; choices: "
                              f"{', '.join(BACKBONE_NAMES)}")
    state = load_state_dict_file(path)
    problem = state_dict_mismatch(_backbone_shapes(network, embedding_size), state)
    if problem is not None:
        found = identify_backbone(state)
        fix = (f"the file holds a {found[0]} with {found[1]}-d embeddings: set id_network={found[0]} "
               f"id_embedding_size={found[1]}" if found else
               "the file matches no backbone of backbones.BACKBONE_NAMES at its embedding size")
        raise CheckpointError(f"config key '{key}' = {path} does not fit id_network={network} "
                              f"id_embedding_size={embedding_size}: {problem}; {fix}")
    return state


def check_identity_network_file(path: str | os.PathLike, network: str, embedding_size: int,
                                key: str = "id_model") -> None:
    """Raise a CheckpointError naming ``key``, the file and the fix unless it is a ``network`` backbone with
    ``embedding_size``-d embeddings."""
    _identity_state(path, network, embedding_size, key)


def load_identity_network(path: str | os.PathLike, network: str, embedding_size: int,
                          device: str | torch.device = "cpu", key: str = "id_model",
                          channel_order: str = "rgb") -> torch.nn.Module:
    """Stage 1's frozen face-recognition network f: checked (see :func:`check_identity_network_file`), strictly
    loaded, eval mode, no parameter gradients, on ``device``. It takes the generator's RGB images and sees them in
    ``channel_order`` (``backbones.identity_order``: BGR for an AdaFace network, which flips them itself)."""
    from backbones import feed_in_order, get_model

    state = _identity_state(path, network, embedding_size, key)
    net = feed_in_order(get_model(network, num_features=embedding_size), channel_order)
    net.load_state_dict(state, strict=True)
    net.requires_grad_(False)
    return net.eval().to(device)


def _generator_state(path: str | os.PathLike, gen_config: Mapping[str, int],
                     key: str = "init_generator") -> tuple[dict, Mapping[str, torch.Tensor]]:
    """(file dict, its G_state_dict) after checking that the file's generator has the dimensions ``gen_config``
    (Generator arguments) asks for; errors list the differing config keys with both values."""
    from utils.checkpoint import CheckpointError, safe_load

    obj = safe_load(path)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("G_state_dict"), Mapping):
        found = sorted(map(str, obj))[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"config key '{key}' = {path}: not a CFSM generator file (no 'G_state_dict'; found "
                              f"{found}). Give a stage-1 generator.pth, a step checkpoint's rank_0.pt or a released "
                              f"generator")
    state = obj["G_state_dict"]
    try:
        file_cfg = infer_generator_config(state, source=str(path))
    except KeyError as e:
        raise CheckpointError(f"config key '{key}' = {path}: {e.args[0]}") from None
    own = Generator(**gen_config).config
    differ = [f"{GENERATOR_CONFIG_KEYS.get(arg, arg)}={file_cfg[arg]} (this config: {own[arg]})"
              for arg in own if file_cfg.get(arg) != own[arg]]
    if differ:
        raise CheckpointError(f"config key '{key}' = {path} holds a generator of another shape: "
                              f"{', '.join(differ)}. Set these keys to the file's values or drop {key}")
    with torch.device("meta"):
        problem = state_dict_mismatch({k: v.shape for k, v in Generator(**gen_config).state_dict().items()}, state)
    if problem is not None:
        raise CheckpointError(f"config key '{key}' = {path} does not fit Generator({own}): {problem}")
    return dict(obj), state


def check_init_generator_file(path: str | os.PathLike, gen_config: Mapping[str, int],
                              key: str = "init_generator") -> None:
    """Raise a CheckpointError naming ``key``, the file and the config keys to change unless the file holds a
    generator of exactly ``gen_config``'s shape (Generator arguments, e.g. ``dict(dim=16, latent_dim=128)``)."""
    _generator_state(path, gen_config, key)


def init_generator_from_file(path: str | os.PathLike, G: torch.nn.Module, D: torch.nn.Module,
                             key: str = "init_generator") -> bool:
    """Start stage 1 from a released-format file: G strictly (a shared origin makes style bases comparable), D
    when the file holds a matching one. Returns whether D was loaded; optimizer states are left fresh (a new
    target domain is a new optimisation)."""
    obj, state = _generator_state(path, G.config, key)
    G.load_state_dict(dict(state), strict=True)
    d_state = obj.get("D_state_dict")
    own = D.state_dict()
    if isinstance(d_state, Mapping) and set(d_state) == set(own) and all(
            tuple(d_state[k].shape) == tuple(v.shape) for k, v in own.items()):
        D.load_state_dict(dict(d_state))
        return True
    return False


def stage1_generator_config(cfg: Mapping) -> dict[str, int]:
    """Generator arguments of a stage-1 config."""
    return {arg: cfg[key] for arg, key in GENERATOR_CONFIG_KEYS.items()}


def check_stage1_files(cfg: Mapping) -> None:
    """Every stage-1 input file, checked before any process group exists, so a bad file stops each rank at start
    (none waits in a collective for a rank that failed): target images listed and all decodable, the identity
    network of ``id_network`` / ``id_embedding_size`` (and an ``id_channel_order`` it does not contradict),
    ``init_generator`` of the configured generator shape."""
    from backbones import identity_order

    from .target_data import check_target_images, list_target_images

    # toy data the trainer is about to generate (generate_toy_data) is not there yet, and is ours: nothing to check
    if not (cfg.get("generate_toy_data") and not os.path.exists(str(cfg["target"]))):
        check_target_images(list_target_images(cfg["target"]), source=str(cfg["target"]))
    check_identity_network_file(cfg["id_model"], cfg["id_network"], cfg["id_embedding_size"])
    identity_order(cfg)  # an explicit id_channel_order against the file's order: one error line
    if cfg.get("init_generator"):
        check_init_generator_file(cfg["init_generator"], stage1_generator_config(cfg))
