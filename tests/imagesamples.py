"""Images made on the spot for the preview tests: every format, orientations, and a camera RAW."""

from __future__ import annotations

import io
import struct

from PIL import Image


def encoded(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def landscape(width: int = 600, height: int = 400) -> Image.Image:
    """Red on the left half, blue on the right: which way up it is shows in the pixels."""
    image = Image.new("RGB", (width, height), (220, 20, 20))
    image.paste((20, 20, 220), (width // 2, 0, width, height))
    return image


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, "JPEG", exif=exif.tobytes())


def dng(preview_jpeg: bytes, preview_size: tuple[int, int], *, flip: int = 1) -> bytes:
    """A minimal DNG: IFD0 is the camera's JPEG preview (with `flip` as its Orientation), a
    SubIFD holds 64x64 pixels of 16-bit CFA sensor data. LibRaw reads it like a camera's."""
    short, long, ascii, byte = 3, 4, 2, 1
    raw_side = 64  # LibRaw refuses sensors under 22 px
    raw_data = bytes(raw_side * raw_side * 2)
    model = b"Canon EOS 5D\x00"
    width, height = preview_size
    ifd0: list[tuple[int, int, int, object]] = [
        (254, long, 1, 1),  # a reduced-resolution image: the preview
        (256, long, 1, width),
        (257, long, 1, height),
        (258, short, 3, ("bits", struct.pack("<3H", 8, 8, 8))),
        (259, short, 1, 7),  # JPEG
        (262, short, 1, 6),  # YCbCr
        (271, ascii, 6, ("make", b"Canon\x00")),
        (272, ascii, len(model), ("model", model)),
        (273, long, 1, "preview"),
        (274, short, 1, flip),
        (277, short, 1, 3),
        (278, long, 1, height),
        (279, long, 1, len(preview_jpeg)),
        (330, long, 1, "subifd"),
        (50706, byte, 4, bytes([1, 4, 0, 0])),  # DNGVersion
        (50708, ascii, len(model), ("unique", model)),
    ]
    subifd: list[tuple[int, int, int, object]] = [
        (254, long, 1, 0),
        (256, long, 1, raw_side),
        (257, long, 1, raw_side),
        (258, short, 1, 16),
        (259, short, 1, 1),
        (262, short, 1, 32803),  # CFA
        (273, long, 1, "raw"),
        (277, short, 1, 1),
        (278, long, 1, raw_side),
        (279, long, 1, len(raw_data)),
        (33421, short, 2, struct.pack("<2H", 2, 2)),
        (33422, byte, 4, bytes([0, 1, 1, 2])),
    ]

    def ifd_size(entries: list[tuple[int, int, int, object]]) -> int:
        return 2 + 12 * len(entries) + 4

    offsets = {"subifd": 8 + ifd_size(ifd0)}
    extra = bytearray()
    extra_start = offsets["subifd"] + ifd_size(subifd)
    for _tag, _, _, value in ifd0 + subifd:
        if isinstance(value, tuple):
            offsets[value[0]] = extra_start + len(extra)
            extra += value[1] + b"\x00" * (len(value[1]) % 2)
    offsets["preview"] = extra_start + len(extra)
    offsets["raw"] = offsets["preview"] + len(preview_jpeg)

    def pack(entries: list[tuple[int, int, int, object]]) -> bytes:
        out = struct.pack("<H", len(entries))
        for tag, kind, count, value in sorted(entries, key=lambda entry: entry[0]):
            if isinstance(value, tuple):
                field = struct.pack("<I", offsets[value[0]])
            elif isinstance(value, str):
                field = struct.pack("<I", offsets[value])
            elif isinstance(value, bytes):
                field = value.ljust(4, b"\x00")
            elif kind == short:
                field = struct.pack("<HH", value, 0)
            else:
                field = struct.pack("<I", value)
            out += struct.pack("<HHI", tag, kind, count) + field
        return out + struct.pack("<I", 0)

    header = b"II*\x00" + struct.pack("<I", 8)
    return header + pack(ifd0) + pack(subifd) + bytes(extra) + preview_jpeg + raw_data
