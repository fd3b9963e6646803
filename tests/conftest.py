"""Shared test fixtures: repo root on sys.path, small thread count, the in-repo reference fixtures."""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"  # files MXNet and the reference code wrote (see its README)
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: part of the repository, so a plain clone runs every fixture test."""
    return FIXTURES


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def mini_toy(tmp_path_factory) -> Path:
    """A miniature toy dataset (16 identities x 6 images, 20 verification pairs, 20 target faces)."""
    from utils.data.toyface import ensure_toy_data

    root = tmp_path_factory.mktemp("mini_toy") / "toy"
    return ensure_toy_data(root, num_identities=16, images_per_identity=6, num_eval_identities=10, num_pairs=20,
                           num_target_faces=20, workers=1)


@pytest.fixture(scope="session")
def tiny_generator_file(tmp_path_factory) -> Path:
    """A randomly initialised small generator saved in the released format ({'G_state_dict': ...})."""
    import torch

    from cfsm import Generator

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gen") / "tiny_generator.pth"
    torch.save({"G_state_dict": Generator(dim=16, n_residual=1, latent_dim=32).state_dict()}, path)
    return path


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    """A randomly initialised r_tiny backbone (32-d embeddings) saved as a plain state dict."""
    import torch

    from backbones import get_model

    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(get_model("r_tiny", num_features=32).state_dict(), path)
    return path
