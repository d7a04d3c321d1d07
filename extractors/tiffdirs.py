"""The three EXIF directories of a file, as read by one TIFF directory reader."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import BinaryIO

from metalake.extractors.containers import TiffBlock, find_exif, open_block
from metalake.extractors.fields import (
    GPS_IFD,
    PANASONIC_COMPRESSION,
    RW2_COMPRESSION,
    RW2_IFD0_TAGS,
    Raw,
)
from metalake.extractors.source import Source
from metalake.extractors.tiffread import read_directory, read_tiff

log = logging.getLogger(__name__)


@dataclass
class ExifDirectories:
    """IFD0, the Exif sub-IFD (0x8769) and the GPS sub-IFD (0x8825), tag id -> `Raw` value."""

    ifd0: dict[int, Raw] = field(default_factory=dict)
    exif: dict[int, Raw] = field(default_factory=dict)
    gps: dict[int, Raw] = field(default_factory=dict)
    complete: bool = False
    """True when every block was read and every directory IFD0 points to was found: another
    reader of the same blocks would find the same tags."""

    def merge(
        self, role: str, ifd0: dict[int, Raw], exif: dict[int, Raw], gps: dict[int, Raw]
    ) -> None:
        """Add one block's directories; a tag already known from an earlier block is kept."""
        if role == "rw2":
            panasonic = {tag: ifd0[tag] for tag in RW2_IFD0_TAGS if tag in ifd0}
            if PANASONIC_COMPRESSION in ifd0:
                panasonic[RW2_COMPRESSION] = ifd0[PANASONIC_COMPRESSION]
            ifd0 = panasonic
        elif role == "exif":
            ifd0, exif = {}, ifd0
        elif role == "gps":
            ifd0, gps = {}, ifd0
        for mine, theirs in ((self.ifd0, ifd0), (self.exif, exif), (self.gps, gps)):
            for tag, value in theirs.items():
                mine.setdefault(tag, value)


CORRUPT = "corrupt"
# Source memo key: True when an extractor has read every EXIF directory of the file completely.
READ_COMPLETE = "tiffdirs.read-complete"


def locate(source: Source) -> tuple[str | None, list[TiffBlock]]:
    """The container family and EXIF blocks of `source`, found once and shared by extractors.

    The family is `CORRUPT` when every block found was corrupt: then there is nothing to read."""
    container, blocks, _ = _located(source)
    return container, blocks


# A block that leads to a GPS directory, with the offset IFD0 gives for it (None: the block's first
# directory is the GPS directory).
_GpsBlock = tuple[TiffBlock, int | None]


def _located(source: Source) -> tuple[str | None, list[TiffBlock], list[_GpsBlock]]:
    """(family, sound blocks, the blocks among them that lead to a GPS directory)."""

    def walk() -> tuple[str | None, list[TiffBlock], list[_GpsBlock]]:
        with source.open() as fp:
            try:
                container, blocks = find_exif(fp, source.head, source.size)
                # A block without a TIFF header, or whose first directory runs past its end, is
                # corrupt: exiftool reads nothing from it ("Bad IFD0 directory", "Malformed APP1
                # EXIF segment"), and no reader may guess from it or search the file on its own.
                sound: list[TiffBlock] = []
                with_gps: list[_GpsBlock] = []
                for block in blocks:
                    ok, gps, pointer = _check(fp, block)
                    if ok:
                        sound.append(block)
                    if ok and gps:
                        with_gps.append((block, pointer))
                return (CORRUPT if blocks and not sound else container), sound, with_gps
            except Exception:
                # A walker bug, not the file's fault: logged once, and no block is found.
                log.exception("cannot walk %s", source.filename or source)
                return None, [], []

    return source.memo("containers.find_exif", walk)


def read_gps(source: Source) -> dict[int, Raw]:
    """The file's GPS directory as the neutral reader (`extractors.tiffread`) reads it, once per
    file: the `gps` extractor's own reading, so that no built-in extractor depends on another
    one's parser. Reads only the blocks whose IFD0 points to a GPS directory (noted while
    locating them), and only that directory: a file without GPS costs nothing more."""

    def read() -> dict[int, Raw]:
        directories = ExifDirectories()
        _, _, blocks = _located(source)
        if not blocks:
            return {}
        with source.open() as fp:
            for block, pointer in blocks:
                stream = open_block(fp, block)
                if pointer is None:  # its first directory is the GPS directory
                    found = read_tiff(stream, block.length, strict=False, sub_directories=())
                    if found is not None:
                        directories.merge(block.role, *found)
                    continue
                # IFD0's pointer, noted while locating: IFD0 is not read again.
                order = "<" if stream.read(2) == b"II" else ">"
                gps = read_directory(stream, order, pointer, block.length, strict=False)
                directories.merge(block.role, {}, {}, gps or {})
        return directories.gps

    return source.memo("tiffdirs.gps", read)


_GPS_POINTER = frozenset({GPS_IFD})


def _check(fp: BinaryIO, block: TiffBlock) -> tuple[bool, bool, int | None]:
    """(whether a block has a TIFF header and an IFD0 within it, whether it leads to a GPS
    directory, the offset IFD0 gives for it), decoding no tag but IFD0's GPS pointer."""
    stream = open_block(fp, block)
    if stream.read(4) in (b"II+\x00", b"MM\x00+"):
        return True, False, None  # BigTIFF: left to Pillow, which reads it
    found = read_tiff(
        stream, block.length, strict=False, ifd0_tags=_GPS_POINTER, sub_directories=()
    )
    if found is None:
        return False, False, None
    if block.role == "gps":
        return True, True, None
    pointer = found[0].get(GPS_IFD)
    if isinstance(pointer, tuple):
        pointer = pointer[0] if pointer else None
    if block.role == "exif" or not isinstance(pointer, int) or isinstance(pointer, bool):
        return True, False, None  # no GPS directory to read (read_tiff would find none)
    return True, True, pointer
