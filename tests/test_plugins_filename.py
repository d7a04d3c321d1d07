"""The example third-party plugin (examples/metalake-filename), registered directly and found
through its entry point, without installing anything into the shared environment."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from metalake.extractors.registry import ExtractorRegistry, builtin_plugins
from metalake.extractors.testing import sample_exif, save_with_pillow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "metalake-filename"


@pytest.fixture(scope="module")
def plugin() -> Iterator[ModuleType]:
    """The example's module, imported from its folder as an installed copy would be."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        spec = importlib.util.find_spec("metalake_filename")
        assert spec is not None
        assert spec.origin is not None
        assert Path(spec.origin).is_relative_to(EXAMPLE)
        yield importlib.import_module("metalake_filename")
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("metalake_filename", None)


@pytest.fixture
def registry(plugin: ModuleType) -> ExtractorRegistry:
    return ExtractorRegistry([*builtin_plugins(), ("filename", plugin)])


def _plain_jpeg(folder: Path, name: str) -> Path:
    path = folder / "upload.bin"  # the name on disk does not matter: the client's name does
    Image.new("RGB", (8, 8)).save(path, "JPEG")
    return path


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("IMG_20230405_060708.jpg", datetime(2023, 4, 5, 6, 7, 8)),
        ("PXL_20230405_060708123.jpg", datetime(2023, 4, 5, 6, 7, 8)),
        ("20230405_060708.heic", datetime(2023, 4, 5, 6, 7, 8)),
        ("Screenshot 2023-04-05 at 06.07.08.png", datetime(2023, 4, 5, 6, 7, 8)),
        ("WhatsApp Image 2023-04-05 at 06.07.08.jpeg", datetime(2023, 4, 5, 6, 7, 8)),
        ("signal-2023-04-05-060708.jpg", datetime(2023, 4, 5, 6, 7, 8)),
        ("photos/2023-04-05_06-07-08.jpg", datetime(2023, 4, 5, 6, 7, 8)),
        ("IMG_20231305_250000.jpg", None),  # month 13: not a date
        ("scan-0001.jpg", None),
        ("IMG_1234567890123.jpg", None),
        ("18000101_000000.jpg", None),  # a counter more likely than a capture time
    ],
)
def test_the_capture_time_comes_from_the_name(
    registry: ExtractorRegistry, tmp_path: Path, name: str, expected: datetime | None
) -> None:
    result = registry.extract(_plain_jpeg(tmp_path, name), filename=name)
    assert result.values.get("acquired_at") == expected
    if expected is not None:
        assert result.sources["acquired_at"] == "filename"
    assert result.errors == []


def test_the_files_own_capture_time_wins(registry: ExtractorRegistry, tmp_path: Path) -> None:
    path = save_with_pillow(tmp_path / "photo.jpg", sample_exif())
    result = registry.extract(path, filename="IMG_19991231_235959.jpg")
    assert result.values["acquired_at"].isoformat() == "2021-06-01T12:34:56+02:00"  # type: ignore[union-attr]
    assert result.sources["acquired_at"] == "pillow"


def test_without_a_client_name_it_does_nothing(registry: ExtractorRegistry, tmp_path: Path) -> None:
    result = registry.extract(_plain_jpeg(tmp_path, ""), filename=None)
    assert "acquired_at" not in result.values
    assert result.errors == []


def test_the_declared_entry_point_is_found_after_the_builtins(
    plugin: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    group = declared["project"]["entry-points"]["metalake.extractors"]
    assert group == {"filename": "metalake_filename"}
    point = importlib.metadata.EntryPoint("filename", group["filename"], "metalake.extractors")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [point])
    described = ExtractorRegistry.from_environment({}).describe()
    assert [info.name for info in described] == ["pillow", "exifread", "gps", "xmp", "filename"]
    assert described[-1].version == declared["project"]["version"] == plugin.__version__
    blocked = ExtractorRegistry.from_environment({"METALAKE_DISABLE_PLUGINS": "filename"})
    assert "filename" not in blocked.names
