#!/usr/bin/env python3
"""Rewrites the generated tables of docs/operations.md's Settings section from the declarations
in server/config.py (`make settings-table`); tests/test_settings.py fails while they differ."""

from __future__ import annotations

import sys
from pathlib import Path

from metalake.server.config import TABLE_END, TABLE_START, settings_tables

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def main() -> int:
    text = DOC.read_text()
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        print(f"{DOC}: the markers of the generated settings are missing", file=sys.stderr)
        return 1
    fresh = text[:start] + settings_tables() + text[end + len(TABLE_END) :]
    if fresh != text:
        DOC.write_text(fresh)
        print(f"{DOC.name}: settings tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
