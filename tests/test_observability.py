"""Metrics, request ids and logs, as an operator reads them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

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


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample /metrics serves, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_calls_codes_bytes_and_extractors(stub: pb_grpc.DatalakeServiceStub) -> None:
    # Counters are per process, and other tests' servers ran in this one: compare with before.
    port = free_port()
    start_metrics_server(f"127.0.0.1:{port}")
    before = scrape(port)
    content = jpeg_bytes()
    stub.UploadData(requests(content, "a.jpg", fill_metadata=True))
    with pytest.raises(grpc.RpcError):
        stub.GetData(pb.GetDataRequest(id="missing"))
    after = scrape(port)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # A call is counted as its handler ends, which may be just after the client has its answer.
    deadline = time.monotonic() + 30
    while not grew("metalake_rpcs_total", code="NOT_FOUND", method="GetData"):
        assert time.monotonic() < deadline, "the failed GetData was never counted"
        time.sleep(0.05)
        after = scrape(port)

    assert grew("metalake_rpcs_total", code="OK", method="UploadData") == 1
    assert grew("metalake_rpcs_total", code="NOT_FOUND", method="GetData") == 1
    assert grew("metalake_rpc_duration_seconds_count", method="UploadData") == 1
    assert grew("metalake_bytes_received_total") >= len(content)
    assert after[("metalake_uploads_in_flight", ())] == 0
    assert (
        sum(
            grew("metalake_extractor_results_total", extractor="pillow", result=result)
            for result in ("hit", "miss", "error")
        )
        == 1
    )
    assert grew("metalake_extractor_duration_seconds_count", extractor="pillow") == 1


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


@pytest.mark.parametrize(
    ("module", "not_imported"),
    [
        ("metalake.server.auth", "metalake.server.observability"),
        ("metalake.server.observability", "metalake.server.auth"),
    ],
)
def test_auth_and_observability_do_not_import_each_other(module: str, not_imported: str) -> None:
    """Both build on metalake.server.calls (handler wrapping, request ids, aborts), so either
    can change without the other, and no import cycle waits for the unwary."""
    check = f"import sys, {module}; assert {not_imported!r} not in sys.modules"
    completed = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
