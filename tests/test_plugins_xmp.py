"""The example third-party plugin, pip-installed: found through its entry point, run after the
built-ins, filling only what they left empty."""

from __future__ import annotations

import importlib.metadata
import io
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from metalake.extractors.registry import ExtractorRegistry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "metalake-xmp"

XMP = b"""<?xpacket begin='' id='W5M0MpCehiHzreSzNTczkc9d'?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/"
    xmlns:tiff="http://ns.adobe.com/tiff/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    drone-dji:AbsoluteAltitude="+512.25"
    tiff:Make="XMP Make (EXIF has one: must not win)"
    xmp:CreateDate="2023-04-05T06:07:08+02:00">
   <dc:creator><rdf:Seq><rdf:li>Grace Hopper</rdf:li></rdf:Seq></dc:creator>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end='w'?>"""


@pytest.fixture(scope="module")
def installed_xmp_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The example pip-installed as a user would, but into a directory of its own, on sys.path
    only while this module's tests run, from a copy of its source: the shared virtualenv, the
    source tree and the other tests (whose registries must not find it) stay as they were."""
    root = tmp_path_factory.mktemp("xmp-plugin")
    source, target = root / "source", root / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    # The build backend (setuptools) is already in the venv: no network needed.
    install += ["--no-build-isolation", "--target", str(target), str(source)]
    completed = subprocess.run(install, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        pytest.fail(f"pip install {EXAMPLE} failed:\n{completed.stderr}")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(target))  # also invalidates the import caches
        try:
            yield
        finally:
            sys.modules.pop("metalake_xmp", None)
    importlib.invalidate_caches()


def _jpeg_with_exif_and_xmp(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x010F] = "EXIF Make"
    exif[0x0132] = "2001:02:03 04:05:06"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG", exif=exif)
    jpeg = buffer.getvalue()
    payload = b"http://ns.adobe.com/xap/1.0/\x00" + XMP
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    path.write_bytes(jpeg[:2] + segment + jpeg[2:])
    return path


def test_discovered_through_the_entry_point_after_the_builtins(installed_xmp_plugin: None) -> None:
    points = importlib.metadata.entry_points(group="metalake.extractors")
    assert "xmp" in [point.name for point in points]
    described = ExtractorRegistry.from_environment({}).describe()
    names = [info.name for info in described]
    assert names[:3] == ["pillow", "exifread", "gps"]
    xmp = next(info for info in described if info.name == "xmp")
    assert xmp.version == "0.1.0"
    assert xmp.order > 3


def test_fills_only_what_the_builtins_left_empty(
    installed_xmp_plugin: None, tmp_path: Path
) -> None:
    path = _jpeg_with_exif_and_xmp(tmp_path / "drone.jpg")
    result = ExtractorRegistry.from_environment({}).extract(path, filename=path.name)
    assert result.values["manufacturer"] == "EXIF Make"
    assert result.sources["manufacturer"] == "pillow"
    # EXIF's DateTime wins over the XMP date: the built-ins run first.
    assert result.values["acquired_at"] == datetime(2001, 2, 3, 4, 5, 6)
    assert result.sources["acquired_at"] == "pillow"
    assert result.values["altitude"] == 512.25
    assert result.values["acquired_by"] == "Grace Hopper"
    assert result.sources["altitude"] == result.sources["acquired_by"] == "xmp"
    assert result.errors == []


def test_xmp_date_used_when_exif_has_none(installed_xmp_plugin: None, tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    payload = b"http://ns.adobe.com/xap/1.0/\x00" + XMP
    jpeg = buffer.getvalue()
    path.write_bytes(
        jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
    )
    result = ExtractorRegistry.from_environment({}).extract(path)
    assert result.values["acquired_at"] == datetime(
        2023, 4, 5, 6, 7, 8, tzinfo=timezone(timedelta(hours=2))
    )
    assert result.sources["acquired_at"] == "xmp"


def test_entity_declarations_are_refused(installed_xmp_plugin: None) -> None:
    metalake_xmp = importlib.import_module("metalake_xmp")  # installed by the fixture
    laughs = b'<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><x>&b;</x>'
    assert metalake_xmp.parse_packet(laughs) is None
    assert metalake_xmp.parse_packet(b"<not xml") is None


def test_can_be_blocked(installed_xmp_plugin: None) -> None:
    registry = ExtractorRegistry.from_environment({"METALAKE_DISABLE_PLUGINS": "xmp"})
    assert "xmp" not in registry.names
