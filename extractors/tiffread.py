"""A small, strict, bounded TIFF directory reader, in pure Python.

It decides whether bytes found by scanning are a real TIFF structure (`containers` validates
every scanned candidate with it: random bytes behind a TIFF signature are refused), and it is the
`gps` extractor's own reader, so that no built-in extractor depends on another one's parser.
It reads only the tags metalake maps, and at most MAX_VALUE bytes of each.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from metalake.extractors.fields import EXIF_IFD, GPS_IFD, MAPPED_TAGS, Rational, Raw

# Entry types: (struct code, size). 13 is IFD (a LONG offset).
_TYPES: dict[int, tuple[str, int]] = {
    1: ("B", 1),
    2: ("s", 1),
    3: ("H", 2),
    4: ("I", 4),
    5: ("II", 8),
    6: ("b", 1),
    7: ("s", 1),
    8: ("h", 2),
    9: ("i", 4),
    10: ("ii", 8),
    11: ("f", 4),
    12: ("d", 8),
    13: ("I", 4),
}
# One directory entry: tag, type, count, value or offset.
_ENTRY = {order: struct.Struct(order + "HHI4s") for order in "<>"}
MAX_ENTRIES = 1024  # more than any real directory has
MAX_VALUE = 64 * 1024  # bytes of one mapped tag's value


def read_directory(
    fp: BinaryIO,
    order: str,
    offset: int,
    length: int,
    tags: frozenset[int] = MAPPED_TAGS,
    *,
    strict: bool = True,
) -> dict[int, Raw] | None:
    """The entries of the directory at `offset` whose tag is in `tags` (the last of duplicates,
    as exiftool), or None when what is there is not a TIFF directory: no entries, or entries
    past the end of the block (exiftool's "Bad IFD0 directory"); and when `strict`, more than
    MAX_ENTRIES or many unknown entry types, which random bytes have and real files do not."""
    if offset < 8 or offset + 2 > length:
        return None
    fp.seek(offset)
    raw_count = fp.read(2)
    if len(raw_count) < 2:
        return None
    count = struct.unpack(order + "H", raw_count)[0]
    if count == 0 or (strict and count > MAX_ENTRIES) or offset + 2 + 12 * count > length:
        return None
    entries = fp.read(12 * min(count, MAX_ENTRIES))
    if len(entries) < 12 * min(count, MAX_ENTRIES):
        return None
    listed = list(_ENTRY[order].iter_unpack(entries))
    # A real directory has valid entry types; random bytes almost never do.
    if strict and sum(kind not in _TYPES for _, kind, _, _ in listed) * 4 > count:
        return None
    # The last of duplicates that decodes, so the entries from the last: a tag once decoded is
    # not decoded again. (Decoding each of 1,024 duplicates of 8,191 rationals cost 5 s.)
    out: dict[int, Raw] = {}
    for tag, kind, number, value in reversed(listed):
        if kind not in _TYPES or tag not in tags or tag in out:
            continue
        code, size = _TYPES[kind]
        total = size * number
        if total > MAX_VALUE or number == 0:
            continue
        if total > 4:
            pointer = struct.unpack(order + "I", value)[0]
            if pointer + total > length:
                continue
            fp.seek(pointer)
            value = fp.read(total)
            if len(value) < total:
                continue
        decoded = _decode(order, kind, code, number, value[:total])
        if decoded is not None:
            out[tag] = decoded
    return out


def _decode(order: str, kind: int, code: str, number: int, data: bytes) -> Raw | None:
    if kind in (2, 7):
        return data
    if kind in (5, 10):
        pairs = struct.unpack(order + code[0] * (2 * number), data)
        items: tuple[Raw, ...] = tuple(
            Rational(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)
        )
    else:
        items = struct.unpack(order + code * number, data)
    return items[0] if len(items) == 1 else items


Directories = tuple[dict[int, Raw], dict[int, Raw], dict[int, Raw]]


def read_tiff(
    fp: BinaryIO,
    length: int,
    *,
    strict: bool = True,
    ifd0_tags: frozenset[int] = MAPPED_TAGS,
    sub_directories: tuple[int, ...] = (EXIF_IFD, GPS_IFD),
) -> Directories | None:
    """IFD0, Exif and GPS directories of the classic TIFF structure (not BigTIFF) that `fp`
    holds in its first `length` bytes, or None when it holds no plausible one (see
    `read_directory` for what `strict` adds). Only `ifd0_tags` of IFD0 are decoded, and only the
    `sub_directories` (of EXIF_IFD, GPS_IFD) are read: the others come back empty."""
    fp.seek(0)
    header = fp.read(8)
    if len(header) < 8:
        return None
    if header[:4] == b"II*\x00":
        order = "<"
    elif header[:4] == b"MM\x00*":
        order = ">"
    else:
        return None
    ifd0 = read_directory(
        fp, order, struct.unpack(order + "I", header[4:8])[0], length, ifd0_tags, strict=strict
    )
    if ifd0 is None:
        return None
    subs: list[dict[int, Raw]] = []
    for tag in (EXIF_IFD, GPS_IFD):
        pointer = ifd0.get(tag) if tag in sub_directories else None
        if isinstance(pointer, tuple):
            pointer = pointer[0] if pointer else None
        found = (
            read_directory(fp, order, pointer, length, strict=strict)
            if isinstance(pointer, int) and not isinstance(pointer, bool)
            else None
        )
        subs.append(found or {})
    return ifd0, subs[0], subs[1]
