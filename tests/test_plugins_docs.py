"""The docs cannot drift: every hook in metalake.plugin is documented in docs/plugins.md."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from metalake import plugin as hookspecs  # where the hooks are specified (the plugin API)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOKS = [
    name
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("metalake_")
]


def test_there_are_hooks() -> None:
    assert HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    headings = re.findall(r"^#+\s+`?(\w+)", DOCS.read_text(), flags=re.MULTILINE)
    assert hook in headings, f"{hook} has no heading in {DOCS.name}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    for topic in ("When it is called", "What it returns", "How results merge"):
        assert topic in doc, f"{hook}'s docstring does not say {topic!r}"


@pytest.mark.parametrize(
    "switch", ["METALAKE_PLUGINS", "METALAKE_DISABLE_PLUGINS", "METALAKE_EXTRACT_TIMEOUT"]
)
def test_switches_are_documented(switch: str) -> None:
    assert switch in DOCS.read_text()
