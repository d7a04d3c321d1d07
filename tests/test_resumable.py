"""Resumable uploads and the many-files stream, as a device on a bad link uses them."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from metalake import metadata as md
from metalake.server.config import Settings
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, serving
from tests.test_service import jpeg_bytes, violations

Stub = pb_grpc.DatalakeServiceStub


def writes(
    upload_id: str, content: bytes, offset: int, *, finish: bool, chunk: int = 64 * 1024
) -> Iterator[pb.WriteUploadRequest]:
    positions = list(range(offset, len(content), chunk)) or [offset]
    for i, start in enumerate(positions):
        yield pb.WriteUploadRequest(
            upload_id=upload_id if i == 0 else "",
            write_offset=start,
            data=content[start : start + chunk],
            finish_write=finish and i == len(positions) - 1,
        )


def broken_after(
    messages: Iterator[pb.WriteUploadRequest], count: int
) -> Iterator[pb.WriteUploadRequest]:
    for i, message in enumerate(messages):
        if i == count:
            raise ConnectionError("the link dropped")
        yield message


def start(stub: Stub, upload_id: str = "", **header: object) -> pb.StartUploadResponse:
    return stub.StartUpload(
        pb.StartUploadRequest(
            header=pb.UploadDataHeader(filename="drone.jpg", **header),  # type: ignore[arg-type]
            upload_id=upload_id,
        )
    )


def committed(stub: Stub, upload_id: str) -> int:
    return stub.QueryUpload(pb.QueryUploadRequest(upload_id=upload_id)).committed_size


def test_an_interrupted_upload_resumes_from_what_was_committed(stub: Stub) -> None:
    content = os.urandom(1_000_000)
    upload_id = start(stub, "cam-7-frame-0001", tags=["resumed"]).upload_id
    assert upload_id == "cam-7-frame-0001"

    first = stub.WriteUpload(writes(upload_id, content[:300_000], 0, finish=False))
    assert first.committed_size == 300_000
    # The link drops mid-stream: whatever the server received is kept (possibly nothing, if
    # the cancellation overtook the messages).
    with pytest.raises(grpc.RpcError):
        stub.WriteUpload(broken_after(writes(upload_id, content, 300_000, finish=True), 4))
    time.sleep(0.2)  # the server notices the broken stream asynchronously
    size = committed(stub, upload_id)
    assert 300_000 <= size <= 300_000 + 4 * 64 * 1024

    response = stub.WriteUpload(writes(upload_id, content, size, finish=True))
    assert response.committed_size == len(content)
    assert response.data.sha256 == hashlib.sha256(content).hexdigest()
    assert list(response.data.tags) == ["resumed"]
    stored = b"".join(
        m.chunk for m in stub.DownloadData(pb.DownloadDataRequest(id=response.data.id))
    )
    assert stored == content

    query = stub.QueryUpload(pb.QueryUploadRequest(upload_id=upload_id))
    assert query.complete
    assert query.data == response.data
    # Finishing again (a retry that never saw the answer) returns the same item.
    again = stub.WriteUpload(writes(upload_id, content, 0, finish=True))
    assert again.data == response.data
    assert len(stub.ListData(pb.ListDataRequest()).data) == 1


def test_resent_bytes_are_skipped_and_gaps_refused(stub: Stub) -> None:
    content = os.urandom(300_000)
    upload_id = start(stub).upload_id
    first = stub.WriteUpload(writes(upload_id, content[:200_000], 0, finish=False))
    assert first.committed_size == 200_000
    assert not first.HasField("data")

    with pytest.raises(grpc.RpcError) as caught:
        stub.WriteUpload(writes(upload_id, content, 250_000, finish=True))
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE

    done = stub.WriteUpload(writes(upload_id, content, 100_000, finish=True))
    assert done.data.sha256 == hashlib.sha256(content).hexdigest()


def test_starting_an_upload_id_again_returns_its_state(stub: Stub) -> None:
    first = start(stub, "device-42.batch_3")
    stub.WriteUpload(writes(first.upload_id, b"abcdef", 0, finish=False))
    again = start(stub, "device-42.batch_3")
    assert again.upload_id == first.upload_id
    assert again.committed_size == 6


@pytest.mark.parametrize("upload_id", ["../escape", ".hidden", "a/b", "x" * 129])
def test_upload_ids_are_names_not_paths(stub: Stub, upload_id: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        start(stub, upload_id)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "upload_id" in violations(caught.value)


def test_unknown_uploads_are_not_found(stub: Stub) -> None:
    for call in (
        lambda: stub.QueryUpload(pb.QueryUploadRequest(upload_id="nope")),
        lambda: stub.WriteUpload(writes("nope", b"x", 0, finish=True)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_resumable_upload_is_checked_and_filled_like_any_other(stub: Stub) -> None:
    content = jpeg_bytes()
    upload_id = start(stub, expected_sha256=hashlib.sha256(b"other").hexdigest()).upload_id
    with pytest.raises(grpc.RpcError) as caught:
        stub.WriteUpload(writes(upload_id, content, 0, finish=True))
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    with pytest.raises(grpc.RpcError) as caught:
        committed(stub, upload_id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # corrupted bytes are not kept

    upload_id = start(stub, metadata=md.to_proto({"reference": "R1"})).upload_id
    data = stub.WriteUpload(writes(upload_id, content, 0, finish=True)).data
    assert data.content_type == "image/jpeg"
    assert data.metadata.reference == "R1"


def test_unfinished_uploads_expire_and_their_bytes_are_reclaimed(tmp_path: Path) -> None:
    settings = replace(
        Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0"), upload_ttl=0.5, gc_interval=0.2
    )
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        upload_id = start(stub).upload_id
        stub.WriteUpload(writes(upload_id, b"x" * 1000, 0, finish=False))
        [staged] = (handle.data_dir / "uploads").iterdir()
        assert staged.stat().st_size == 1000
        deadline = time.monotonic() + 10
        while staged.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not staged.exists()
        with pytest.raises(grpc.RpcError) as caught:
            committed(stub, upload_id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def stream_requests(
    files: list[tuple[str, bytes, md.MetadataDict]],
) -> Iterator[pb.UploadDataStreamRequest]:
    for filename, content, metadata in files:
        yield pb.UploadDataStreamRequest(
            header=pb.UploadDataHeader(filename=filename, metadata=md.to_proto(metadata))
        )
        for start_at in range(0, len(content), 30_000):
            yield pb.UploadDataStreamRequest(chunk=content[start_at : start_at + 30_000])
        yield pb.UploadDataStreamRequest(finish=True)


def test_many_files_over_one_stream_one_answer_each_in_order(
    stub: Stub, running_server: ServerHandle
) -> None:
    files: list[tuple[str, bytes, md.MetadataDict]] = [
        (f"{i:03d}.bin", os.urandom(50_000 + i), {"custom_id": str(i)}) for i in range(40)
    ]
    bad = pb.Metadata(latitude=100.0)
    requests = list(stream_requests(files))
    # File 7 carries an invalid latitude: it fails alone.
    header_index = [i for i, r in enumerate(requests) if r.HasField("header")][7]
    requests[header_index].header.metadata.CopyFrom(bad)

    answers = list(stub.UploadDataStream(iter(requests)))
    assert [a.file_index for a in answers] == list(range(40))
    assert answers[7].WhichOneof("result") == "error"
    assert answers[7].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[7].error.field_violations[0].field == "header.metadata.latitude"
    for i, answer in enumerate(answers):
        if i == 7:
            continue
        assert answer.data.filename == files[i][0]
        assert answer.data.sha256 == hashlib.sha256(files[i][1]).hexdigest()
        assert answer.data.metadata.custom_id == str(i)
    assert len(list(stub.ListData(pb.ListDataRequest(page_size=100)).data)) == 39
    assert list((running_server.data_dir / "tmp").iterdir()) == []


def test_a_broken_stream_stores_nothing_of_the_unfinished_file(
    stub: Stub, running_server: ServerHandle
) -> None:
    requests = list(stream_requests([("a", b"a" * 1000, {}), ("b", b"b" * 1000, {})]))
    truncated = requests[:-1]  # file b never finishes
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.UploadDataStream(iter(truncated)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    names = [d.filename for d in stub.ListData(pb.ListDataRequest()).data]
    assert names == ["a"]
    assert list((running_server.data_dir / "tmp").iterdir()) == []


def test_lost_staged_bytes_are_resent_not_invented(
    stub: Stub, running_server: ServerHandle
) -> None:
    content = os.urandom(200_000)
    upload_id = start(stub).upload_id
    stub.WriteUpload(writes(upload_id, content[:150_000], 0, finish=False))
    # The staged bytes vanish (another server's disk, a lost volume): the committed size the
    # catalog remembers must not be trusted.
    for staged in (running_server.data_dir / "uploads").iterdir():
        staged.unlink()
    with pytest.raises(grpc.RpcError) as caught:
        stub.WriteUpload(writes(upload_id, content, 150_000, finish=True))
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert committed(stub, upload_id) == 0
    done = stub.WriteUpload(writes(upload_id, content, 0, finish=True))
    assert done.data.sha256 == hashlib.sha256(content).hexdigest()
