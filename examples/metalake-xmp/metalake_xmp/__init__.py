"""metalake extractor `xmp`: metadata from the XMP packet, for the fields EXIF left empty.

Written against metalake.plugin alone (the hook marker, the Source protocol, the field names):
it needs `metalake[plugin]` (pluggy), not the server, to import.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from datetime import datetime
from typing import BinaryIO
from xml.etree import ElementTree

from metalake.plugin import Source, hookimpl

__version__ = "0.1.0"
NAME = "xmp"

MAX_PACKET = 1024 * 1024
MAX_ITEMS = 4096
XMP_JPEG_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "exif": "http://ns.adobe.com/exif/1.0/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "drone-dji": "http://www.dji.com/drone-dji/1.0/",
}
# Candidates per field, first found wins.
TEXT_FIELDS = {
    "acquired_by": ("dc:creator", "tiff:Artist"),
    "manufacturer": ("tiff:Make",),
    "software": ("tiff:Software", "xmp:CreatorTool"),
}
DATE_PROPERTIES = ("exif:DateTimeOriginal", "photoshop:DateCreated", "xmp:CreateDate")
_COORDINATE = re.compile(r"^\s*(\d{1,3}),(\d{1,2}(?:\.\d+)?)(?:,(\d{1,2}(?:\.\d+)?))?([NSEW])\s*$")


@hookimpl
def metalake_extract_metadata(source: Source, missing: frozenset[str]) -> Mapping[str, object]:
    with source.open() as fp:
        packet = find_packet(fp)
    if packet is None:
        return {}
    properties = parse_packet(packet)
    if properties is None:
        return {}
    return {field: value for field, value in to_fields(properties).items() if field in missing}


def find_packet(fp: BinaryIO) -> bytes | None:
    """The XMP packet of a JPEG, PNG or WebP file, reading headers only."""
    head = fp.read(12)
    if head[:2] == b"\xff\xd8":
        return _jpeg(fp)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return _png(fp)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(fp)
    return None


def _jpeg(fp: BinaryIO) -> bytes | None:
    pos = 2
    for _ in range(MAX_ITEMS):
        fp.seek(pos)
        marker = fp.read(4)
        if len(marker) < 4 or marker[0] != 0xFF or marker[1] in (0xD9, 0xDA):
            return None
        length = struct.unpack(">H", marker[2:4])[0]
        if marker[1] == 0xE1 and length > len(XMP_JPEG_HEADER) + 2:
            body = fp.read(length - 2)
            if body.startswith(XMP_JPEG_HEADER):
                return body[len(XMP_JPEG_HEADER) :]
        pos += 2 + length
    return None


def _png(fp: BinaryIO) -> bytes | None:
    pos = 8
    for _ in range(MAX_ITEMS):
        fp.seek(pos)
        header = fp.read(8)
        if len(header) < 8:
            return None
        length, kind = struct.unpack(">I4s", header)
        if kind == b"iTXt" and length <= MAX_PACKET:
            data = fp.read(length)
            keyword, _, rest = data.partition(b"\x00")
            if keyword == b"XML:com.adobe.xmp" and rest[:1] == b"\x00":  # uncompressed only
                parts = rest[2:].split(b"\x00", 2)
                return parts[2] if len(parts) == 3 else None
        if kind == b"IEND":
            return None
        pos += 12 + length
    return None


def _webp(fp: BinaryIO) -> bytes | None:
    pos = 12
    for _ in range(MAX_ITEMS):
        fp.seek(pos)
        header = fp.read(8)
        if len(header) < 8:
            return None
        kind, length = struct.unpack("<4sI", header)
        if kind == b"XMP " and length <= MAX_PACKET:
            return fp.read(length)
        pos += 8 + length + (length & 1)
    return None


def parse_packet(packet: bytes) -> dict[str, str] | None:
    """Simple XMP properties as {"prefix:Name": text}; arrays give their items joined by ", ".

    Refuses DTDs outright: with no DOCTYPE there can be no entity to expand.
    """
    if len(packet) > MAX_PACKET or b"<!DOCTYPE" in packet or b"<!ENTITY" in packet:
        return None
    try:
        root = ElementTree.fromstring(packet.strip(b"\x00 \r\n\t"))
    except ElementTree.ParseError:
        return None
    names = {uri: prefix for prefix, uri in NS.items()}
    found: dict[str, str] = {}

    def qualified(tag: str) -> str | None:
        if not tag.startswith("{"):
            return None
        uri, _, local = tag[1:].partition("}")
        prefix = names.get(uri)
        return f"{prefix}:{local}" if prefix else None

    for description in root.iter(f"{{{RDF}}}Description"):
        for attribute, value in description.attrib.items():
            name = qualified(attribute)
            if name:
                found.setdefault(name, value)
        for child in description:
            name = qualified(child.tag)
            if not name:
                continue
            items = [item.text or "" for item in child.iter(f"{{{RDF}}}li")]
            text = (
                ", ".join(item.strip() for item in items if item.strip()) if items else child.text
            )
            if text and text.strip():
                found.setdefault(name, text.strip())
    return found


def to_fields(properties: Mapping[str, str]) -> dict[str, object]:
    """metalake fields from XMP properties (exiftool's XMP names)."""
    out: dict[str, object] = {}
    for field, candidates in TEXT_FIELDS.items():
        for name in candidates:
            if properties.get(name):
                out[field] = properties[name]
                break
    for name in DATE_PROPERTIES:
        moment = _date(properties.get(name))
        if moment is not None:
            out["acquired_at"] = moment
            break
    altitude = _number(properties.get("drone-dji:AbsoluteAltitude"))
    if altitude is None and "exif:GPSAltitudeRef" in properties:
        altitude = _number(properties.get("exif:GPSAltitude"))
        if altitude is not None and properties["exif:GPSAltitudeRef"].strip() == "1":
            altitude = -altitude
    if altitude is not None:
        out["altitude"] = altitude
    for field, xmp_name, dji_name in (
        ("latitude", "exif:GPSLatitude", "drone-dji:GpsLatitude"),
        ("longitude", "exif:GPSLongitude", "drone-dji:GpsLongitude"),
    ):
        value = _coordinate(properties.get(xmp_name))
        if value is None:
            value = _number(properties.get(dji_name))
        if value is not None:
            out[field] = value
    return out


def _number(text: str | None) -> float | None:
    """A decimal ("+123.4") or a rational ("1234/10"); None if neither or not finite."""
    if text is None:
        return None
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            number = float(numerator) / float(denominator)
        else:
            number = float(text)
    except (ValueError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) else None


def _coordinate(text: str | None) -> float | None:
    """XMP's "DDD,MM.mmk" or "DDD,MM,SSk" as signed decimal degrees."""
    match = _COORDINATE.match(text or "")
    if match is None:
        return None
    degrees, minutes, seconds, ref = match.groups()
    value = float(degrees) + float(minutes) / 60 + float(seconds or 0) / 3600
    return -value if ref in "SW" else value


def _date(text: str | None) -> datetime | None:
    """ISO 8601 XMP dates; a date without a time is too vague to be an acquisition time."""
    if not text or "T" not in text:
        return None
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
