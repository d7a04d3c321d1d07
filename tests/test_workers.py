"""`metalake serve --workers N`: N real processes on one port, supervised."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from metalake.server.blobstore import LocalBlobStore
from metalake.server.ingest import SMALL_FILE
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import S3_ENV, stored_blobs
from tests.serverprocess import ServerProcess, command_line
from tests.test_faults import held_open
from tests.test_service import requests, upload

WORKER_KEY = "x-metalake-worker"
# A channel of its own per call: gRPC shares connections between channels of a process
# otherwise, and the kernel spreads connections (not calls) over the workers.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[ServerProcess]:
    metrics = f"127.0.0.1:{free_port()}"
    with ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
        METALAKE_WORKERS="2",
        METALAKE_METRICS_LISTEN=metrics,
    ) as server:
        server.env["metrics"] = metrics  # for the tests' eyes only
        yield server


def workers_of(server: ServerProcess) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    workers = set()
    for pid in server.pids()[1:]:
        if b"spawn_main" in command_line(pid):
            workers.add(pid)
    return workers


def upload_once(target: str, content: bytes, name: str, request_id: str = "") -> tuple[str, int]:
    """Upload on a new connection; the stored item's id and the pid of the worker that answered."""
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        response, call = stub.UploadData.with_call(
            requests(content, name, request_id=request_id), timeout=20
        )
        worker = dict(call.trailing_metadata() or ())[WORKER_KEY]
        return response.data.id, int(worker)


def listed_ids(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        ids: set[str] = set()
        token = ""
        while True:
            page = stub.ListData(pb.ListDataRequest(page_size=1000, page_token=token), timeout=20)
            ids.update(d.id for d in page.data)
            token = page.next_page_token
            if not token:
                return ids


def test_two_workers_share_one_port_and_both_take_calls(two_workers: ServerProcess) -> None:
    workers = workers_of(two_workers)
    assert len(workers) == 2
    answered: dict[str, int] = {}
    # Each connection lands on either worker: 40 uploads leave a chance of 2**-39 of one idle.
    for index in range(40):
        data_id, worker = upload_once(two_workers.target, os.urandom(2000), f"{index}.bin")
        answered[data_id] = worker
        assert worker in workers
    assert set(answered.values()) == workers
    # One datalake whichever worker answers: every item is listed through either.
    assert listed_ids(two_workers.target) == set(answered)
    # Health answers for the server from any worker.
    for _ in range(4):
        with grpc.insecure_channel(two_workers.target, options=OWN_CONNECTION) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    # The supervisor's metrics add up every worker's.
    with urllib.request.urlopen(f"http://{two_workers.env['metrics']}/metrics") as page:
        metrics = page.read().decode()
    counted = re.search(
        r'^metalake_rpcs_total\{code="OK",method="UploadData"\} (\S+)$', metrics, re.MULTILINE
    )
    assert counted is not None, metrics
    assert float(counted.group(1)) == 40
    assert re.search(r"^metalake_uploads_in_flight 0\.0$", metrics, re.MULTILINE), metrics
    # And every worker's group commits: all 40 items, in some batches.
    items = re.search(r"^metalake_catalog_batch_items_sum (\S+)$", metrics, re.MULTILINE)
    assert items is not None, metrics
    assert float(items.group(1)) == 40


def test_two_workers_share_one_http_port_picked_by_the_supervisor(tmp_path: Path) -> None:
    # Port 0: the supervisor picks the HTTP port once, as it does for gRPC, and every worker
    # binds it; a port per worker would leave the console unreachable through the logged one.
    with ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
        METALAKE_WORKERS="2",
        METALAKE_HTTP_LISTEN="127.0.0.1:0",
    ) as server:
        workers = workers_of(server)
        assert len(workers) == 2
        found = re.search(
            r"HTTP face of every worker on (127\.0\.0\.1:\d+)", server.log.read_text()
        )
        assert found is not None, server.log.read_text()
        http = found.group(1)
        assert not http.endswith(":0")
        data_id, _ = upload_once(server.target, b"shared by both", "shared.bin")
        answered = set()
        # Each request on a connection of its own: 40 leave a chance of 2**-39 of one idle.
        for _ in range(40):
            with urllib.request.urlopen(f"http://{http}/v1/data/{data_id}", timeout=10) as page:
                assert page.status == 200
                assert json.loads(page.read())["id"] == data_id
                answered.add(int(page.headers[WORKER_KEY]))
        assert answered == workers
        with urllib.request.urlopen(f"http://{http}/", timeout=10) as console:
            assert console.status == 200
            assert "text/html" in console.headers["content-type"]


