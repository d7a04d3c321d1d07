"""EXIF tags to metalake fields, following exiftool's names and conversions.

Both TIFF directory readers (Pillow's and exifread's) hand their values over in one neutral form,
`Raw`, so that the mapping, and its agreement with exiftool, is written once.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TypeAlias

from metalake.metadata import MetadataDict, check_value
from metalake.plugin import Derived


@dataclass(frozen=True, slots=True)
class Rational:
    """A TIFF RATIONAL as stored: the denominator may be zero. (Not a tuple: arrays are.)"""

    num: int
    den: int


Raw: TypeAlias = "int | float | Rational | bytes | tuple[Raw, ...]"
Directory: TypeAlias = Mapping[int, Raw]

# Tag ids.
MAKE, SOFTWARE, DATETIME, ARTIST = 0x010F, 0x0131, 0x0132, 0x013B
XRESOLUTION, YRESOLUTION, RESOLUTION_UNIT, COMPRESSION = 0x011A, 0x011B, 0x0128, 0x0103
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
DATETIME_ORIGINAL, OFFSET_TIME, OFFSET_TIME_ORIGINAL, COLOR_SPACE = 0x9003, 0x9010, 0x9011, 0xA001
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
GPS_ALTITUDE_REF, GPS_ALTITUDE = 5, 6
GPS_TIME_STAMP, GPS_DATE_STAMP = 7, 29
# Panasonic RW2 keeps its compression in IFD0 tag 0x0B (exiftool's PanasonicRaw table); readers
# hand it over under this pseudo tag, outside TIFF's 16-bit range, so it meets no real tag.
PANASONIC_COMPRESSION, RW2_COMPRESSION = 0x000B, 0x1000B

# Every tag the mapping reads (GPS tags 1-6 do not occur in IFD0 or the Exif IFD): readers
# decode only these, not the dozens of others a camera writes.
MAPPED_TAGS = frozenset(
    {
        MAKE,
        SOFTWARE,
        DATETIME,
        ARTIST,
        XRESOLUTION,
        YRESOLUTION,
        RESOLUTION_UNIT,
        COMPRESSION,
        EXIF_IFD,
        GPS_IFD,
        DATETIME_ORIGINAL,
        OFFSET_TIME,
        OFFSET_TIME_ORIGINAL,
        COLOR_SPACE,
        GPS_LATITUDE_REF,
        GPS_LATITUDE,
        GPS_LONGITUDE_REF,
        GPS_LONGITUDE,
        GPS_ALTITUDE_REF,
        GPS_ALTITUDE,
        GPS_TIME_STAMP,
        GPS_DATE_STAMP,
        PANASONIC_COMPRESSION,
    }
)

TEXT_TAGS = (MAKE, SOFTWARE, DATETIME, ARTIST)
GPS_FIELDS = frozenset({"latitude", "longitude", "altitude"})
EXIF_FIELDS = frozenset(
    {
        "acquired_at",
        "acquired_by",
        "manufacturer",
        "software",
        "resolution_x",
        "resolution_y",
        "resolution_unit",
        "compression",
        "color_space",
    }
)

# exiftool's PrintConv tables (Image::ExifTool::Exif).
RESOLUTION_UNITS = {1: "None", 2: "inches", 3: "cm"}
COLOR_SPACES = {
    1: "sRGB",
    2: "Adobe RGB",
    0xFFFF: "Uncalibrated",
    0xFFFE: "ICC Profile",
    0xFFFD: "Wide Gamut RGB",
}
COMPRESSIONS = {
    1: "Uncompressed",
    2: "CCITT 1D",
    3: "T4/Group 3 Fax",
    4: "T6/Group 4 Fax",
    5: "LZW",
    6: "JPEG (old-style)",
    7: "JPEG",
    8: "Adobe Deflate",
    9: "JBIG B&W",
    10: "JBIG Color",
    99: "JPEG",
    262: "Kodak 262",
    32766: "Next",
    32767: "Sony ARW Compressed",
    32769: "Packed RAW",
    32770: "Samsung SRW Compressed",
    32771: "CCIRLEW",
    32772: "Samsung SRW Compressed 2",
    32773: "PackBits",
    32809: "Thunderscan",
    32867: "Kodak KDC Compressed",
    32895: "IT8CTPAD",
    32896: "IT8LW",
    32897: "IT8MP",
    32898: "IT8BL",
    32908: "PixarFilm",
    32909: "PixarLog",
    32946: "Deflate",
    32947: "DCS",
    33003: "Aperio JPEG 2000 YCbCr",
    33005: "Aperio JPEG 2000 RGB",
    34661: "JBIG",
    34676: "SGILog",
    34677: "SGILog24",
    34712: "JPEG 2000",
    34713: "Nikon NEF Compressed",
    34715: "JBIG2 TIFF FX",
    34718: "Microsoft Document Imaging (MDI) Binary Level Codec",
    34719: "Microsoft Document Imaging (MDI) Progressive Transform Codec",
    34720: "Microsoft Document Imaging (MDI) Vector",
    34887: "ESRI Lerc",
    34892: "Lossy JPEG",
    34925: "LZMA2",
    34926: "Zstd",
    34927: "WebP",
    34933: "PNG",
    34934: "JPEG XR",
    65000: "Kodak DCR Compressed",
    65535: "Pentax PEF Compressed",
}

PANASONIC_COMPRESSIONS = {
    34316: "Panasonic RAW 1",
    34826: "Panasonic RAW 2",
    34828: "Panasonic RAW 3",
    34830: "Panasonic RAW 4",
}
# The IFD0 tags exiftool's PanasonicRaw table reads as the standard ones; an RW2's IFD0 has
# others at the standard ids (its XResolution is no resolution).
RW2_IFD0_TAGS = frozenset({MAKE, EXIF_IFD, GPS_IFD})

_DATETIME = re.compile(r"\s*(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"\s*([+-])(\d{2}):(\d{2})\s*$")


def first(value: Raw | None) -> Raw | None:
    """A scalar from a value that may be a one-element (or longer) array."""
    while isinstance(value, tuple):
        if not value:
            return None
        value = value[0]
    return value


def to_text(value: Raw | None) -> str | None:
    """An EXIF ASCII value as exiftool shows it: cut at the first NUL, stripped, empty = absent."""
    value = first(value)
    if not isinstance(value, bytes):
        return None
    raw = value.split(b"\x00", 1)[0]
    # exiftool (-charset exif=utf8, the oracle's setting) shows a byte that is not UTF-8 as "?".
    text = raw.decode("utf-8", "replace").replace("\ufffd", "?").strip()
    return text or None


def to_int(value: Raw | None) -> int | None:
    scalar = first(value)
    if isinstance(scalar, bool) or not isinstance(scalar, int):
        return None
    return scalar


_NUMBER_TYPES = (int, float)


def to_float(value: Raw | None) -> float | None:
    """A finite number from an integer or rational; a zero denominator is no value."""
    scalar = first(value)
    if isinstance(scalar, Rational):
        if scalar.den == 0:
            return None
        number = scalar.num / scalar.den
    elif isinstance(scalar, _NUMBER_TYPES) and not isinstance(scalar, bool):
        number = float(scalar)
    else:
        return None
    return number if math.isfinite(number) else None


def parse_datetime(value: Raw | None, offset: Raw | None) -> datetime | None:
    """`YYYY:MM:DD HH:MM:SS` (sub-seconds ignored) with an optional `±HH:MM` offset tag."""
    text = to_text(value)
    if text is None:
        return None
    match = _DATETIME.match(text)
    if match is None:
        return None
    try:
        year, month, day, hour, minute, second = map(int, match.groups())
        moment = datetime(year, month, day, hour, minute, second)
    except ValueError:  # '0000:00:00 00:00:00', month 13, ...
        return None
    offset_text = to_text(offset)
    offset_match = _OFFSET.match(offset_text) if offset_text else None
    if offset_match is not None:
        zone = _zone(*offset_match.groups())
        if zone is not None:
            moment = moment.replace(tzinfo=zone)
    return moment


@functools.lru_cache(maxsize=256)
def _zone(sign: str, hours: str, minutes: str) -> timezone | None:
    """The fixed offset `±HH:MM` (None past a day), made once: a file's offset is one of few."""
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    if delta >= timedelta(hours=24):
        return None
    return timezone(-delta if sign == "-" else delta)


