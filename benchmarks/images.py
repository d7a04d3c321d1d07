"""The benchmarks' small files: distinct JPEGs with camera EXIF, made on the fly.

Four photos of noise (which JPEG cannot shrink) with camera EXIF, GPS included
(`sample_exif`); each file is one of them with a comment segment naming it right after the
start-of-image marker: still a valid JPEG, with a SHA-256 of its own, so that the blob store
deduplicates none of them.
"""

from __future__ import annotations

import functools
import io
import random
import struct

from PIL import Image

from metalake.extractors.testing import sample_exif


def camera_jpegs(count: int, *, side: int, salt: str = "") -> list[bytes]:
    """`count` distinct JPEGs of `side` x `side` pixels (at quality 85, 364 px make about
    100 KiB and 460 px about 160 KiB); `salt`, in every comment, keeps one run's files apart
    from another's on the same server."""
    bases = _bases(side)
    files = []
    for index in range(count):
        base = bases[index % len(bases)]
        comment = " ".join(filter(None, ["metalake bench", salt, f"file {index}"])).encode()
        segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        files.append(base[:2] + segment + base[2:])
    return files


@functools.cache
def _bases(side: int) -> tuple[bytes, ...]:
    bases = []
    for seed in range(4):
        pixels = random.Random(seed).randbytes(side * side * 3)
        buffer = io.BytesIO()
        Image.frombytes("RGB", (side, side), pixels).save(
            buffer, "JPEG", quality=85, exif=sample_exif()
        )
        bases.append(buffer.getvalue())
    return tuple(bases)