def test_two_workers_on_postgresql_and_s3(
    tmp_path: Path, postgres_url: str, s3_url: str, s3_endpoint: str
) -> None:
    env = {
        **S3_ENV,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "METALAKE_CATALOG_URL": postgres_url,
        "METALAKE_BLOB_URL": s3_url,
        "METALAKE_MIGRATE": "true",
        "METALAKE_WORKERS": "2",
    }
    with ServerProcess(tmp_path / "data", tmp_path / "server.log", **env) as server:
        workers = workers_of(server)
        answered: dict[str, int] = {}
        for index in range(40):
            data_id, worker = upload_once(server.target, os.urandom(3000), f"{index}.bin")
            answered[data_id] = worker
        assert set(answered.values()) == workers
        assert listed_ids(server.target) == set(answered)


def test_a_killed_worker_is_replaced_and_nothing_acknowledged_is_lost(
    two_workers: ServerProcess, tmp_path: Path
) -> None:
    target = two_workers.target
    acknowledged: set[str] = set()
    failures: list[grpc.StatusCode] = []
    stop = threading.Event()

    def device(seed: int) -> None:
        count = 0
        while not stop.is_set():
            count += 1
            request_id = f"{seed}-{count}"
            for _ in range(20):  # retried with its request id: stored once whatever happens
                try:
                    data_id, _ = upload_once(target, os.urandom(300_000), request_id, request_id)
                except grpc.RpcError as error:
                    failures.append(error.code())
                    time.sleep(0.1)
                    continue
                acknowledged.add(data_id)
                break

    devices = [threading.Thread(target=device, args=(seed,)) for seed in range(4)]
    for thread in devices:
        thread.start()
    try:
        time.sleep(1.0)
        victim, survivor = sorted(workers_of(two_workers))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        # One look at a time: the victim may still be listed for a moment after the signal.
        while victim in (now := workers_of(two_workers)) or len(now - {survivor}) != 1:
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.1)
        [replacement] = now - {survivor}
        assert replacement != victim
        stored_before = len(acknowledged)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in devices:
            thread.join(60)
    assert len(acknowledged) > stored_before, "uploads went on after the kill"
    # Only connections to the killed worker failed, and only as a client can retry.
    assert set(failures) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert acknowledged <= listed_ids(target)
    # Its half-received uploads were discarded; the others' spool files are theirs to finish.
    assert not list((tmp_path / "data" / "tmp").glob(f"{victim}-*"))
    assert two_workers.process is not None
    assert two_workers.process.poll() is None


def test_replacing_a_worker_leaves_the_other_workers_uploads_alone(
    two_workers: ServerProcess, tmp_path: Path
) -> None:
    spool = tmp_path / "data" / "tmp"
    release = threading.Event()
    channel = grpc.insecure_channel(two_workers.target, options=OWN_CONNECTION)
    stub = pb_grpc.DatalakeServiceStub(channel)
    # Past SMALL_FILE: spooled to disk as it arrives (a smaller file is gathered in memory).
    content = os.urandom(SMALL_FILE + 100_000)
    in_flight = stub.UploadData.future(held_until(release, content, "big"))
    deadline = time.monotonic() + 30
    while not list(spool.iterdir()):
        assert time.monotonic() < deadline, "the upload never reached a worker's spool"
        time.sleep(0.05)
    [spooled] = spool.iterdir()
    receiving = int(spooled.name.split("-")[0])  # spool files are named after their process
    [other] = workers_of(two_workers) - {receiving}
    os.kill(other, signal.SIGKILL)
    while other in workers_of(two_workers) or len(workers_of(two_workers)) < 2:
        assert time.monotonic() < deadline + 30, "the dead worker was not replaced"
        time.sleep(0.1)
    assert spooled.exists()  # the replacement's start-up did not take it for a leftover
    release.set()
    stored = in_flight.result(timeout=30).data
    assert stored.size == len(content)
    assert stored.id in listed_ids(two_workers.target)
    channel.close()


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    two_workers: ServerProcess, tmp_path: Path
) -> None:
    release = threading.Event()
    workers = workers_of(two_workers)
    in_flight = []
    for _ in range(4):  # on a connection each: some on either worker, most likely
        channel = grpc.insecure_channel(two_workers.target, options=OWN_CONNECTION)
        stub = pb_grpc.DatalakeServiceStub(channel)
        in_flight.append((channel, stub.UploadData.future(held_open(release))))
    time.sleep(0.5)
    two_workers.signal(signal.SIGTERM)
    time.sleep(0.5)
    release.set()
    stored, refused = [], []
    for channel, call in in_flight:
        try:
            stored.append(call.result(timeout=30).data.id)
        except grpc.RpcError as error:
            refused.append(error.code())
        channel.close()
    # Each upload in flight finished, or was refused as a client can retry: no hang, no crash.
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE}
    assert two_workers.wait(30) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert list((tmp_path / "data" / "tmp").iterdir()) == []

    with ServerProcess(tmp_path / "data", tmp_path / "again.log") as again:
        assert listed_ids(again.target) == set(stored)


