"""metalake extractor `filename`: the capture time from the file's name, when nothing inside the
file gave one.

Phones, cameras and messengers name files after the moment they were taken:
``IMG_20230405_060708.jpg``, ``PXL_20230405_060708123.jpg``, ``20230405_060708.heic``,
``Screenshot 2023-04-05 at 06.07.08.png``, ``WhatsApp Image 2023-04-05 at 06.07.08.jpeg``,
``signal-2023-04-05-060708.jpg``. Such names carry a local wall time without a UTC offset, so the
value is a naive datetime. Scanned documents and exported photos often have no EXIF at all: this
is where their date comes from.

It shows what a plugin needs and nothing more: one hook implementation written against
``metalake.plugin`` (``pip install 'metalake[plugin]'``: pluggy and the typed API, no server),
reading only ``source.filename`` (the client's name for the file; it never opens the file),
returning ``None`` when the name says nothing, and an entry point in ``pyproject.toml``.
"""

from __future__ import annotations

import re
from datetime import datetime

from metalake.plugin import ExtractedMetadata, Source, hookimpl

__version__ = "0.1.0"
NAME = "filename"

# Year, month, day, hour, minute, second, with the separators real devices use; the digits must
# not be part of a longer number (a 14-digit serial is no date).
PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        # IMG_20230405_060708, PXL_20230405_060708123, VID-20230405-WA0001 has no time: skipped
        r"(?<!\d)(\d{4})(\d{2})(\d{2})[_-](\d{2})(\d{2})(\d{2})(?!\d{1,2}(?!\d))",
        # Screenshot 2023-04-05 at 06.07.08, WhatsApp Image 2023-04-05 at 06.07.08
        r"(?<!\d)(\d{4})-(\d{2})-(\d{2})[ _]at[ _](\d{2})\.(\d{2})\.(\d{2})(?!\d)",
        # signal-2023-04-05-060708, 2023-04-05_06-07-08, 2023-04-05 06.07.08
        r"(?<!\d)(\d{4})-(\d{2})-(\d{2})[ _-](\d{2})[.-]?(\d{2})[.-]?(\d{2})(?!\d)",
    )
)
# Dates outside these years are more likely counters than capture times.
FIRST_YEAR, LAST_YEAR = 1990, 2100


@hookimpl
def metalake_extract_metadata(source: Source, missing: frozenset[str]) -> ExtractedMetadata | None:
    """The capture time the file's name gives, if `acquired_at` is still missing."""
    if "acquired_at" not in missing or source.filename is None:
        return None
    moment = parse_filename(source.filename)
    return {"acquired_at": moment} if moment is not None else None


def parse_filename(filename: str) -> datetime | None:
    """The first date and time a file name holds, as a naive datetime, or None."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    for pattern in PATTERNS:
        for match in pattern.finditer(name):
            year, month, day, hour, minute, second = (int(part) for part in match.groups())
            if not FIRST_YEAR <= year <= LAST_YEAR:
                continue
            try:
                return datetime(year, month, day, hour, minute, second)
            except ValueError:  # month 13, 25 o'clock, ...: not a date
                continue
    return None
