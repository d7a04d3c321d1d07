"""Backend outages: the catalog (PostgreSQL) or the bucket (S3) cut behind a TCP proxy while a
server runs. Calls fail UNAVAILABLE with RetryInfo (never INTERNAL), health follows the catalog,
the same server recovers once the backend is back, nothing acknowledged is lost, nothing
half-stored is listed, and `metalake gc` reclaims what the failure left."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import boto3
import grpc
import psycopg
import pytest
import sqlalchemy
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from metalake import Client
from metalake.server.auth import Role
from metalake.server.blobstore import LocalBlobStore
from metalake.server.config import Settings
from metalake.server.errors import LimitReached, NotFound, Unavailable
from metalake.server.faults import backend_fault
from metalake.server.schema_versions import engine_url
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import S3_ENV, ServerHandle, serving, stored_blobs
from tests.tcpproxy import TcpProxy
from tests.test_faults import retry_info
from tests.test_service import requests, upload
from tests.test_similar import hash_now, jpeg, photo

Stub = pb_grpc.DatalakeServiceStub
MiB = 1024 * 1024


def wait_until(condition: Callable[[], bool], what: str, deadline: float = 30.0) -> None:
    """Poll until `condition` holds; fail (saying what) if it never does."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.05)


def health(channel: grpc.Channel) -> int:
    check = health_pb2_grpc.HealthStub(channel).Check
    status: int = check(health_pb2.HealthCheckRequest(), timeout=10).status
    return status


def assert_unavailable(call: Callable[[], object]) -> None:
    """The call fails UNAVAILABLE with a RetryInfo delay: clients retry it."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    info = retry_info(caught.value)
    assert info is not None
    assert info.retry_delay.ToTimedelta() > timedelta(0)


def held(
    content: bytes, filename: str, request_id: str, release: threading.Event
) -> Iterator[pb.UploadDataRequest]:
    """An upload whose last chunk waits for `release`."""
    messages = list(requests(content, filename, request_id=request_id))
    yield from messages[:-1]
    release.wait(30)
    yield messages[-1]


def listed(stub: Stub) -> dict[str, pb.Data]:
    found: dict[str, pb.Data] = {}
    token = ""
    while True:
        page = stub.ListData(pb.ListDataRequest(page_size=1000, page_token=token))
        found.update((d.id, d) for d in page.data)
        token = page.next_page_token
        if not token:
            return found


def downloaded(stub: Stub, data_id: str) -> bytes:
    return b"".join(m.chunk for m in stub.DownloadData(pb.DownloadDataRequest(id=data_id)))


def assert_intact(stub: Stub, sent: dict[str, bytes]) -> None:
    """Exactly the files of `sent` (by filename) are listed, once each, with their bytes."""
    items = list(listed(stub).values())
    assert sorted(d.filename for d in items) == sorted(sent)
    for item in items:
        assert downloaded(stub, item.id) == sent[item.filename]
        assert item.sha256 == hashlib.sha256(sent[item.filename]).hexdigest()


def receiving(count: int) -> Callable[[], bool]:
    """The in-process server is receiving `count` uploads (admitted, their bytes coming in: a
    small file's in memory, a larger one's in a spool file)."""
    return lambda: (REGISTRY.get_sample_value("metalake_uploads_in_flight") or 0) >= count


# The catalog: PostgreSQL behind the proxy.


@pytest.fixture
def catalog_proxy(postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy to PostgreSQL, and the test schema's URL through it."""
    parts = urlsplit(postgres_url)
    assert parts.hostname is not None
    with TcpProxy(parts.hostname, parts.port or 5432) as proxy:
        yield proxy, postgres_url.replace(parts.netloc, f"{parts.username}@{proxy.address}", 1)


def _catalog_settings(data_dir: Path, catalog_url: str) -> Settings:
    return replace(
        Settings(data_dir=data_dir, listen="127.0.0.1:0", catalog_url=catalog_url, migrate=True),
        health_interval=0.1,
    )


