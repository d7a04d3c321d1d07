"""Retries, corruption and concurrent changes: nothing stored twice, corrupted or lost."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, stored_blobs
from tests.test_service import assert_nothing_stored, requests, upload, violations

Stub = pb_grpc.DatalakeServiceStub


def blob_count(handle: ServerHandle) -> int:
    return len(stored_blobs(handle.data_dir))


def test_a_retry_with_the_same_request_id_returns_the_first_item(
    stub: Stub, running_server: ServerHandle
) -> None:
    request_id = str(uuid.uuid4())
    first = upload(stub, b"frame-1", "a.jpg", request_id=request_id)
    again = upload(stub, b"frame-1", "a.jpg", request_id=request_id)
    assert again == first
    assert len(stub.ListData(pb.ListDataRequest()).data) == 1
    other = upload(stub, b"frame-1", "a.jpg", request_id=str(uuid.uuid4()))
    assert other.id != first.id


def test_a_retry_racing_the_first_try_still_stores_once(
    stub: Stub, running_server: ServerHandle
) -> None:
    request_id = str(uuid.uuid4())
    content = b"x" * 300_000
    results: list[pb.Data] = []

    def slow_stream() -> Iterator[pb.UploadDataRequest]:
        for i, message in enumerate(requests(content, "a.bin", request_id=request_id)):
            if i:
                time.sleep(0.05)  # both tries are mid-stream at the same time
            yield message

    def attempt() -> None:
        results.append(stub.UploadData(slow_stream()).data)

    threads = [threading.Thread(target=attempt) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({d.id for d in results}) == 1
    assert len(stub.ListData(pb.ListDataRequest()).data) == 1
    assert blob_count(running_server) == 1
    assert list((running_server.data_dir / "tmp").iterdir()) == []


def test_the_expected_sha256_must_match(stub: Stub, running_server: ServerHandle) -> None:
    content = b"the bytes the camera meant"
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, content + b"!", "a", expected_sha256=hashlib.sha256(content).hexdigest())
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert "header.expected_sha256" in violations(caught.value)
    assert_nothing_stored(stub, running_server.data_dir)

    data = upload(stub, content, "a", expected_sha256=hashlib.sha256(content).hexdigest())
    assert data.sha256 == hashlib.sha256(content).hexdigest()


def test_a_malformed_expected_sha256_is_an_invalid_argument(stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, b"x", "a", expected_sha256="ABC")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.expected_sha256" in violations(caught.value)


def test_etags_guard_updates_and_deletes(stub: Stub) -> None:
    data = upload(stub, b"x", "a")
    assert data.etag
    mask = FieldMask(paths=["weather"])
    updated = stub.UpdateMetadata(
        pb.UpdateMetadataRequest(
            id=data.id, metadata=pb.Metadata(weather="sun"), update_mask=mask, etag=data.etag
        )
    ).data
    assert updated.etag != data.etag

    for call in (
        lambda: stub.UpdateMetadata(
            pb.UpdateMetadataRequest(
                id=data.id, metadata=pb.Metadata(weather="rain"), update_mask=mask, etag=data.etag
            )
        ),
        lambda: stub.DeleteData(pb.DeleteDataRequest(id=data.id, etag=data.etag)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.ABORTED
    assert stub.GetData(pb.GetDataRequest(id=data.id)).data == updated
    stub.DeleteData(pb.DeleteDataRequest(id=data.id, etag=updated.etag))
