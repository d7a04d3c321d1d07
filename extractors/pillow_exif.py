"""Built-in extractor `pillow`: EXIF read by Pillow's TIFF directory reader.

The EXIF blocks are located by `extractors.containers` (headers only, every format metalake
accepts) and their IFD0, Exif and GPS directories read with Pillow; the GPS directory only when a
capture time without its offset asks for the GPS clock (the `gps` extractor reads positions on its
own). Files no walker knows are opened with `Image.open` (lazily: pixel data is never decoded),
by Pillow's readers of formats that carry EXIF only (EXIF_FORMATS), and read with
`getexif().get_ifd(...)`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import IO, Any, cast

import pillow_heif
from PIL import Image, TiffImagePlugin, TiffTags, UnidentifiedImageError

from metalake.extractors.containers import TiffBlock, open_block
from metalake.extractors.fields import (
    EXIF_FIELDS,
    EXIF_IFD,
    GPS_IFD,
    MAPPED_TAGS,
    TEXT_TAGS,
    Rational,
    Raw,
    exif_fields,
)
from metalake.extractors.hookspecs import hookimpl
from metalake.extractors.source import Source
from metalake.extractors.tiffdirs import READ_COMPLETE, ExifDirectories, locate

NAME = "pillow"
log = logging.getLogger(__name__)

# HEIC/HEIF (and AVIF, where the installed pillow_heif supports it) open in Pillow.
pillow_heif.register_heif_opener()


@hookimpl
def metalake_extract_metadata(source: Source, missing: frozenset[str]) -> Mapping[str, object]:
    if not missing & EXIF_FIELDS:
        return {}
    reading = _reading(source)
    found = exif_fields(reading.directories.ifd0, reading.directories.exif)
    moment = found.get("acquired_at")
    if "acquired_at" in missing and isinstance(moment, datetime) and moment.tzinfo is None:
        # Only a capture time without its offset needs the GPS directory (the GPS clock may
        # give the offset): the one directory of three that is read only when needed.
        directories = read_directories(source)
        found = exif_fields(directories.ifd0, directories.exif, directories.gps)
    # Tells the `exifread` extractor, without either importing the other, that a second reading
    # of the same blocks would add nothing (see exifread_exif).
    source.memo(READ_COMPLETE, lambda: _complete(source))
    return found


def read_directories(source: Source) -> ExifDirectories:
    """The file's EXIF directories as Pillow reads them, GPS included, parsed once per file."""
    reading = _reading(source)
    if reading.gps_pending:
        with reading.lock:
            _read_gps(source, reading)
    return reading.directories


@dataclass
class _Reading:
    """A file's EXIF directories as Pillow reads them: IFD0 and Exif at once, GPS on demand."""

    directories: ExifDirectories
    # Per block, in file order: its GPS directory as read so far.
    gps: list[dict[int, Raw]] = field(default_factory=list)
    # (block index, block, offset) of the GPS directories IFD0 points to, not read yet.
    gps_pending: list[tuple[int, TiffBlock, int]] = field(default_factory=list)
    # Every block and every directory its IFD0 points to read, the GPS ones not read yet aside.
    complete: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _reading(source: Source) -> _Reading:
    return source.memo("pillow.reading", lambda: _read(source))


def _complete(source: Source) -> bool:
    """Whether Pillow read every directory that matters completely: then another reader of the
    same blocks would add nothing. A GPS directory left unread does not count against it: the
    fields needed none (only a capture time without an offset does, and then it is read), so
    another reader's GPS directory would add nothing either."""
    reading = _reading(source)
    # A text tag read as a number (a duplicate tag of another type, which Pillow keeps in
    # place of the text exiftool shows) is no complete reading: let another reader try.
    return reading.complete and all(
        isinstance(reading.directories.ifd0.get(tag, b""), bytes) for tag in TEXT_TAGS
    )


