"""Every config key declared in configs/base.py, as the markdown table of docs/configs.md: printed, or written
into the docs (one row per key: default, stage, meaning, rule, what a change does on resume).

    python -m tools.config_keys                  # print the table
    python -m tools.config_keys --update-docs    # rewrite the table in docs/configs.md (a test checks it is current)
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from utils.cli import ArgumentParser, UsageError, run_command

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configs.md"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update-docs", action="store_true",
                        help=f"rewrite the key table in {DOCS.relative_to(DOCS.parents[1])} instead of printing it "
                             f"(default: print)")
    args = parser.parse_args(argv)
    from configs.base import KEYS, SECTIONS
    from configs.schema import docs_with_table, key_table_markdown

    table = key_table_markdown(KEYS, SECTIONS)
    if not args.update_docs:
        print(table)
        return 0
    try:
        updated = docs_with_table(DOCS.read_text(), table)
    except ValueError as exc:
        raise UsageError(f"{DOCS}: {exc}; restore the markers around the table") from None
    DOCS.write_text(updated)
    print(f"wrote the table of {len(KEYS)} keys into {DOCS}")
    return 0


if __name__ == "__main__":
    run_command(main)
