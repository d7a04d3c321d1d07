"""The three EXIF directories of a file, as read by one TIFF directory reader."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from metalake.extractors.containers import TiffBlock, find_exif
from metalake.extractors.fields import Raw
from metalake.extractors.source import Source

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
        if role == "exif":
            ifd0, exif = {}, ifd0
        elif role == "gps":
            ifd0, gps = {}, ifd0
        for mine, theirs in ((self.ifd0, ifd0), (self.exif, exif), (self.gps, gps)):
            for tag, value in theirs.items():
                mine.setdefault(tag, value)


def locate(source: Source) -> tuple[str | None, list[TiffBlock]]:
    """The container family and EXIF blocks of `source`, found once and shared by extractors."""

    def walk() -> tuple[str | None, list[TiffBlock]]:
        with source.open() as fp:
            try:
                return find_exif(fp, source.head, source.size)
            except Exception:
                # A walker bug, not the file's fault: logged once, and no block is found.
                log.exception("cannot walk %s", source.filename or source.path)
                return None, []

    return source.memo("containers.find_exif", walk)
