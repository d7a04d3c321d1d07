"""Helpers for testing extractors: EXIF-bearing files built on the fly, and exiftool as oracle.

Plugin authors may use them too (see docs/plugins.md). Nothing here runs in the server.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, TiffImagePlugin

from metalake.metadata import MetadataDict, parse_datetime

R = TiffImagePlugin.IFDRational

# What `sample_exif()` writes, as metalake fields (and as exiftool reads them).
SAMPLE_FIELDS: dict[str, Any] = {
    "acquired_at": "2021-06-01T12:34:56+02:00",
    "acquired_by": "Ada Lovelace",
    "manufacturer": "Metalake Optics",
    "software": "builder v2",
    "resolution_x": 300.0,
    "resolution_y": 150.0,
    "resolution_unit": "cm",
    "compression": "LZW",
    "color_space": "Adobe RGB",
    "latitude": -33.8568,
    "longitude": 151.2153,
    "altitude": -12.5,
}

# Container formats `wrap_tiff` can build around a TIFF-structured EXIF block.
WRAPPERS = (
    "tiff",
    "orf",
    "rw2",
    "psd",
    "jp2",
    "jxl",
    "cr3",
    "heif",
    "raf",
    "png-late",
    "png-text",
    "miff",
    "flif",
    "x3f",
)


def dms(degrees: float) -> tuple[R, R, R]:
    """Decimal degrees as the three GPS rationals (seconds to 1/10000)."""
    whole = int(degrees)
    minutes_float = (degrees - whole) * 60
    minutes = int(minutes_float)
    seconds = round((minutes_float - minutes) * 60 * 10000)
    return R(whole, 1), R(minutes, 1), R(seconds, 10000)


def sample_exif() -> Image.Exif:
    """EXIF with IFD0, the Exif sub-IFD and the GPS sub-IFD: every field of `SAMPLE_FIELDS`."""
    exif = Image.Exif()
    exif[0x010F] = "Metalake Optics"
    exif[0x013B] = "Ada Lovelace"
    exif[0x0131] = "builder v2"
    exif[0x0132] = "2020:01:01 00:00:00"
    exif[0x011A] = R(300, 1)
    exif[0x011B] = R(150, 1)
    exif[0x0128] = 3
    exif[0x0103] = 5
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = "2021:06:01 12:34:56"
    sub[0x9011] = "+02:00"
    sub[0xA001] = 2
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "S", dms(33.8568)
    gps[3], gps[4] = "E", dms(151.2153)
    gps[5], gps[6] = b"\x01", R(125, 10)
    return exif


def tiff_bytes(exif: Image.Exif) -> bytes:
    """The TIFF structure of `exif` (IFD0 first), without JPEG's "Exif\\0\\0" prefix."""
    data = exif.tobytes()
    return data[6:] if data.startswith(b"Exif\x00\x00") else data


def save_with_pillow(path: Path, exif: Image.Exif, size: tuple[int, int] = (16, 16)) -> Path:
    """An image Pillow writes with `exif` embedded (JPEG, PNG, WebP from the suffix)."""
    Image.new("RGB", size, (200, 30, 30)).save(path, exif=exif)
    return path


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I4s", len(data), kind) + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(late_chunks: Sequence[bytes], early_chunks: Sequence[bytes] = ()) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buffer, "PNG")
    png = buffer.getvalue()
    iend = png.rindex(b"IEND") - 4
    ihdr_end = 8 + 25
    return (
        png[:ihdr_end]
        + b"".join(early_chunks)
        + png[ihdr_end:iend]
        + b"".join(late_chunks)
        + png[iend:]
    )


