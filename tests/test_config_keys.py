"""tools/config_keys.py: the key table of docs/configs.md, printed or written between its markers."""
import pytest

from tools import config_keys


def test_prints_one_row_per_key_and_rewrites_only_the_table(tmp_path, monkeypatch, capsys):
    from configs.base import KEYS

    assert config_keys.main([]) == 0
    printed = capsys.readouterr().out
    assert all(f"| `{key.name}` |" in printed for key in KEYS)
    doc = tmp_path / "configs.md"
    doc.write_text("intro\n<!-- key table: python -m tools.config_keys --update-docs -->\nstale\n"
                   "<!-- end key table -->\noutro\n")
    monkeypatch.setattr(config_keys, "DOCS", doc)
    assert config_keys.main(["--update-docs"]) == 0
    text = doc.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("<!-- end key table -->\noutro\n")
    assert printed.strip() in text


def test_a_docs_file_without_the_markers_is_refused(tmp_path, monkeypatch):
    doc = tmp_path / "configs.md"
    doc.write_text("no table here\n")
    monkeypatch.setattr(config_keys, "DOCS", doc)
    from utils.cli import UsageError

    with pytest.raises(UsageError, match="configs.md: docs/configs.md has no key-table markers"):
        config_keys.main(["--update-docs"])
