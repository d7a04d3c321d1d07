"""The built-in `xmp` extractor: the fields EXIF left empty, from XMP, in every container that
carries it, checked against exiftool (the oracle) where it is installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from metalake.extractors import xmp
from metalake.extractors.registry import ExtractorRegistry, builtin_plugins
from metalake.extractors.testing import (
    XMP_WRAPPERS,
    as_json_fields,
    exiftool_fields,
    exiftool_path,
    heif_with_split_item,
    same_fields,
    wrap_xmp,
)
from metalake.metadata import check_value
from tests.hangguard import extract_apart

PACKET = b"""<?xpacket begin='\xef\xbb\xbf' id='W5M0MpCehiHzreSzNTczkc9d'?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/"
    xmlns:tiff="http://ns.adobe.com/tiff/1.0/"
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    drone-dji:AbsoluteAltitude="+512.25"
    tiff:Make="DJI"
    tiff:Software="v01.02.0300"
    exif:GPSLatitude="33,51.408S"
    exif:GPSLongitude="151,12.918E"
    exif:DateTimeOriginal="2023-04-05T06:07:08.25+02:00"
    xmp:CreateDate="2020-01-01T00:00:00Z">
   <dc:creator><rdf:Seq><rdf:li>Grace Hopper</rdf:li><rdf:li>Ada</rdf:li></rdf:Seq></dc:creator>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end='w'?>"""
FIELDS = {
    "acquired_at": "2023-04-05T06:07:08+02:00",
    "acquired_by": "Grace Hopper, Ada",
    "manufacturer": "DJI",
    "software": "v01.02.0300",
    "latitude": -(33 + 51.408 / 60),
    "longitude": 151 + 12.918 / 60,
    "altitude": 512.25,
}
FUZZ_REGISTRY = ExtractorRegistry(builtin_plugins(), timeout=20.0)
needs_exiftool = pytest.mark.skipif(exiftool_path() is None, reason="exiftool is the oracle")


@pytest.fixture(scope="module")
def registry() -> ExtractorRegistry:
    return ExtractorRegistry(builtin_plugins())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("xmp")
    files = {}
    for container in XMP_WRAPPERS:
        path = folder / f"sample.{container}"
        path.write_bytes(wrap_xmp(container, PACKET))
        files[container] = path
    return files


def test_every_container_gives_the_xmp_fields(
    registry: ExtractorRegistry, built: dict[str, Path]
) -> None:
    for container, path in built.items():
        result = registry.extract(path, filename=path.name)
        got = {k: v for k, v in as_json_fields(result.values).items() if k in FIELDS}
        assert same_fields(FIELDS, got) == [], container
        assert {result.sources[field] for field in FIELDS} == {"xmp"}, container
        assert result.errors == [], container


@needs_exiftool
def test_built_files_agree_with_exiftool(
    registry: ExtractorRegistry, built: dict[str, Path]
) -> None:
    oracle = exiftool_fields(built.values(), xmp=True)
    for container, path in built.items():
        ours = as_json_fields(registry.extract(path).values)
        assert same_fields(oracle[path], ours) == [], container


def test_xmp_fills_only_what_exif_left_empty(registry: ExtractorRegistry, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F] = "EXIF Make"
    exif[0x0132] = "2001:02:03 04:05:06"
    path = tmp_path / "both.jpg"
    path.write_bytes(wrap_xmp("jpeg", PACKET, exif))
    result = registry.extract(path, filename=path.name)
    assert result.values["manufacturer"] == "EXIF Make"
    assert result.values["acquired_at"] == datetime(2001, 2, 3, 4, 5, 6)
    assert result.sources["manufacturer"] == result.sources["acquired_at"] == "pillow"
    assert result.values["altitude"] == 512.25
    assert result.sources["altitude"] == result.sources["acquired_by"] == "xmp"
    assert registry.names.index("xmp") > registry.names.index("gps")


def test_dates_and_altitudes_as_exiftool_reads_them() -> None:
    def fields(**properties: str) -> dict[str, object]:
        return xmp.to_fields(properties)

    assert fields(**{"photoshop:DateCreated": "2021-02-03"}) == {}  # a date is no capture time
    assert fields(**{"xmp:CreateDate": "2021-02-03T04:05"}) == {
        "acquired_at": datetime(2021, 2, 3, 4, 5)
    }
    assert fields(**{"xmp:CreateDate": "2021-02-03T04:05:06Z"}) == {
        "acquired_at": datetime(2021, 2, 3, 4, 5, 6, tzinfo=UTC)
    }
    below = fields(**{"exif:GPSAltitude": "1234/10", "exif:GPSAltitudeRef": "1"})
    assert below == {"altitude": -123.4}
    assert fields(**{"exif:GPSAltitude": "1234/10"}) == {}  # no reference, no altitude
    assert fields(**{"exif:GPSLatitude": "10,30,36N"}) == {"latitude": 10.51}
    assert fields(**{"exif:GPSLatitude": "91,0.0Q"}) == {}
    offset = fields(**{"exif:DateTimeOriginal": "2021-02-03T04:05:06-03:30"})
    assert offset == {
        "acquired_at": datetime(2021, 2, 3, 4, 5, 6, tzinfo=timezone(-timedelta(hours=3.5)))
    }


@pytest.mark.parametrize(
    "packet",
    [
        b'<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><x>&b;</x>',
        b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>',
        b"<not xml",
        b"<x:xmpmeta xmlns:x='adobe:ns:meta/'>" + b" " * xmp.MAX_PACKET + b"</x:xmpmeta>",
    ],
)
def test_hostile_packets_give_nothing(
    registry: ExtractorRegistry, tmp_path: Path, packet: bytes
) -> None:
    assert xmp.parse_packet(packet) is None
    path = tmp_path / "hostile.png"
    path.write_bytes(wrap_xmp("png", packet))
    result = registry.extract(path)
    assert result.values == {}
    assert result.errors == []


def test_a_compressed_packet_is_inflated_within_bounds(tmp_path: Path) -> None:
    # 64 MB of spaces compress to ~64 KB: inflating stops at MAX_PACKET.
    bomb = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'>" + b" " * 64_000_000 + b"</x:xmpmeta>"
    path = tmp_path / "bomb.png-zipped"
    path.write_bytes(wrap_xmp("png-zipped", bomb))
    result = ExtractorRegistry(builtin_plugins()).extract(path)
    assert result.values == {}
    assert result.errors == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns on truncated TIFFs
@settings(
    max_examples=int(os.environ.get("METALAKE_FUZZ_EXAMPLES", 200)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    container=st.sampled_from(XMP_WRAPPERS),
    where=st.floats(0, 1),
    splice=st.binary(max_size=32),
    cut=st.floats(0, 1),
)
def test_mutated_packets_never_break_extraction(
    tmp_path: Path, container: str, where: float, splice: bytes, cut: float
) -> None:
    packet = bytearray(PACKET)
    position = int(where * len(packet))
    packet[position : position + len(splice)] = splice
    try:
        data = bytearray(wrap_xmp(container, bytes(packet)))
    except ValueError:  # the svg builder needs the rdf:RDF element the splice may have cut
        return
    path = tmp_path / f"fuzz.{container}"
    path.write_bytes(bytes(data[: max(1, int(cut * len(data)))] if cut < 0.3 else data))
    result = FUZZ_REGISTRY.extract(path, filename=path.name)
    assert result.errors == []
    for field, value in result.values.items():
        assert check_value(field, value) is None, (field, value)


_FRAGMENTS = [b"<x:xmpmeta", b"</x:xmpmeta>", b"<rdf:RDF", b"</rdf:RDF>", b" ", b"\n", b">", b"x"]


@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=24))
def test_the_packet_search_finds_what_the_regular_expression_would(
    fragments: list[bytes],
) -> None:
    text = b"".join(fragments)
    for name in (b"x:xmpmeta", b"rdf:RDF"):
        pattern = b"<" + name + rb"[\s>].*?</" + name + b">"
        found = re.search(pattern, text, re.DOTALL)
        assert xmp.element(text, name) == (found.group(0) if found else None)


def test_a_file_of_openings_without_a_closing_tag_is_searched_in_linear_time(
    tmp_path: Path,
) -> None:
    # The regular expression this search replaced took 14 s of CPU on 214 KiB of these, holding
    # the GIL: the whole server stood still. Run apart, so that a regression fails, not hangs.
    path = tmp_path / "openings.svg"
    path.write_bytes(b"<x:xmpmeta " * 24_000)
    assert extract_apart(path) == ({}, [])


def test_an_xmp_item_split_into_many_extents_is_joined_in_linear_time(tmp_path: Path) -> None:
    # 65,535 extents of 63 bytes (a 513 KiB file): joined with `data += part`, every extent
    # copied all the bytes before it (37 s of CPU). Run apart, so that a regression fails.
    filler = b" " * 63
    data = heif_with_split_item(b"mime", b"\x00application/rdf+xml\x00", PACKET, 65_535, filler)
    (tmp_path / "split.heic").write_bytes(data)
    (tmp_path / "expected").write_bytes(PACKET + filler * 65_534)
    script = (
        "import io, sys\n"
        "from pathlib import Path\n"
        "from metalake.extractors.containers import heif_item\n"
        "data = Path(sys.argv[1], 'split.heic').read_bytes()\n"
        "found = heif_item(io.BytesIO(data), len(data), b'mime', b'application/rdf+xml')\n"
        "assert found == Path(sys.argv[1], 'expected').read_bytes()\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=20)
