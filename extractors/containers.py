"""Find the TIFF-structured EXIF blocks inside image containers, reading headers only.

Every walker seeks over image data instead of reading it, bounds its loops and its reads, and
returns no block rather than raising on a malformed file: a 75 MB JPEG costs what a 10 KB one does.
The blocks are then parsed by Pillow's or exifread's TIFF directory readers.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Literal

from metalake.extractors.tiffread import read_tiff

# Loops over segments, chunks and boxes stop here: real files have a few dozen.
MAX_ITEMS = 4096
# Extents listed in one iloc box, all items together: as many as one item may have. A reader
# of zero-width fields consumes no byte per extent, so the count, not the box's size, bounds it.
MAX_EXTENTS = 65_535
# EXIF carried as text (PNG "Raw profile" chunks) or split over extents is read into memory.
MAX_INLINE_EXIF = 4 * 1024 * 1024

Role = Literal["tiff", "exif", "gps", "rw2"]
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Canon CR3: EXIF directories live as TIFF files in CMT boxes of this uuid box inside moov.
CR3_UUID = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")
# JPEG 2000: EXIF in a uuid box with this id (exiftool's "JpgTiffExif->JP2").
JP2_EXIF_UUID = b"JpgTiffExif->JP2"
# GeoJP2: a (degenerate) GeoTIFF in a uuid box, whose IFD0 exiftool reads as well.
GEOJP2_UUID = bytes.fromhex("b14bf8bd083d4b43a5ae8cd7d5a6ce03")
RW2_JPG_FROM_RAW = 0x002E
PSD_EXIF_RESOURCE = 0x0422
# Formats without a walker are scanned for a TIFF signature in their first SCAN_LIMIT bytes (the
# header, where every format that carries EXIF puts it); each candidate must read as a real TIFF
# directory structure, and at most MAX_CANDIDATES are tried.
SCAN_LIMIT = 256 * 1024
MAX_CANDIDATES = 32
# Containers of other files, not of one image's metadata: a TIFF inside one is a file of its own
# (an OLE2 compound document such as Microsoft Image Composer's, a ZIP, a PDF).
NOT_SCANNED = (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", b"PK\x03\x04", b"%PDF")
_TIFF_SIGNATURE = re.compile(rb"II\*\x00|MM\x00\*")


@dataclass(frozen=True)
class TiffBlock:
    """A TIFF structure (header, then directories) holding EXIF, located in a file.

    `role` names what the block's first directory is: IFD0 with its Exif and GPS pointers
    ("tiff"), or, as in CR3, the Exif ("exif") or GPS ("gps") directory itself, or a Panasonic
    RW2 IFD0 ("rw2"), whose tags mostly mean other things than TIFF's. Offsets inside the
    block are relative to `offset`. `header` replaces the first four bytes when the container uses
    its own magic (ORF "IIRO", RW2 "IIU\\0"). `data` holds the block when it is not a contiguous
    run of the file.
    """

    container: str
    offset: int
    length: int
    role: Role = "tiff"
    header: bytes = b""
    data: bytes | None = None


class _Window(io.RawIOBase):
    """A read-only view of `length` bytes of `fp` from `start`, as if they were a whole file."""

    def __init__(self, fp: BinaryIO, start: int, length: int, header: bytes = b"") -> None:
        super().__init__()
        self._fp = fp
        self._start = start
        self._length = max(0, length)
        self._header = header
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._length - self._pos)
        if count <= 0:
            return 0
        self._fp.seek(self._start + self._pos)
        data = self._fp.read(count)
        if self._pos < len(self._header):
            patched = bytearray(data)
            overlap = self._header[self._pos : self._pos + len(patched)]
            patched[: len(overlap)] = overlap
            data = bytes(patched)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


# A block up to this size is read out whole, from memory or from disk: one copy (one read) costs
# less than the window's reads, each a Python call (a JPEG's EXIF block is at most 64 KiB).
_COPIED_BLOCK = 256 * 1024


def open_block(fp: BinaryIO, block: TiffBlock) -> BinaryIO:
    """A seekable file object holding just the block, for a TIFF directory reader."""
    if block.data is not None:
        return io.BytesIO(block.data)
    if (
        block.length <= _COPIED_BLOCK
        and block.offset >= 0
        # Not getbuffer() for a BytesIO: it would copy the whole file out of the bytes it shares.
        and block.offset + block.length <= fp.seek(0, io.SEEK_END)
    ):
        # The same bytes the window would show, its length included (the block lies inside).
        fp.seek(block.offset)
        data = fp.read(block.length)
        if block.header:
            data = block.header[: len(data)] + data[len(block.header) :]
        return io.BytesIO(data)
    window = _Window(fp, block.offset, block.length, block.header)
    # Directory readers do many tiny reads; a buffer makes a 65,535-entry directory cheap.
    return io.BufferedReader(window, 8 * 1024)


def sniff(head: bytes) -> str | None:
    """The container family of a file from its first bytes, or None when we have no walker."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:16] == b"FUJIFILMCCD-RAW ":
        return "raf"
    if head[:2] in (b"II", b"MM") and len(head) >= 8:
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] in (b"ftyp", b"jP  ", b"JXL "):
        return "bmff"
    if head[:4] == b"8BPS":
        return "psd"
    if head[:4] == b"\xc5\xd0\xd3\xc6" or head[:4] == b"%!PS":
        return "eps"
    if head[:4] == b"FLIF":
        return "flif"
    if head.startswith(b"Paint Shop Pro Image File"):
        return "psp"
    if head[:4] == b"FOVb":
        return "x3f"
    return None


