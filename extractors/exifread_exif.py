"""Built-in extractor `exifread`: a second, independent TIFF directory reader, as fallback.

Runs for the fields the extractors before it left empty, unless one of them recorded (in the
source's memo, `tiffdirs.READ_COMPLETE`) that it read every directory of the file completely:
the same tags, read again, would add nothing. Reads the EXIF blocks `extractors.containers`
located, and JPEG files in which it located none (exifread searches them its own way).
It imports no other extractor: with `pillow` disabled it reads everything itself.

Not HEIF files in which none was located: exifread's own HEIF search loops forever on a box
whose 64-bit size is 0 (it seeks back to the box it just read), and reads an iloc box's
zero-width extents one by one, 65,535 of them for every 6 bytes; in Python, so a time limit
stops the call, but the abandoned thread spins on. Where it would find an Exif item, the
walker has found it already.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, BinaryIO, cast

from exifread.core.exceptions import ExifNotFound, InvalidExif
from exifread.core.exif_header import ExifHeader
from exifread.core.find_exif import determine_type, get_endian_str

from metalake.extractors.containers import open_block
from metalake.extractors.fields import EXIF_FIELDS, Rational, Raw, exif_fields
from metalake.extractors.hookspecs import hookimpl
from metalake.extractors.source import Source
from metalake.extractors.tiffdirs import READ_COMPLETE, ExifDirectories, locate

NAME = "exifread"
log = logging.getLogger(__name__)
# exifread warns ("Possibly corrupted IFD") about every quirky file it reads; what matters, a
# failure, the registry logs itself, with the file's name.
logging.getLogger("exifread").setLevel(logging.ERROR)

_DIRECTORY_OF_PREFIX = {"Image": "ifd0", "EXIF": "exif", "GPS": "gps"}


@hookimpl
def metalake_extract_metadata(source: Source, missing: frozenset[str]) -> Mapping[str, object]:
    if not missing & EXIF_FIELDS:
        return {}
    if source.memo(READ_COMPLETE, lambda: False):
        # An earlier reader read every directory there is: the same tags would add nothing.
        return {}
    directories = read_directories(source)
    return exif_fields(directories.ifd0, directories.exif, directories.gps)


def read_directories(source: Source) -> ExifDirectories:
    """The file's EXIF directories as exifread reads them, parsed once per file."""
    return source.memo("exifread.directories", lambda: _read(source))


def _read(source: Source) -> ExifDirectories:
    directories = ExifDirectories()
    container, blocks = locate(source)
    with source.open() as fp:
        # One allowance for all of the file's blocks: a CR3 of 64 tiny blocks, each pointing
        # to a directory of 65,535 entries past its end, cost 9.5 s for 2.3 KiB (and the
        # blocks are as many as the file's size allows).
        allowance = _Allowance(max(source.size, sum(block.length for block in blocks)))
        if blocks:
            for block in blocks:
                stream = open_block(fp, block)
                directories.merge(block.role, *_process(_Budgeted(stream, allowance)))
        elif container == "jpeg":
            directories.merge("tiff", *_process(_Budgeted(fp, allowance)))
    return directories


class ReadBudgetSpent(Exception):
    """exifread read more of a file than any real file makes it read."""


class DirectoryPastTheEnd(Exception):
    """exifread read on past the end of the file, in one directory, more often than a real
    directory makes it: its entry count is corrupt."""


class _Allowance:
    """What exifread may still read of a file: READ_BUDGET plus 4 times the file's length (or
    its blocks' together, when blocks held in memory are longer)."""

    def __init__(self, length: int) -> None:
        self.left = READ_BUDGET + 4 * max(0, length)


