"""A full disk (ENOSPC) while spooling or committing: RESOURCE_EXHAUSTED with a clear message,
the partial data removed, and the server goes on serving. Faults are injected into a real
in-process server: the spool file fills up, or fsync reports the disk full."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import pytest

import metalake.server.blobstore
import metalake.server.datalake
import metalake.server.ingest.receiving
from metalake.server.ingest import SMALL_FILE
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, stored_blobs
from tests.test_faults import retry_info
from tests.test_service import assert_nothing_stored, exif_jpeg, upload

Stub = pb_grpc.DatalakeServiceStub
MiB = 1024 * 1024


class FillsUp:
    """A spool file on a disk with `room` bytes left: past them, writes fail as Linux's do."""

    def __init__(self, handle: BinaryIO, room: int) -> None:
        self._handle = handle
        self._room = room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._handle.name)
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spool files created from now on have 100 KB of room, and so has each file a small upload
    is written to in one step (`LocalBlobStore.put`, through os.write or os.writev, or os.pwrite
    for a pack appended directly): a spool file, or the pack it is appended to, which cannot
    grow past 100 KB (what a failed append cut off is room again, as on a real disk)."""
    create = metalake.server.blobstore.create_spool_file

    async def create_on_a_full_disk(path: Path) -> Any:
        return FillsUp(await create(path), 100_000)

    for module in (
        metalake.server.blobstore,
        metalake.server.datalake,
        metalake.server.ingest.receiving,
    ):
        monkeypatch.setattr(module, "create_spool_file", create_on_a_full_disk)

    write = os.write

    def write_on_a_full_disk(fd: int, data: bytes | memoryview) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        spooled = path.endswith(".part") and Path(path).parent.name == "tmp"
        packed = path.endswith(".pack") and Path(path).parent.name == "packs"
        if not (spooled or packed):
            return write(fd, data)
        room = 100_000 - os.lseek(fd, 0, os.SEEK_CUR)  # appending: where it stands is its size
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, memoryview(data)[:room])  # a short write, as Linux's at the limit

    monkeypatch.setattr(os, "write", write_on_a_full_disk)
    # A writev writes its buffers as one write would.
    monkeypatch.setattr(
        os, "writev", lambda fd, buffers: write_on_a_full_disk(fd, b"".join(buffers))
    )
    pwrite = os.pwrite

    def direct_write_on_a_full_disk(fd: int, data: bytes | memoryview, position: int) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(".pack"):
            return pwrite(fd, data, position)
        room = 100_000 - position
        fits = min(len(data), room) // metalake.server.blobstore.DIRECT_ALIGN
        if fits <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        # A direct write stops short by whole blocks.
        return pwrite(
            fd, memoryview(data)[: fits * metalake.server.blobstore.DIRECT_ALIGN], position
        )

    monkeypatch.setattr(os, "pwrite", direct_write_on_a_full_disk)


@pytest.fixture
def fsync_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync (and fdatasync, which packs use) reports the disk full (as ext4 with delayed
    allocation, or NFS, may)."""

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fsync)


