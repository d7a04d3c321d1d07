"""Limits, draining and crashes: the server stays bounded and never loses what it acknowledged."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from metalake.server import app
from metalake.server.config import Settings
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import serving, stored_blobs
from tests.serverprocess import ServerProcess
from tests.test_service import assert_nothing_stored, requests, upload

Stub = pb_grpc.DatalakeServiceStub


def retry_info(error: grpc.RpcError) -> error_details_pb2.RetryInfo | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info
    return None


def held_open(release: threading.Event) -> Iterator[pb.UploadDataRequest]:
    yield pb.UploadDataRequest(header=pb.UploadDataHeader(filename="slow"))
    yield pb.UploadDataRequest(chunk=b"x")
    release.wait(30)


def test_a_file_over_the_size_limit_is_refused_and_nothing_kept(tmp_path: Path) -> None:
    settings = replace(Settings(data_dir=tmp_path, listen="127.0.0.1:0"), max_file_size=100_000)
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            upload(stub, os.urandom(100_001), "big")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maximum file size" in (caught.value.details() or "")
        assert retry_info(caught.value) is None  # retrying will not help
        assert_nothing_stored(stub, handle.data_dir)
        assert upload(stub, os.urandom(100_000), "fits").size == 100_000


def test_uploads_beyond_the_concurrency_limit_are_told_to_retry(tmp_path: Path) -> None:
    settings = replace(Settings(data_dir=tmp_path, listen="127.0.0.1:0"), max_concurrent_uploads=2)
    release = threading.Event()
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        slow = [stub.UploadData.future(held_open(release)) for _ in range(2)]
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as caught:
            upload(stub, b"third", "third")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = retry_info(caught.value)
        assert info is not None
        assert info.retry_delay.ToTimedelta().total_seconds() > 0
        release.set()
        assert all(f.result(timeout=30).data.size == 1 for f in slow)
        assert upload(stub, b"third", "third").size == 5


def test_sigterm_drains_in_flight_uploads_and_refuses_new_ones(tmp_path: Path) -> None:
    release = threading.Event()
    with ServerProcess(tmp_path / "data", tmp_path / "server.log") as server:
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.DatalakeServiceStub(channel)
        in_flight = stub.UploadData.future(held_open(release))
        time.sleep(0.5)
        server.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            upload(stub, b"late", "late")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        assert in_flight.result(timeout=30).data.size == 1
        assert server.wait() == 0
        channel.close()

    with ServerProcess(tmp_path / "data", tmp_path / "server.log") as server:
        with grpc.insecure_channel(server.target) as channel:
            stored = pb_grpc.DatalakeServiceStub(channel).ListData(pb.ListDataRequest()).data
        assert [d.filename for d in stored] == ["slow"]


def _device(
    target: str,
    seed: int,
    acknowledged: dict[str, str],
    wrong: list[str],
    stop: threading.Event,
) -> None:
    """Uploads random files until the server dies; records what the server acknowledged, and
    in `wrong` any answer that does not match what was sent (the test asserts on it: a failed
    assertion in this thread would only be a warning)."""
    rng = random.Random(seed)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        while not stop.is_set():
            content = rng.randbytes(rng.choice([10, 5_000, 200_000, 1_500_000]))
            try:
                data = stub.UploadData(
                    requests(content, f"{seed}-{rng.random()}.bin", chunk_size=64 * 1024),
                    timeout=10,
                ).data
            except grpc.RpcError:
                return
            if data.sha256 != hashlib.sha256(content).hexdigest():
                wrong.append(f"{data.id}: sent {hashlib.sha256(content).hexdigest()}")
            acknowledged[data.id] = data.sha256


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    acknowledged: dict[str, str] = {}
    wrong: list[str] = []
    rng = random.Random(1234)
    for round_ in range(8):
        with ServerProcess(data_dir, log) as server:
            stop = threading.Event()
            devices = [
                threading.Thread(
                    target=_device,
                    args=(server.target, round_ * 10 + i, acknowledged, wrong, stop),
                )
                for i in range(4)
            ]
            for device in devices:
                device.start()
            time.sleep(rng.uniform(0.3, 1.5))
            server.signal(signal.SIGKILL)
            server.wait()
            stop.set()
            for device in devices:
                device.join(30)
                assert not device.is_alive()
    assert wrong == []
    assert len(acknowledged) > 10, "the devices should have stored something between kills"

    # A restart collects what the crashes left half-done (orphans of any age, here).
    with ServerProcess(data_dir, log, METALAKE_ORPHAN_AGE="0") as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.DatalakeServiceStub(channel)
            listed: dict[str, str] = {}
            token = ""
            while True:
                page = stub.ListData(pb.ListDataRequest(page_size=1000, page_token=token))
                listed.update((d.id, d.sha256) for d in page.data)
                token = page.next_page_token
                if not token:
                    break
            # Everything acknowledged is there, and every item's bytes are intact.
            assert acknowledged.items() <= listed.items()
            for data_id, sha256 in listed.items():
                messages = stub.DownloadData(pb.DownloadDataRequest(id=data_id))
                digest = hashlib.sha256()
                for message in messages:
                    digest.update(message.chunk)
                assert digest.hexdigest() == sha256
        # No bytes without their item, and no half-written leftovers.
        blobs = set(stored_blobs(data_dir))
        assert blobs == set(listed.values())
        assert list((data_dir / "tmp").iterdir()) == []


def test_storage_quotas_hold_per_organization(tmp_path: Path) -> None:
    settings = replace(
        Settings(data_dir=tmp_path, listen="127.0.0.1:0"),
        org_storage_quota=1_000,
        org_max_file_size=800,
    )
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        first = upload(stub, os.urandom(600), "a")
        with pytest.raises(grpc.RpcError) as caught:
            upload(stub, os.urandom(801), "too-big")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as caught:
            upload(stub, os.urandom(600), "over-quota")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quota" in (caught.value.details() or "")
        assert [d.id for d in stub.ListData(pb.ListDataRequest()).data] == [first.id]
        assert len(stored_blobs(handle.data_dir)) == 1

        # Deleting frees the space; an organization's own limits override the defaults.
        stub.DeleteData(pb.DeleteDataRequest(id=first.id))
        assert upload(stub, os.urandom(600), "b").size == 600
        asyncio.run_coroutine_threadsafe(
            handle.running.datalake.catalog.set_organization_limits(
                "default", max_file_size=None, storage_quota=10_000
            ),
            handle.loop,
        ).result(30)
        assert upload(stub, os.urandom(800), "c").size == 800


async def _stubborn(gone: asyncio.Future[None]) -> None:
    """A background job whose clean-up waits, however often it is cancelled, for a backend
    that is `gone` (until the test sets it)."""
    while not gone.done():
        try:
            await asyncio.shield(gone)
        except asyncio.CancelledError:
            continue


async def test_a_stuck_step_does_not_hold_the_server_s_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app, "STOP_STEP_SECONDS", 0.5)
    running = await app.start(Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0"))
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stuck = asyncio.create_task(_stubborn(gone), name="stubborn-job")
    running.background.append(stuck)
    try:
        started = time.monotonic()
        await asyncio.wait_for(running.stop(grace=0), 10)
        assert time.monotonic() - started < 5
        # The log says which step overran, and where what still runs waits; not gRPC's own
        # tasks waiting for calls.
        assert "cancelling the background jobs took over 0.5 s" in caplog.text
        assert "stubborn-job: _stubborn (test_faults.py:" in caplog.text
        assert "_request_registered_call" not in caplog.text

        def list_data() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                Stub(channel).ListData(pb.ListDataRequest(), timeout=2)

        with pytest.raises(grpc.RpcError):  # stopped all the same
            await asyncio.to_thread(list_data)
    finally:
        gone.set_result(None)
        await stuck
