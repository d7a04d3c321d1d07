"""Shared fixtures: a real metalake server, started in-process on port 0, and clients for it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from metalake.v1 import datalake_pb2_grpc
from server.app import RunningServer, start
from server.config import Settings


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
