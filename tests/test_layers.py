"""The package layers, read from the source (no imports run): utils/ is the bottom layer and imports no model,
data or trainer code; the config loader (which reads the model registries) sits with configs/."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE_UTILS = {"backbones", "losses", "partial_fc", "cfsm", "dataset", "train", "train_generator", "configs", "bench",
               "tools"}


def imported_top_modules(path: Path) -> set[str]:
    """The top-level package of every import in `path` (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((REPO / "utils").glob("*.py")), ids=lambda p: p.name)
def test_utils_imports_no_model_or_trainer_code(path):
    assert not imported_top_modules(path) & ABOVE_UTILS, f"{path.name} imports from a layer above utils/"


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from backbones import get_model\n    import dataset.sub\n")
    assert imported_top_modules(module) == {"backbones", "dataset"}