def dms_to_degrees(value: Raw | None) -> float | None:
    """Degrees, minutes and seconds (any prefix of them) as decimal degrees."""
    parts = value if isinstance(value, tuple) else (value,)
    if not parts or len(parts) > 3:
        return None
    degrees = 0.0
    for part, scale in zip(parts, (1.0, 60.0, 3600.0), strict=False):
        number = to_float(part)
        if number is None:
            return None
        degrees += number / scale
    return degrees


def _named(table: Mapping[int, str], value: Raw | None) -> str | None:
    """exiftool's name for an enumerated value; an unknown one is 'Unknown (N)', in decimal
    (the field rules: exiftool itself writes some in hex, e.g. ColorSpace 'Unknown (0x0)')."""
    number = to_int(value)
    if number is None:
        return None
    if number in table:
        return table[number]
    return f"Unknown ({number})"


def exif_fields(
    ifd0: Directory, exif: Directory, gps: Directory | None = None
) -> dict[str, object]:
    """Every non-GPS field the directories give, valid values only. A capture time without a
    recorded offset gets one from the GPS clock when `gps` allows (see `offset_from_gps_clock`):
    then it is `Derived(value, "gps-clock")`."""
    acquired_at = parse_datetime(
        exif.get(DATETIME_ORIGINAL), exif.get(OFFSET_TIME_ORIGINAL)
    ) or parse_datetime(ifd0.get(DATETIME), exif.get(OFFSET_TIME))
    values: dict[str, object] = {
        "acquired_at": acquired_at,
        "acquired_by": to_text(ifd0.get(ARTIST)),
        "manufacturer": to_text(ifd0.get(MAKE)),
        "software": to_text(ifd0.get(SOFTWARE)),
        "resolution_x": to_float(ifd0.get(XRESOLUTION)),
        "resolution_y": to_float(ifd0.get(YRESOLUTION)),
        "resolution_unit": _named(RESOLUTION_UNITS, ifd0.get(RESOLUTION_UNIT)),
        "compression": _named(COMPRESSIONS, ifd0.get(COMPRESSION))
        or _named(PANASONIC_COMPRESSIONS, ifd0.get(RW2_COMPRESSION)),
        "color_space": _named(COLOR_SPACES, exif.get(COLOR_SPACE)),
    }
    out: dict[str, object] = dict(valid(values))
    if "acquired_at" in out and acquired_at is not None and acquired_at.tzinfo is None and gps:
        offset = offset_from_gps_clock(acquired_at, gps)
        if offset is not None:
            out["acquired_at"] = Derived(acquired_at.replace(tzinfo=offset), "gps-clock")
    return out


