"""Docs that cannot drift: every setting the server reads is in the configuration reference."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_environment_variable_is_documented() -> None:
    read = set()
    for module in (
        "server/config.py",
        "server/observability.py",
        "extractors/registry.py",
        "metalake/client.py",
    ):
        read |= set(re.findall(r"\"(METALAKE_[A-Z_]+)\"", (ROOT / module).read_text()))
    documented = (ROOT / "docs/operations.md").read_text()
    assert read, "the scan found no settings at all"
    missing = sorted(name for name in read if name not in documented)
    assert missing == [], f"undocumented in docs/operations.md: {missing}"


def test_the_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().splitlines()[:8]
    assert any("make run" in line for line in head)
    assert any("make test" in line for line in head)