def _read(source: Source) -> _Reading:
    reading = _Reading(ExifDirectories())
    container, blocks = locate(source)
    if blocks:
        complete = True
        with source.open() as fp:
            for index, block in enumerate(blocks):
                stream = open_block(fp, block)
                head = stream.read(16)
                first, first_whole = _first_directory(stream, head)
                exif, exif_whole = _sub_directory(stream, head, first, EXIF_IFD)
                gps: dict[int, Raw] = {}
                offset = _pointer(first, GPS_IFD)
                if offset is not None:
                    if block.role in ("tiff", "rw2"):
                        reading.gps_pending.append((index, block, offset))
                    else:  # rare (CR3 blocks): read at once
                        gps, gps_whole = _directory(stream, head, offset, GPS_IFD)
                        complete = complete and gps_whole
                complete = complete and first_whole and (exif_whole or EXIF_IFD not in first)
                reading.directories.merge(block.role, first, exif, gps)
                reading.gps.append(reading.directories.gps if block.role == "gps" else gps)
                reading.directories.gps = {}
        reading.complete = complete
        _merge_gps(reading)
    elif container is None or (container == "bmff" and _is_heif(source.head)):
        reading.directories.merge("tiff", *_read_with_image_open(source))
    return reading


def _read_gps(source: Source, reading: _Reading) -> None:
    """Under the reading's lock: read the GPS directories not read yet."""
    pending, reading.gps_pending = reading.gps_pending, []
    with source.open() as fp:
        for index, block, offset in pending:
            stream = open_block(fp, block)
            gps, whole = _directory(stream, stream.read(16), offset, GPS_IFD)
            reading.gps[index] = gps
            reading.complete = reading.complete and whole
    _merge_gps(reading)


def _merge_gps(reading: _Reading) -> None:
    """The file's GPS directory: each tag from the first block that has it (as `merge`)."""
    merged: dict[int, Raw] = {}
    for gps in reading.gps:
        for tag, value in gps.items():
            merged.setdefault(tag, value)
    reading.directories.gps = merged


def _is_heif(head: bytes) -> bool:
    return head[8:12] in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")


# A directory's mapped tags, and whether the directory was there whole (see `_directory`).
_Directory = tuple[dict[int, Raw], bool]


def _first_directory(stream: IO[bytes], head: bytes) -> _Directory:
    bigtiff = head[2:4] in (b"+\x00", b"\x00+")
    try:
        # Rejects anything but a TIFF header, so a garbage block yields nothing.
        probe = TiffImagePlugin.ImageFileDirectory_v2(head if bigtiff else head[:8])
    except Exception:  # SyntaxError, struct.error, ...: not a TIFF header
        return {}, False
    return _directory(stream, head, probe.next, None)


def _pointer(ifd0: dict[int, Raw], tag: int) -> int | None:
    pointer = ifd0.get(tag)
    if isinstance(pointer, tuple) and pointer:
        pointer = pointer[0]
    if not isinstance(pointer, int) or pointer <= 0:
        return None
    return pointer


def _sub_directory(stream: IO[bytes], head: bytes, ifd0: dict[int, Raw], tag: int) -> _Directory:
    pointer = _pointer(ifd0, tag)
    if pointer is None:
        return {}, False
    return _directory(stream, head, pointer, tag)


def _directory(stream: IO[bytes], head: bytes, offset: int, group: int | None) -> _Directory:
    """One directory's mapped tags, each decoded on its own so that one corrupt tag loses only
    itself, and whether the directory was there whole: its entries and the offset after them
    within the block. Pillow reads what it can of a broken one; a whole one read without a
    mapped tag is read completely all the same (another reader would find none either)."""
    bigtiff = head[2:4] in (b"+\x00", b"\x00+")
    order = "<" if head[:2] == b"II" else ">"
    try:
        info = TiffImagePlugin.ImageFileDirectory_v2(head if bigtiff else head[:8], group=group)
        stream, whole = _for_pillow(stream, order, offset, bigtiff)
        stream.seek(offset)
        info.load(stream)
    except Exception as error:  # a hostile file: keep what the other directories give
        log.debug("unreadable TIFF directory at %s: %r", offset, error)
        return {}, False
    out: dict[int, Raw] = {}
    # The entries Pillow's `load` kept, by the names its class documents them under: decoded
    # here by Pillow's own loader for their type, not through `info[tag]`, which also looks the
    # tag up in Pillow's registry and re-infers its type through the numbers ABCs: 5 us a tag,
    # half of this extractor's time on a camera JPEG.
    entries: dict[int, bytes] = info._tagdata
    for tag in MAPPED_TAGS.intersection(entries):
        try:
            value = _decoded(info, info.tagtype[tag], entries[tag])
        except Exception as error:
            log.debug("unreadable tag %#x: %r", tag, error)
            continue
        if value is not None:
            out[tag] = value
    return out, whole