def test_a_dead_workers_spool_files_are_told_from_the_living(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    (tmp_path / "tmp" / "101-a.part").write_bytes(b"dead")
    (tmp_path / "tmp" / "102-b.part").write_bytes(b"alive")
    assert store.discard_spooled(owner=101) == 1
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == ["102-b.part"]


def test_workers_must_be_at_least_one(tmp_path: Path) -> None:
    from metalake.cli import main

    assert main(["serve", "--workers", "0", "--data-dir", str(tmp_path)]) == 2


def test_a_server_whose_workers_cannot_start_says_why_and_exits_1(tmp_path: Path) -> None:
    metalake = Path(sys.executable).with_name("metalake")
    finished = subprocess.run(
        [str(metalake), "serve", "--workers", "2", "--listen", "0.0.0.0:0"],
        env={**os.environ, "METALAKE_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 1
    # Both workers refused for the same reason, said once.
    assert finished.stderr.count("refusing to serve 0.0.0.0") == 1, finished.stderr


def held_until(
    release: threading.Event, content: bytes, filename: str
) -> Iterator[pb.UploadDataRequest]:
    """An upload whose last chunk is sent only once `release` is set."""
    messages = list(requests(content, filename))
    yield from messages[:-1]
    release.wait(60)
    yield messages[-1]


def test_a_server_started_beside_the_workers_leaves_their_uploads_alone(
    two_workers: ServerProcess, tmp_path: Path
) -> None:
    """The supervisor holds the data directory's lock for as long as its workers serve: a
    second server on the same directory must not take their uploads in flight for a dead
    run's leftovers."""
    spool = tmp_path / "data" / "tmp"
    content = os.urandom(SMALL_FILE + 400_000)  # spooled to disk as it arrives
    release = threading.Event()
    with grpc.insecure_channel(two_workers.target, options=OWN_CONNECTION) as channel:
        call = pb_grpc.DatalakeServiceStub(channel).UploadData.future(
            held_until(release, content, "slow")
        )
        deadline = time.monotonic() + 30
        while not list(spool.iterdir()):
            assert time.monotonic() < deadline, "the upload never reached a worker's spool"
            time.sleep(0.05)
        spooled = list(spool.iterdir())
        with ServerProcess(tmp_path / "data", tmp_path / "beside.log") as beside:
            assert all(path.exists() for path in spooled)
            with grpc.insecure_channel(beside.target) as other:
                beside_id = upload(pb_grpc.DatalakeServiceStub(other), b"beside", "beside").id
        release.set()
        stored = call.result(timeout=60).data
    assert stored.size == len(content)
    assert {stored.id, beside_id} <= listed_ids(two_workers.target)


def test_a_killed_workers_multipart_uploads_are_aborted_and_its_siblings_kept(
    tmp_path: Path, s3_url: str, s3_endpoint: str
) -> None:
    """S3 keeps (and bills) unfinished multipart uploads: the supervisor aborts those of a
    worker that died, by the markers named after it, and leaves the other worker's going."""
    env = {
        **S3_ENV,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "METALAKE_BLOB_URL": s3_url,
        "METALAKE_WORKERS": "2",
    }
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    s3: Any = boto3.client("s3", endpoint_url=s3_endpoint)
    spool = tmp_path / "data" / "tmp"

    def pending() -> set[str]:
        return {u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}

    def marked() -> dict[int, set[str]]:
        """The multipart uploads each process's markers name."""
        keys: dict[int, set[str]] = {}
        for marker in spool.glob("*.multipart"):
            try:
                key = json.loads(marker.read_text())["key"]
            except (FileNotFoundError, json.JSONDecodeError):
                continue  # being written, or gone meanwhile
            keys.setdefault(int(marker.name.split("-")[0]), set()).add(key)
        return keys

    release = threading.Event()
    calls: list[tuple[grpc.Channel, Any]] = []
    with ServerProcess(tmp_path / "data", tmp_path / "server.log", **env) as server:
        workers = workers_of(server)
        try:
            # Uploads on connections of their own until both workers have one with a part in S3
            # (10 MiB: beyond the 8 MiB part size); 16 leave a chance of 2**-15 of failing.
            while set(marked()) != workers:
                assert len(calls) < 16, "every connection went to the same worker"
                channel = grpc.insecure_channel(server.target, options=OWN_CONNECTION)
                stub = pb_grpc.DatalakeServiceStub(channel)
                call = stub.UploadData.future(
                    held_until(release, os.urandom(10 * 1024 * 1024), f"{len(calls)}.bin")
                )
                calls.append((channel, call))
                deadline = time.monotonic() + 60
                while sum(map(len, marked().values())) < len(calls):
                    assert time.monotonic() < deadline, "the upload never reached S3"
                    time.sleep(0.05)
            victim, survivor = sorted(workers)
            before = marked()
            assert pending() == before[victim] | before[survivor]

            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while victim in (now := workers_of(server)) or len(now) != 2:
                assert time.monotonic() < deadline, "the dead worker was not replaced"
                time.sleep(0.1)
            # Cleaned before the replacement started: the victim's aborted, the other's going.
            assert pending() == before[survivor]
            assert marked() == {survivor: before[survivor]}

            release.set()
            stored, failed = [], []
            for _, call in calls:
                try:
                    stored.append(call.result(timeout=60).data.id)
                except grpc.RpcError as error:
                    failed.append(error.code())
                else:
                    assert dict(call.trailing_metadata())[WORKER_KEY] == str(survivor)
            # The dead worker's calls failed as a client can retry; the other's were stored.
            assert set(failed) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
            assert len(stored) == len(before[survivor])
            assert set(stored) <= listed_ids(server.target)
            assert pending() == set()
            assert marked() == {}
        finally:
            release.set()
            for channel, _ in calls:
                channel.close()


def test_workers_storing_and_deleting_the_same_small_files_keep_every_blob_in_use(
    two_workers: ServerProcess,
) -> None:
    """Small uploads are stored in one step, an existing blob of the same content taken as
    stored: across the workers, the blob locks (file locks beside the SQLite catalog) must keep
    a deletion that finds a blob unused from removing it under an upload of the same content.
    Retries of one request sent to both workers at once store one item (batched commits)."""
    target = two_workers.target
    contents = [os.urandom(3_000 + n) for n in range(2)]

    def store_and_maybe_delete(round_: int) -> str | None:
        """Store, read back (the blob must be there once the upload is acknowledged), and
        delete most: items of one content come and go on both workers at once."""
        content = contents[round_ % len(contents)]
        data_id, _ = upload_once(target, content, f"r{round_}.bin")
        with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
            stub = pb_grpc.DatalakeServiceStub(channel)
            request = pb.DownloadDataRequest(id=data_id)
            assert b"".join(m.chunk for m in stub.DownloadData(request, timeout=20)) == content
            if round_ % 8 == 7:
                return data_id
            stub.DeleteData(pb.DeleteDataRequest(id=data_id), timeout=20)
        return None

    def retried(request: int) -> str:
        return upload_once(target, os.urandom(500) + bytes([request]), "retry", f"req-{request}")[0]

    with ThreadPoolExecutor(16) as pool:
        kept = {i for i in pool.map(store_and_maybe_delete, range(240)) if i is not None}
        retries = list(pool.map(lambda r: retried(r // 2), range(20)))
    assert all(retries[n] == retries[n + 1] for n in range(0, 20, 2)), retries
    kept |= set(retries)
    assert listed_ids(target) == kept
    stored: set[str] = set()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        for data_id in kept:
            item = stub.GetData(pb.GetDataRequest(id=data_id), timeout=20)
            request = pb.DownloadDataRequest(id=data_id)
            body = b"".join(m.chunk for m in stub.DownloadData(request, timeout=20))
            assert hashlib.sha256(body).hexdigest() == item.data.sha256
            stored.add(item.data.sha256)
    blobs = set(stored_blobs(two_workers.data_dir))
    assert blobs == stored


@pytest.mark.parametrize("workers", [1, 2])
def test_each_server_process_leaves_its_start_up_heap_out_of_garbage_collection(
    tmp_path: Path, workers: int
) -> None:
    # Full collections walked the whole start-up heap with the event loop stopped (app.py,
    # freeze_startup_heap): each process serving calls freezes it once it has started.
    log = tmp_path / "server.log"
    env = {"METALAKE_WORKERS": str(workers), "METALAKE_LOG_LEVEL": "debug"}
    with ServerProcess(tmp_path / "data", log, **env):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            frozen = [int(n) for n in _FROZEN.findall(log.read_text())]
            if len(frozen) >= workers:
                break
            time.sleep(0.05)
    assert len(frozen) == workers
    # Far more than anything a request leaves: the modules, gRPC and the catalog's metadata.
    assert all(count > 50_000 for count in frozen)


_FROZEN = re.compile(r"(\d+) objects made at start-up left out of garbage collection")