class _Budgeted:
    """A file handle for exifread that raises `ReadBudgetSpent` once the reads of the file's
    handles, each counted as READ_CALL_COST bytes more than it returns, spend its allowance.

    exifread reads every entry of a directory, a value up to 999 items one read each, an ASCII
    value whole: duplicates of a long value read it again and again. A 1 MiB TIFF of 43,000
    entries, each the same 504 KiB string, made it read 22 GB (12 s of CPU); 16,000 entries of
    999 SHORTs (189 KiB), 16 million reads (11.6 s). The files of the corpus read less than 4
    times their block's length, counted so; a corrupt entry count (65,535 entries, three small
    reads each) stays well within the budget too, so exifread still reads what it can there.
    Where such a count runs past the end of the block, the directory stops at MAX_SHORT_READS
    reads that came back short (`DirectoryPastTheEnd`, see `_exifread_tags`).
    """

    def __init__(self, stream: BinaryIO, allowance: _Allowance) -> None:
        self._stream = stream
        self._allowance = allowance
        self.short_reads = 0  # in the directory being read (see `_dump`)

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._allowance.left -= len(data) + READ_CALL_COST
        if self._allowance.left < 0:
            raise ReadBudgetSpent
        if len(data) < size:
            self.short_reads += 1
            if self.short_reads > MAX_SHORT_READS:
                raise DirectoryPastTheEnd
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()


READ_BUDGET = 4 * 1024 * 1024
READ_CALL_COST = 4
# Reads that come back short (at or past the end of the block) in one directory, beyond which its
# reading stops. exifread reads every entry a directory's count claims, past the end too, at
# three reads and about 6.5 us each: a 16-byte TIFF whose count says 65,535 (one of Pillow's test
# images) cost 0.43 s of CPU. No file of the corpus or of Pillow's test images reads short more
# than once, except three with such a count.
MAX_SHORT_READS = 64


def _process(stream: _Budgeted) -> tuple[dict[int, Raw], dict[int, Raw], dict[int, Raw]]:
    found: dict[str, dict[int, Raw]] = {"ifd0": {}, "exif": {}, "gps": {}}
    try:
        tags = _exifread_tags(stream)
    except Exception as error:  # a hostile file: exifread is the fallback, not the judge
        log.debug("exifread failed: %r", error)
        return found["ifd0"], found["exif"], found["gps"]
    for key, tag in tags.items():
        prefix = key.split(" ", 1)[0]
        directory = _DIRECTORY_OF_PREFIX.get(prefix)
        number = getattr(tag, "tag", None)
        if directory is None or not isinstance(number, int):
            continue
        value = normalize(getattr(tag, "values", None))
        if value is not None:
            found[directory].setdefault(number, value)
    return found["ifd0"], found["exif"], found["gps"]


def normalize(value: object) -> Raw | None:
    """exifread's value types in the neutral form `extractors.fields` maps."""
    if isinstance(value, Fraction):
        return Rational(value.numerator, value.denominator)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float | bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, tuple | list):
        items = [normalize(item) for item in value]
        return tuple(item for item in items if item is not None)
    return None


def _exifread_tags(stream: _Budgeted) -> dict[str, Any]:
    """What `exifread.process_file(details=False, extract_thumbnail=False)` returns, read the
    way it reads, one directory at a time: a directory whose corrupt count runs past the end of
    the file (`DirectoryPastTheEnd`) stops alone, and what the others hold is kept. (A
    thumbnail directory of such a count, after good IFD0 and Exif directories, is one of
    Pillow's test images.)"""
    stream.seek(0)
    handle = cast(BinaryIO, stream)  # read, seek and tell: all that exifread calls
    try:
        offset, endian_bytes, fake_exif = determine_type(handle)
    except (ExifNotFound, InvalidExif):
        return {}
    endian, _ = get_endian_str(endian_bytes)
    header = ExifHeader(
        handle, endian, offset, fake_exif, strict=False, debug=False, detailed=False
    )
    for index, ifd in enumerate(header.list_ifd()):
        name = "Image" if index == 0 else "Thumbnail" if index == 1 else f"IFD {index}"
        _dump(header, stream, ifd, name)
    exif = header.tags.get("Image ExifOffset")
    if exif:
        _dump(header, stream, exif.values[0], "EXIF")
    return header.tags


def _dump(header: ExifHeader, stream: _Budgeted, ifd: int, name: str) -> None:
    """One directory (and those it points to, GPS among them) into `header.tags`."""
    stream.short_reads = 0
    try:
        header.dump_ifd(ifd=ifd, ifd_name=name)
    except DirectoryPastTheEnd:
        log.debug("exifread: directory %s at %d runs past the end of the file", name, ifd)
