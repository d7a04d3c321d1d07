"""Hostile files: the registry never raises, never hangs, never returns an invalid value.

Real EXIF-bearing files are built here (Pillow writes them), then mutated where parsers break:
directory entry counts, value types, counts and offsets, next-IFD pointers (loops), truncation,
NUL-laden and non-UTF-8 strings, zero denominators. A hang would show up as a timeout error.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from metalake.extractors import containers
from metalake.extractors.registry import ExtractorRegistry, builtin_plugins
from metalake.extractors.testing import sample_exif, tiff_bytes, wrap_tiff
from metalake.metadata import check_value

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns on corrupt EXIF

CONTAINERS = (
    "jpeg",
    "tiff",
    "png-late",
    "heif",
    "cr3",
    "webp",
    "psd",
    "raf",
    "miff",
    "flif",
    "x3f",
)
REGISTRY = ExtractorRegistry(builtin_plugins(), timeout=20.0)
BASE_TIFF = tiff_bytes(sample_exif())


def _directories(tiff: bytes) -> list[int]:
    """Offsets of IFD0 and of the sub-IFDs it points to, read from a well-formed block."""
    order = "<" if tiff[:2] == b"II" else ">"
    ifd0 = struct.unpack(order + "I", tiff[4:8])[0]
    found = [ifd0]
    count = struct.unpack(order + "H", tiff[ifd0 : ifd0 + 2])[0]
    for index in range(count):
        entry = ifd0 + 2 + 12 * index
        tag = struct.unpack(order + "H", tiff[entry : entry + 2])[0]
        if tag in (0x8769, 0x8825):
            found.append(struct.unpack(order + "I", tiff[entry + 8 : entry + 12])[0])
    return found


DIRECTORIES = _directories(BASE_TIFF)
ORDER = "<" if BASE_TIFF[:2] == b"II" else ">"
COUNTS = {
    offset: struct.unpack(ORDER + "H", BASE_TIFF[offset : offset + 2])[0] for offset in DIRECTORIES
}


@st.composite
def mutated_tiff(draw: st.DrawFn) -> bytes:
    data = bytearray(BASE_TIFF)
    for _ in range(draw(st.integers(1, 6))):
        directory = draw(st.sampled_from(DIRECTORIES))
        count = COUNTS[directory]  # as built: mutations may have changed the stored count
        entry = directory + 2 + 12 * draw(st.integers(0, max(0, count - 1)))
        kind = draw(
            st.sampled_from(
                ["entries", "type", "count", "offset", "loop", "bytes", "string", "zero-den"]
            )
        )
        if kind == "entries":  # a 65,535-entry (or other absurd) directory
            data[directory : directory + 2] = struct.pack(
                ORDER + "H", draw(st.sampled_from([0, 1, 0xFFFF, count + 1]))
            )
        elif kind == "type":
            data[entry + 2 : entry + 4] = struct.pack(ORDER + "H", draw(st.integers(0, 20)))
        elif kind == "count":
            data[entry + 4 : entry + 8] = struct.pack(
                ORDER + "I", draw(st.sampled_from([0, 1, 2, 0x7FFFFFFF, 0xFFFFFFFF]))
            )
        elif kind == "offset":  # out of the file, or anywhere in it
            data[entry + 8 : entry + 12] = struct.pack(
                ORDER + "I", draw(st.one_of(st.integers(0, len(data) + 16), st.just(0xFFFFFFF0)))
            )
        elif kind == "loop":  # next-IFD pointer, or a sub-IFD pointer, back to a directory
            end = directory + 2 + 12 * count
            target = draw(st.sampled_from(DIRECTORIES))
            position = end if draw(st.booleans()) else entry + 8
            data[position : position + 4] = struct.pack(ORDER + "I", target)
        elif kind == "bytes":
            position = draw(st.integers(0, len(data) - 1))
            data[position : position + 8] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "string":  # NULs, non-UTF-8 and control bytes in whatever the entry points to
            offset = struct.unpack(ORDER + "I", data[entry + 8 : entry + 12])[0]
            if offset < len(data) - 4:
                junk = draw(
                    st.binary(min_size=1, max_size=24).map(lambda b: b.replace(b"A", b"\x00"))
                )
                data[offset : offset + len(junk)] = junk
        else:  # zero denominators in whatever the entry points to
            offset = struct.unpack(ORDER + "I", data[entry + 8 : entry + 12])[0]
            if offset < len(data) - 8:
                data[offset + 4 : offset + 8] = b"\x00\x00\x00\x00"
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _wrap(container: str, tiff: bytes) -> bytes:
    if container == "jpeg":
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, "JPEG")
        jpeg = buffer.getvalue()
        payload = b"Exif\x00\x00" + tiff[:65000]
        return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
    if container == "webp":
        chunk = b"EXIF" + struct.pack("<I", len(tiff)) + tiff + b"\x00" * (len(tiff) & 1)
        vp8l = b"VP8L" + struct.pack("<I", 5) + b"\x2f\x00\x00\x00\x00\x00"
        body = b"WEBP" + vp8l + chunk
        return b"RIFF" + struct.pack("<I", len(body)) + body
    if container == "cr3":  # the mutated block as IFD0, Exif and GPS directories alike

        def box(kind: bytes, payload: bytes) -> bytes:
            return struct.pack(">I4s", 8 + len(payload), kind) + payload

        cmts = b"".join(box(kind, tiff) for kind in (b"CMT1", b"CMT2", b"CMT4"))
        uuid = box(b"uuid", bytes.fromhex("85c0b687820f11e08111f4ce462b6a48") + cmts)
        return box(b"ftyp", b"crx \x00\x00\x00\x01crx isom") + box(b"moov", uuid)
    return wrap_tiff(container, tiff)


def _check(path: Path) -> None:
    result = REGISTRY.extract(path, filename=path.name)
    assert result.errors == []
    for field, value in result.values.items():
        assert check_value(field, value) is None, (field, value)


@settings(
    max_examples=int(os.environ.get("METALAKE_FUZZ_EXAMPLES", 600)),
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(container=st.sampled_from(CONTAINERS), tiff=mutated_tiff())
def test_mutated_exif_never_breaks_extraction(tmp_path: Path, container: str, tiff: bytes) -> None:
    path = tmp_path / f"fuzz.{container}"
    path.write_bytes(_wrap(container, tiff))
    _check(path)


@settings(
    max_examples=int(os.environ.get("METALAKE_FUZZ_EXAMPLES", 300)),
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(
    container=st.sampled_from(CONTAINERS),
    cut=st.floats(0, 1),
    splice=st.binary(max_size=64),
    where=st.floats(0, 1),
)
def test_mutated_containers_never_break_extraction(
    tmp_path: Path, container: str, cut: float, splice: bytes, where: float
) -> None:
    data = bytearray(_wrap(container, BASE_TIFF))
    position = int(where * len(data))
    data[position : position + len(splice)] = splice
    path = tmp_path / f"fuzz.{container}"
    path.write_bytes(bytes(data[: max(1, int(cut * len(data)))] if cut < 0.5 else data))
    _check(path)


def test_a_65535_entry_directory_is_read_within_bounds(tmp_path: Path) -> None:
    entries = b"".join(struct.pack("<HHII", 0x010F, 2, 4, 0x656E6F4E) for _ in range(0xFFFF))
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0xFFFF) + entries + b"\x00" * 4
    path = tmp_path / "wide.tif"
    path.write_bytes(tiff)
    result = REGISTRY.extract(path)
    assert result.errors == []
    assert result.values == {"manufacturer": "None"}  # the first of 65,535 Make entries


def test_many_text_chunks_inflate_no_more_than_one_profile_could(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each "Raw profile" chunk may inflate to 8 MiB before its text proves not to be EXIF; a
    PNG of many such chunks (120 fit in a MiB) costs that once, not once a chunk."""
    inflated: list[int] = []

    class Counted:
        def __init__(self, wbits: int) -> None:
            self._inflater = zlib.decompressobj(wbits)

        def decompress(self, data: bytes, max_length: int) -> bytes:
            out = self._inflater.decompress(data, max_length)
            inflated.append(len(out))
            return out

    class CountingZlib:
        error = zlib.error
        decompressobj = Counted

    monkeypatch.setattr(containers, "zlib", CountingZlib)
    text = zlib.compress(b"\nexif\n 4194304\n" + b"z" * containers.MAX_INLINE_EXIF * 2, 9)
    chunk_data = b"Raw profile type exif\x00\x00" + text
    chunk = struct.pack(">I4s", len(chunk_data), b"zTXt") + chunk_data + b"\x00" * 4
    plain = wrap_tiff("png-late", b"")
    path = tmp_path / "many-texts.png"
    path.write_bytes(plain[:33] + chunk * 20 + plain[33:])
    result = REGISTRY.extract(path)
    assert result.errors == []
    assert result.values == {}
    assert len(inflated) >= 1
    assert sum(inflated) <= 2 * containers.MAX_INLINE_EXIF  # not 20 times that