def _jpeg_with_app1(tiff: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def wrap_tiff(container: str, tiff: bytes) -> bytes:
    """A minimal file of `container` format (see `WRAPPERS`) carrying the EXIF block `tiff`.

    Only the structure metadata readers walk is real; pixel data is absent or a stub.
    """
    if container == "tiff":
        return tiff
    if container in ("orf", "rw2"):
        magic = {"orf": b"RO", "rw2": b"U\x00"}[container]
        return tiff[:2] + (magic if tiff[:2] == b"II" else magic[::-1]) + tiff[4:]
    if container == "psd":
        header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 8, 8, 8, 3)
        resource = b"8BIM" + struct.pack(">H", 0x0422) + b"\x00\x00" + struct.pack(">I", len(tiff))
        resource += tiff + (b"\x00" if len(tiff) % 2 else b"")
        layers = struct.pack(">I", 0)
        image = struct.pack(">H", 0) + bytes(8 * 8 * 3)
        return (
            header
            + struct.pack(">I", 0)
            + struct.pack(">I", len(resource))
            + resource
            + layers
            + image
        )
    if container == "jp2":
        signature = _box(b"jP  ", b"\r\n\x87\n")
        ftyp = _box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
        ihdr = _box(b"ihdr", struct.pack(">IIHBBBB", 8, 8, 3, 7, 7, 0, 0))
        colr = _box(b"colr", b"\x01\x00\x00\x00\x00\x00\x10")
        return (
            signature
            + ftyp
            + _box(b"jp2h", ihdr + colr)
            + _box(b"uuid", b"JpgTiffExif->JP2" + b"Exif\x00\x00" + tiff)
        )
    if container == "jxl":
        signature = _box(b"JXL ", b"\r\n\x87\n")
        ftyp = _box(b"ftyp", b"jxl \x00\x00\x00\x00jxl ")
        codestream = _box(b"jxlc", b"\xff\x0a\x00")
        return signature + ftyp + _box(b"Exif", b"\x00\x00\x00\x00" + tiff) + codestream
    if container == "cr3":
        exif = Image.Exif()
        exif.load(tiff)
        ifd0 = Image.Exif()
        for tag, value in exif.items():
            if tag not in (0x8769, 0x8825):
                ifd0[tag] = value
        cmt2, cmt4 = Image.Exif(), Image.Exif()
        cmt2.update(exif.get_ifd(0x8769))
        cmt4.update(exif.get_ifd(0x8825))
        uuid_payload = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")
        uuid_payload += _box(b"CMT1", tiff_bytes(ifd0)) + _box(b"CMT2", tiff_bytes(cmt2))
        uuid_payload += _box(b"CMT4", tiff_bytes(cmt4))
        ftyp = _box(b"ftyp", b"crx \x00\x00\x00\x01crx isom")
        return ftyp + _box(b"moov", _box(b"uuid", uuid_payload)) + _box(b"mdat", bytes(64))
    if container == "heif":
        ftyp = _box(b"ftyp", b"heic\x00\x00\x00\x00mif1heic")
        hdlr = _box(b"hdlr", bytes(8) + b"pict" + bytes(13))
        infe = _box(b"infe", b"\x02\x00\x00\x00" + struct.pack(">HH", 1, 0) + b"Exif\x00")
        iinf = _box(b"iinf", b"\x00\x00\x00\x00" + struct.pack(">H", 1) + infe)
        payload = struct.pack(">I", 6) + b"Exif\x00\x00" + tiff
        # iloc version 0, 4-byte offsets and lengths, no base offset; offset patched below.
        iloc_body = (
            b"\x00\x00\x00\x00"
            + bytes([0x44, 0x00])
            + struct.pack(">HHHHII", 1, 1, 0, 1, 0, len(payload))
        )
        meta = _box(b"meta", b"\x00\x00\x00\x00" + hdlr + iinf + _box(b"iloc", iloc_body))
        head = ftyp + meta
        mdat_payload_offset = len(head) + 8
        iloc_body = iloc_body[:-8] + struct.pack(">II", mdat_payload_offset, len(payload))
        meta = _box(b"meta", b"\x00\x00\x00\x00" + hdlr + iinf + _box(b"iloc", iloc_body))
        return ftyp + meta + _box(b"mdat", payload)
    if container == "raf":
        jpeg = _jpeg_with_app1(tiff)
        header = b"FUJIFILMCCD-RAW 0201FF383501" + bytes(56)
        header = header[:84] + struct.pack(">II", 160, len(jpeg))
        header = header.ljust(160, b"\x00")
        return header + jpeg
    if container == "png-late":
        return _png([_png_chunk(b"eXIf", tiff)])
    if container == "png-text":
        hex_digits = (b"Exif\x00\x00" + tiff).hex()
        lines = "\n".join(hex_digits[i : i + 72] for i in range(0, len(hex_digits), 72))
        text = f"\nexif\n{len(tiff) + 6:8d}\n{lines}\n".encode()
        return _png(
            [], [_png_chunk(b"zTXt", b"Raw profile type exif\x00\x00" + zlib.compress(text))]
        )
    if container == "miff":  # ImageMagick: a text header, then the profiles, then the pixels
        profile = b"Exif\x00\x00" + tiff
        header = b"id=ImageMagick\nclass=DirectClass  matte=False\ncolumns=1  rows=1  depth=8\n"
        header += b"profile-APP1=%d\n\x0c\n:\x1a" % len(profile)
        return header + profile + b"\x80\x80\x80"
    if container == "flif":  # FLIF: header, then DEFLATE-compressed metadata chunks
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        chunk = deflate.compress(b"Exif\x00\x00" + tiff) + deflate.flush()
        length = _varint(len(chunk))
        return b"FLIF\x33\x31\x00\x00" + b"eXif" + length + chunk + b"\x00" + bytes(16)
    if container == "x3f":  # Sigma: header, a JPEG preview section, the directory at the end
        header = b"FOVb" + struct.pack("<I", (2 << 16) | 1) + bytes(32)
        section = b"SECi" + struct.pack("<IIIIII", 0x20000, 2, 18, 8, 8, 0) + _jpeg_with_app1(tiff)
        directory = b"SECd" + struct.pack("<II", 0x20000, 1)
        directory += struct.pack("<II4s", len(header), len(section), b"IMA2")
        return header + section + directory + struct.pack("<I", len(header) + len(section))
    raise ValueError(f"unknown container {container!r}; expected one of {WRAPPERS}")