# The offsets in use on Earth, and how far a camera's clock may stray from GPS time and still
# be read as a whole quarter-hour offset.
MIN_OFFSET, MAX_OFFSET = timedelta(hours=-12), timedelta(hours=14)
OFFSET_STEP, OFFSET_SLACK = 15 * 60, 5 * 60


def gps_utc(gps: Directory) -> datetime | None:
    """GPSDateStamp and GPSTimeStamp (UTC) as a naive datetime, or None."""
    date = to_text(gps.get(GPS_DATE_STAMP))
    stamp = gps.get(GPS_TIME_STAMP)
    if date is None or not isinstance(stamp, tuple) or len(stamp) != 3:
        return None
    match = re.match(r"(\d{4})[:-](\d{2})[:-](\d{2})$", date)
    parts = [to_float(part) for part in stamp]
    if match is None or any(part is None or not 0 <= part < 61 for part in parts):
        return None
    hours, minutes, seconds = (float(part) for part in parts if part is not None)
    try:
        year, month, day_of_month = (int(group) for group in match.groups())
        day = datetime(year, month, day_of_month)
    except ValueError:
        return None
    return day + timedelta(hours=hours, minutes=minutes, seconds=int(seconds))


def offset_from_gps_clock(local: datetime, gps: Directory) -> timezone | None:
    """The UTC offset of a naive local time, from the GPS clock (UTC) recorded beside it:
    local - UTC rounded to 15 minutes, kept only within -12:00..+14:00 and when rounding moves
    it by at most 5 minutes (a GPS date a day off, or a clock far adrift, gives None)."""
    utc = gps_utc(gps)
    if utc is None:
        return None
    seconds = (local - utc).total_seconds()
    rounded = round(seconds / OFFSET_STEP) * OFFSET_STEP
    offset = timedelta(seconds=rounded)
    if abs(seconds - rounded) > OFFSET_SLACK or not MIN_OFFSET <= offset <= MAX_OFFSET:
        return None
    return timezone(offset)


def gps_fields(gps: Directory) -> MetadataDict:
    """Signed decimal degrees and metres; a coordinate without its reference is absent."""
    values: dict[str, object] = {}
    for field, ref_tag, tag, negative in (
        ("latitude", GPS_LATITUDE_REF, GPS_LATITUDE, "S"),
        ("longitude", GPS_LONGITUDE_REF, GPS_LONGITUDE, "W"),
    ):
        if ref_tag not in gps:
            continue
        degrees = dms_to_degrees(gps.get(tag))
        ref = to_text(gps[ref_tag]) or ""
        if degrees is not None:
            values[field] = -degrees if ref[:1].upper() == negative else degrees
    if GPS_ALTITUDE_REF in gps:
        metres = to_float(gps.get(GPS_ALTITUDE))
        ref_value = first(gps[GPS_ALTITUDE_REF])
        below = ref_value == 1 or ref_value in (b"\x01", b"1")
        if metres is not None:
            values["altitude"] = -metres if below else metres
    return valid(values)


_VALUE_TYPES = (float, str, datetime)


def valid(values: Mapping[str, object]) -> MetadataDict:
    """Only the values that pass the metadata model's checks; the others are no value."""
    out: MetadataDict = {}
    for field, value in values.items():
        if value is None:
            continue
        if isinstance(value, _VALUE_TYPES) and check_value(field, value) is None:
            out[field] = value
    return out
