"""Shared fixtures: a real metalake server, started in-process on port 0, and clients for it."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import grpc
import pytest
import sqlalchemy
from moto.server import ThreadedMotoServer

from metalake.server.app import RunningServer, start
from metalake.server.blobstore import LocalBlobStore
from metalake.server.catalog import SqlCatalog
from metalake.server.config import Settings
from metalake.server.schema_versions import engine_url
from metalake.v1 import datalake_pb2_grpc


@dataclass
class ServerHandle:
    """A server running on its own event loop in a background thread."""

    target: str
    data_dir: Path
    running: RunningServer
    loop: asyncio.AbstractEventLoop


@contextmanager
def serving(settings: Settings) -> Iterator[ServerHandle]:
    """Run a real server with these settings on its own loop, in a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="metalake-server", daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start(settings), loop).result(timeout=30)
    try:
        yield ServerHandle(f"127.0.0.1:{running.port}", settings.data_dir, running, loop)
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(grace=1), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture
def running_server(tmp_path: Path) -> Iterator[ServerHandle]:
    with serving(Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0")) as handle:
        yield handle


@pytest.fixture
def server_target(running_server: ServerHandle) -> str:
    """The address of a fresh metalake server with an empty datalake."""
    return running_server.target


@pytest.fixture
def channel(server_target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server_target) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.Channel) -> datalake_pb2_grpc.DatalakeServiceStub:
    return datalake_pb2_grpc.DatalakeServiceStub(channel)


# The catalog contract suite's engines: SQLite, and a real PostgreSQL.

POSTGRES_URL = os.environ.get(
    "METALAKE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def postgres_or_skip() -> None:
    """PostgreSQL tests skip where there is none, except where it is required (CI)."""
    try:
        engine = sqlalchemy.create_engine(engine_url(POSTGRES_URL))
        with engine.connect():
            pass
        engine.dispose()
    except sqlalchemy.exc.OperationalError as error:
        if os.environ.get("METALAKE_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL is required here but unreachable at {POSTGRES_URL}: {error}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} (set METALAKE_TEST_POSTGRES_URL)")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL to a fresh, empty schema in the test database, dropped afterwards."""
    postgres_or_skip()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(engine_url(POSTGRES_URL))
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def catalog(catalog_url: str) -> AsyncIterator[SqlCatalog]:
    catalog = SqlCatalog.open(catalog_url, migrate=True)
    try:
        yield catalog
    finally:
        await catalog.close()


# S3: moto's server mode over real HTTP on loopback.

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for the whole session."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the AWS_* environment points at moto."""
    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    bucket = f"metalake-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/lake"


def stored_blobs(data_dir: Path) -> list[str]:
    """The key of every blob stored in a data directory's local store, packed or as a file,
    sorted: what a process that opened it now would find."""
    store = LocalBlobStore(data_dir)
    try:
        return sorted(key for key, _ in store.blob_keys())
    finally:
        store.close()
