"""Rewrite the options table of docs/training.md from `TrainConfig`'s declarations.

    .venv/bin/python tools/update_options_table.py          # after adding or changing an option

The table is generated (`bnzoo.config.options_table`) and a test keeps the document equal to it;
this replaces the table in place: the lines from its header row to the first line that is not a
table row.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnzoo.config import options_table  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
HEADER = "| option | default | accepts | what it does |"


def main() -> int:
    lines = DOC.read_text(encoding="utf-8").split("\n")
    start = lines.index(HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = options_table().split("\n")
    DOC.write_text("\n".join(lines), encoding="utf-8")
    print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
