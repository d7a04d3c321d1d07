"""metalake.plugin, the plugin author's module: it stands alone and agrees with the registry."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import get_type_hints

import pluggy
import pytest

from metalake import metadata as md
from metalake import plugin
from metalake.extractors import hookspecs
from metalake.extractors.registry import ExtractorRegistry
from metalake.extractors.source import Source as ConcreteSource

PROBE = """
import json, sys
import metalake.plugin
from metalake.plugin import ExtractedMetadata, FIELDS, FIELD_TYPES, Source, hookimpl
print(json.dumps(sorted(sys.modules)))
"""


def test_the_plugin_module_imports_neither_grpc_protobuf_nor_the_server() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    modules = json.loads(done.stdout)
    forbidden = ("grpc", "google", "metalake.server", "metalake.extractors", "metalake.v1")
    for prefix in forbidden:
        found = [m for m in modules if m == prefix or m.startswith(prefix + ".")]
        assert found == [], f"importing metalake.plugin loaded {found}"
    assert "pluggy" in modules


def test_the_package_marks_the_plugin_module_typed() -> None:
    assert (Path(plugin.__file__).parent / "py.typed").exists()


def test_built_ins_and_plugins_share_one_set_of_markers() -> None:
    assert hookspecs.hookimpl is plugin.hookimpl
    assert hookspecs.hookspec is plugin.hookspec
    assert hookspecs.metalake_extract_metadata is plugin.metalake_extract_metadata
    from metalake.extractors import hookimpl

    assert hookimpl is plugin.hookimpl
    # A plugin written with plain pluggy (no metalake import) is the same marker too.
    assert pluggy.HookimplMarker("metalake").project_name == plugin.hookimpl.project_name


def test_field_types_agree_with_the_metadata_model() -> None:
    hints = get_type_hints(plugin.ExtractedMetadata)
    assert tuple(hints) == md.FIELDS
    assert dict(plugin.FIELD_TYPES) == hints
    assert {f for f, t in hints.items() if t is float} == md.FLOAT_FIELDS
    assert {f for f, t in hints.items() if t is datetime} == md.TIMESTAMP_FIELDS
    assert {f for f, t in hints.items() if t is str} == md.STRING_FIELDS


class _Typed:
    """A plugin written against metalake.plugin only, with its types."""

    NAME = "typed"

    @plugin.hookimpl
    def metalake_extract_metadata(
        self, source: plugin.Source, missing: frozenset[str]
    ) -> plugin.ExtractedMetadata | None:
        if not source.head.startswith(b"TYPED"):
            return None
        with source.open() as fp:
            text = fp.read(source.size).decode()
        found: plugin.ExtractedMetadata = {
            "software": text.split()[1],
            "altitude": float(text.split()[2]),
        }
        return found


def test_a_plugin_typed_with_the_plugin_module_runs_in_the_registry(tmp_path: Path) -> None:
    path = tmp_path / "a.typed"
    path.write_bytes(b"TYPED editor-2 123.5")
    registry = ExtractorRegistry([("typed", _Typed())])
    result = registry.extract(path, filename="a.typed")
    assert result.errors == []
    assert result.values == {"software": "editor-2", "altitude": 123.5}
    assert result.sources == {"software": "typed", "altitude": "typed"}


def test_the_registry_s_source_satisfies_the_protocol(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    source: plugin.Source = ConcreteSource(path, "a.bin")  # mypy checks the protocol here
    assert (source.size, source.head, source.filename) == (100, b"x" * 64, "a.bin")
    assert source.memo("k", lambda: 1) == 1
    returned: Mapping[str, object] | None = _Typed().metalake_extract_metadata(source, frozenset())
    assert returned is None


def test_a_small_upload_s_source_is_in_memory_and_read_through_open() -> None:
    data = b"TYPED editor-3 7.25" + b" " * 100
    source: plugin.Source = ConcreteSource(None, "a.typed", data=data)  # mypy: the protocol
    assert source.in_memory
    assert (source.size, source.head, source.filename) == (len(data), data[:64], "a.typed")
    with source.open() as fp:
        assert fp.read() == data
    with pytest.raises(FileNotFoundError):
        _ = source.path
    registry = ExtractorRegistry([("typed", _Typed())])
    result = registry.extract_data(data, filename="a.typed")
    assert result.errors == []
    assert result.values == {"software": "editor-3", "altitude": 7.25}


def test_a_source_on_disk_is_not_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    source: plugin.Source = ConcreteSource(path, "a.bin")
    assert not source.in_memory
    assert source.path == path
