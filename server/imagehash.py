"""The near-duplicate hash of an image (dHash, 64 bits, and that of its mirror image).

Kept apart from `similarity` (the index, the queries, the background job) so that a decoder
process (server.decoding), which runs these functions on clients' images, imports Pillow and
little else: it starts in a fraction of the time the catalog's modules would take.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from metalake.server.thumbnails import decoded_formats

# The decoded size asked of JPEG's DCT scaling: enough for a 9x8 thumbnail, and cheap.
_DRAFT_SIZE = (64, 64)
# Pixels beyond which an image is refused rather than decoded (a decompression bomb).
_MAX_PIXELS = 200_000_000


class NotAnImageError(Exception):
    """The bytes are not an image Pillow can decode."""


@dataclass(frozen=True)
class ImageHash:
    value: int  # unsigned 64 bits
    mirror: int  # the hash of the image flipped left to right


def dhash_pixels(image: Image.Image) -> int:
    """The 64-bit difference hash of an image: bit (row, col) is 1 when pixel (row, col + 1) of
    its 9x8 grey reduction is brighter than pixel (row, col), rows top to bottom."""
    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    pixels = small.tobytes()
    value = 0
    for row in range(8):
        line = pixels[row * 9 : row * 9 + 9]
        for col in range(8):
            value = (value << 1) | (line[col + 1] > line[col])
    return value


def hash_image(source: str | Path | BinaryIO) -> ImageHash:
    """The hash of an image file and of its mirror; NotAnImageError if it is none."""
    try:
        with Image.open(source, formats=decoded_formats()) as opened:
            if opened.width * opened.height > _MAX_PIXELS:
                raise NotAnImageError(f"{opened.width}x{opened.height} pixels is too large")
            opened.draft("RGB", _DRAFT_SIZE)
            shown = ImageOps.exif_transpose(opened)
            grey = shown.convert("L")
            return ImageHash(
                dhash_pixels(grey), dhash_pixels(grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
            )
    except NotAnImageError:
        raise
    except Exception as error:  # Pillow raises many kinds on bad input: none may escape
        raise NotAnImageError(str(error) or type(error).__name__) from None


ImageSource = Path | bytes


def hash_or_error(image: ImageSource) -> ImageHash:
    """hash_image of a file or of bytes in memory (NotAnImageError if it is none)."""
    return hash_image(io.BytesIO(image) if isinstance(image, bytes) else image)


def hash_or_none(image: ImageSource) -> ImageHash | None:
    """The hash of an image file, or of an image's bytes in memory; None when it is none."""
    if isinstance(image, Path) and not image.is_file():
        raise FileNotFoundError(image)
    try:
        return hash_or_error(image)
    except NotAnImageError:
        return None