def _collect_garbage(handle: ServerHandle) -> None:
    asyncio.run_coroutine_threadsafe(
        handle.running.datalake.collect_garbage(orphan_age=timedelta(0)), handle.loop
    ).result(60)


def test_a_catalog_outage_is_unavailable_and_the_same_server_recovers(
    tmp_path: Path, catalog_proxy: tuple[TcpProxy, str]
) -> None:
    proxy, url = catalog_proxy
    data_dir = tmp_path / "data"
    with (
        serving(_catalog_settings(data_dir, url)) as handle,
        grpc.insecure_channel(handle.target) as channel,
    ):
        stub = Stub(channel)
        sent = {f"kept-{i}": os.urandom(1_000 + i) for i in range(3)}
        kept = {name: upload(stub, content, name) for name, content in sent.items()}
        # Two uploads whose bytes are in when the catalog goes away: their commit fails.
        release = threading.Event()
        late = {f"late-{i}": (os.urandom(300_000), str(uuid.uuid4())) for i in range(2)}
        in_flight = [
            stub.UploadData.future(held(content, name, request_id, release))
            for name, (content, request_id) in late.items()
        ]
        wait_until(receiving(2), "both uploads are being received")
        watch = iter(stub.WatchData(pb.WatchDataRequest()))
        proxy.cut()
        release.set()
        for future in in_flight:
            assert_unavailable(future.result)
        assert_unavailable(lambda: next(watch))  # reconnect with the last resume token
        some = next(iter(kept.values()))
        assert_unavailable(lambda: stub.ListData(pb.ListDataRequest()))
        assert_unavailable(lambda: stub.GetData(pb.GetDataRequest(id=some.id)))
        assert_unavailable(lambda: downloaded(stub, some.id))
        assert_unavailable(lambda: upload(stub, b"new", "refused"))
        assert_unavailable(lambda: stub.DeleteData(pb.DeleteDataRequest(id=some.id)))
        stream = stub.UploadDataStream(
            iter(
                [
                    pb.UploadDataStreamRequest(header=pb.UploadDataHeader(filename="s")),
                    pb.UploadDataStreamRequest(chunk=b"stream"),
                    pb.UploadDataStreamRequest(finish=True),
                ]
            )
        )
        (answer,) = list(stream)  # a FileError for that file, not a broken stream
        assert answer.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        wait_until(lambda: health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, "NS")

        proxy.restore()
        wait_until(lambda: health(channel) == health_pb2.HealthCheckResponse.SERVING, "SERVING")
        # No restart: the retried uploads (same request ids) are stored once each.
        for name, (content, request_id) in late.items():
            assert upload(stub, content, name, request_id=request_id).size == len(content)
            sent[name] = content
        again = late["late-0"]
        upload(stub, again[0], "late-0", request_id=again[1])
        assert_intact(stub, sent)
        _collect_garbage(handle)
        blobs = set(stored_blobs(data_dir))
        assert blobs == {hashlib.sha256(c).hexdigest() for c in sent.values()}
        assert list((data_dir / "tmp").iterdir()) == []


def test_a_connection_dropped_mid_statement_is_unavailable(
    tmp_path: Path, catalog_proxy: tuple[TcpProxy, str], postgres_url: str
) -> None:
    proxy, url = catalog_proxy
    direct = sqlalchemy.create_engine(engine_url(postgres_url))
    waiting = sqlalchemy.text(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'data'::regclass"
    )
    try:
        with (
            # No background hashing: its walk of the items would be one more statement
            # waiting on the lock, and the cut could come before both of ours wait.
            serving(
                replace(_catalog_settings(tmp_path / "data", url), hash_images=False)
            ) as handle,
            grpc.insecure_channel(handle.target) as channel,
        ):
            stub = Stub(channel)
            sent = {"first": os.urandom(5_000)}
            upload(stub, sent["first"], "first")
            blocked, request_id = os.urandom(7_000), str(uuid.uuid4())
            with direct.connect() as locker, direct.connect() as observer:
                transaction = locker.begin()
                # Every statement on the items table now waits: the cut comes mid-statement.
                locker.execute(sqlalchemy.text("LOCK TABLE data IN ACCESS EXCLUSIVE MODE"))
                listing = stub.ListData.future(pb.ListDataRequest())
                uploading = stub.UploadData.future(
                    requests(blocked, "blocked", request_id=request_id)
                )
                wait_until(
                    lambda: observer.execute(waiting).scalar_one() >= 2, "statements waiting"
                )
                proxy.cut()
                assert_unavailable(listing.result)
                assert_unavailable(uploading.result)
                transaction.rollback()
            proxy.restore()
            # The pool replaces its dead connections by itself.
            assert upload(stub, blocked, "blocked", request_id=request_id).size == len(blocked)
            sent["blocked"] = blocked
            assert_intact(stub, sent)
    finally:
        direct.dispose()


