"""Small files take a lean path (gathered in memory, filled from memory, stored in one step);
larger ones stream through the spool. Both must store and fill exactly the same."""

from __future__ import annotations

import hashlib
import os

import pytest

from metalake import metadata as md
from metalake.extractors.registry import ExtractorRegistry, builtin_plugins
from metalake.server.ingest import SMALL_FILE
from metalake.v1 import datalake_pb2 as pb
from tests.conftest import ServerHandle, stored_blobs
from tests.test_extract_corpus import CORPUS
from tests.test_service import Stub, exif_jpeg, upload


def padded_jpeg(size: int) -> bytes:
    """A JPEG with EXIF of exactly `size` bytes: padding after its end-of-image marker."""
    jpeg = exif_jpeg()
    return jpeg + b"\x00" * (size - len(jpeg))


@pytest.mark.parametrize("size", [SMALL_FILE - 1, SMALL_FILE, SMALL_FILE + 1, 3 * SMALL_FILE])
def test_files_on_both_sides_of_the_threshold_store_and_fill_alike(
    stub: Stub, running_server: ServerHandle, size: int
) -> None:
    content = padded_jpeg(size)
    # Chunks that do not line up with the threshold, as any client may send.
    data = upload(stub, content, "canon.jpg", fill_metadata=True, chunk_size=100_003)
    assert data.size == size
    assert data.sha256 == hashlib.sha256(content).hexdigest()
    assert data.content_type == "image/jpeg"
    values, _ = md.from_proto(data.metadata)
    assert values["software"] == "GIMP 2.4.5"
    assert values["latitude"] == pytest.approx(43.6)
    assert data.metadata_sources["software"] == "pillow"
    download = stub.DownloadData(pb.DownloadDataRequest(id=data.id))
    assert b"".join(m.chunk for m in download) == content
    assert list((running_server.data_dir / "tmp").iterdir()) == []


def test_an_identical_small_file_is_stored_once(stub: Stub, running_server: ServerHandle) -> None:
    content = os.urandom(5000)
    first, second = upload(stub, content, "a.bin"), upload(stub, content, "b.bin")
    assert first.id != second.id
    assert first.sha256 == second.sha256
    assert stored_blobs(running_server.data_dir) == [first.sha256]
    # Deleting one item keeps the bytes the other still uses.
    stub.DeleteData(pb.DeleteDataRequest(id=first.id))
    download = stub.DownloadData(pb.DownloadDataRequest(id=second.id))
    assert b"".join(m.chunk for m in download) == content


@pytest.mark.parametrize("size", [SMALL_FILE, SMALL_FILE + 1])
def test_extract_metadata_reads_small_and_large_files_alike(stub: Stub, size: int) -> None:
    content = padded_jpeg(size)
    messages = [pb.ExtractMetadataRequest(header=pb.ExtractMetadataHeader(filename="c.jpg"))]
    messages += [
        pb.ExtractMetadataRequest(chunk=content[i : i + 65536])
        for i in range(0, len(content), 65536)
    ]
    response = stub.ExtractMetadata(iter(messages))
    values, _ = md.from_proto(response.metadata)
    assert values["manufacturer"] == "Canon"
    assert values["longitude"] == pytest.approx(1.44)
    assert response.metadata_sources["manufacturer"] == "pillow"


async def test_extraction_from_memory_finds_what_extraction_from_disk_does() -> None:
    registry = ExtractorRegistry(builtin_plugins())
    files = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix != ".json")
    if not files:
        pytest.skip(f"no corpus at {CORPUS}")
    for path in files:
        on_disk = registry.extract(path, filename=path.name)
        in_memory = registry.extract_data(path.read_bytes(), filename=path.name)
        assert in_memory.values == on_disk.values, path.name
        assert in_memory.sources == on_disk.sources, path.name
        # What the server awaits, from memory and from its spool file.
        for content in (path.read_bytes(), path):
            awaited = await registry.extract_async(content, filename=path.name)
            assert awaited.values == on_disk.values, path.name
            assert awaited.sources == on_disk.sources, path.name
