"""Built-in extractor `gps`: GPS position and altitude from the GPS directory (0x8825).

Reads the GPS directory with metalake's own small TIFF reader (`extractors.tiffread`), so that
it depends on no other extractor: disabling `pillow` or `exifread` leaves it whole.
Degrees/minutes/seconds with their N/S/E/W references become
signed decimal degrees; GPSAltitude with GPSAltitudeRef (1 = below sea level) becomes signed
metres. A value without its reference tag is absent, as in exiftool.
"""

from __future__ import annotations

from collections.abc import Mapping

from metalake.extractors.fields import GPS_FIELDS, gps_fields
from metalake.extractors.hookspecs import hookimpl
from metalake.extractors.source import Source
from metalake.extractors.tiffdirs import read_gps

NAME = "gps"


@hookimpl
def metalake_extract_metadata(source: Source, missing: frozenset[str]) -> Mapping[str, object]:
    wanted = missing & GPS_FIELDS
    if not wanted:
        return {}
    return gps_fields(read_gps(source))