_SIGNED_RATIONAL = 10
_ENTRY_TAG = {order: struct.Struct(order + "H10x") for order in "<>"}
# Shortening a directory costs about as much as Pillow's reading of a few entries: not worth it
# for IFD0 (about a dozen, most of them mapped), worth it for an Exif directory.
_WORTH_SHORTENING = 16


def _for_pillow(
    stream: IO[bytes], order: str, offset: int, bigtiff: bool
) -> tuple[IO[bytes], bool]:
    """What Pillow is to read the directory at `offset` from, and whether the directory lies
    whole within the block: its count, its entries and the next directory's offset.

    That is `stream`, or, for a block in memory whose classic TIFF directory is whole and
    lists entries of tags metalake does not map, a copy of it whose directory lists only the
    others, in their order (the values stay where they are: only a crafted file's value that
    overlaps the directory itself could read otherwise). Pillow's `load` spends about 2 us
    on every entry, read or not (it names each one and formats a debug line for it); a camera's
    Exif directory lists 30 to 60 entries, of which metalake maps four."""
    if offset < 0:
        return stream, False
    if bigtiff or not isinstance(stream, io.BytesIO):
        # A window on a large file (or BigTIFF): read as it is.
        count_size, entry_size, next_size = (8, 20, 8) if bigtiff else (2, 12, 4)
        end = stream.seek(0, io.SEEK_END)
        stream.seek(offset)
        raw = stream.read(count_size)
        if len(raw) < count_size:
            return stream, False
        count = struct.unpack(order + ("Q" if bigtiff else "H"), raw)[0]
        return stream, offset + count_size + entry_size * count + next_size <= end
    data = stream.getvalue()  # the bytes the BytesIO was made from, not a copy
    if offset + 2 > len(data):
        return stream, False
    count = struct.unpack_from(order + "H", data, offset)[0]
    end = offset + 2 + 12 * count
    if end + 4 > len(data):
        return stream, False  # for Pillow to read as far as it can
    if count < _WORTH_SHORTENING:
        return stream, True
    tags = [tag for (tag,) in _ENTRY_TAG[order].iter_unpack(data[offset + 2 : end])]
    if MAPPED_TAGS.issuperset(tags):
        return stream, True
    start = offset + 2
    kept = [
        data[start + 12 * i : start + 12 * i + 12] for i, t in enumerate(tags) if t in MAPPED_TAGS
    ]
    # The shorter list in place of the longer one, then the next directory's offset.
    table = struct.pack(order + "H", len(kept)) + b"".join(kept) + data[end : end + 4]
    return io.BytesIO(data[:offset] + table + data[offset + len(table) :]), True


def _decoded(info: TiffImagePlugin.ImageFileDirectory_v2, kind: int, data: bytes) -> Raw | None:
    """One entry's bytes as Pillow's loader for its type decodes them, in the neutral form: a
    one-element array as its element (as `tiffread` gives it)."""
    if kind == TiffTags.RATIONAL or kind == _SIGNED_RATIONAL:
        # Pillow's loader, with the legacy API's (numerator, denominator) pairs, not IFDRational
        # objects made only to be taken apart again.
        pairs = _LOADERS[kind][1](info, data, True)
        items: tuple[Raw, ...] = tuple(Rational(num, den) for num, den in pairs)
    else:
        value = _LOADERS[kind][1](info, data, False)
        if type(value) is not tuple:
            return normalize(value)  # bytes (BYTE, UNDEFINED) or text (ASCII)
        items = value
    return items[0] if len(items) == 1 else items


# Pillow's loaders by TIFF type: the table `ImageFileDirectory_v2.load` itself reads entries with.
_LOADERS = TiffImagePlugin.ImageFileDirectory_v2._load_dispatch


