"""The built-in extractors on files built here, checked against exiftool (the oracle)."""

from __future__ import annotations

import io
import os
import struct
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageFile
from PIL.TiffImagePlugin import IFDRational

from metalake.extractors import exifread_exif, tiffread
from metalake.extractors.containers import _COPIED_BLOCK, SCAN_LIMIT, TiffBlock, open_block
from metalake.extractors.fields import (
    GPS_LATITUDE,
    MAKE,
    MAPPED_TAGS,
    XRESOLUTION,
    Rational,
    dms_to_degrees,
    first,
    gps_fields,
    parse_datetime,
    to_text,
)
from metalake.extractors.pillow_exif import normalize, read_directories
from metalake.extractors.registry import ExtractorRegistry, builtin_plugins
from metalake.extractors.source import Source
from metalake.extractors.testing import (
    SAMPLE_FIELDS,
    WRAPPERS,
    R,
    as_json_fields,
    exiftool_fields,
    exiftool_path,
    heif_with_split_item,
    same_fields,
    sample_exif,
    save_with_pillow,
    tiff_bytes,
    wrap_tiff,
)
from tests.hangguard import extract_apart

needs_exiftool = pytest.mark.skipif(
    exiftool_path() is None,
    reason="exiftool is not installed (apt-get install libimage-exiftool-perl); it is the oracle",
)
# exiftool reads RW2's IFD0 with its Panasonic table, which has no Artist, Software,
# resolution or compression: metalake reads it so too (and must agree with exiftool exactly).
SUBSET_ONLY: set[str] = set()


@pytest.fixture(scope="module")
def registry() -> ExtractorRegistry:
    return ExtractorRegistry(builtin_plugins())


@pytest.fixture(scope="module")
def built_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("built")
    tiff = tiff_bytes(sample_exif())
    files = {}
    for container in WRAPPERS:
        path = folder / f"sample.{container}"
        path.write_bytes(wrap_tiff(container, tiff))
        files[container] = path
    for suffix in ("jpg", "png", "webp"):
        files[f"pillow-{suffix}"] = save_with_pillow(folder / f"pillow.{suffix}", sample_exif())
    return files


def test_every_container_gives_every_field(
    registry: ExtractorRegistry, built_files: dict[str, Path]
) -> None:
    for name, path in built_files.items():
        result = registry.extract(path, filename=path.name)
        if name == "rw2":  # Panasonic's IFD0 table: Make and the Exif and GPS pointers only
            assert set(result.values) == {"manufacturer", "acquired_at", "color_space"} | {
                "latitude",
                "longitude",
                "altitude",
            }
            continue
        assert same_fields(SAMPLE_FIELDS, as_json_fields(result.values)) == [], name
        assert result.errors == [], name
        assert result.sources["latitude"] == "gps"
        assert result.sources["manufacturer"] == "pillow", (name, result.sources)


@needs_exiftool
def test_built_files_agree_with_exiftool(
    registry: ExtractorRegistry, built_files: dict[str, Path]
) -> None:
    oracle = exiftool_fields(built_files.values())
    for name, path in built_files.items():
        ours = as_json_fields(registry.extract(path).values)
        theirs = oracle[path]
        if name in SUBSET_ONLY:
            ours = {field: value for field, value in ours.items() if field in theirs}
        assert same_fields(theirs, ours) == [], name


@needs_exiftool
def test_edge_values_agree_with_exiftool(registry: ExtractorRegistry, tmp_path: Path) -> None:
    cases: list[dict[int, Any]] = [
        {0x010F: "  Padded  ", 0x0128: 7, 0x0103: 34892},  # unknown unit, named compression
        {0x010F: "Cut\x00after NUL", 0x0103: 60000, 0x0132: "0000:00:00 00:00:00"},
        {0x011A: R(0, 0), 0x011B: R(72, 0), 0x0131: "", 0x0132: "2019:13:01 00:00:00"},
        {0x0132: "2019:02:03 04:05:06", 0x013B: "Zoë Ünïcode"},
    ]
    paths = []
    for index, tags in enumerate(cases):
        exif = Image.Exif()
        for tag, value in tags.items():
            exif[tag] = value
        exif.get_ifd(0x8769)[0xA001] = [5, 1, 0xFFFF, 0xFFFD][index]
        gps = exif.get_ifd(0x8825)
        if index == 0:
            gps[2], gps[4], gps[6] = (
                (R(1, 1), R(2, 1), R(3, 1)),
                (R(4, 1), R(5, 1), R(6, 1)),
                R(7, 1),
            )
        if index == 1:  # references present, a zero denominator in the latitude
            gps[1], gps[2], gps[3], gps[4] = (
                "N",
                (R(1, 0), R(2, 1), R(3, 1)),
                "W",
                (R(4, 1), R(0, 1), R(0, 1)),
            )
            gps[5], gps[6] = b"\x00", R(100, 3)
        paths.append(save_with_pillow(tmp_path / f"edge{index}.jpg", exif))
    oracle = exiftool_fields(paths)
    for path in paths:
        ours = as_json_fields(registry.extract(path).values)
        assert same_fields(oracle[path], ours) == [], path.name


