"""Previews of images: JPEGs of 256 or 1024 px on the long side, the right way up.

`render` reads a local file and returns the preview's bytes, or None when the file is not an
image this server can read (a preview is a convenience: failing to make one is never an error).
It knows nothing of gRPC, HTTP or the catalog; `DatalakeCore.thumbnail` stores what it makes.

- JPEG, PNG, WebP, TIFF, GIF, BMP, JPEG 2000, PSD, TGA, ICO, PPM through Pillow
  (DECODED_FORMATS); HEIC/HEIF/AVIF through pillow-heif.
- Camera RAW (CR2, CR3, NEF, ARW, DNG, RAF, ORF, RW2, PEF, ...): the preview JPEG the camera
  embedded, through LibRaw (rawpy), never a demosaic of the sensor data.
- JPEGs are decoded at 1/2, 1/4 or 1/8 scale when that still covers twice the preview (Pillow's
  draft mode, libjpeg's DCT scaling): a 24-megapixel photo costs a few milliseconds, not 100.
- EXIF orientation is applied, so portrait photos stand up; for RAW previews without their own
  orientation, the RAW's is.
- Transparency is flattened on white; 16-bit and other modes become 8-bit RGB or grey.
- Pillow's decompression-bomb guard stays on: a bomb gets no preview.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pillow_heif
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

SIZES = (256, 1024)
DEFAULT_SIZE = 256
CONTENT_TYPE = "image/jpeg"
JPEG_QUALITY = 82
# Decode at least this many times the preview's size before the final resampling, so that the
# draft's coarse scaling never shows (Pillow's own `reducing_gap` idea). libjpeg's DCT scaling
# is itself a good reduction: 1.5 lets a 12-megapixel photo decode at 1/2 for the 1024 px
# preview and 1/8 for the 256 px one (2 would decode it whole, then at 1/4: 2-4x the work).
_DRAFT_MARGIN = 1.5

# Extensions of camera RAW formats: read with LibRaw first (Pillow would open the TIFF-based
# ones as a TIFF, and find only a tiny or undecodable first image).
RAW_EXTENSIONS = frozenset(
    {
        *("3fr", "ari", "arw", "bay", "cr2", "cr3", "crw", "dcr", "dng", "erf", "fff", "iiq"),
        *("k25", "kdc", "mef", "mos", "mrw", "nef", "nrw", "orf", "pef", "raf", "raw", "rw2"),
        *("rwl", "sr2", "srf", "srw", "x3f"),
    }
)

pillow_heif.register_heif_opener()
if hasattr(pillow_heif, "register_avif_opener"):  # older pillow-heif; newer Pillow reads AVIF
    pillow_heif.register_avif_opener()

# The formats whose Pillow readers decode a client's file here (previews, and the similarity
# hasher's): photos and the common raster formats, with decoders in C. Pillow reads 40 more;
# left out are its decoders written in Python, which a tiny crafted file keeps busy for seconds
# (a 284-byte BLP of Pillow's tests: 1.2 s for a preview, 1.5 s to hash, from a client that
# names it image/*), and formats no photo comes in. EPS above all: Pillow renders it by running
# Ghostscript, on a server where that is installed.
DECODED_FORMATS = (
    *("JPEG", "MPO", "PNG", "GIF", "WEBP", "TIFF", "BMP", "DIB", "HEIF", "AVIF", "JPEG2000"),
    *("PSD", "TGA", "ICO", "PPM"),
)


@functools.cache
def decoded_formats() -> tuple[str, ...]:
    """DECODED_FORMATS that this Pillow reads (Image.open fails on a format it does not know)."""
    Image.init()
    return tuple(name for name in DECODED_FORMATS if name in Image.OPEN)


@dataclass(frozen=True)
class Preview:
    content: bytes
    width: int
    height: int


def can_preview(content_type: str, filename: str) -> bool:
    """Whether a preview is worth trying: images, and files named like camera RAW."""
    return content_type.startswith("image/") or is_raw_name(filename)


def is_raw_name(filename: str) -> bool:
    return filename.rsplit(".", 1)[-1].lower() in RAW_EXTENSIONS if "." in filename else False


def render(path: Path, size: int, *, filename: str = "") -> Preview | None:
    """Blocking: the preview of the image in `path`, `size` px on its long side at most (never
    enlarged), or None when no reader can make one."""
    readers = (_raw_image, _pillow_image) if is_raw_name(filename) else (_pillow_image, _raw_image)
    for reader in readers:
        try:
            with warnings.catch_warnings():
                # A large image is fine; a bomb still raises DecompressionBombError.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = reader(path, size)
                if image is None:
                    continue
                return _encode(image, size)
        except Exception as error:  # any reader failing on any input means "no preview"
            log.debug("%s cannot preview %s: %r", reader.__name__, filename or path, error)
    return None


def _pillow_image(path: Path, size: int) -> Image.Image | None:
    image = Image.open(path, formats=decoded_formats())
    _draft(image, size)
    image.load()
    return _upright(image)


def _draft(image: Image.Image, size: int) -> None:
    """Before loading: a JPEG is then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that
    keeps its long side at least _DRAFT_MARGIN times the preview's; other formats ignore it."""
    long_side = max(image.size)
    if long_side <= size * _DRAFT_MARGIN:
        return
    factor = size * _DRAFT_MARGIN / long_side
    image.draft("RGB", (math.ceil(image.width * factor), math.ceil(image.height * factor)))


def _raw_image(path: Path, size: int) -> Image.Image | None:
    import rawpy  # imported on first use: LibRaw is only needed for RAW files

    with rawpy.imread(str(path)) as raw:
        thumb = raw.extract_thumb()
        flip = int(raw.sizes.flip)
    image: Image.Image
    if thumb.format == rawpy.ThumbFormat.JPEG and isinstance(thumb.data, bytes):
        image = Image.open(io.BytesIO(thumb.data))
        _draft(image, size)
        image.load()
        if image.getexif().get(_ORIENTATION_TAG, 1) != 1:
            return _upright(image)
    else:  # a bitmap (some older cameras): an RGB array
        image = Image.fromarray(cast(Any, thumb.data))
    # LibRaw's flip: 3 upside down, 5 turned left, 6 turned right.
    return image.transpose(_LIBRAW_FLIPS[flip]) if flip in _LIBRAW_FLIPS else image


_LIBRAW_FLIPS = {
    3: Image.Transpose.ROTATE_180,
    5: Image.Transpose.ROTATE_90,
    6: Image.Transpose.ROTATE_270,
}


_ORIENTATION_TAG = 0x0112


def _upright(image: Image.Image) -> Image.Image:
    upright: Any = ImageOps.exif_transpose(image)
    return upright if upright is not None else image


def _encode(image: Image.Image, size: int) -> Preview:
    image = _to_rgb(image)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return Preview(buffer.getvalue(), image.width, image.height)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGB", "L"):
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the top 8 bits (convert("L") would clip everything above 255).
        return image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
