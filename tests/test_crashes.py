"""SIGKILL during each RPC that writes, then a start on the same data: the server starts and
serves, everything acknowledged is there and intact, nothing half-stored is listed, and what the
crash left half-done (spool files, scratch directories, staging, S3 multipart uploads) is gone."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from metalake import metadata as md
from metalake.server.ingest import SMALL_FILE
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import S3_ENV
from tests.serverprocess import ServerProcess
from tests.test_outages import listed, wait_until
from tests.test_service import exif_jpeg, requests, upload

Stub = pb_grpc.DatalakeServiceStub
MiB = 1024 * 1024


@dataclass
class Crash:
    """What a client saw before the kill, and what must hold after the restart."""

    acknowledged: dict[str, bytes] = field(default_factory=dict)  # filename -> content
    sent_whole: dict[str, bytes] = field(default_factory=dict)  # sent in full, maybe stored
    half_sent: set[str] = field(default_factory=set)  # never finished: must not be listed
    after: Callable[[Stub], None] | None = None  # checks of this RPC's own, after the restart
    errors: list[BaseException] = field(default_factory=list)  # from client threads


@dataclass
class Running:
    """The server about to be killed, and a client of it."""

    stub: Stub
    target: str
    data_dir: Path


# Files past SMALL_FILE are spooled to disk as they arrive (smaller ones are gathered in memory
# and leave nothing behind a kill): these tests kill a server with a spool file on disk.
SPOOLED = SMALL_FILE + 100_000


def spooling(data_dir: Path) -> Callable[[], bool]:
    return lambda: any((data_dir / "tmp").iterdir())


def releasing(release: threading.Event, call: Any) -> Callable[[], None]:
    """What ends a held call once its server is dead: let its requests end, cancel it."""

    def finish() -> None:
        release.set()
        call.cancel()

    return finish


def held_upload(
    content: bytes, filename: str, release: threading.Event
) -> Iterator[pb.UploadDataRequest]:
    messages = list(requests(content, filename))
    yield from messages[:-1]
    release.wait(60)


def during_upload_data(server: Running, crash: Crash) -> Callable[[], None]:
    stub, data_dir = server.stub, server.data_dir
    release = threading.Event()
    crash.half_sent.add("half")
    call = stub.UploadData.future(held_upload(os.urandom(SPOOLED + 500_000), "half", release))
    wait_until(spooling(data_dir), "the upload is spooling")
    return releasing(release, call)


def during_write_upload(server: Running, crash: Crash) -> Callable[[], None]:
    stub = server.stub
    content = os.urandom(9 * MiB)  # past the 8 MiB after which a committed size is recorded
    stub.StartUpload(
        pb.StartUploadRequest(header=pb.UploadDataHeader(filename="big"), upload_id="u1")
    )
    release = threading.Event()

    def writes() -> Iterator[pb.WriteUploadRequest]:
        for offset in range(0, len(content) - MiB, MiB):
            yield pb.WriteUploadRequest(
                upload_id="u1" if offset == 0 else "",
                write_offset=offset,
                data=content[offset : offset + MiB],
            )
        release.wait(60)

    call = stub.WriteUpload.future(writes())
    query = pb.QueryUploadRequest(upload_id="u1")
    wait_until(
        lambda: stub.QueryUpload(query).committed_size >= 8 * MiB, "a committed size is recorded"
    )

    def after(stub: Stub) -> None:
        # The upload survives the crash: resume from what the server says it kept, finish.
        kept = stub.QueryUpload(pb.QueryUploadRequest(upload_id="u1")).committed_size
        assert 8 * MiB <= kept <= len(content) - MiB
        finish = [
            pb.WriteUploadRequest(upload_id="u1", write_offset=kept, data=content[kept:]),
            pb.WriteUploadRequest(write_offset=len(content), finish_write=True),
        ]
        data = stub.WriteUpload(iter(finish)).data
        assert data.sha256 == hashlib.sha256(content).hexdigest()
        crash.acknowledged["big"] = content

    crash.half_sent.add("big")  # not listed before it is finished
    crash.after = after
    return releasing(release, call)


def during_upload_data_stream(server: Running, crash: Crash) -> Callable[[], None]:
    stub, data_dir = server.stub, server.data_dir
    first, second = os.urandom(20_000), os.urandom(SPOOLED + 400_000)
    release = threading.Event()

    def messages() -> Iterator[pb.UploadDataStreamRequest]:
        yield pb.UploadDataStreamRequest(header=pb.UploadDataHeader(filename="first"))
        yield pb.UploadDataStreamRequest(chunk=first)
        yield pb.UploadDataStreamRequest(finish=True)
        yield pb.UploadDataStreamRequest(header=pb.UploadDataHeader(filename="second"))
        yield pb.UploadDataStreamRequest(chunk=second[: SPOOLED + 200_000])
        release.wait(60)

    answers = stub.UploadDataStream(messages())
    assert next(iter(answers)).data.filename == "first"
    crash.acknowledged["first"] = first
    crash.half_sent.add("second")
    wait_until(spooling(data_dir), "the second file is spooling")
    return releasing(release, answers)


def during_extract_metadata(server: Running, crash: Crash) -> Callable[[], None]:
    stub, data_dir = server.stub, server.data_dir
    content = exif_jpeg() + os.urandom(SPOOLED + 300_000)
    release = threading.Event()

    def messages() -> Iterator[pb.ExtractMetadataRequest]:
        yield pb.ExtractMetadataRequest(header=pb.ExtractMetadataHeader(filename="x.jpg"))
        yield pb.ExtractMetadataRequest(chunk=content[: SPOOLED + 200_000])
        release.wait(60)

    call = stub.ExtractMetadata.future(messages())
    wait_until(spooling(data_dir), "the extraction is spooling")
    return releasing(release, call)


def during_update_metadata(server: Running, crash: Crash) -> Callable[[], None]:
    stub = server.stub
    item = next(d for d in listed(stub).values() if d.filename == "base-0")
    acknowledged: list[str] = []
    sent: list[str] = []

    def updates() -> None:
        with grpc.insecure_channel(server.target) as channel:
            own = Stub(channel)
            for number in range(100_000):
                value = f"v{number}"
                sent.append(value)
                request = pb.UpdateMetadataRequest(
                    id=item.id,
                    metadata=md.to_proto({"reference": value}),
                    update_mask=FieldMask(paths=["reference"]),
                )
                try:
                    own.UpdateMetadata(request, timeout=10)
                except grpc.RpcError:
                    return  # the server died
                acknowledged.append(value)

    def after(stub: Stub) -> None:
        reference = md.from_proto(stub.GetData(pb.GetDataRequest(id=item.id)).data.metadata)[0]
        # The last acknowledged value, or the one in flight when the server died.
        assert reference["reference"] in (acknowledged[-1], sent[-1])

    crash.after = after
    return _in_thread(updates, crash, lambda: len(acknowledged) >= 20)


def during_delete_data(server: Running, crash: Crash) -> Callable[[], None]:
    stub = server.stub
    doomed = {f"doomed-{i}": os.urandom(3_000 + i) for i in range(60)}
    ids = {upload(stub, content, name).id: name for name, content in doomed.items()}
    crash.acknowledged.update(doomed)
    deleted: list[str] = []
    sent: list[str] = []

    def deletes() -> None:
        with grpc.insecure_channel(server.target) as channel:
            own = Stub(channel)
            for data_id, name in ids.items():
                sent.append(name)
                try:
                    own.DeleteData(pb.DeleteDataRequest(id=data_id), timeout=10)
                except grpc.RpcError:
                    return
                deleted.append(name)

    def after(stub: Stub) -> None:
        names = {d.filename for d in listed(stub).values()}
        assert not names & set(deleted)  # an acknowledged deletion stays done
        in_flight = set(sent) - set(deleted)
        assert set(doomed) - set(sent) <= names  # never asked: still there
        for name in in_flight | set(deleted):
            crash.acknowledged.pop(name, None)  # gone, or (the one in flight) maybe not
            if name in names:
                crash.sent_whole[name] = doomed[name]

    crash.after = after
    return _in_thread(deletes, crash, lambda: len(deleted) >= 10)


def _in_thread(
    work: Callable[[], None], crash: Crash, started: Callable[[], bool]
) -> Callable[[], None]:
    def run() -> None:
        try:
            work()
        except BaseException as error:  # reported by the test, not lost in the thread
            crash.errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(started, "the calls are under way")
    return lambda: thread.join(60)


RPCS: dict[str, Callable[[Running, Crash], Callable[[], None]]] = {
    "UploadData": during_upload_data,
    "WriteUpload": during_write_upload,
    "UploadDataStream": during_upload_data_stream,
    "ExtractMetadata": during_extract_metadata,
    "UpdateMetadata": during_update_metadata,
    "DeleteData": during_delete_data,
}


def check_restarted(stub: Stub, data_dir: Path, crash: Crash) -> None:
    if crash.after is not None:
        crash.after(stub)
    assert upload(stub, b"after the restart", "after").size == 17  # it serves
    crash.acknowledged["after"] = b"after the restart"
    items = listed(stub)
    by_name: dict[str, list[pb.Data]] = {}
    for item in items.values():
        by_name.setdefault(item.filename, []).append(item)
    for name in crash.acknowledged:
        assert len(by_name.get(name, [])) == 1, f"{name} acknowledged, listed {by_name.get(name)}"
    assert not crash.half_sent & (set(by_name) - set(crash.acknowledged))
    for item in items.values():
        sent = crash.acknowledged.get(item.filename, crash.sent_whole.get(item.filename))
        assert sent is not None, f"{item.filename} was never sent whole"
        body = b"".join(m.chunk for m in stub.DownloadData(pb.DownloadDataRequest(id=item.id)))
        assert body == sent
        assert item.sha256 == hashlib.sha256(sent).hexdigest()
    assert list((data_dir / "tmp").iterdir()) == []


@pytest.mark.parametrize("rpc", list(RPCS))
def test_a_kill_during_each_writing_rpc_loses_nothing(rpc: str, tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    crash = Crash()
    with ServerProcess(data_dir, log) as server, grpc.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        for i in range(3):
            content = os.urandom(10_000 + i)
            upload(stub, content, f"base-{i}")
            crash.acknowledged[f"base-{i}"] = content
        finish = RPCS[rpc](Running(stub, server.target, data_dir), crash)
        server.signal(signal.SIGKILL)
        server.wait()
        finish()
    assert crash.errors == []
    # An extraction scratch directory as older versions left it must not stop the start either.
    (data_dir / "tmp" / "tmpa1b2c3d4").mkdir()
    (data_dir / "tmp" / "tmpa1b2c3d4" / "spool").write_bytes(b"half")

    with ServerProcess(data_dir, log) as server, grpc.insecure_channel(server.target) as channel:
        check_restarted(Stub(channel), data_dir, crash)


def test_a_kill_during_an_s3_upload_aborts_its_multipart_upload_at_the_next_start(
    tmp_path: Path, s3_url: str, s3_endpoint: str
) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint, "METALAKE_BLOB_URL": s3_url}
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    s3: Any = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_REGION"],
    )
    kept = os.urandom(50_000)
    with (
        ServerProcess(data_dir, log, **env) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = Stub(channel)
        upload(stub, kept, "kept")
        release = threading.Event()
        call = stub.UploadData.future(held_upload(os.urandom(10 * MiB), "half", release))
        wait_until(lambda: bool(s3.list_multipart_uploads(Bucket=bucket).get("Uploads")), "a part")
        server.signal(signal.SIGKILL)
        server.wait()
        releasing(release, call)()
    with (
        ServerProcess(data_dir, log, **env) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        stub = Stub(channel)
        (item,) = listed(stub).values()
        assert item.filename == "kept"
        body = b"".join(m.chunk for m in stub.DownloadData(pb.DownloadDataRequest(id=item.id)))
        assert body == kept
        assert upload(stub, b"more", "more").size == 4


def test_a_second_process_on_the_same_data_directory_leaves_live_uploads_alone(
    tmp_path: Path,
) -> None:
    """Only a dead process's leftovers are discarded at start-up: a server starting beside a
    live one on the same data directory (a worker, a restart while the old one drains) must not
    take the files of the uploads it is running."""
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    content = os.urandom(SPOOLED + 400_000)
    release = threading.Event()

    def slow() -> Iterator[pb.UploadDataRequest]:
        messages = list(requests(content, "slow"))
        yield from messages[:-1]
        release.wait(60)
        yield messages[-1]

    with ServerProcess(data_dir, log) as first, grpc.insecure_channel(first.target) as channel:
        call = Stub(channel).UploadData.future(slow())
        wait_until(spooling(data_dir), "the upload is spooling")
        with ServerProcess(data_dir, log) as second:
            spooled = list((data_dir / "tmp").iterdir())
            assert spooled != []
            with grpc.insecure_channel(second.target) as other:
                assert upload(Stub(other), b"beside", "beside").size == 6
        release.set()
        stored = call.result(timeout=60).data
        assert stored.sha256 == hashlib.sha256(content).hexdigest()
