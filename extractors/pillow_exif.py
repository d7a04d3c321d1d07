"""Built-in extractor `pillow`: EXIF read by Pillow's TIFF directory reader.

The EXIF blocks are located by `extractors.containers` (headers only, every format metalake
accepts) and their IFD0, Exif and GPS directories read with Pillow. Files no walker knows are opened
with `Image.open` (lazily: pixel data is never decoded) and read with `getexif().get_ifd(...)`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from fractions import Fraction
from typing import IO, Any

import pillow_heif
from PIL import Image, TiffImagePlugin, UnidentifiedImageError

from metalake.extractors.containers import open_block
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
    directories = read_directories(source)
    # Tells the `exifread` extractor, without either importing the other, that a second reading
    # of the same blocks would add nothing (see exifread_exif).
    source.memo(READ_COMPLETE, lambda: directories.complete)
    return exif_fields(directories.ifd0, directories.exif, directories.gps)


def read_directories(source: Source) -> ExifDirectories:
    """The file's EXIF directories as Pillow reads them, parsed once per file."""
    return source.memo("pillow.directories", lambda: _read(source))


def _read(source: Source) -> ExifDirectories:
    directories = ExifDirectories()
    container, blocks = locate(source)
    if blocks:
        complete = True
        with source.open() as fp:
            for block in blocks:
                ifd0, exif, gps = _read_block(open_block(fp, block))
                directories.merge(block.role, ifd0, exif, gps)
                complete = (
                    complete
                    and bool(ifd0)
                    and all(
                        found or tag not in ifd0
                        for tag, found in ((EXIF_IFD, exif), (GPS_IFD, gps))
                    )
                )
        # A text tag read as a number (a duplicate tag of another type, which Pillow keeps in
        # place of the text exiftool shows) is no complete reading: let another reader try.
        directories.complete = complete and all(
            isinstance(directories.ifd0.get(tag, b""), bytes) for tag in TEXT_TAGS
        )
    elif container is None or (container == "bmff" and _is_heif(source.head)):
        directories.merge("tiff", *_read_with_image_open(source))
    return directories


def _is_heif(head: bytes) -> bool:
    return head[8:12] in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")


def _read_block(stream: IO[bytes]) -> tuple[dict[int, Raw], dict[int, Raw], dict[int, Raw]]:
    head = stream.read(16)
    bigtiff = head[2:4] in (b"+\x00", b"\x00+")
    try:
        # Rejects anything but a TIFF header, so a garbage block yields nothing.
        probe = TiffImagePlugin.ImageFileDirectory_v2(head if bigtiff else head[:8])
    except Exception:  # SyntaxError, struct.error, ...: not a TIFF header
        return {}, {}, {}
    ifd0 = _directory(stream, head, probe.next, None)
    exif = _sub_directory(stream, head, ifd0, EXIF_IFD)
    gps = _sub_directory(stream, head, ifd0, GPS_IFD)
    return ifd0, exif, gps


def _sub_directory(
    stream: IO[bytes], head: bytes, ifd0: dict[int, Raw], tag: int
) -> dict[int, Raw]:
    pointer = ifd0.get(tag)
    if isinstance(pointer, tuple) and pointer:
        pointer = pointer[0]
    if not isinstance(pointer, int) or pointer <= 0:
        return {}
    return _directory(stream, head, pointer, tag)


def _directory(stream: IO[bytes], head: bytes, offset: int, group: int | None) -> dict[int, Raw]:
    """One directory, each tag decoded on its own so that one corrupt tag loses only itself."""
    bigtiff = head[2:4] in (b"+\x00", b"\x00+")
    try:
        info = TiffImagePlugin.ImageFileDirectory_v2(head if bigtiff else head[:8], group=group)
        stream.seek(offset)
        info.load(stream)
    except Exception as error:  # a hostile file: keep what the other directories give
        log.debug("unreadable TIFF directory at %s: %r", offset, error)
        return {}
    out: dict[int, Raw] = {}
    for tag in MAPPED_TAGS.intersection(info.keys()):
        try:
            value = normalize(info[tag])
        except Exception as error:
            log.debug("unreadable tag %#x: %r", tag, error)
            continue
        if value is not None:
            out[tag] = value
    return out


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
        image = Image.open(fp)
    except Image.DecompressionBombError as error:
        fp.close()
        # Pillow's guard did its job: the file claims too many pixels to be opened safely.
        log.warning("not opening %s: %s", source.filename or source, error)
        return {}, {}, {}
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, NotImplementedError) as error:
        fp.close()
        log.debug("Pillow cannot open %s: %r", source.filename or source, error)
        return {}, {}, {}
    with fp, image:
        if image.format == "PNG":
            # Never reached (PNG has a walker), and must not be: getexif() on a PNG whose eXIf
            # chunk follows IDAT decodes the whole image.
            return {}, {}, {}
        exif = image.getexif()
        ifd0 = _normalized(dict(exif))
        return ifd0, _normalized(exif.get_ifd(EXIF_IFD)), _normalized(exif.get_ifd(GPS_IFD))


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
