"""Hang guards: a crafted file extracted in a process of its own, under a timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import json, sys
from pathlib import Path
from metalake.extractors.registry import ExtractorRegistry
path = Path(sys.argv[1])
registry = ExtractorRegistry.from_environment({})
registry.timeout = None
found = registry.extract_data(path.read_bytes(), path.name)
values = {name: str(value) for name, value in found.values.items()}
print(json.dumps({"values": values, "errors": found.errors}))
"""


def extract_apart(path: Path, *, timeout: float = 20) -> tuple[dict[str, str], list[list[str]]]:
    """The built-ins' values (as text) and errors for the file at `path`, extracted from its
    bytes without a time limit, in a process of its own that fails the test past `timeout`
    seconds: a regression to superlinear time fails, rather than hangs the suite."""
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(path)],
        check=True,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    answer = json.loads(done.stdout)
    return answer["values"], answer["errors"]