def test_png_with_exif_after_the_image_data_is_not_decoded(
    registry: ExtractorRegistry, built_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)
    result = registry.extract(built_files["png-late"])
    assert result.values["manufacturer"] == "Metalake Optics"
    assert result.errors == []


class CountingFile(io.BufferedReader):
    read_total = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        CountingFile.read_total += len(data)
        return data


@pytest.fixture
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> type[CountingFile]:
    def counting_open(self: Source) -> BinaryIO:
        return CountingFile(io.FileIO(self.path, "rb"))

    monkeypatch.setattr(Source, "open", counting_open)
    CountingFile.read_total = 0
    return CountingFile


def _big_jpeg(path: Path, size: int) -> Path:
    """A JPEG with EXIF whose scan data is padded to `size` bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG", exif=sample_exif())
    jpeg = buffer.getvalue()
    with path.open("wb") as out:
        out.write(jpeg[:-2])
        out.write(b"\x00" * (size - len(jpeg)))
        out.write(b"\xff\xd9")
    return path


@pytest.mark.parametrize("container", ["jpeg", "tiff", "png-late", "heif", "cr3", "raf"])
def test_a_huge_file_costs_what_a_small_one_does(
    registry: ExtractorRegistry,
    tmp_path: Path,
    counted_reads: type[CountingFile],
    container: str,
) -> None:
    if container == "jpeg":
        small, big = (
            _big_jpeg(tmp_path / "s.jpg", 10_000),
            _big_jpeg(tmp_path / "b.jpg", 75_000_000),
        )
    else:
        data = wrap_tiff(container, tiff_bytes(sample_exif()))
        small, big = tmp_path / "small", tmp_path / "big"
        small.write_bytes(data)
        with big.open("wb") as out:  # the image data, never read, sits after the metadata
            out.write(data)
            out.truncate(75_000_000)
    counted_reads.read_total = 0
    small_values = registry.extract(small).values
    small_read = counted_reads.read_total
    counted_reads.read_total = 0
    big_values = registry.extract(big).values
    assert big_values == small_values
    assert big_values["manufacturer"] == "Metalake Optics"
    assert counted_reads.read_total <= small_read + 70_000  # read-ahead buffers at most


def test_gps_needs_its_reference() -> None:
    lat = (Rational(10, 1), Rational(30, 1), Rational(0, 1))
    assert gps_fields({2: lat, 4: lat, 6: Rational(5, 1)}) == {}
    assert gps_fields({1: b"S", 2: lat, 3: b"W", 4: lat, 5: 1, 6: Rational(5, 1)}) == {
        "latitude": -10.5,
        "longitude": -10.5,
        "altitude": -5.0,
    }
    assert gps_fields({1: b"N", 2: (Rational(400, 1), Rational(0, 1), Rational(0, 1))}) == {}
    assert dms_to_degrees((Rational(1, 0), Rational(0, 1), Rational(0, 1))) is None


def test_text_and_dates_follow_exiftool() -> None:
    assert to_text(b"  Canon\x00junk") == "Canon"
    assert to_text(b"\x00") is None
    assert to_text(b"caf\xe9") == "caf?"  # not UTF-8: exiftool shows each such byte as "?"
    assert parse_datetime(b"0000:00:00 00:00:00", None) is None
    assert parse_datetime(b"2020:02:30 00:00:00", None) is None
    aware = parse_datetime(b"2020:02:03 04:05:06.123", b"-05:30")
    assert aware is not None
    assert aware.isoformat() == "2020-02-03T04:05:06-05:30"
    # Offsets are made once and shared; one of a day or more is no offset.
    again = parse_datetime(b"2021:01:01 00:00:00", b"-05:30")
    assert again is not None
    assert again.tzinfo is aware.tzinfo
    utc = parse_datetime(b"2021:01:01 00:00:00", b"-00:00")
    assert utc is not None
    assert utc.utcoffset() == timedelta(0)
    naive = parse_datetime(b"2021:01:01 00:00:00", b"+24:00")
    assert naive is not None
    assert naive.tzinfo is None


# One value of each TIFF type Pillow decodes: (type, its bytes, little-endian).
_ONE_OF_EACH_TYPE = [
    (1, b"\x07"),  # BYTE
    (2, b"Canon\x00"),  # ASCII
    (3, struct.pack("<H", 300)),  # SHORT
    (4, struct.pack("<I", 70_000)),  # LONG
    (5, struct.pack("<II", 300, 1)),  # RATIONAL
    (6, struct.pack("<b", -7)),  # SBYTE
    (7, b"raw\x00bytes"),  # UNDEFINED
    (8, struct.pack("<h", -300)),  # SSHORT
    (9, struct.pack("<i", -70_000)),  # SLONG
    (10, struct.pack("<ii", -3, 2)),  # SRATIONAL
    (11, struct.pack("<f", 2.5)),  # FLOAT
    (12, struct.pack("<d", 72.25)),  # DOUBLE
]
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}


def _tiff_with_entries(entries: list[tuple[int, int, bytes]]) -> bytes:
    """A little-endian TIFF whose IFD0 lists `entries` (tag, type, value's bytes) in this
    order, each value longer than 4 bytes after the directory."""
    values_at = 8 + 2 + 12 * len(entries) + 4
    table, tail = b"", b""
    for tag, kind, data in entries:
        if len(data) <= 4:
            inline = data.ljust(4, b"\x00")
        else:
            inline = struct.pack("<I", values_at + len(tail))
            tail += data
        table += struct.pack("<HHI", tag, kind, len(data) // _TYPE_SIZES[kind]) + inline
    header = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    return header + table + struct.pack("<I", 0) + tail


def _tiff_with_entry(tag: int, kind: int, data: bytes) -> bytes:
    """A little-endian TIFF whose IFD0 holds one entry."""
    return _tiff_with_entries([(tag, kind, data)])


@pytest.mark.parametrize("tag", [MAKE, XRESOLUTION])
@pytest.mark.parametrize(("kind", "one"), _ONE_OF_EACH_TYPE)
def test_pillow_decodes_an_entry_of_any_type_as_its_own_lookup_does(
    tag: int, kind: int, one: bytes
) -> None:
    # The extractor decodes entries with Pillow's loader for their type, not through Pillow's
    # `ifd[tag]`, which also coerces by its tag registry: both must give the same value, for a
    # tag of the type it should have and of any other (XResolution as text, Make as a number).
    for values in (1, 2):
        data = _tiff_with_entry(tag, kind, one * values)
        ours = read_directories(Source(None, "entry.tif", data=data)).ifd0.get(tag)
        exif = Image.Exif()
        exif.load(data)
        theirs = normalize(exif[tag])
        if values == 1 and isinstance(theirs, tuple) and len(theirs) == 1:
            theirs = theirs[0]  # a one-element array is its element (as tiffread gives it)
        if values == 1:
            assert ours == theirs
        else:
            # Pillow's lookup keeps the first of several values where its registry expects one
            # (XResolution); the extractor keeps them all, and the fields read the first.
            assert first(ours) == first(theirs)
            assert isinstance(ours, bytes) or ours == tuple(first(ours) for _ in range(2))


def test_a_long_directory_reads_as_pillow_reads_it_whole() -> None:
    # Pillow is given a long directory listing only the tags metalake maps (each entry it
    # lists costs Pillow's reader about 2 us): the values must be those of Pillow's reading of
    # the whole directory, the first of a duplicated tag included, values before and after.
    unmapped = [(0xC000 + n, 2, f"note {n}".encode() + b"\x00") for n in range(20)]
    entries = [
        *unmapped[:8],
        (MAKE, 2, b"First Optics\x00"),
        *unmapped[8:16],
        (XRESOLUTION, 5, struct.pack("<II", 300, 1)),
        (MAKE, 2, b"Second Optics\x00"),
        *unmapped[16:],
    ]
    data = _tiff_with_entries(entries)
    ours = read_directories(Source(None, "long.tif", data=data)).ifd0
    exif = Image.Exif()
    exif.load(data)
    theirs = {tag: normalize(exif[tag]) for tag in MAPPED_TAGS.intersection(exif)}
    assert ours == theirs == {MAKE: b"First Optics", XRESOLUTION: Rational(300, 1)}


def test_pillow_values_are_normalized_by_exact_type_and_by_kind() -> None:
    assert normalize("Canon") == b"Canon"
    assert normalize(IFDRational(3, 4)) == Rational(3, 4)
    assert normalize((IFDRational(1, 2), "x", 7, None)) == (Rational(1, 2), b"x", 7)
    assert normalize(Fraction(5, 2)) == Rational(5, 2)
    assert normalize(True) == 1

    class Text(str):
        pass

    assert normalize(Text("sub")) == b"sub"
    assert normalize(object()) is None


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_not_an_image_gives_nothing(registry: ExtractorRegistry, tmp_path: Path) -> None:
    for name, data in {
        "empty": b"",
        "text.txt": b"hello",
        "truncated.jpg": b"\xff\xd8\xff\xe1\x00",
        "truncated.tif": b"II*\x00\xff\xff\xff\x7f",
        "box.heic": struct.pack(">I4s", 0xFFFFFFF0, b"ftyp"),
    }.items():
        path = tmp_path / name
        path.write_bytes(data)
        result = registry.extract(path, filename=name)
        assert result.values == {}, name
        assert result.errors == [], name


def _clock_exif(local: str, gps_date: str | None, gps_time: tuple[int, int, int]) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = local
    gps = exif.get_ifd(0x8825)
    if gps_date is not None:
        gps[29] = gps_date
    gps[7] = tuple(R(part, 1) for part in gps_time)
    return exif


@pytest.mark.parametrize(
    ("local", "gps_date", "gps_time", "offset"),
    [
        ("2021:06:01 14:34:56", "2021:06:01", (12, 34, 50), "+02:00"),  # a camera 6 s fast
        ("2021:06:01 02:00:00", "2021:06:01", (7, 30, 0), "-05:30"),
        ("2021:06:01 09:45:00", "2021:05:31", (20, 0, 0), "+13:45"),  # across midnight
        ("2021:06:01 14:34:56", "2021:06:02", (12, 34, 50), None),  # GPS date a day off
        ("2021:06:01 14:34:56", "2021:06:01", (12, 27, 0), None),  # 7 min from a quarter hour
        ("2021:06:01 00:00:00", "2021:06:01", (13, 0, 0), None),  # -13:00 is no offset on Earth
        ("2021:06:01 14:34:56", None, (12, 34, 50), None),  # no GPS date
    ],
)
def test_offset_from_the_gps_clock(
    registry: ExtractorRegistry,
    tmp_path: Path,
    local: str,
    gps_date: str | None,
    gps_time: tuple[int, int, int],
    offset: str | None,
) -> None:
    path = save_with_pillow(tmp_path / "clock.jpg", _clock_exif(local, gps_date, gps_time))
    result = registry.extract(path)
    moment = result.values["acquired_at"]
    assert isinstance(moment, datetime)
    # The wall time is the file's, always.
    assert moment.replace(tzinfo=None) == datetime.strptime(local, "%Y:%m:%d %H:%M:%S")
    if offset is None:
        assert moment.tzinfo is None
        assert result.sources["acquired_at"] == "pillow"
    else:
        assert moment.isoformat()[19:] == offset
        assert result.sources["acquired_at"] == "pillow+gps-clock"


def test_a_recorded_offset_wins_over_the_gps_clock(
    registry: ExtractorRegistry, tmp_path: Path
) -> None:
    exif = _clock_exif("2021:06:01 14:34:56", "2021:06:01", (12, 34, 56))
    exif.get_ifd(0x8769)[0x9011] = "+05:00"
    result = registry.extract(save_with_pillow(tmp_path / "recorded.jpg", exif))
    moment = result.values["acquired_at"]
    assert isinstance(moment, datetime)
    assert moment.isoformat() == "2021-06-01T14:34:56+05:00"
    assert result.sources["acquired_at"] == "pillow"


def test_pillow_reads_the_gps_directory_only_for_a_capture_time_without_offset(
    registry: ExtractorRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metalake.extractors import pillow_exif

    reads: list[str] = []
    read_gps = pillow_exif._read_gps

    def counted(source: Source, reading: Any) -> None:
        reads.append(source.filename or "")
        read_gps(source, reading)

    monkeypatch.setattr(pillow_exif, "_read_gps", counted)
    # A recorded offset (the sample's): Pillow's reading of the GPS directory would add nothing.
    recorded = registry.extract(save_with_pillow(tmp_path / "recorded.jpg", sample_exif()))
    assert reads == []
    assert recorded.sources["acquired_at"] == "pillow"
    assert recorded.sources["latitude"] == "gps"
    # exifread does not read again what Pillow did not need to read.
    assert recorded.timings.keys() >= {"exifread"}
    assert "exifread" not in recorded.sources.values()
    # The client gave the capture time: nothing needs the GPS directory either.
    exif = _clock_exif("2021:06:01 14:34:56", "2021:06:01", (12, 34, 56))
    exif[0x010F] = "Metalake Optics"  # Make
    naive = save_with_pillow(tmp_path / "naive.jpg", exif)
    given = registry.extract(naive, filename="given.jpg", missing=["manufacturer"])
    assert reads == []
    assert given.values == {"manufacturer": "Metalake Optics"}
    # A capture time without an offset: the GPS clock may give it, so the directory is read.
    clock = registry.extract(naive, filename="clock.jpg")
    assert reads == ["clock.jpg"]
    moment = clock.values["acquired_at"]
    assert isinstance(moment, datetime)
    assert moment.isoformat() == "2021-06-01T14:34:56+02:00"
    assert clock.sources["acquired_at"] == "pillow+gps-clock"


def test_each_builtin_works_alone(tmp_path: Path) -> None:
    """Built-ins are independent plugins: none imports or runs another's parser."""
    path = save_with_pillow(tmp_path / "alone.jpg", sample_exif())
    for name in ("pillow", "exifread", "gps"):
        alone = ExtractorRegistry([p for p in builtin_plugins() if p[0] == name])
        result = alone.extract(path)
        assert set(result.sources.values()) == {name}, name
    gps_only = ExtractorRegistry([p for p in builtin_plugins() if p[0] == "gps"]).extract(path)
    assert gps_only.values["latitude"] == pytest.approx(SAMPLE_FIELDS["latitude"])
    exifread_only = ExtractorRegistry([p for p in builtin_plugins() if p[0] == "exifread"])
    assert exifread_only.extract(path).values["manufacturer"] == "Metalake Optics"


def _entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")


def _tiff_with(entries: list[bytes], tail: bytes = b"") -> bytes:
    """A little-endian TIFF: IFD0 at 8 with `entries`, then `tail` (values they point to)."""
    return b"II*\x00" + struct.pack("<IH", 8, len(entries)) + b"".join(entries) + b"\x00" * 4 + tail


def _field_rule_files(folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Files each exercising one field rule, with what metalake must read from them."""
    software = b"Kofax standard Multi-Page TIFF Storage Filter\x00"
    tail_at = 8 + 2 + 12 * 3 + 4
    duplicate = _tiff_with(
        [
            _entry(0x0103, 3, 1, struct.pack("<H", 6)),
            _entry(0x0131, 3, 1, struct.pack("<H", 3)),  # Software as a number, then as text
            _entry(0x0131, 2, len(software), struct.pack("<I", tail_at)),
        ],
        software,
    )
    exif = Image.Exif()
    exif[0x010F] = "Acme"
    exif.get_ifd(0x8769)[0xA001] = 0
    good = tiff_bytes(exif)
    # IFD0 claims 32 entries, more than the segment holds: exiftool's "Bad IFD0 directory".
    bad_ifd0 = good[:8] + struct.pack("<H" if good[:2] == b"II" else ">H", 32) + good[10:]
    files = {
        "duplicate.tif": (
            duplicate,
            {"compression": "JPEG (old-style)", "software": software[:-1].decode()},
        ),
        "colorspace0.tif": (good, {"manufacturer": "Acme", "color_space": "Unknown (0)"}),
        "bad-ifd0.jpg": (wrap_jpeg(bad_ifd0[: len(good) - 40]), {}),
        "not-tiff.jpg": (wrap_jpeg(b"\xff\xff\xff\xff" + good[4:]), {}),
        "latin1.tif": (
            _tiff_with([_entry(0x010F, 2, 4, b"caf\xe9")]),
            {"manufacturer": "caf?"},
        ),
    }
    out = {}
    for name, (data, expected) in files.items():
        path = folder / name
        path.write_bytes(data)
        out[name] = (path, expected)
    return out


def wrap_jpeg(tiff: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns on the corrupt ones
def test_field_rules_exactly(registry: ExtractorRegistry, tmp_path: Path) -> None:
    """Duplicate tags (the last one, as exiftool), 'Unknown (N)' in decimal, corrupt blocks
    giving nothing at all (no reader guessing from them), bytes that are not UTF-8 as '?'."""
    files = _field_rule_files(tmp_path)
    for name, (path, expected) in files.items():
        got = as_json_fields(registry.extract(path, filename=name).values)
        assert same_fields(expected, got) == [], name
    if exiftool_path() is not None:  # and exiftool, the oracle, reads the same
        oracle = exiftool_fields(path for path, _ in files.values())
        for name, (path, expected) in files.items():
            assert same_fields(oracle[path], expected) == [], name


@pytest.mark.parametrize("container", ["miff", "flif"])
def test_a_scanned_format_reads_a_bounded_header(
    registry: ExtractorRegistry,
    tmp_path: Path,
    counted_reads: type[CountingFile],
    container: str,
) -> None:
    """Formats read by scanning (MIFF) or by walking chunks in the header (FLIF) read at most
    a fixed number of bytes, however big the file: the pixels after the header are not read."""
    data = wrap_tiff(container, tiff_bytes(sample_exif()))
    big = tmp_path / f"big.{container}"
    with big.open("wb") as out:
        out.write(data)
        out.truncate(75_000_000)
    values = registry.extract(big).values
    assert values["manufacturer"] == "Metalake Optics"
    # The EXIF scan and the XMP scan each read at most SCAN_LIMIT; buffers add a little.
    assert counted_reads.read_total <= 2 * SCAN_LIMIT + 70_000


def test_an_item_split_into_many_extents_is_joined_in_linear_time(tmp_path: Path) -> None:
    # 65,535 extents of 60 bytes: joined with `data += part`, every extent copied all the bytes
    # before it (34 s of CPU for this 513 KiB file). Run apart, so that a regression fails.
    payload = struct.pack(">I", 6) + b"Exif\x00\x00" + tiff_bytes(sample_exif())
    path = tmp_path / "split.heic"
    path.write_bytes(heif_with_split_item(b"Exif", b"\x00", payload, 65_535, bytes(60)))
    values, _ = extract_apart(path)
    assert values["manufacturer"] == "Metalake Optics"


def test_a_heif_box_of_size_zero_does_not_hang_the_fallback_reader(tmp_path: Path) -> None:
    # exifread's own HEIF search, which ran on HEIF files in which no EXIF was located, seeks
    # back to a box whose 64-bit size is 0 and reads it again, forever: a 48-byte file spun an
    # abandoned thread at full CPU. Run apart, so that a regression fails, not hangs.
    ftyp = struct.pack(">I4s", 24, b"ftyp") + b"heic\x00\x00\x00\x00mif1heic"
    path = tmp_path / "stuck.heic"
    path.write_bytes(ftyp + struct.pack(">I4sQ", 1, b"free", 0) + bytes(8))
    assert extract_apart(path) == ({}, [])


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def test_an_iloc_box_of_zero_width_extents_is_read_in_bounded_time(tmp_path: Path) -> None:
    # iloc with zero-width offsets and lengths: 6 bytes of an item list 65,535 extents that
    # take no byte. 4,096 such items (24 KiB) cost 150 s of CPU. Run apart, so that a
    # regression fails, not hangs.
    infe = _box(b"infe", b"\x02\x00\x00\x00" + struct.pack(">HH", 1, 0) + b"Exif\x00")
    iinf = _box(b"iinf", b"\x00\x00\x00\x00" + struct.pack(">H", 1) + infe)
    items = b"".join(struct.pack(">HHH", item, 0, 65_535) for item in range(1, 4097))
    iloc = _box(b"iloc", b"\x00\x00\x00\x00" + b"\x00\x00" + struct.pack(">H", 4096) + items)
    ftyp = _box(b"ftyp", b"heic\x00\x00\x00\x00mif1heic")
    path = tmp_path / "extents.heic"
    path.write_bytes(ftyp + _box(b"meta", b"\x00\x00\x00\x00" + iinf + iloc))
    assert extract_apart(path) == ({}, [])


def _read_directory_decoding_every_entry(
    fp: BinaryIO, order: str, offset: int, length: int, *, strict: bool
) -> dict[int, object] | None:
    """tiffread.read_directory as it was: every entry decoded in turn, the last kept."""
    if offset < 8 or offset + 2 > length:
        return None
    fp.seek(offset)
    raw_count = fp.read(2)
    if len(raw_count) < 2:
        return None
    count = struct.unpack(order + "H", raw_count)[0]
    if count == 0 or (strict and count > tiffread.MAX_ENTRIES) or offset + 2 + 12 * count > length:
        return None
    entries = fp.read(12 * min(count, tiffread.MAX_ENTRIES))
    if len(entries) < 12 * min(count, tiffread.MAX_ENTRIES):
        return None
    out: dict[int, object] = {}
    unknown = 0
    for index in range(len(entries) // 12):
        tag, kind, number, value = struct.unpack_from(order + "HHI4s", entries, 12 * index)
        if kind not in tiffread._TYPES:
            unknown += 1
            continue
        if tag not in MAPPED_TAGS:
            continue
        code, size = tiffread._TYPES[kind]
        total = size * number
        if total > tiffread.MAX_VALUE or number == 0:
            continue
        if total > 4:
            pointer = struct.unpack(order + "I", value)[0]
            if pointer + total > length:
                continue
            fp.seek(pointer)
            value = fp.read(total)
            if len(value) < total:
                continue
        decoded = tiffread._decode(order, kind, code, number, value[:total])
        if decoded is not None:
            out[tag] = decoded
    if strict and unknown * 4 > count:
        return None
    return out


_ENTRY_TAGS = st.sampled_from([MAKE, XRESOLUTION, GPS_LATITUDE, 0x9999])


@given(
    order=st.sampled_from("<>"),
    entries=st.lists(
        st.tuples(
            _ENTRY_TAGS,
            st.integers(0, 14),
            st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)),
            st.integers(0, 200),
        ),
        max_size=12,
    ),
    tail=st.binary(max_size=160),
    strict=st.booleans(),
)
def test_a_directory_keeps_the_last_duplicate_as_before(
    order: str, entries: list[tuple[int, int, int, int]], tail: bytes, strict: bool
) -> None:
    # read_directory decodes, of duplicate entries, only the last that decodes: the same
    # directory as decoding them all in turn and keeping the last, in every case.
    packed = b"".join(
        struct.pack(order + "HHII", tag, kind, number, pointer)
        for tag, kind, number, pointer in entries
    )
    data = b"II*\x00" + bytes(4) + struct.pack(order + "H", len(entries)) + packed + tail
    expected = _read_directory_decoding_every_entry(
        io.BytesIO(data), order, 8, len(data), strict=strict
    )
    found = tiffread.read_directory(io.BytesIO(data), order, 8, len(data), strict=strict)
    # Compared as text: a float entry may hold NaN, which is not equal to itself.
    assert repr(found and sorted(found.items())) == repr(expected and sorted(expected.items()))


def test_a_directory_of_duplicates_is_decoded_once_per_tag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1,023 GPSLatitude entries of 8,191 rationals each, then one of 3, all at the same offset
    # (a 76 KiB GPS directory): each was decoded in turn, 5 s of CPU for the last one's value.
    decoded: list[int] = []
    decode = tiffread._decode

    def counted(order: str, kind: int, code: str, number: int, data: bytes) -> object:
        decoded.append(number)
        return decode(order, kind, code, number, data)

    monkeypatch.setattr(tiffread, "_decode", counted)
    entries = struct.pack("<HHII", GPS_LATITUDE, 5, 8191, 8 + 2 + 12 * 1024 + 4) * 1023
    latitude = struct.pack("<HHII", GPS_LATITUDE, 5, 3, 8 + 2 + 12 * 1024 + 4)
    data = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1024) + entries + latitude
    data += bytes(4) + struct.pack("<6I", 12, 1, 30, 1, 0, 1) + bytes(65_504)
    gps = tiffread.read_directory(io.BytesIO(data), "<", 8, len(data), strict=False)
    assert gps == {GPS_LATITUDE: (Rational(12, 1), Rational(30, 1), Rational(0, 1))}
    assert decoded == [3]


def test_a_directory_of_long_duplicate_texts_is_not_read_again_and_again(
    tmp_path: Path,
) -> None:
    # 65,535 entries of one unmapped ASCII tag, each the same 2 MiB text: exifread read the
    # text at every entry (a 1 MiB file of 43,000 such entries: 12 s of CPU), the time growing
    # as the square of the size. Run apart, so that a regression fails, not hangs.
    entries = 65_535
    text_at = 8 + 2 + 12 * entries + 4
    directory = struct.pack("<HHII", 0x010D, 2, 2 * 1024 * 1024, text_at) * entries
    path = tmp_path / "texts.tif"
    path.write_bytes(
        b"II*\x00"
        + struct.pack("<IH", 8, entries)
        + directory
        + bytes(4)
        + b"a" * (2 * 1024 * 1024)
    )
    assert extract_apart(path) == ({}, [])


def test_an_x3f_naming_one_preview_many_times_walks_it_a_bounded_number_of_times(
    registry: ExtractorRegistry, tmp_path: Path, counted_reads: type[CountingFile]
) -> None:
    # 4,096 directory entries naming the same JPEG preview of 4,000 markers and no EXIF (a
    # 64 KiB file): each entry walked the preview again, 16 million markers, 6.7 s of CPU.
    markers = b"\xff\xe2\x00\x02" * 4000
    preview = b"SECi\x00\x00\x02\x00\x02\x00\x00\x00\x12\x00\x00\x00" + bytes(12)
    preview += b"\xff\xd8" + markers + b"\xff\xd9"
    head = b"FOVb" + bytes(60)
    directory = b"SECd" + bytes(4) + struct.pack("<I", 4096)
    directory += struct.pack("<II4s", len(head), len(preview), b"IMA2") * 4096
    path = tmp_path / "previews.x3f"
    path.write_bytes(head + preview + directory + struct.pack("<I", len(head) + len(preview)))
    assert registry.extract(path).values == {}
    # The directory, the markers once (4 bytes each) and the XMP scan of the whole file.
    assert counted_reads.read_total <= 3 * path.stat().st_size


def test_many_blocks_share_one_read_budget(tmp_path: Path) -> None:
    # A CR3 of 4,096 CMT1 boxes, each a tiny TIFF whose Exif pointer leads to a count of 65,535
    # entries past its end (144 KiB): exifread read each block's 65,535 entries, 0.14 s a
    # block, 64 blocks 9.5 s. Run apart, so that a regression fails, not hangs.
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x8769, 4, 1, 26)
    tiff += bytes(4) + b"\xff\xff"
    uuid = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48") + _box(b"CMT1", tiff) * 4096
    path = tmp_path / "blocks.cr3"
    path.write_bytes(
        _box(b"ftyp", b"crx \x00\x00\x00\x01crx isom") + _box(b"moov", _box(b"uuid", uuid))
    )
    assert extract_apart(path) == ({}, [])


def test_an_image_whose_exif_pillow_cannot_read_has_no_exif_and_no_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found on mutated HEIF files, which Pillow opens (pillow_heif) when no walker located their
    # EXIF: getexif() then raised "not a TIFF file", and the registry logged the extractor as
    # failed. Here a GIF, which no walker reads, stands in for them.
    def broken(image: Image.Image) -> Image.Exif:
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, "GIF")
    found = ExtractorRegistry(builtin_plugins()).extract_data(gif.getvalue(), "a.gif")
    assert found.values == {}
    assert found.errors == []
    assert "pillow" in found.timings  # it ran, and found nothing


def _ftex(width: int, height: int) -> bytes:
    """An uncompressed FTEX texture (Pillow's FtexImagePlugin), which has no EXIF."""
    pixels = bytes(width * height * 3)
    where = 4 + 4 * 7
    header = b"FTEX" + struct.pack("<7i", 3, width, height, 1, 1, 1, where)
    return header + struct.pack("<i", len(pixels)) + pixels


def test_a_format_whose_reader_closes_the_file_is_no_error(tmp_path: Path) -> None:
    # Found on Pillow's own test images: its FTEX reader closes the handle it was given once it
    # has the pixel data, and entering that handle as a context manager then raised, so the
    # registry logged the `pillow` extractor as failed on a good file.
    path = tmp_path / "texture.ftu"
    path.write_bytes(_ftex(4, 4))
    with Image.open(path) as image:
        assert image.format == "FTEX"  # Pillow opens it: the fallback reader's path is taken
    registry = ExtractorRegistry(builtin_plugins())
    for found in (registry.extract(path), registry.extract_data(path.read_bytes(), path.name)):
        assert found.values == {}
        assert found.errors == []
        assert "pillow" in found.timings


@pytest.fixture
def exifread_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many reads exifread makes, counted as they reach the file."""
    calls = [0]
    read = exifread_exif._Budgeted.read

    def counting(self: exifread_exif._Budgeted, size: int = -1) -> bytes:
        calls[0] += 1
        return read(self, size)

    monkeypatch.setattr(exifread_exif._Budgeted, "read", counting)
    return calls


def test_a_directory_count_past_the_end_of_a_tiny_file_is_not_read_out(
    exifread_reads: list[int],
) -> None:
    # 16 bytes (one of Pillow's test images, seek_too_large.tif): a count of 65,535 entries and
    # nothing after it. exifread read all of them past the end, three reads each: 196,000 reads
    # and 0.43 s of CPU for one tiny upload.
    tiny = b"II+\x00\x08\x00\x00\x00" + b"\xff" * 7 + b"\x80"
    found = ExtractorRegistry([exifread_exif], timeout=None).extract_data(tiny, "tiny.tif")
    assert (found.values, found.errors) == ({}, [])
    assert exifread_reads[0] < 1_000


def test_a_directory_past_the_end_stops_alone(exifread_reads: list[int]) -> None:
    # A good IFD0, then a thumbnail directory whose count runs past the end of the file (Pillow's
    # exif-ifd-offset.jpg has one): IFD0's values are kept, and the bad directory is not read out.
    make = b"Acme\x00"
    ifd1_at = 8 + 2 + 12 + 4
    tiff = (
        b"II*\x00"
        + struct.pack("<IH", 8, 1)
        + struct.pack("<HHII", 0x010F, 2, len(make), ifd1_at + 2)  # Make, just past IFD1's count
        + struct.pack("<I", ifd1_at)
        + b"\xff\xff"  # IFD1: 65,535 entries, of which only Make's text is in the file
        + make
    )
    registry = ExtractorRegistry([exifread_exif], timeout=None)
    found = registry.extract_data(tiff, "thumbnail.tif")
    assert found.values == {"manufacturer": "Acme"}
    assert found.errors == []
    assert exifread_reads[0] < 1_000


def test_a_block_of_a_file_on_disk_is_read_out_whole_when_small(tmp_path: Path) -> None:
    # An upload over 1 MiB (most camera JPEGs) is extracted from its spool file: the directory
    # readers' many small reads and seeks go to its EXIF block read out once, as for a file in
    # memory, not each through a window on the file (0.39-0.42 -> 0.29 ms per corpus JPEG). A
    # large block (a TIFF's, the whole file) stays a window; so does one claiming more bytes than
    # the file has. All show the same bytes.
    content = os.urandom(3 * _COPIED_BLOCK)
    path = tmp_path / "spooled.bin"
    path.write_bytes(content)
    cases = [
        (TiffBlock("jpeg", 1000, 5000, header=b"II*\x00"), True),
        (TiffBlock("tiff", 0, 2 * _COPIED_BLOCK), False),
        (TiffBlock("jpeg", len(content) - 100, 5000), False),
    ]
    for block, in_memory in cases:
        with path.open("rb") as fp, open_block(fp, block) as stream:
            assert isinstance(stream, io.BytesIO) is in_memory
            shown = stream.read()
        expected = content[block.offset : block.offset + block.length]
        assert shown == block.header + expected[len(block.header) :]


def test_exifread_does_not_read_again_what_pillow_read_whole(
    tmp_path: Path, exifread_reads: list[int]
) -> None:
    # An Exif directory without one tag metalake maps (an editor's: exposure only) is read
    # whole by Pillow all the same: exifread, the fallback, would find nothing more in it.
    # A reading left incomplete (a directory running past the block) still goes to exifread.
    exif = Image.Exif()
    exif[MAKE] = "Acme"
    exif.get_ifd(0x8769)[0x829A] = IFDRational(1, 100)  # ExposureTime
    whole = save_with_pillow(tmp_path / "whole.jpg", exif)
    registry = ExtractorRegistry(builtin_plugins(), timeout=None)
    assert registry.extract(whole).values["manufacturer"] == "Acme"
    assert exifread_reads[0] == 0
    data = bytearray(whole.read_bytes())
    at = data.index(b"Exif\x00\x00") + 6  # the TIFF block Pillow wrote
    order = "<" if data[at : at + 2] == b"II" else ">"
    pointer = data.index(struct.pack(order + "HHI", 0x8769, 4, 1), at) + 8
    (exif_ifd,) = struct.unpack_from(order + "I", data, pointer)
    struct.pack_into(order + "H", data, at + exif_ifd, 0xFFFF)  # a count past the block's end
    assert registry.extract_data(bytes(data), "cut.jpg").values["manufacturer"] == "Acme"
    assert exifread_reads[0] > 0


def test_pillow_runs_only_its_readers_of_formats_with_exif(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pillow's XPM reader parses the whole palette as it opens a file (23 ms for one of its test
    # images of 237 KB), for a format that carries no EXIF: not run on a client's file.
    from PIL import XpmImagePlugin

    opened: list[str] = []
    real_open = XpmImagePlugin.XpmImageFile._open

    def counting_open(self: XpmImagePlugin.XpmImageFile) -> None:
        opened.append("xpm")
        real_open(self)

    monkeypatch.setattr(XpmImagePlugin.XpmImageFile, "_open", counting_open)
    colors = 20_000
    palette = "".join(f'"{index:04x} c #{index:06x}",\n' for index in range(colors))
    xpm = f'/* XPM */\nstatic char *a[]={{\n"1 1 {colors} 4",\n{palette}"0000"}};\n'.encode()
    with Image.open(io.BytesIO(xpm)) as image:
        assert image.format == "XPM"  # a file Pillow reads...
    opened.clear()
    found = ExtractorRegistry(builtin_plugins()).extract_data(xpm, "palette.xpm")
    assert (found.values, found.errors) == ({}, [])
    assert opened == []  # ...but not for its EXIF, which XPM cannot carry