def _varint(number: int) -> bytes:
    groups = [number & 0x7F]
    number >>= 7
    while number:
        groups.append(0x80 | (number & 0x7F))
        number >>= 7
    return bytes(reversed(groups))


def exiftool_path() -> str | None:
    """The exiftool executable, or None when it is not installed."""
    return shutil.which("exiftool")


_EXIFTOOL_TAGS = (
    "-IFD0:Make",
    "-IFD0:Artist",
    "-IFD0:Software",
    "-IFD0:ModifyDate",
    "-IFD0:XResolution#",
    "-IFD0:YResolution#",
    "-IFD0:ResolutionUnit",
    "-IFD0:Compression",
    "-ExifIFD:ColorSpace",
    "-ExifIFD:DateTimeOriginal",
    "-ExifIFD:OffsetTimeOriginal",
    "-ExifIFD:OffsetTime",
    "-Composite:GPSLatitude#",
    "-Composite:GPSLongitude#",
    "-Composite:GPSAltitude#",
)
# The XMP properties the `xmp` extractor maps, read for the fields EXIF leaves empty.
_EXIFTOOL_XMP_TAGS = (
    "-XMP-exif:DateTimeOriginal",
    "-XMP-xmp:CreateDate",
    "-XMP-photoshop:DateCreated",
    "-XMP-exif:GPSLatitude#",
    "-XMP-exif:GPSLongitude#",
    "-XMP-exif:GPSAltitude#",
    "-XMP-exif:GPSAltitudeRef#",
    "-XMP-drone-dji:AbsoluteAltitude#",
    "-XMP-tiff:Make",
    "-XMP-tiff:Software",
    "-XMP-dc:Creator",
)


class _Number(float):
    """A JSON number that remembers how it was written (str gives the literal)."""

    literal: str

    def __new__(cls, literal: str) -> _Number:
        number = super().__new__(cls, literal)
        number.literal = literal
        return number

    def __str__(self) -> str:
        return self.literal