def _read_with_image_open(
    source: Source,
) -> tuple[dict[int, Raw], dict[int, Raw], dict[int, Raw]]:
    try:
        fp = source.open()
    except OSError as error:
        log.debug("cannot open %s: %r", source.filename or source, error)
        return {}, {}, {}
    try:
        # Pillow leaves a handle it was given open: the `with` below closes both.
        image = Image.open(fp, formats=_exif_formats())
    except Image.DecompressionBombError as error:
        fp.close()
        # Pillow's guard did its job: the file claims too many pixels to be opened safely.
        log.warning("not opening %s: %s", source.filename or source, error)
        return {}, {}, {}
    except _UNREADABLE as error:
        fp.close()
        log.debug("Pillow cannot open %s: %r", source.filename or source, error)
        return {}, {}, {}
    # Not `with fp`: a plugin may close the handle it was given once it has read what it needs
    # (FTEX keeps the pixel data in a buffer of its own), and entering a closed file raises.
    with contextlib.closing(fp), image:
        if image.format == "PNG":
            # Never reached (PNG has a walker), and must not be: getexif() on a PNG whose eXIf
            # chunk follows IDAT decodes the whole image.
            return {}, {}, {}
        try:
            exif = image.getexif()
            ifd0 = _normalized(dict(exif))
            return ifd0, _normalized(exif.get_ifd(EXIF_IFD)), _normalized(exif.get_ifd(GPS_IFD))
        except _UNREADABLE as error:
            # An image Pillow opens whose EXIF is broken (a mutated HEIF: "not a TIFF file"):
            # no EXIF to read, as for a file it cannot open, not a failure of this extractor.
            log.debug("Pillow cannot read the EXIF of %s: %r", source.filename or source, error)
            return {}, {}, {}


# The formats whose Pillow reader gives EXIF (an `exif` entry in the image's info, or TIFF tags):
# no other of Pillow's readers runs on a client's file here. They would parse headers of their own
# for nothing (XPM reads its whole palette as it opens: 23 ms for a 237 KB file), and each one
# left out is one reader fewer that a crafted file can reach.
EXIF_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "TIFF", "HEIF", "AVIF")


@functools.cache
def _exif_formats() -> tuple[str, ...]:
    """EXIF_FORMATS that this Pillow can open (Image.open fails on a format it does not know)."""
    Image.init()
    return tuple(name for name in EXIF_FORMATS if name in Image.OPEN)


# What Pillow raises for a file, or an EXIF block, it cannot read.
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, NotImplementedError)


def _normalized(directory: dict[int, Any]) -> dict[int, Raw]:
    out: dict[int, Raw] = {}
    for tag, value in directory.items():
        normal = normalize(value)
        if normal is not None:
            out[tag] = normal
    return out


def normalize(value: object) -> Raw | None:
    """Pillow's value types in the neutral form `extractors.fields` maps."""
    # The types Pillow's decoders return, by identity first: isinstance against Pillow's and
    # the numbers ABCs was a tenth of this extractor's time.
    kind = type(value)
    if kind is int or kind is bytes or kind is float:
        return value  # type: ignore[return-value]  # exactly int, bytes or float
    if kind is tuple:
        items = [normalize(item) for item in value]  # type: ignore[attr-defined]
        return tuple(item for item in items if item is not None)
    if kind is str:
        # Pillow decodes ASCII as Latin-1, which is lossless: recover the bytes.
        return cast(str, value).encode("latin-1", "replace")
    if kind is TiffImagePlugin.IFDRational:
        # Exactly Pillow's rational: isinstance against it (a numbers.Rational, an ABC) costs more.
        rational = cast(TiffImagePlugin.IFDRational, value)
        return Rational(int(rational.numerator), int(rational.denominator))
    if isinstance(value, TiffImagePlugin.IFDRational):
        return Rational(int(value.numerator), int(value.denominator))
    if isinstance(value, Fraction):
        return Rational(value.numerator, value.denominator)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float | bytes):
        return value
    if isinstance(value, str):
        # Pillow decodes ASCII as Latin-1, which is lossless: recover the bytes.
        return value.encode("latin-1", "replace")
    if isinstance(value, tuple | list):
        items = [normalize(item) for item in value]
        return tuple(item for item in items if item is not None)
    return None
