"""Metrics, request ids and logs, as an operator reads them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from metalake import metadata as md
from metalake.server.auth import Role
from metalake.server.config import Settings
from metalake.server.observability import configure_logging, start_metrics_server
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, serving
from tests.test_service import jpeg_bytes, requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_metrics_count_calls_codes_bytes_and_extractors(stub: pb_grpc.DatalakeServiceStub) -> None:
    port = free_port()
    start_metrics_server(f"127.0.0.1:{port}")
    content = jpeg_bytes()
    stub.UploadData(requests(content, "a.jpg", fill_metadata=True))
    with pytest.raises(grpc.RpcError):
        stub.GetData(pb.GetDataRequest(id="missing"))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'metalake_rpcs_total{code="OK",method="UploadData"}' in text
    assert 'metalake_rpcs_total{code="NOT_FOUND",method="GetData"}' in text
    assert 'metalake_rpc_duration_seconds_count{method="UploadData"}' in text
    received = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("metalake_bytes_received_total ")
    ]
    assert received
    assert received[0] >= len(content)
    assert "metalake_uploads_in_flight 0.0" in text
    assert 'metalake_extractor_results_total{extractor="pillow"' in text
    assert 'metalake_extractor_duration_seconds_count{extractor="pillow"}' in text


def test_every_call_gets_a_request_id_in_trailing_metadata(
    stub: pb_grpc.DatalakeServiceStub,
) -> None:
    _, call = stub.ListData.with_call(pb.ListDataRequest())
    ids = [v for k, v in call.trailing_metadata() if k == "x-request-id"]
    assert len(ids) == 1
    assert len(ids[0]) == 32
    _, call = stub.ListData.with_call(
        pb.ListDataRequest(), metadata=(("x-request-id", "device-7:frame-42"),)
    )
    assert ("x-request-id", "device-7:frame-42") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetData(pb.GetDataRequest(id="missing"))
    trailing: Any = caught.value.trailing_metadata()
    assert any(key == "x-request-id" for key, _ in trailing)


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging(json_output=True, stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_logs_are_json_with_request_ids_and_no_secrets(
    tmp_path: Path, json_logs: io.StringIO
) -> None:
    settings = replace(
        Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0"), auth_cache_seconds=0
    )
    with serving(settings) as handle:
        token = _token(handle)
        with grpc.insecure_channel(handle.target) as channel:
            stub = pb_grpc.DatalakeServiceStub(channel)
            metadata = {"reference": "SECRET-REFERENCE-7", "acquired_by": "Jane Roe"}
            stub.UploadData(
                requests(b"bytes", "a.bin", metadata=md.normalize(metadata)),
                metadata=(("authorization", f"Bearer {token}"), ("x-request-id", "req-123")),
            )
    lines = json_logs.getvalue().splitlines()
    records = [json.loads(line) for line in lines]
    stored = [r for r in records if r["message"].startswith("stored ")]
    assert stored
    assert stored[0]["request_id"] == "req-123"
    assert {"time", "level", "logger", "message"} <= set(stored[0])
    everything = "\n".join(lines)
    for secret in (token, "SECRET-REFERENCE-7", "Jane Roe"):
        assert secret not in everything


def _token(handle: ServerHandle) -> str:
    created = asyncio.run_coroutine_threadsafe(
        handle.running.tokens.create("acme", Role.WRITE), handle.loop
    ).result(30)
    return created.secret


def test_log_times_read_as_logging_formats_them() -> None:
    """The server formats each second's date and time once; every line still reads as
    logging's own default format would."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging(stream=io.StringIO(), json_output=False)
        formatter = root.handlers[0].formatter
    finally:
        root.handlers[:], root.level = handlers, level
    reference = logging.Formatter()
    assert formatter is not None
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_600_000_000.25):
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created % 1) * 1000
        assert formatter.formatTime(record) == reference.formatTime(record)