def exiftool_fields(paths: Iterable[Path], *, xmp: bool = False) -> dict[Path, dict[str, Any]]:
    """What exiftool reads from each file, mapped to metalake fields by the corpus rules
    (acquired_at as `YYYY-MM-DDTHH:MM:SS[±HH:MM]`, numbers as floats).

    With `xmp`, the fields EXIF leaves empty are read from the XMP properties the built-in `xmp`
    extractor maps (see docs/plugins.md)."""
    paths = list(paths)
    executable = exiftool_path()
    if executable is None:
        raise RuntimeError("exiftool is not installed (apt-get install libimage-exiftool-perl)")
    completed = subprocess.run(
        [
            executable,
            "-j",
            "-G1",
            "-charset",
            "exif=utf8",
            *_EXIFTOOL_TAGS,
            *(_EXIFTOOL_XMP_TAGS if xmp else ()),
            *map(str, paths),
        ],
        capture_output=True,
        check=False,
        text=True,
    )
    # Numbers stay as written: Software "1.00" is a string, not the number 1.0.
    records = json.loads(completed.stdout or "[]", parse_float=_Number, parse_int=_Number)
    by_file = {record["SourceFile"]: record for record in records}
    mapped = {}
    for path in paths:
        record = by_file.get(str(path), {})
        fields = _map_exiftool(record)
        if xmp:
            for field, value in _map_exiftool_xmp(record).items():
                fields.setdefault(field, value)
        mapped[path] = fields
    return mapped


