"""Built-in extractor `gps`: GPS position and altitude from the GPS directory (0x8825).

Decodes what the TIFF directory readers found: Pillow's reading first, exifread's when Pillow's
could not read every directory. Degrees/minutes/seconds with their N/S/E/W references become
signed decimal degrees; GPSAltitude with GPSAltitudeRef (1 = below sea level) becomes signed
metres. A value without its reference tag is absent, as in exiftool.
"""

from __future__ import annotations

from collections.abc import Mapping

from metalake.extractors import exifread_exif, pillow_exif
from metalake.extractors.fields import GPS_FIELDS, gps_fields
from metalake.extractors.hookspecs import hookimpl
from metalake.extractors.source import Source

NAME = "gps"


@hookimpl
def metalake_extract_metadata(source: Source, missing: frozenset[str]) -> Mapping[str, object]:
    wanted = missing & GPS_FIELDS
    if not wanted:
        return {}
    pillow = pillow_exif.read_directories(source)
    directory = pillow.gps
    if not directory and not pillow.complete:
        # Only when Pillow could not read every directory: exifread reads the same tags otherwise.
        directory = exifread_exif.read_directories(source).gps
    return gps_fields(directory)
