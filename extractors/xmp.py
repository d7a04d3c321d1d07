"""Built-in extractor `xmp`: the fields EXIF left empty, from the file's XMP packet.

Runs after the EXIF extractors, so it fills only what they did not. The packet is found reading
headers only: JPEG (APP1 `http://ns.adobe.com/xap/1.0/`), PNG (`iTXt` `XML:com.adobe.xmp`), WebP
(`XMP ` chunk), TIFF and TIFF-based RAW (tag 700), and in any other container (HEIF/HEIC, JPEG XL,
JPEG 2000, GIF, PSD, ...) by a bounded scan of its first bytes for the `<x:xmpmeta` element.

The XML is untrusted: it is parsed with defusedxml (no DTD, no entity expansion), at most
MAX_PACKET bytes of it. Properties follow exiftool's XMP tables:

- acquired_at: exif:DateTimeOriginal, else xmp:CreateDate, else photoshop:DateCreated, with the
  offset they carry (a date without a time is no capture time);
- latitude / longitude: exif:GPSLatitude / exif:GPSLongitude, "DD,MM.mmmN" or "DD,MM,SSN";
- altitude: DJI's drone-dji:AbsoluteAltitude (metres above sea level), else exif:GPSAltitude
  with exif:GPSAltitudeRef (1 = below sea level);
- manufacturer: tiff:Make; software: tiff:Software; acquired_by: dc:creator (items joined by
  ", ").
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Mapping
from datetime import datetime
from typing import BinaryIO
from xml.etree.ElementTree import Element

import defusedxml.ElementTree
from defusedxml import DefusedXmlException

from metalake.extractors.containers import bmff_boxes, heif_item
from metalake.extractors.hookspecs import hookimpl
from metalake.extractors.source import Source

NAME = "xmp"

MAX_PACKET = 1024 * 1024
MAX_ITEMS = 4096
SCAN_LIMIT = 256 * 1024
XMP_JPEG_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_TAG = 700
# JPEG 2000 keeps XMP in a uuid box with this id (its "xml " boxes are other XML, for exiftool).
JP2_XMP_UUID = bytes.fromhex("be7acfcb97a942e89c71999491e3afac")
FIELDS = frozenset(
    {"acquired_at", "acquired_by", "manufacturer", "software", "latitude", "longitude", "altitude"}
)

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "exif": "http://ns.adobe.com/exif/1.0/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "drone-dji": "http://www.dji.com/drone-dji/1.0/",
}
TEXT_FIELDS = {
    "acquired_by": "dc:creator",
    "manufacturer": "tiff:Make",
    "software": "tiff:Software",
}
DATE_PROPERTIES = ("exif:DateTimeOriginal", "xmp:CreateDate", "photoshop:DateCreated")
# Local names of the properties each field reads, as bytes to look for before parsing.
NEEDLES = {
    "acquired_at": (b"DateTimeOriginal", b"CreateDate", b"DateCreated"),
    "acquired_by": (b"creator",),
    "manufacturer": (b"Make",),
    "software": (b"Software",),
    "latitude": (b"GPSLatitude",),
    "longitude": (b"GPSLongitude",),
    "altitude": (b"GPSAltitude", b"AbsoluteAltitude"),
}
_COORDINATE = re.compile(r"^\s*(\d{1,3}),(\d{1,2}(?:\.\d+)?)(?:,(\d{1,2}(?:\.\d+)?))?([NSEW])\s*$")


@hookimpl
def metalake_extract_metadata(source: Source, missing: frozenset[str]) -> Mapping[str, object]:
    if not missing & FIELDS:
        return {}
    with source.open() as fp:
        packet = find_packet(fp, source.head, source.size)
    # Parsing XML costs more than finding the packet: skip it when no property of a missing
    # field is named in the packet (cameras write long packets of other things).
    if packet is None or not any(
        needle in packet for field in missing & FIELDS for needle in NEEDLES[field]
    ):
        return {}
    properties = parse_packet(packet)
    return to_fields(properties) if properties else {}


def find_packet(fp: BinaryIO, head: bytes, size: int) -> bytes | None:
    """The XMP packet of a file, reading headers only (at most MAX_PACKET bytes of it)."""
    if head[:3] == b"\xff\xd8\xff":
        return _jpeg(fp)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return _png(fp)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(fp)
    if head[:4] in (b"II*\x00", b"MM\x00*") or head[:4] in (b"IIRO", b"MMOR", b"IIU\x00"):
        return _tiff(fp, head, size)
    if head[4:8] in (b"ftyp", b"jP  ", b"JXL "):
        return _bmff(fp, head, size)
    # Any other container (GIF, PSD, SVG, EPS, ...): the packet, where exiftool finds it too, is
    # within the first bytes, as plain text.
    fp.seek(0)
    text = fp.read(min(size, SCAN_LIMIT))
    # SVG and other XML keep XMP's RDF without the x:xmpmeta wrapper.
    return element(text, b"x:xmpmeta") or element(text, b"rdf:RDF")


def element(text: bytes, name: bytes) -> bytes | None:
    """The first element `name` of `text`, from its opening tag to the first closing tag after
    it: what `re.search(rb"<name[\\s>].*?</name>", text, re.DOTALL)` finds, in linear time.

    That search is quadratic where openings pile up with no closing tag after them (it scans
    to the end from each): 14 s of CPU for a 214 KiB file of them, in C and holding the GIL, so
    no time limit could stop it and the whole server stood still. If the first opening has no
    closing after it, no later one has either.
    """
    opening, closing = b"<" + name, b"</" + name + b">"
    at = text.find(opening)
    while at != -1:
        after = at + len(opening)
        if text[after : after + 1].isspace() or text[after : after + 1] == b">":
            end = text.find(closing, after + 1)
            return None if end == -1 else text[at : end + len(closing)]
        at = text.find(opening, at + 1)
    return None


def _bmff(fp: BinaryIO, head: bytes, size: int) -> bytes | None:
    """HEIF/HEIC/AVIF: an item of type "mime", application/rdf+xml; JPEG XL: the "xml " box;
    JPEG 2000: the XMP uuid box."""
    if head[4:8] == b"ftyp" and head[8:12] not in (b"jxl ", b"jp2 ", b"jpx ", b"jpm "):
        return heif_item(fp, size, b"mime", b"application/rdf+xml")
    for kind, start, end in bmff_boxes(fp, size):
        if end - start > MAX_PACKET:
            continue
        if kind == b"xml " and head[4:8] == b"JXL ":
            fp.seek(start)
            return fp.read(end - start)
        if kind == b"uuid":
            fp.seek(start)
            if fp.read(16) == JP2_XMP_UUID:
                return fp.read(end - start - 16)
    return None


def _jpeg(fp: BinaryIO) -> bytes | None:
    pos = 2
    for _ in range(MAX_ITEMS):
        fp.seek(pos)
        marker = fp.read(4)
        if len(marker) < 4 or marker[0] != 0xFF or marker[1] in (0xD9, 0xDA):
            return None
        length = struct.unpack(">H", marker[2:4])[0]
        is_xmp = marker[1] == 0xE1 and length > len(XMP_JPEG_HEADER) + 2
        if is_xmp and fp.read(len(XMP_JPEG_HEADER)) == XMP_JPEG_HEADER:
            return fp.read(length - 2 - len(XMP_JPEG_HEADER))
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
            keyword, _, rest = fp.read(length).partition(b"\x00")
            if keyword == b"XML:com.adobe.xmp" and len(rest) >= 2:
                parts = rest[2:].split(b"\x00", 2)  # language, translated keyword, text
                if len(parts) < 3:
                    return None
                if rest[:2] == b"\x00\x00":
                    return parts[2]
                if rest[:2] == b"\x01\x00":  # zlib, bounded: no inflation bomb
                    try:
                        return zlib.decompressobj().decompress(parts[2], MAX_PACKET)
                    except zlib.error:
                        return None
        if kind == b"IEND":  # read past IDAT, without reading it: exiftool reads XMP after it
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


def _tiff(fp: BinaryIO, head: bytes, size: int) -> bytes | None:
    """Tag 700 (XMLPacket) of IFD0."""
    if len(head) < 8:
        return None
    order = "<" if head[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", head[4:8])[0]
    fp.seek(ifd)
    count_bytes = fp.read(2)
    if len(count_bytes) < 2:
        return None
    count = min(struct.unpack(order + "H", count_bytes)[0], MAX_ITEMS)
    entries = fp.read(12 * count)
    for index in range(len(entries) // 12):
        tag, kind, number, offset = struct.unpack_from(order + "HHII", entries, 12 * index)
        if tag == XMP_TAG and kind in (1, 7) and 4 < number <= MAX_PACKET:
            if offset + number > size:
                return None
            fp.seek(offset)
            return fp.read(number)
    return None


def parse_packet(packet: bytes) -> dict[str, str] | None:
    """Simple XMP properties as {"prefix:Name": text}; arrays give their items joined by ", ".

    None when the packet is too big, not XML, or declares a DTD or entities (defusedxml)."""
    if len(packet) > MAX_PACKET:
        return None
    start = packet.find(b"<x:xmpmeta")
    end = packet.rfind(b"</x:xmpmeta>")
    if start >= 0 and end > start:
        packet = packet[start : end + len(b"</x:xmpmeta>")]
    try:
        root: Element = defusedxml.ElementTree.fromstring(
            packet.strip(b"\x00 \r\n\t"), forbid_dtd=True
        )
    except (defusedxml.ElementTree.ParseError, DefusedXmlException, ValueError):
        return None
    names = {uri: prefix for prefix, uri in NS.items()}

    def qualified(tag: str) -> str | None:
        if not tag.startswith("{"):
            return None
        uri, _, local = tag[1:].partition("}")
        prefix = names.get(uri)
        return f"{prefix}:{local}" if prefix else None

    found: dict[str, str] = {}
    for description in root.iter(f"{{{RDF}}}Description"):
        for attribute, value in description.attrib.items():
            name = qualified(attribute)
            if name and value.strip():
                found.setdefault(name, value.strip())
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
    for field, name in TEXT_FIELDS.items():
        if properties.get(name):
            out[field] = properties[name]
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
    for field, name in (("latitude", "exif:GPSLatitude"), ("longitude", "exif:GPSLongitude")):
        value = _coordinate(properties.get(name))
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
    """An XMP date with a time (seconds optional, fractions ignored) and its offset, if any."""
    if not text or "T" not in text:
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.replace(microsecond=0)