def find_exif(fp: BinaryIO, head: bytes, size: int) -> tuple[str | None, list[TiffBlock]]:
    """The container family and the EXIF blocks found in it, in the order a reader should use.

    A container with a walker is walked; any other file is scanned (`scan_for_tiff`)."""
    container = sniff(head)
    walker = _WALKERS.get(container or "")
    if walker is None:
        if head.startswith(NOT_SCANNED):
            return container, []
        return container, scan_for_tiff(fp, size)
    return container, walker(fp, head, size)


def is_tiff_structure(fp: BinaryIO, block: TiffBlock) -> bool:
    """Whether `block` reads as a TIFF header and a plausible IFD0 (see `extractors.tiffread`)."""
    return read_tiff(open_block(fp, block), block.length) is not None


def scan_for_tiff(fp: BinaryIO, size: int, container: str = "scan") -> list[TiffBlock]:
    """The first TIFF structure in the file's first SCAN_LIMIT bytes that validates as one.

    For formats that embed an EXIF block (with or without JPEG's "Exif\\0\\0" before it) in a
    container of their own (MIFF, GIMP XCF, BPG, Minolta MRW, Paint Shop Pro, Sigma X3F, ...).
    The signature alone proves nothing: random bytes contain "II*\\0" once every 4 GB, files
    carry unrelated TIFF previews deep inside, so a candidate must have a plausible IFD0.
    """
    data = _read_at(fp, 0, min(size, SCAN_LIMIT))
    for index, match in enumerate(_TIFF_SIGNATURE.finditer(data)):
        if index >= MAX_CANDIDATES:
            break
        block = TiffBlock(container, match.start(), size - match.start())
        if is_tiff_structure(fp, block):
            return [block]
    return []


def _read_at(fp: BinaryIO, offset: int, count: int) -> bytes:
    if offset < 0 or count <= 0:
        return b""
    fp.seek(offset)
    return fp.read(count)


def _looks_like_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_MAGIC


def _tiff_at(
    fp: BinaryIO, container: str, start: int, end: int, role: Role = "tiff"
) -> TiffBlock | None:
    """A block at `start` if a TIFF header is there or within the next few bytes."""
    probe = _read_at(fp, start, 32)
    for skip in range(0, max(0, len(probe) - 3)):
        if _looks_like_tiff(probe[skip:]):
            return TiffBlock(container, start + skip, end - start - skip, role)
    return None


def _jpeg_blocks(fp: BinaryIO, start: int, end: int, container: str = "jpeg") -> list[TiffBlock]:
    return _jpeg_walk(fp, start, end, container, MAX_ITEMS)[0]


