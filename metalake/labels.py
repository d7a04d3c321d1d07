"""Labels: free key/value pairs beside the typed metadata, with the rules every side checks.

Keys are 1 to MAX_KEY_LENGTH characters of letters, digits and "_", starting with a letter or
"_" (so that `labels.KEY` is a field name in filters); case-sensitive. Values are at most
MAX_VALUE_LENGTH characters without control characters (short enough for any index), and an item
has at most MAX_LABELS of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from metalake.metadata import FieldViolation, has_control_characters

MAX_LABELS = 64
MAX_KEY_LENGTH = 63
MAX_VALUE_LENGTH = 256
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_key(key: str) -> str | None:
    """Why `key` cannot be a label key, or None when it can."""
    if not key:
        return "a label key must not be empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"a label key is at most {MAX_KEY_LENGTH} characters, got {len(key)}"
    if not KEY.fullmatch(key):
        return (
            f"label key {key[:40]!r} must be letters, digits and '_', starting with a letter or '_'"
        )
    return None


def check_value(value: object) -> str | None:
    """Why `value` cannot be a label value, or None when it can."""
    if not isinstance(value, str):
        return f"a label value must be a string, got {type(value).__name__}"
    if len(value) > MAX_VALUE_LENGTH:
        return f"a label value is at most {MAX_VALUE_LENGTH} characters, got {len(value)}"
    if has_control_characters(value):
        return "a label value must not contain control characters"
    return None


def validate(labels: Mapping[str, object], *, prefix: str = "labels") -> list[FieldViolation]:
    """Every violation in `labels`, with field paths like `labels.rig`."""
    found: list[FieldViolation] = []
    if len(labels) > MAX_LABELS:
        found.append(FieldViolation(prefix, f"at most {MAX_LABELS} labels, got {len(labels)}"))
    for key, value in labels.items():
        problem = check_key(key) or check_value(value)
        if problem:
            found.append(FieldViolation(f"{prefix}.{key[:MAX_KEY_LENGTH]}", problem))
    return found