def assert_disk_full(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "storage is full" in (error.details() or "")
    assert retry_info(error) is None  # not a moment's load: the SDK does not hammer it


def leftovers(data_dir: Path) -> list[str]:
    """Spool files and stored blobs (packed or files), by name."""
    return [p.name for p in (data_dir / "tmp").rglob("*")] + stored_blobs(data_dir)


def test_a_full_disk_while_spooling_an_upload(
    stub: Stub, running_server: ServerHandle, full_disk: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, os.urandom(3 * MiB), "big")
    assert_disk_full(caught.value)
    assert_nothing_stored(stub, running_server.data_dir)
    assert leftovers(running_server.data_dir) == []
    monkeypatch.undo()  # space freed: the same server stores the next one
    assert upload(stub, os.urandom(3 * MiB), "big").size == 3 * MiB


def test_a_full_disk_while_committing_an_upload(
    stub: Stub, running_server: ServerHandle, fsync_full: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, os.urandom(200_000), "a")
    assert_disk_full(caught.value)
    assert_nothing_stored(stub, running_server.data_dir)
    assert leftovers(running_server.data_dir) == []
    monkeypatch.undo()
    assert upload(stub, b"fits", "b").size == 4


def test_a_full_disk_fails_one_file_of_a_stream(
    stub: Stub, running_server: ServerHandle, full_disk: None
) -> None:
    small = os.urandom(1_000)

    def messages() -> Iterator[pb.UploadDataStreamRequest]:
        for name, content in (("big", os.urandom(MiB)), ("small", small)):
            yield pb.UploadDataStreamRequest(header=pb.UploadDataHeader(filename=name))
            yield pb.UploadDataStreamRequest(chunk=content)
            yield pb.UploadDataStreamRequest(finish=True)

    big, stored = list(stub.UploadDataStream(messages()))
    assert big.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "storage is full" in big.error.message
    assert stored.data.sha256 == hashlib.sha256(small).hexdigest()
    assert [d.filename for d in stub.ListData(pb.ListDataRequest()).data] == ["small"]


def test_a_full_disk_while_extracting(
    stub: Stub, running_server: ServerHandle, full_disk: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def messages(padding: int) -> Iterator[pb.ExtractMetadataRequest]:
        yield pb.ExtractMetadataRequest(header=pb.ExtractMetadataHeader(filename="x.jpg"))
        yield pb.ExtractMetadataRequest(chunk=exif_jpeg() + os.urandom(padding))

    # A file larger than SMALL_FILE is spooled to disk to be read: the full disk fails it.
    with pytest.raises(grpc.RpcError) as caught:
        stub.ExtractMetadata(messages(SMALL_FILE + 200_000))
    assert_disk_full(caught.value)
    assert leftovers(running_server.data_dir) == []
    # A small one is read from memory: the full disk does not concern it.
    assert stub.ExtractMetadata(messages(200_000)).metadata_sources
    assert leftovers(running_server.data_dir) == []
    monkeypatch.undo()
    assert stub.ExtractMetadata(messages(SMALL_FILE + 200_000)).metadata_sources


def test_a_full_disk_while_storing_a_small_upload(
    stub: Stub, running_server: ServerHandle, full_disk: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small upload is written to disk in one step (LocalBlobStore.put): a short write, then
    ENOSPC, fails it cleanly and its partial file goes; identical content stored earlier stays
    readable, and stored again, needs no room."""
    stored = os.urandom(50_000)
    first = upload(stub, stored, "fits")
    for content in (os.urandom(300_000), os.urandom(SMALL_FILE)):
        with pytest.raises(grpc.RpcError) as caught:
            upload(stub, content, "too-big-for-what-is-left")
        assert_disk_full(caught.value)
    assert leftovers(running_server.data_dir) == [first.sha256]
    assert [d.filename for d in stub.ListData(pb.ListDataRequest()).data] == ["fits"]
    assert upload(stub, stored, "same-bytes").sha256 == first.sha256
    monkeypatch.undo()
    again = os.urandom(300_000)
    assert upload(stub, again, "after").sha256 == hashlib.sha256(again).hexdigest()


def test_a_full_disk_keeps_a_resumable_upload_at_its_committed_size(
    stub: Stub, running_server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = os.urandom(3 * MiB)
    header = pb.UploadDataHeader(filename="r.bin")
    stub.StartUpload(pb.StartUploadRequest(header=header, upload_id="r1"))

    def writes(start: int, end: int, finish: bool = False) -> Iterator[pb.WriteUploadRequest]:
        for offset in range(start, end, MiB):
            yield pb.WriteUploadRequest(
                upload_id="r1", write_offset=offset, data=content[offset : min(end, offset + MiB)]
            )
        if finish:
            yield pb.WriteUploadRequest(upload_id="r1", write_offset=end, finish_write=True)

    assert stub.WriteUpload(writes(0, MiB)).committed_size == MiB

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(grpc.RpcError) as caught:
        stub.WriteUpload(writes(MiB, 2 * MiB))
    assert_disk_full(caught.value)
    # What could not be made durable is gone; what was committed stays, to resume from.
    assert stub.QueryUpload(pb.QueryUploadRequest(upload_id="r1")).committed_size == MiB
    (staged,) = (running_server.data_dir / "uploads").iterdir()
    assert staged.stat().st_size == MiB
    monkeypatch.undo()
    data = stub.WriteUpload(writes(MiB, len(content), finish=True)).data
    assert data.sha256 == hashlib.sha256(content).hexdigest()