def _jpeg_walk(
    fp: BinaryIO, start: int, end: int, container: str, steps: int
) -> tuple[list[TiffBlock], int]:
    """The EXIF block of the JPEG at `start`, walking at most `steps` markers, and the number
    of steps taken."""
    pos = start + 2
    for step in range(1, steps + 1):
        head = _read_at(fp, pos, 4)
        if len(head) < 2 or head[0] != 0xFF:
            return [], step
        marker = head[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        if marker in (0xD9, 0xDA) or len(head) < 4:  # image data begins: no metadata after it
            return [], step
        length = struct.unpack(">H", head[2:4])[0]
        if length < 2 or pos + 2 + length > end:
            return [], step
        if marker == 0xE1 and length >= 8 and _read_at(fp, pos + 4, 6)[:5] == b"Exif\x00":
            return [TiffBlock(container, pos + 10, length - 8)], step
        pos += 2 + length
    return [], steps


def _walk_jpeg(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    return _jpeg_blocks(fp, 0, size)


def _walk_raf(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    # Fujifilm RAF: exiftool reads EXIF from the JPEG preview the header points to.
    pointer = _read_at(fp, 84, 8)
    if len(pointer) < 8:
        return []
    offset, length = struct.unpack(">II", pointer)
    if offset + length > size or _read_at(fp, offset, 2) != b"\xff\xd8":
        return []
    return _jpeg_blocks(fp, offset, offset + length, "raf")


def _walk_tiff(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    # TIFF and the RAW formats built on it (DNG, CR2, NEF, ARW, PEF, ...). ORF ("IIRO", "MMOR",
    # "IISR") and RW2 ("IIU\0") keep TIFF's layout under their own magic: read them as TIFF.
    order = head[:2]
    if head[:4] in TIFF_MAGIC:
        return [TiffBlock("tiff", 0, size)]
    standard = b"II*\x00" if order == b"II" else b"MM\x00*"
    if head[2:4] == (b"U\x00" if order == b"II" else b"\x00U"):
        return _walk_rw2(fp, size, standard)
    return [TiffBlock("tiff", 0, size, header=standard)]


def _walk_rw2(fp: BinaryIO, size: int, standard: bytes) -> list[TiffBlock]:
    # Panasonic RW2: IFD0 in Panasonic's own table (Make, compression, Exif and GPS pointers),
    # and a JPEG (JpgFromRaw, tag 0x2E) whose EXIF gives the usual IFD0 tags after it.
    blocks = [TiffBlock("tiff", 0, size, role="rw2", header=standard)]
    order = "<" if standard[:2] == b"II" else ">"
    header = _read_at(fp, 4, 4)
    if len(header) < 4:
        return blocks
    ifd = struct.unpack(order + "I", header)[0]
    count_bytes = _read_at(fp, ifd, 2)
    if len(count_bytes) < 2:
        return blocks
    count = min(struct.unpack(order + "H", count_bytes)[0], MAX_ITEMS)
    entries = _read_at(fp, ifd + 2, 12 * count)
    for index in range(len(entries) // 12):
        tag, _, length, offset = struct.unpack_from(order + "HHII", entries, 12 * index)
        if tag == RW2_JPG_FROM_RAW and length > 4 and offset + length <= size:
            if _read_at(fp, offset, 2) == b"\xff\xd8":
                blocks += _jpeg_blocks(fp, offset, offset + length, "rw2")
            break
    return blocks


def _walk_png(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    pos = 8
    # All of a file's text chunks inflate to this much at most, together: one profile's hex
    # text (two digits a byte) fits, and a file of many chunks that each inflate that far and
    # then prove not to be EXIF costs it once, not once a chunk (120 such chunks per MiB).
    room = 2 * MAX_INLINE_EXIF
    for _ in range(MAX_ITEMS):
        chunk = _read_at(fp, pos, 8)
        if len(chunk) < 8:
            return []
        length, kind = struct.unpack(">I4s", chunk)
        data_start = pos + 8
        if data_start + length > size:
            return []
        if kind == b"eXIf":
            block = _tiff_at(fp, "png", data_start, data_start + length)
            return [block] if block else []
        if kind in (b"tEXt", b"zTXt", b"iTXt") and length <= MAX_INLINE_EXIF and room > 0:
            data, inflated = _png_raw_profile(kind, _read_at(fp, data_start, length), room)
            if data is not None:
                return [TiffBlock("png", 0, len(data), data=data)]
            room -= inflated
        if kind == b"IEND":
            return []
        pos = data_start + length + 4  # skips IDAT without reading it
    return []


def _png_raw_profile(kind: bytes, data: bytes, room: int) -> tuple[bytes | None, int]:
    """EXIF in ImageMagick's "Raw profile type exif" text chunk (a length then hex digits), and
    how many bytes it inflated (at most `room`)."""
    keyword, _, rest = data.partition(b"\x00")
    if keyword not in (b"Raw profile type exif", b"Raw profile type APP1"):
        return None, 0
    inflated = 0
    if kind == b"zTXt":
        text = _inflate(rest[1:], limit=room)
        inflated = _cost(text, room)
    elif kind == b"iTXt":
        flag, method = rest[:1], rest[1:2]
        # iTXt: compression flag, method, language NUL, translated keyword NUL, text.
        parts = rest[2:].split(b"\x00", 2)
        if len(parts) < 3:
            return None, 0
        text = parts[2]
        if flag == b"\x01" and method == b"\x00":
            text = _inflate(parts[2], limit=room)
            inflated = _cost(text, room)
    else:
        text = rest
    return _raw_profile_exif(text), inflated


def _cost(inflated: bytes | None, room: int) -> int:
    # A stream found broken may have inflated all it could first: it takes all the room.
    return room if inflated is None else len(inflated)


def _raw_profile_exif(text: bytes | None) -> bytes | None:
    if text is None:
        return None
    lines = text.split(b"\n", 3)
    if len(lines) < 4:
        return None
    try:
        raw = bytes.fromhex(lines[3].decode("ascii").replace("\n", "").replace(" ", ""))
    except ValueError:
        return None
    if raw.startswith(b"Exif\x00\x00"):
        raw = raw[6:]
    return raw if _looks_like_tiff(raw) else None


def _inflate(data: bytes, *, raw: bool = False, limit: int = 2 * MAX_INLINE_EXIF) -> bytes | None:
    if limit <= 0:
        return None  # zlib reads a max_length of 0 as no limit at all
    inflater = zlib.decompressobj(-15 if raw else 15)
    try:
        # Bounded: a small compressed chunk must not expand into gigabytes.
        out = inflater.decompress(data, limit)
    except zlib.error:
        return None
    return out


def _walk_webp(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    pos = 12
    for _ in range(MAX_ITEMS):
        chunk = _read_at(fp, pos, 8)
        if len(chunk) < 8:
            return []
        kind, length = struct.unpack("<4sI", chunk)
        data_start = pos + 8
        if data_start + length > size:
            return []
        if kind == b"EXIF":
            block = _tiff_at(fp, "webp", data_start, data_start + length)
            return [block] if block else []
        pos = data_start + length + (length & 1)
    return []


def _walk_psd(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    # Header (26 bytes), colour mode data (length + data), then the image resources section.
    color = _read_at(fp, 26, 4)
    if len(color) < 4:
        return []
    pos = 30 + struct.unpack(">I", color)[0]
    section = _read_at(fp, pos, 4)
    if len(section) < 4:
        return []
    end = min(size, pos + 4 + struct.unpack(">I", section)[0])
    return _psd_resources(fp, pos + 4, end, "psd")


def _psd_resources(fp: BinaryIO, pos: int, end: int, container: str) -> list[TiffBlock]:
    """The EXIF block (resource 0x0422) among Photoshop image resources ("8BIM" blocks)."""
    for _ in range(MAX_ITEMS):
        header = _read_at(fp, pos, 7)
        if len(header) < 7 or header[:4] != b"8BIM":
            return []
        resource = struct.unpack(">H", header[4:6])[0]
        name_length = header[6]
        pos += 6 + ((name_length + 2) & ~1)  # Pascal name, padded to even
        length_bytes = _read_at(fp, pos, 4)
        if len(length_bytes) < 4:
            return []
        length = struct.unpack(">I", length_bytes)[0]
        data_start = pos + 4
        if data_start + length > end:
            return []
        if resource == PSD_EXIF_RESOURCE:
            block = _tiff_at(fp, container, data_start, data_start + length)
            return [block] if block else []
        pos = data_start + length + (length & 1)
    return []


def _boxes(fp: BinaryIO, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """ISO-BMFF boxes between `start` and `end`: (type, payload start, payload end)."""
    found: list[tuple[bytes, int, int]] = []
    pos = start
    while pos + 8 <= end and len(found) < MAX_ITEMS:
        header = _read_at(fp, pos, 16)
        if len(header) < 8:
            break
        size, kind = struct.unpack(">I4s", header[:8])
        payload = pos + 8
        if size == 1:
            if len(header) < 16:
                break
            size = struct.unpack(">Q", header[8:16])[0]
            payload = pos + 16
        elif size == 0:
            size = end - pos
        if size < payload - pos or pos + size > end:
            break
        found.append((kind, payload, pos + size))
        pos += size
    return found


def _walk_bmff(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    # One walker for ISO-BMFF files: HEIF/HEIC/AVIF (Exif item), CR3 (CMT boxes), JPEG XL (Exif
    # box) and JPEG 2000 (Exif uuid box).
    blocks: list[TiffBlock] = []
    for kind, start, end in _boxes(fp, 0, size):
        found: list[TiffBlock] = []
        if kind == b"meta":
            found = _heif_exif(fp, start + 4, end, size)  # a full box: version, flags first
        elif kind == b"moov":
            found = _cr3_exif(fp, start, end)
        elif kind == b"Exif":
            block = _exif_with_offset(fp, "jxl", start, end)
            found = [block] if block else []
        elif kind == b"uuid":
            # JPEG 2000 may have an EXIF and a GeoJP2 box, anywhere among the others.
            uuid = _read_at(fp, start, 16)
            if uuid == JP2_EXIF_UUID:
                block = _tiff_at(fp, "jp2", start + 16, end)
                blocks[:0] = [block] if block else []  # before any GeoJP2 block
            elif uuid == GEOJP2_UUID:
                block = _tiff_at(fp, "jp2", start + 16, end)
                blocks += [block] if block and is_tiff_structure(fp, block) else []
        if found:
            return blocks + found
    return blocks


def _exif_with_offset(fp: BinaryIO, container: str, start: int, end: int) -> TiffBlock | None:
    """An Exif item or box: a 4-byte offset to the TIFF header, then the TIFF structure."""
    prefix = _read_at(fp, start, 4)
    if len(prefix) < 4:
        return None
    skip = struct.unpack(">I", prefix)[0]
    tiff_start = start + 4 + skip
    if skip < end - start and _looks_like_tiff(_read_at(fp, tiff_start, 4)):
        return TiffBlock(container, tiff_start, end - tiff_start)
    # Some writers get the offset wrong: look for the header near the start instead.
    return _tiff_at(fp, container, start, end)


def _cr3_exif(fp: BinaryIO, start: int, end: int) -> list[TiffBlock]:
    roles: dict[bytes, Role] = {b"CMT1": "tiff", b"CMT2": "exif", b"CMT4": "gps"}
    blocks: list[TiffBlock] = []
    for kind, box_start, box_end in _boxes(fp, start, end):
        if kind != b"uuid" or _read_at(fp, box_start, 16) != CR3_UUID:
            continue
        for child, child_start, child_end in _boxes(fp, box_start + 16, box_end):
            role = roles.get(child)
            if role is not None and _looks_like_tiff(_read_at(fp, child_start, 4)):
                blocks.append(TiffBlock("cr3", child_start, child_end - child_start, role))
    return blocks


def _heif_exif(fp: BinaryIO, start: int, end: int, size: int) -> list[TiffBlock]:
    children = {kind: (s, e) for kind, s, e in _boxes(fp, start, end)}
    if b"iinf" not in children or b"iloc" not in children:
        return []
    exif_ids = _heif_exif_items(fp, *children[b"iinf"])
    if not exif_ids:
        return []
    idat_start = children[b"idat"][0] if b"idat" in children else None
    for item_id, extents in _heif_locations(fp, *children[b"iloc"], idat_start):
        if item_id not in exif_ids or not extents:
            continue
        if len(extents) == 1:
            offset, length = extents[0]
            # A zero length means "to the end of the file".
            stop = size if length == 0 else min(offset + length, size)
            block = _exif_with_offset(fp, "heif", offset, stop)
            return [block] if block else []
        # Split over extents: join them (bounded), then read the joined bytes.
        data = _joined(fp, extents, size, to_the_end=False)
        if data is None:
            return []
        inner = _exif_with_offset(io.BytesIO(data), "heif", 0, len(data))
        if inner is None:
            return []
        return [TiffBlock("heif", 0, inner.length, data=data[inner.offset :])]
    return []


def _heif_exif_items(fp: BinaryIO, start: int, end: int) -> set[int]:
    return {item for item, (kind, _) in _heif_items(fp, start, end).items() if kind == b"Exif"}


def _heif_items(fp: BinaryIO, start: int, end: int) -> dict[int, tuple[bytes, bytes]]:
    """Item id -> (item type, content type) from an iinf box (infe version 2 or 3)."""
    header = _read_at(fp, start, 8)
    if len(header) < 6:
        return {}
    version = header[0]
    first_child = start + (6 if version == 0 else 8)
    items: dict[int, tuple[bytes, bytes]] = {}
    for kind, box_start, box_end in _boxes(fp, first_child, end):
        if kind != b"infe":
            continue
        info = _read_at(fp, box_start, min(box_end - box_start, 256))
        if len(info) < 12 or info[0] < 2:
            continue
        if info[0] == 2:
            item_id, item_type, rest = struct.unpack(">H", info[4:6])[0], info[8:12], info[12:]
        else:
            if len(info) < 14:
                continue
            item_id, item_type, rest = struct.unpack(">I", info[4:8])[0], info[10:14], info[14:]
        # Then the item name and, for "mime" items, the content type, both NUL-terminated.
        names = rest.split(b"\x00")
        items[item_id] = (item_type, names[1] if item_type == b"mime" and len(names) > 1 else b"")
    return items


def heif_item(fp: BinaryIO, size: int, item_type: bytes, content_type: bytes = b"") -> bytes | None:
    """The content (at most MAX_INLINE_EXIF bytes) of the first item of a HEIF file's meta box
    with this item type (and content type, for "mime" items), or None."""
    for kind, start, end in _boxes(fp, 0, size):
        if kind != b"meta":
            continue
        children = {k: (s, e) for k, s, e in _boxes(fp, start + 4, end)}
        if b"iinf" not in children or b"iloc" not in children:
            return None
        wanted = {
            item
            for item, (kind_of, content) in _heif_items(fp, *children[b"iinf"]).items()
            if kind_of == item_type and (not content_type or content == content_type)
        }
        idat_start = children[b"idat"][0] if b"idat" in children else None
        for item_id, extents in _heif_locations(fp, *children[b"iloc"], idat_start):
            if item_id in wanted and extents:
                return _joined(fp, extents, size, to_the_end=True)
        return None
    return None


def _joined(
    fp: BinaryIO, extents: list[tuple[int, int]], size: int, *, to_the_end: bool
) -> bytes | None:
    """The extents' bytes one after the other, or None past MAX_INLINE_EXIF bytes. With
    `to_the_end`, a zero length means "to the end of the file" (else it reads nothing).

    Joined once at the end: `data += part` copied all that came before at every extent; 65,535
    extents of 60 bytes (a 513 KiB file) cost 34 s of CPU.
    """
    parts: list[bytes] = []
    total = 0
    for offset, length in extents:
        if to_the_end:
            length = length or size - offset
        if total + length > MAX_INLINE_EXIF:
            return None
        part = _read_at(fp, offset, length)
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def bmff_boxes(fp: BinaryIO, size: int) -> list[tuple[bytes, int, int]]:
    """The top-level boxes of an ISO-BMFF file: (type, payload start, payload end)."""
    return _boxes(fp, 0, size)


def _heif_locations(
    fp: BinaryIO, start: int, end: int, idat_start: int | None
) -> list[tuple[int, list[tuple[int, int]]]]:
    data = _read_at(fp, start, min(end - start, 1024 * 1024))
    try:
        return _parse_iloc(data, idat_start)
    except (struct.error, IndexError):
        return []


def _parse_iloc(data: bytes, idat_start: int | None) -> list[tuple[int, list[tuple[int, int]]]]:
    version = data[0]
    offset_size, length_size = data[4] >> 4, data[4] & 0xF
    base_size, index_size = data[5] >> 4, (data[5] & 0xF if version in (1, 2) else 0)
    pos = 6

    def number(width: int) -> int:
        nonlocal pos
        if width not in (0, 2, 4, 8):
            raise struct.error(f"bad iloc field width {width}")
        value = int.from_bytes(data[pos : pos + width], "big") if width else 0
        if len(data) < pos + width:
            raise struct.error("truncated iloc")
        pos += width
        return value

    count = number(2) if version < 2 else number(4)
    items: list[tuple[int, list[tuple[int, int]]]] = []
    extents_left = MAX_EXTENTS
    for _ in range(min(count, MAX_ITEMS)):
        item_id = number(2 if version < 2 else 4)
        method = number(2) & 0xF if version in (1, 2) else 0
        number(2)  # data reference index
        base = number(base_size)
        extents: list[tuple[int, int]] = []
        extent_count = number(2)
        extents_left -= extent_count
        if extents_left < 0:
            # With zero-width fields, 6 bytes of an item listed 65,535 extents: 4,096 such items
            # (24 KiB) cost 150 s of CPU, the box is no list of real files' items.
            raise struct.error("too many iloc extents")
        for _ in range(extent_count):
            if index_size:
                number(index_size)
            offset, length = number(offset_size), number(length_size)
            extents.append((base + offset, length))
        if method == 1 and idat_start is not None:
            extents = [(idat_start + offset, length) for offset, length in extents]
        elif method != 0:
            extents = []
        items.append((item_id, extents))
    return items


def _walk_eps(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    # EPS: the EXIF of a Photoshop EPS is in its PostScript, as hex digits after
    # "%BeginPhotoshop: <length>" (Photoshop image resources); a DOS EPS binary header may point
    # to a TIFF preview as well, whose IFD0 exiftool reads too (after the Photoshop EXIF).
    ps_start, ps_end = 0, size
    blocks: list[TiffBlock] = []
    if head[:4] == b"\xc5\xd0\xd3\xc6":
        fields = struct.unpack("<6I", _read_at(fp, 4, 24).ljust(24, b"\x00"))
        ps_start, ps_end = fields[0], min(size, fields[0] + fields[1])
        tiff_start, tiff_length = fields[4], fields[5]
        if tiff_start and tiff_start + tiff_length <= size:
            preview = TiffBlock("eps", tiff_start, tiff_length)
            if is_tiff_structure(fp, preview):
                blocks.append(preview)
    text = _read_at(fp, ps_start, min(ps_end - ps_start, SCAN_LIMIT))
    if not text.startswith((b"%!PS", b"%!Adobe")):
        return []  # exiftool: "PostScript format error (invalid header)", nothing read
    match = re.search(rb"%BeginPhotoshop:\s*(\d+)", text)
    if match is not None and int(match.group(1)) <= MAX_INLINE_EXIF:
        hex_start = ps_start + match.end()
        hex_text = _read_at(fp, hex_start, min(ps_end - hex_start, 3 * int(match.group(1)) + 4096))
        hex_text = hex_text.split(b"%EndPhotoshop", 1)[0]
        try:
            resources = bytes.fromhex(re.sub(rb"[%\s]", b"", hex_text).decode("ascii"))
        except ValueError:
            resources = b""
        inner = io.BytesIO(resources)
        found = _psd_resources(inner, 0, len(resources), "eps")
        blocks[:0] = [
            TiffBlock("eps", 0, block.length, data=resources[block.offset :]) for block in found
        ]
    return blocks


def _walk_flif(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    # FLIF: after the header (magic, format byte, bytes per channel, width, height and, when
    # animated, a frame count, as varints), optional chunks: a 4-letter name, a varint length and
    # DEFLATE-compressed content. "eXif" holds "Exif\0\0" and the TIFF structure.
    data = _read_at(fp, 0, min(size, SCAN_LIMIT))
    if len(data) < 6:
        return []
    pos = 6
    try:
        # The format byte's high nibble: 3, 4 still (non-interlaced, interlaced); 5, 6 animated,
        # which have a frame count after width and height.
        for _ in range(3 if data[4] >> 4 in (5, 6) else 2):
            _, pos = _varint(data, pos)
        for _ in range(MAX_ITEMS):
            name = data[pos : pos + 4]
            if len(name) < 4 or name[0] < 32:  # the image data begins
                return []
            length, pos = _varint(data, pos + 4)
            content = data[pos : pos + length]
            pos += length
            if name == b"eXif":
                raw = _inflate(content, raw=True)
                if raw is None:
                    return []
                raw = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
                block = TiffBlock("flif", 0, len(raw), data=raw)
                return [block] if is_tiff_structure(io.BytesIO(raw), block) else []
    except IndexError:
        return []
    return []


def _walk_psp(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    # Paint Shop Pro: EXIF in a "~FL\0" sub-block of the extended data block, as "Exif\0\0" and
    # a TIFF structure whose offsets, after the first, count from IFD0 instead of the TIFF
    # header (exiftool's PSP.pm). Rebased here into a standard TIFF structure.
    data = _read_at(fp, 0, min(size, SCAN_LIMIT))
    at = data.find(b"Exif\x00\x00")
    if at < 10 or data[at - 10 : at - 6] != b"~FL\x00":
        return []
    length = struct.unpack("<I", data[at - 4 : at])[0]
    tiff = data[at + 6 : at + length]
    if len(tiff) < 16 or tiff[:4] not in TIFF_MAGIC[:2]:
        return []
    order = "<" if tiff[:2] == b"II" else ">"
    count = struct.unpack(order + "H", tiff[8:10])[0]
    ifd0 = tiff[8 : 8 + 2 + 12 * count + 4]
    # N[p] == tiff[8 + p] for every offset p >= 8, and IFD0 copied to the end.
    rebased = tiff[:4] + struct.pack(order + "I", len(tiff) - 8) + tiff[16:] + ifd0
    block = TiffBlock("psp", 0, len(rebased), data=rebased)
    return [block] if is_tiff_structure(io.BytesIO(rebased), block) else []


def _walk_x3f(fp: BinaryIO, head: bytes, size: int) -> list[TiffBlock]:
    # Sigma X3F: the last 4 bytes point to a "SECd" directory of (offset, length, type) entries;
    # an IMA2 section whose header says JPEG (format 18) is the preview, whose EXIF exiftool
    # reads as the file's (SigmaRaw.pm). Real files put it anywhere, often after the raw data.
    pointer = _read_at(fp, size - 4, 4)
    if len(pointer) < 4:
        return []
    directory = struct.unpack("<I", pointer)[0]
    header = _read_at(fp, directory, 12)
    if len(header) < 12 or header[:4] != b"SECd":
        return scan_for_tiff(fp, size, "x3f")
    count = min(struct.unpack("<I", header[8:12])[0], MAX_ITEMS)
    entries = _read_at(fp, directory + 12, 12 * count)
    # The previews' markers are walked MAX_ITEMS in all, not each: 4,096 entries naming one
    # preview of 4,000 markers (a 64 KiB file) walked 16 million of them, 1.6 ms per entry.
    steps = MAX_ITEMS
    for index in range(len(entries) // 12):
        offset, length, kind = struct.unpack_from("<II4s", entries, 12 * index)
        if kind != b"IMA2" or length <= 28 or offset + length > size:
            continue
        if _read_at(fp, offset, 16) == b"SECi\x00\x00\x02\x00\x02\x00\x00\x00\x12\x00\x00\x00":
            blocks, taken = _jpeg_walk(fp, offset + 28, offset + length, "x3f", steps)
            if blocks:
                return blocks
            steps -= taken
            if steps <= 0:
                return []
    return []


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for _ in range(8):
        byte = data[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos
    raise IndexError("varint too long")


_WALKERS = {
    "jpeg": _walk_jpeg,
    "raf": _walk_raf,
    "tiff": _walk_tiff,
    "png": _walk_png,
    "webp": _walk_webp,
    "bmff": _walk_bmff,
    "psd": _walk_psd,
    "eps": _walk_eps,
    "flif": _walk_flif,
    "psp": _walk_psp,
    "x3f": _walk_x3f,
}