def test_with_the_token_store_away_calls_are_unavailable_not_refused(
    tmp_path: Path, catalog_proxy: tuple[TcpProxy, str]
) -> None:
    proxy, url = catalog_proxy
    settings = replace(_catalog_settings(tmp_path / "data", url), auth_cache_seconds=0)
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        created = asyncio.run_coroutine_threadsafe(
            handle.running.tokens.create("acme", Role.READ), handle.loop
        ).result(30)
        token = (("authorization", f"Bearer {created.secret}"),)
        stub = Stub(channel)
        assert list(stub.ListData(pb.ListDataRequest(), metadata=token).data) == []
        proxy.cut()
        # Not UNAUTHENTICATED: the token may be fine, the catalog that knows it is away.
        assert_unavailable(lambda: stub.ListData(pb.ListDataRequest(), metadata=token))
        proxy.restore()
        assert list(stub.ListData(pb.ListDataRequest(), metadata=token).data) == []


def _rpcs(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("metalake_rpcs_total", {"method": method, "code": code})
    return value or 0.0


def test_the_sdk_retries_reads_and_uploads_through_a_short_outage(
    tmp_path: Path, catalog_proxy: tuple[TcpProxy, str]
) -> None:
    proxy, url = catalog_proxy
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(os.urandom(20_000))
    second.write_bytes(os.urandom(30_000))
    methods = ("UploadData", "ListData", "GetData", "DownloadData")
    before = {m: _rpcs(m, "UNAVAILABLE") for m in methods}
    with (
        serving(_catalog_settings(tmp_path / "data", url)) as handle,
        Client(handle.target) as client,
    ):
        datalake = client.get_datalake()
        stored = datalake.upload_data(first)
        results: dict[str, Any] = {}

        def run(name: str, call: Callable[[], object]) -> None:
            try:
                results[name] = call()
            except Exception as error:  # reported by the test thread below
                results[name] = error

        calls: dict[str, Callable[[], object]] = {
            "upload": lambda: datalake.upload_data(second),
            "list": lambda: [d.filename for d in datalake.list_data()],
            "get": lambda: datalake.get_data(stored.id).sha256,
            "download": lambda: datalake.download_data(stored.id, tmp_path / "out.bin"),
        }
        proxy.cut()
        threads = [threading.Thread(target=run, args=item) for item in calls.items()]
        for thread in threads:
            thread.start()
        # Every call has failed at least once before the catalog comes back.
        wait_until(
            lambda: all(_rpcs(m, "UNAVAILABLE") > before[m] for m in methods), "calls refused"
        )
        proxy.restore()
        for thread in threads:
            thread.join(60)
        errors = {k: v for k, v in results.items() if isinstance(v, Exception)}
        assert errors == {}
        assert results["upload"].sha256 == hashlib.sha256(second.read_bytes()).hexdigest()
        assert results["list"] in (["first.bin"], ["first.bin", "second.bin"])
        assert results["get"] == stored.sha256
        assert (tmp_path / "out.bin").read_bytes() == first.read_bytes()
        assert sorted(d.filename for d in datalake.list_data()) == ["first.bin", "second.bin"]


def test_the_sdk_watch_reopens_after_its_resume_token_once_the_catalog_is_back(
    tmp_path: Path, catalog_proxy: tuple[TcpProxy, str]
) -> None:
    proxy, url = catalog_proxy
    with (
        serving(_catalog_settings(tmp_path / "data", url)) as handle,
        grpc.insecure_channel(handle.target) as channel,
        Client(handle.target) as client,
    ):
        stub = Stub(channel)
        seen: list[str] = []
        failures: list[BaseException] = []

        def consume() -> None:
            try:
                for event in client.get_datalake().watch():
                    seen.append(event["data"]["filename"])
                    if event["data"]["filename"] == "second":
                        return
            except BaseException as error:  # reported by the test
                failures.append(error)

        watcher = threading.Thread(target=consume)
        watcher.start()
        # The watch starts from "now": upload until it has seen something (it has a token).
        uploaded: list[str] = []
        while not seen and not failures and len(uploaded) < 100:
            uploaded.append(f"first-{len(uploaded)}")
            upload(stub, b"first", uploaded[-1])
            time.sleep(0.1)
        wait_until(lambda: len(seen) > 0, "the watch saw an event")
        before = _rpcs("WatchData", "UNAVAILABLE")
        proxy.cut()
        wait_until(lambda: _rpcs("WatchData", "UNAVAILABLE") > before, "the watch broke")
        proxy.restore()
        upload(stub, b"second", "second")
        watcher.join(60)
        assert failures == []
        # Every event after the watch began, once, in order, across the outage.
        assert seen == [*uploaded[len(uploaded) - len(seen) + 1 :], "second"]


def _break_the_next_read_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Local blob reads fail once, like a dropped bucket connection, after their first chunk;
    the returned list gets the offset where the stream broke."""
    original = LocalBlobStore.read
    broken: list[int] = []

    async def breaks_once(
        self: LocalBlobStore, key: str, *, offset: int = 0, chunk_size: int
    ) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in original(self, key, offset=offset, chunk_size=chunk_size):
            if not broken and sent >= chunk_size:
                broken.append(offset + sent)
                raise EndpointConnectionError(endpoint_url="http://bucket.invalid")
            sent += len(chunk)
            yield chunk

    monkeypatch.setattr(LocalBlobStore, "read", breaks_once)
    return broken


def test_the_sdk_resumes_a_download_that_broke_mid_stream(
    running_server: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = os.urandom(3 * 256 * 1024 + 5)
    with Client(running_server.target) as client:
        datalake = client.get_datalake()
        (tmp_path / "files").mkdir()
        source = tmp_path / "files" / "big.bin"
        source.write_bytes(content)
        stored = datalake.upload_data(source)
        broken = _break_the_next_read_once(monkeypatch)
        target = datalake.download_data(stored.id, tmp_path / "files" / "copy.bin")
    assert broken == [256 * 1024]  # the stream did break, after one chunk
    assert target.read_bytes() == content
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["big.bin", "copy.bin"]


def test_the_sdk_retries_dataset_similar_and_webhook_reads_through_a_short_outage(
    tmp_path: Path, catalog_proxy: tuple[TcpProxy, str]
) -> None:
    proxy, url = catalog_proxy
    methods = (
        "ListDatasets",
        "GetDataset",
        "ListDatasetItems",
        "DiffDatasets",
        "FindSimilar",
        "ListWebhooks",
        "ListWebhookDeliveries",
    )
    before = {m: _rpcs(m, "UNAVAILABLE") for m in methods}
    with (
        serving(_catalog_settings(tmp_path / "data", url)) as handle,
        Client(handle.target) as client,
    ):
        datalake = client.get_datalake()
        (tmp_path / "original.jpg").write_bytes(jpeg(photo(1)))
        (tmp_path / "copy.jpg").write_bytes(jpeg(photo(1), 60))
        original = datalake.upload_data(tmp_path / "original.jpg")
        datalake.create_dataset("train")
        copy = datalake.upload_data(tmp_path / "copy.jpg")
        datalake.create_dataset("train")
        hash_now(handle)
        webhook = datalake.add_webhook("http://127.0.0.1:9/nobody-listens", ["deleted"])
        results: dict[str, Any] = {}

        def run(name: str, call: Callable[[], object]) -> None:
            try:
                results[name] = call()
            except Exception as error:  # reported by the test thread below
                results[name] = error

        calls: dict[str, Callable[[], object]] = {
            "versions": lambda: [d.version for d in datalake.list_datasets("train")],
            "latest": lambda: datalake.get_dataset("train").item_count,
            "items": lambda: [d.id for d in datalake.dataset_items("train", 1)],
            "diff": lambda: [(c.change, c.data_id) for c in datalake.diff_datasets("train", 1)],
            "similar": lambda: [s.data.id for s in datalake.find_similar(original.id)],
            "webhooks": lambda: [w.id for w in datalake.list_webhooks()],
            "deliveries": lambda: list(datalake.webhook_deliveries(webhook.id)),
        }
        proxy.cut()
        threads = [threading.Thread(target=run, args=item) for item in calls.items()]
        for thread in threads:
            thread.start()
        # Every call has failed at least once before the catalog comes back.
        wait_until(
            lambda: all(_rpcs(m, "UNAVAILABLE") > before[m] for m in methods), "calls refused"
        )
        proxy.restore()
        for thread in threads:
            thread.join(60)
        errors = {k: v for k, v in results.items() if isinstance(v, Exception)}
        assert errors == {}
        assert results == {
            "versions": [2, 1],
            "latest": 2,
            "items": [original.id],
            "diff": [("added", copy.id)],
            "similar": [copy.id],
            "webhooks": [webhook.id],
            "deliveries": [],
        }


def test_the_sdk_resumes_a_dataset_download_that_broke_mid_stream(
    running_server: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = os.urandom(3 * 256 * 1024 + 5)
    with Client(running_server.target) as client:
        datalake = client.get_datalake()
        source = tmp_path / "big.bin"
        source.write_bytes(content)
        stored = datalake.upload_data(source)
        datalake.create_dataset("big")
        broken = _break_the_next_read_once(monkeypatch)
        written = datalake.download_dataset("big", tmp_path / "out")
    assert broken == [256 * 1024]  # the stream did break, after one chunk
    assert [(data.id, path.read_bytes()) for data, path in written] == [(stored.id, content)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"{stored.id}_big.bin",
        "manifest.jsonl",
    ]


# The bucket: moto's S3 behind the proxy.


@pytest.fixture
def bucket_proxy(
    s3_url: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TcpProxy]:
    """A proxy to moto; servers built from now on reach the bucket through it."""
    parts = urlsplit(s3_endpoint)
    assert parts.hostname is not None
    with TcpProxy(parts.hostname, parts.port or 80) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{proxy.address}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fail over to the client's retries fast
        yield proxy


def test_a_bucket_outage_is_unavailable_and_gc_reclaims_what_it_left(
    tmp_path: Path, s3_url: str, s3_endpoint: str, bucket_proxy: TcpProxy
) -> None:
    proxy = bucket_proxy
    bucket, prefix = urlsplit(s3_url).netloc, urlsplit(s3_url).path.strip("/")
    s3 = _s3_client(s3_endpoint)
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", blob_url=s3_url)
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        stub = Stub(channel)
        # Big enough for multipart uploads (8 MiB parts), and for a download to outlast every
        # buffer between the bucket and the client.
        sent = {"small": os.urandom(2_000), "big": os.urandom(24 * MiB)}
        kept = {
            name: upload(stub, content, name, chunk_size=1024 * 1024)
            for name, content in sent.items()
        }
        # An upload with a part in the bucket when it goes away.
        release = threading.Event()
        late, late_id = os.urandom(9 * MiB), str(uuid.uuid4())
        in_flight = stub.UploadData.future(held(late, "late", late_id, release))
        wait_until(
            lambda: bool(s3.list_multipart_uploads(Bucket=bucket).get("Uploads")), "a part sent"
        )
        download = iter(stub.DownloadData(pb.DownloadDataRequest(id=kept["big"].id)))
        assert next(download).HasField("data")
        proxy.cut()
        release.set()
        assert_unavailable(in_flight.result)
        assert_unavailable(lambda: b"".join(m.chunk for m in download))
        assert_unavailable(lambda: downloaded(stub, kept["small"].id))
        assert_unavailable(lambda: upload(stub, b"refused", "refused"))

        proxy.restore()
        assert upload(stub, late, "late", request_id=late_id).size == len(late)
        sent["late"] = late
        assert_intact(stub, sent)
        shas = {hashlib.sha256(c).hexdigest() for c in sent.values()}

    # What the failure left: the aborted upload's multipart upload (S3 was away to abort it).
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    gc = subprocess.run(
        [sys.executable, "-m", "metalake.cli", "gc", "--orphan-age=0", f"--data-dir={data_dir}"],
        env={
            **os.environ,
            "AWS_ENDPOINT_URL": s3_endpoint,
            "METALAKE_BLOB_URL": s3_url,
            "METALAKE_UPLOAD_TTL": "0",
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert gc.returncode == 0, gc.stderr
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert sorted(keys) == sorted(f"{prefix}/blobs/{sha}" for sha in shas)


def _s3_client(endpoint: str, config: Config | None = None) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_REGION"],
        config=config,
    )


# Which failures are transient: real errors from the real libraries.


def test_backend_faults_are_told_apart_from_bugs(tmp_path: Path) -> None:
    engine = sqlalchemy.create_engine(
        f"sqlite:///{tmp_path / 'c.sqlite3'}", connect_args={"timeout": 0}
    )
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
    with engine.connect() as writer, engine.connect() as other:
        writer.execute(sqlalchemy.text("BEGIN EXCLUSIVE"))
        with pytest.raises(sqlalchemy.exc.OperationalError) as locked:
            other.execute(sqlalchemy.text("SELECT * FROM t"))
        writer.rollback()
    assert isinstance(backend_fault(locked.value), Unavailable)
    with engine.begin() as connection, pytest.raises(sqlalchemy.exc.OperationalError) as bug:
        connection.execute(sqlalchemy.text("SELECT * FROM no_such_table"))
    assert backend_fault(bug.value) is None  # a bug stays a bug (INTERNAL)
    with engine.begin() as connection, pytest.raises(sqlalchemy.exc.IntegrityError) as twice:
        connection.execute(sqlalchemy.text("INSERT INTO t VALUES (1), (1)"))
    assert backend_fault(twice.value) is None
    engine.dispose()
    full = sqlalchemy.exc.OperationalError(
        "INSERT", {}, sqlite3.OperationalError("database or disk is full")
    )
    assert isinstance(backend_fault(full), LimitReached)

    port = closed_port()
    refused = sqlalchemy.create_engine(f"postgresql+psycopg://u@127.0.0.1:{port}/db")
    with pytest.raises(sqlalchemy.exc.OperationalError) as unreachable:
        refused.connect()
    refused.dispose()
    assert isinstance(unreachable.value.orig, psycopg.OperationalError)
    assert isinstance(backend_fault(unreachable.value), Unavailable)
    s3 = _s3_client(f"http://127.0.0.1:{port}", Config(retries={"max_attempts": 1}))
    with pytest.raises(EndpointConnectionError) as no_bucket:
        s3.head_object(Bucket="b", Key="k")
    assert isinstance(backend_fault(no_bucket.value), Unavailable)
    slow_down = ClientError(
        cast(Any, {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}),
        "PutObject",
    )
    assert isinstance(backend_fault(slow_down), Unavailable)
    denied = ClientError(
        cast(Any, {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}),
        "PutObject",
    )
    assert backend_fault(denied) is None
    for number in (errno.ENOSPC, errno.EDQUOT):
        fault = backend_fault(OSError(number, os.strerror(number), "/data/tmp/x.part"))
        assert isinstance(fault, LimitReached)
        assert "full" in str(fault)
    assert backend_fault(OSError(errno.EACCES, "Permission denied")) is None
    assert backend_fault(NotFound("x")) is None


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
