"""WatchData: every change, in order, resumable, filtered, across servers."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from metalake import metadata as md
from metalake.server.config import Settings
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, serving
from tests.test_service import upload

Stub = pb_grpc.DatalakeServiceStub
CREATED, UPDATED, DELETED = pb.EVENT_TYPE_CREATED, pb.EVENT_TYPE_UPDATED, pb.EVENT_TYPE_DELETED


class Watcher:
    """Reads a WatchData stream on a thread; `take(n)` waits for the next n events."""

    def __init__(self, stub: Stub, **request: str) -> None:
        self.call = stub.WatchData(pb.WatchDataRequest(**request))
        self.events: queue.Queue[pb.WatchDataResponse | grpc.RpcError] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as error:
            self.events.put(error)

    def take(self, count: int) -> list[pb.WatchDataResponse]:
        taken = []
        for _ in range(count):
            item = self.events.get(timeout=15)
            if isinstance(item, grpc.RpcError):
                raise item
            taken.append(item)
        return taken

    def assert_quiet(self) -> None:
        try:
            item = self.events.get(timeout=1)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected event {item}")

    def close(self) -> None:
        self.call.cancel()  # type: ignore[no-untyped-call]
        self.thread.join(10)


@pytest.fixture
def watch(stub: Stub) -> Iterator[type[Watcher]]:
    opened: list[Watcher] = []

    class Opened(Watcher):
        def __init__(self, stub: Stub, **request: str) -> None:
            super().__init__(stub, **request)
            opened.append(self)

    yield Opened
    for watcher in opened:
        watcher.close()


def settle() -> None:
    # A watch "from now" starts at the newest event when the server takes the call.
    time.sleep(0.5)


def test_creation_update_and_deletion_arrive_in_order(stub: Stub, watch: type[Watcher]) -> None:
    watcher = watch(stub)
    settle()
    data = upload(stub, b"x", "a.jpg", tags=["t"])
    stub.UpdateMetadata(
        pb.UpdateMetadataRequest(
            id=data.id,
            metadata=pb.Metadata(weather="fog"),
            update_mask=FieldMask(paths=["weather"]),
        )
    )
    stub.DeleteData(pb.DeleteDataRequest(id=data.id))
    created, updated, deleted = watcher.take(3)
    assert [e.type for e in (created, updated, deleted)] == [CREATED, UPDATED, DELETED]
    assert {e.data_id for e in (created, updated, deleted)} == {data.id}
    assert created.data == data
    assert updated.data.metadata.weather == "fog"
    assert list(deleted.data.tags) == ["t"]
    assert len({created.resume_token, updated.resume_token, deleted.resume_token}) == 3
    watcher.assert_quiet()


def test_resuming_misses_nothing_and_repeats_nothing(stub: Stub, watch: type[Watcher]) -> None:
    first = watch(stub)
    settle()
    ids = [upload(stub, bytes([i]), f"{i}").id for i in range(3)]
    seen = first.take(2)
    first.close()
    ids += [upload(stub, bytes([i]), f"{i}").id for i in range(3, 6)]

    resumed = watch(stub, resume_token=seen[-1].resume_token)
    rest = resumed.take(4)
    assert [e.data_id for e in seen + rest] == ids
    resumed.assert_quiet()


def test_a_filter_narrows_the_events(stub: Stub, watch: type[Watcher]) -> None:
    watcher = watch(stub, filter='manufacturer = "Canon" OR tags:"keep"')
    settle()
    canon = upload(stub, b"c", "c.jpg", metadata=md.normalize({"manufacturer": "Canon"}))
    upload(stub, b"n", "n.jpg", metadata=md.normalize({"manufacturer": "NIKON"}))
    kept = upload(stub, b"k", "k.jpg", tags=["keep"])
    stub.DeleteData(pb.DeleteDataRequest(id=canon.id))
    events = watcher.take(3)
    assert [(e.type, e.data_id) for e in events] == [
        (CREATED, canon.id),
        (CREATED, kept.id),
        (DELETED, canon.id),
    ]
    watcher.assert_quiet()


def test_bad_filters_and_tokens_are_invalid_arguments(stub: Stub) -> None:
    for request in (
        pb.WatchDataRequest(filter="colour = 1"),
        pb.WatchDataRequest(resume_token="not-a-token"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(stub.WatchData(request, timeout=10)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_watcher_too_far_behind_is_told(
    stub: Stub, running_server: ServerHandle, watch: type[Watcher]
) -> None:
    watcher = watch(stub)
    settle()
    upload(stub, b"1", "1")
    [event] = watcher.take(1)
    watcher.close()
    upload(stub, b"2", "2")
    catalog = running_server.running.datalake.catalog
    later = datetime.now(UTC) + timedelta(seconds=1)
    asyncio.run_coroutine_threadsafe(catalog.prune_events(later), running_server.loop).result(30)
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(stub.WatchData(pb.WatchDataRequest(resume_token=event.resume_token))))
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "fell too far behind" in (caught.value.details() or "")


def test_servers_sharing_a_catalog_see_each_others_changes(
    tmp_path: Path, postgres_url: str
) -> None:
    def settings(name: str) -> Settings:
        return replace(
            Settings(data_dir=tmp_path / name, listen="127.0.0.1:0"),
            catalog_url=postgres_url,
            migrate=True,
        )

    with (
        serving(settings("a")) as a,
        serving(settings("b")) as b,
        grpc.insecure_channel(a.target) as to_a,
        grpc.insecure_channel(b.target) as to_b,
    ):
        watcher = Watcher(pb_grpc.DatalakeServiceStub(to_b))
        settle()
        data = upload(pb_grpc.DatalakeServiceStub(to_a), b"x", "through-a.jpg")
        [event] = watcher.take(1)
        assert event.data_id == data.id
        watcher.close()