def test_no_room_left_inflates_nothing() -> None:
    """zlib takes a max_length of 0 for no limit: an allowance spent must not become one."""
    bomb = zlib.compress(b"0" * 50_000_000, 9)
    assert containers._inflate(bomb, limit=0) is None
    assert containers._inflate(bomb, limit=10) == b"0" * 10


def test_decompression_bombs_stay_bounded(tmp_path: Path) -> None:
    # A PNG claiming 100000 x 100000 pixels, with its EXIF after the (tiny) image data.
    png = bytearray(wrap_tiff("png-late", BASE_TIFF))
    png[16:24] = struct.pack(">II", 100_000, 100_000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    bomb_png = tmp_path / "bomb.png"
    bomb_png.write_bytes(bytes(png))
    # A BMP (no walker: Pillow opens it) claiming 10^10 pixels.
    bmp = b"BM" + struct.pack("<IHHI", 70, 0, 0, 54)
    bmp += struct.pack("<IiiHHIIiiII", 40, 100_000, 100_000, 1, 24, 0, 0, 0, 0, 0, 0)
    bomb_bmp = tmp_path / "bomb.bmp"
    bomb_bmp.write_bytes(bmp)
    # A zTXt "Raw profile" inflating to 200 MB.
    zipped = zlib.compress(b"\nexif\n 9999999\n" + b"0" * 200_000_000, 9)
    chunk_data = b"Raw profile type exif\x00\x00" + zipped
    chunk = struct.pack(">I4s", len(chunk_data), b"zTXt") + chunk_data + b"\x00" * 4
    plain = wrap_tiff("png-late", b"")
    bomb_text = tmp_path / "bomb-text.png"
    bomb_text.write_bytes(plain[:33] + chunk + plain[33:])
    assert Image.MAX_IMAGE_PIXELS is not None  # the guard stays on
    assert REGISTRY.extract(bomb_png).values["manufacturer"] == "Metalake Optics"
    for path in (bomb_bmp, bomb_text):
        result = REGISTRY.extract(path)
        assert result.errors == []
        assert result.values == {}


@settings(
    max_examples=int(os.environ.get("METALAKE_FUZZ_EXAMPLES", 300)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    magic=st.sampled_from([b"id=ImageMagick\n", b"gimp xcf v011", b"BPG\xfb", b"\x00MRM", b"??"]),
    signature=st.sampled_from([b"II*\x00", b"MM\x00*", b"Exif\x00\x00II*\x00"]),
    before=st.binary(max_size=512),
    after=st.binary(min_size=0, max_size=4096),
    ifd0_at_8=st.booleans(),
)
def test_random_bytes_behind_a_tiff_signature_give_nothing(
    tmp_path: Path, magic: bytes, signature: bytes, before: bytes, after: bytes, ifd0_at_8: bool
) -> None:
    """The scan for embedded EXIF finds the signature, and must refuse what follows it: not a
    TIFF directory, so no value at all may come out (invented values stay at zero)."""
    order = "<" if b"II" in signature else ">"
    pointer = struct.pack(order + "I", 8) if ifd0_at_8 else b""
    path = tmp_path / "fake.bin"
    path.write_bytes(magic + before + signature + pointer + after)
    result = REGISTRY.extract(path, filename=path.name)
    assert result.errors == []
    assert result.values == {}


def test_a_scanned_block_is_read_only_when_its_directory_is_real(tmp_path: Path) -> None:
    """The same header carrying a real EXIF block gives its values: the refusal above is the
    validation at work, not a scan that finds nothing."""
    path = tmp_path / "real.miff"
    path.write_bytes(wrap_tiff("miff", BASE_TIFF))
    assert REGISTRY.extract(path).values["manufacturer"] == "Metalake Optics"
    fake = bytearray(wrap_tiff("miff", BASE_TIFF))
    start = fake.index(b"Exif\x00\x00") + 6
    ifd0 = start + DIRECTORIES[0]
    fake[ifd0 + 2 :] = bytes(len(fake) - ifd0 - 2)  # entries zeroed: type 0 is no TIFF type
    path.write_bytes(bytes(fake))
    assert REGISTRY.extract(path).values == {}