def _map_exiftool(record: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, key in (
        ("manufacturer", "IFD0:Make"),
        ("acquired_by", "IFD0:Artist"),
        ("software", "IFD0:Software"),
        ("resolution_unit", "IFD0:ResolutionUnit"),
        ("compression", "IFD0:Compression"),
        ("color_space", "ExifIFD:ColorSpace"),
    ):
        if key in record and str(record[key]).strip():
            out[field] = str(record[key]).strip()
    # exiftool prints an unknown ColorSpace in hex; the rules write every unknown value in decimal.
    if out.get("color_space", "").startswith("Unknown (0x"):
        out["color_space"] = f"Unknown ({int(out['color_space'][11:-1], 16)})"
    for field, key in (
        ("resolution_x", "IFD0:XResolution"),
        ("resolution_y", "IFD0:YResolution"),
        ("latitude", "Composite:GPSLatitude"),
        ("longitude", "Composite:GPSLongitude"),
        ("altitude", "Composite:GPSAltitude"),
    ):
        if isinstance(record.get(key), int | float):
            out[field] = float(record[key])
    for field in ("resolution_x", "resolution_y"):  # a resolution must be > 0 (the contract)
        if field in out and not out[field] > 0:
            del out[field]
    for date_key, offset_key in (
        ("ExifIFD:DateTimeOriginal", "ExifIFD:OffsetTimeOriginal"),
        ("IFD0:ModifyDate", "ExifIFD:OffsetTime"),
    ):
        text = str(record.get(date_key, ""))
        if len(text) >= 19 and text[4] == ":" and text[7] == ":":
            iso = text[:10].replace(":", "-") + "T" + text[11:19]
            try:
                parse_datetime(iso)
            except ValueError:
                continue
            offset = str(record.get(offset_key, ""))
            out["acquired_at"] = iso + (offset if len(offset) == 6 and offset[0] in "+-" else "")
            break
    return out


_EXIFTOOL_DATE = re.compile(
    r"(\d{4}):(\d{2}):(\d{2}) (\d{2}):(\d{2})(?::(\d{2}))?(?:\.\d+)?(Z|[+-]\d{2}:\d{2})?$"
)


def _exiftool_date(text: str) -> str | None:
    """exiftool's `YYYY:MM:DD HH:MM[:SS][.ss][±HH:MM|Z]` as the rules write it, or None."""
    match = _EXIFTOOL_DATE.match(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, zone = match.groups()
    iso = f"{year}-{month}-{day}T{hour}:{minute}:{second or '00'}"
    try:
        parse_datetime(iso)
    except ValueError:
        return None
    return iso + ("+00:00" if zone == "Z" else zone or "")


def _as_float(value: object) -> float | None:
    try:
        number = float(str(value))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _map_exiftool_xmp(record: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, key in (
        ("manufacturer", "XMP-tiff:Make"),
        ("software", "XMP-tiff:Software"),
        ("acquired_by", "XMP-dc:Creator"),
    ):
        value = record.get(key)
        if isinstance(value, list):
            value = ", ".join(str(item).strip() for item in value if str(item).strip())
        if value is not None and str(value).strip():
            out[field] = str(value).strip()
    for key in ("XMP-exif:DateTimeOriginal", "XMP-xmp:CreateDate", "XMP-photoshop:DateCreated"):
        date = _exiftool_date(str(record.get(key, "")))
        if date is not None:
            out["acquired_at"] = date
            break
    for field, key in (
        ("latitude", "XMP-exif:GPSLatitude"),
        ("longitude", "XMP-exif:GPSLongitude"),
    ):
        if isinstance(record.get(key), int | float):
            out[field] = float(record[key])
    dji = _as_float(record.get("XMP-drone-dji:AbsoluteAltitude"))  # "+512.25": a string
    if dji is not None:
        out["altitude"] = dji
    elif isinstance(record.get("XMP-exif:GPSAltitude"), int | float):
        below = record.get("XMP-exif:GPSAltitudeRef") == 1
        out["altitude"] = float(record["XMP-exif:GPSAltitude"]) * (-1 if below else 1)
    return out


def _wall_and_offset(text: str) -> tuple[object, object]:
    try:
        moment = parse_datetime(text)
    except ValueError:
        return text, None
    return moment.replace(tzinfo=None), moment.utcoffset()


def as_json_fields(values: MetadataDict) -> dict[str, Any]:
    """Extracted values in the form `exiftool_fields` and expected.json use."""
    from metalake.metadata import format_datetime

    return {
        field: format_datetime(value) if not isinstance(value, float | str) else value
        for field, value in values.items()
    }


def same_fields(expected: Mapping[str, Any], got: Mapping[str, Any]) -> list[str]:
    """The differences between two field mappings, within the corpus tolerances. Capture times
    agree when their wall times and offsets do ('Z' is '+00:00')."""
    problems = []
    for field in sorted(set(expected) | set(got)):
        want, have = expected.get(field), got.get(field)
        if field == "acquired_at" and isinstance(want, str) and isinstance(have, str):
            if _wall_and_offset(want) == _wall_and_offset(have):
                continue
        elif isinstance(want, float) and isinstance(have, float):
            tolerance = 1e-7 if field in ("latitude", "longitude") else 1e-6 * abs(want)
            if abs(want - have) <= tolerance:
                continue
        elif want == have:
            continue
        problems.append(f"{field}: expected {want!r}, got {have!r}")
    return problems


# Containers `wrap_xmp` can build around an XMP packet.
XMP_WRAPPERS = ("jpeg", "png", "png-zipped", "webp", "tiff", "heif", "jxl", "jp2", "gif", "svg")


def _heif_with_item(item_type: bytes, name_and_type: bytes, payload: bytes) -> bytes:
    ftyp = _box(b"ftyp", b"heic\x00\x00\x00\x00mif1heic")
    hdlr = _box(b"hdlr", bytes(8) + b"pict" + bytes(13))
    infe = _box(b"infe", b"\x02\x00\x00\x00" + struct.pack(">HH", 1, 0) + item_type + name_and_type)
    iinf = _box(b"iinf", b"\x00\x00\x00\x00" + struct.pack(">H", 1) + infe)

    def meta(offset: int) -> bytes:
        # iloc version 0, 4-byte offsets and lengths, no base offset.
        iloc = b"\x00\x00\x00\x00" + bytes([0x44, 0x00])
        iloc += struct.pack(">HHHHII", 1, 1, 0, 1, offset, len(payload))
        return _box(b"meta", b"\x00\x00\x00\x00" + hdlr + iinf + _box(b"iloc", iloc))

    offset = len(ftyp) + len(meta(0)) + 8
    return ftyp + meta(offset) + _box(b"mdat", payload)


def heif_with_split_item(
    item_type: bytes, name_and_type: bytes, payload: bytes, extents: int, filler: bytes
) -> bytes:
    """A HEIF file whose one item is `payload` followed by `filler`, repeated to make `extents`
    extents in all (at most 65,535): an item split into pieces, which a reader joins."""
    ftyp = _box(b"ftyp", b"heic\x00\x00\x00\x00mif1heic")
    hdlr = _box(b"hdlr", bytes(8) + b"pict" + bytes(13))
    infe = _box(b"infe", b"\x02\x00\x00\x00" + struct.pack(">HH", 1, 0) + item_type + name_and_type)
    iinf = _box(b"iinf", b"\x00\x00\x00\x00" + struct.pack(">H", 1) + infe)

    def meta(offset: int) -> bytes:
        # iloc version 0, 4-byte offsets and lengths, no base offset.
        iloc = b"\x00\x00\x00\x00" + bytes([0x44, 0x00]) + struct.pack(">HHHH", 1, 1, 0, extents)
        iloc += struct.pack(">II", offset, len(payload))
        iloc += struct.pack(">II", offset + len(payload), len(filler)) * (extents - 1)
        return _box(b"meta", b"\x00\x00\x00\x00" + hdlr + iinf + _box(b"iloc", iloc))

    offset = len(ftyp) + len(meta(0)) + 8
    return ftyp + meta(offset) + _box(b"mdat", payload + filler)


def wrap_xmp(container: str, packet: bytes, exif: Image.Exif | None = None) -> bytes:
    """A minimal file of `container` format (see `XMP_WRAPPERS`) carrying the XMP `packet`, and
    for JPEG, PNG and WebP also `exif`, where each format keeps them."""
    if container in ("jpeg", "png", "webp"):
        buffer = io.BytesIO()
        extra: dict[str, Any] = {"exif": exif} if exif is not None else {}
        if container == "webp":
            Image.new("RGB", (8, 8)).save(buffer, "WEBP", xmp=packet, **extra)
            return buffer.getvalue()
        Image.new("RGB", (8, 8)).save(buffer, container.upper(), **extra)
        data = buffer.getvalue()
        if container == "jpeg":
            payload = b"http://ns.adobe.com/xap/1.0/\x00" + packet
            segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
            return data[:2] + segment + data[2:]
        return _png([_png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + packet)])
    if container == "png-zipped":
        text = b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + zlib.compress(packet)
        return _png([_png_chunk(b"iTXt", text)])
    if container == "tiff":
        image = Image.new("RGB", (4, 4))
        buffer = io.BytesIO()
        info = TiffImagePlugin.ImageFileDirectory_v2()
        info[700] = packet
        info.tagtype[700] = 1  # BYTE, as XMLPacket is written
        image.save(buffer, "TIFF", tiffinfo=info)
        return buffer.getvalue()
    if container == "heif":
        return _heif_with_item(b"mime", b"\x00application/rdf+xml\x00", packet)
    if container == "jxl":
        signature = _box(b"JXL ", b"\r\n\x87\n")
        ftyp = _box(b"ftyp", b"jxl \x00\x00\x00\x00jxl ")
        return signature + ftyp + _box(b"xml ", packet) + _box(b"jxlc", b"\xff\x0a\x00")
    if container == "jp2":
        signature = _box(b"jP  ", b"\r\n\x87\n")
        ftyp = _box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
        uuid = bytes.fromhex("be7acfcb97a942e89c71999491e3afac")
        ihdr = _box(b"ihdr", struct.pack(">IIHBBBB", 8, 8, 3, 7, 7, 0, 0))
        colr = _box(b"colr", b"\x01\x00\x00\x00\x00\x00\x10")
        return signature + ftyp + _box(b"jp2h", ihdr + colr) + _box(b"uuid", uuid + packet)
    if container == "gif":  # XMP as GIF's "XMP DataXMP" application extension
        buffer = io.BytesIO()
        Image.new("P", (4, 4)).save(buffer, "GIF")
        gif = buffer.getvalue()
        trailer = bytes([1, *range(255, -1, -1), 0])  # the "magic trailer" of the extension
        extension = b"\x21\xff\x0bXMP DataXMP" + packet + trailer
        return gif[:-1] + extension + gif[-1:]
    if container == "svg":
        start = packet.index(b"<rdf:RDF")
        end = packet.index(b"</rdf:RDF>") + len(b"</rdf:RDF>")
        return (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" '
            b'height="4"><metadata>' + packet[start:end] + b"</metadata></svg>"
        )
    raise ValueError(f"unknown container {container!r}; expected one of {XMP_WRAPPERS}")
