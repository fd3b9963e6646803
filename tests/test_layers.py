"""The package layers, read from the source (no imports run): utils/ is the bottom layer and no file below it
imports model, data, trainer, evaluation or command code; the config loader (which reads the model registries) sits
with configs/. Inside utils/ the flat helpers import neither sub-package, and utils/data/ (file formats) imports
nothing of utils/run/ (the run scaffold)."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE_UTILS = {"backbones", "bench", "cfsm", "configs", "dataset", "eval", "losses", "partial_fc", "tools", "train",
               "train_generator"}
UTILS_FILES = sorted((REPO / "utils").rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """The full dotted name of every absolute import in `path` (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from utils import run`
    return names


def imported_top_modules(path: Path) -> set[str]:
    """The top-level package of every import in `path` (module level or inside functions)."""
    return {name.split(".")[0] for name in imported_modules(path)}


def layer_problem(path: Path, utils_root: Path) -> str | None:
    """Why `path` (a file below `utils_root`) breaks the layers, or None."""
    above = imported_top_modules(path) & ABOVE_UTILS
    if above:
        return f"imports {', '.join(sorted(above))}, a layer above utils/"
    inside = path.relative_to(utils_root).parts
    part = inside[0] if len(inside) > 1 else "flat"  # run, data, or a flat helper
    higher = {"run": (), "data": ("utils.run",)}.get(part, ("utils.run", "utils.data"))
    wrong = sorted(n for n in imported_modules(path) if any(n == h or n.startswith(h + ".") for h in higher))
    if wrong:
        return f"imports {wrong[0]}: {'utils/data/' if part == 'data' else 'a flat helper of utils/'} sits below it"
    return None


def test_every_file_below_utils_is_checked():
    assert {"utils/run/scaffold.py", "utils/data/toyface.py", "utils/errors.py", "utils/data/binfile.py"} <= \
        {p.relative_to(REPO).as_posix() for p in UTILS_FILES}


def test_the_layers_name_every_package_above_utils():
    """A new top-level package or module must be placed: above utils/ (ABOVE_UTILS), or utils/ / tests/ itself."""
    top = {p.stem for p in REPO.glob("*.py")} | {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()
                                                 or p.is_dir() and any(p.glob("*.py"))}
    assert top - {"utils", "tests"} == ABOVE_UTILS


@pytest.mark.parametrize("path", UTILS_FILES, ids=lambda p: p.relative_to(REPO / "utils").as_posix())
def test_utils_imports_no_model_eval_or_trainer_code(path):
    problem = layer_problem(path, REPO / "utils")
    assert problem is None, f"{path.relative_to(REPO)}: {problem}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from backbones import get_model\n    import dataset.sub\n")
    assert imported_top_modules(module) == {"backbones", "dataset"}


@pytest.mark.parametrize("source", ["from eval.binfile import write_bin\n",
                                    "def f():\n    import eval.metrics\n",
                                    "def f():\n    from eval import binfile\n"])
@pytest.mark.parametrize("where", ["data/m.py", "run/m.py", "m.py"])
def test_the_check_refuses_eval_in_a_sub_package(tmp_path, source, where):
    """What utils/data/toyface.py did before the .bin format moved to utils/data/binfile.py: import eval."""
    module = tmp_path / "utils" / where
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_text(source)
    assert "eval" in layer_problem(module, tmp_path / "utils")


def test_the_check_keeps_the_order_inside_utils(tmp_path):
    """Flat helpers import neither sub-package; utils/data/ imports nothing of utils/run/; utils/run/ may use both."""
    utils = tmp_path / "utils"
    (utils / "data").mkdir(parents=True)
    (utils / "run").mkdir()
    cases = {"m.py": "from utils.data.recordio import x\n", "n.py": "from utils import run\n",
             "data/m.py": "def f():\n    from utils.run.run_folder import x\n"}
    for where, source in cases.items():
        (utils / where).write_text(source)
        assert "sits below it" in layer_problem(utils / where, utils), where
    (utils / "run" / "m.py").write_text("from utils.data.degrade import x\nfrom utils.errors import E\n")
    (utils / "data" / "n.py").write_text("from utils.errors import E\nfrom utils.data.binfile import w\n")
    assert layer_problem(utils / "run" / "m.py", utils) is None
    assert layer_problem(utils / "data" / "n.py", utils) is None
