"""Metrics, request ids and logs, as an operator reads them."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from metalake import metadata as md
from metalake.server import thumbnails
from metalake.server.auth import Role
from metalake.server.config import Settings
from metalake.server.observability import (
    CONTENT_LOGGERS,
    QUIET_LOGGERS,
    configure_logging,
    start_metrics_server,
)
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


def test_metrics_show_how_many_items_each_catalog_commit_took(
    stub: pb_grpc.DatalakeServiceStub,
) -> None:
    port = free_port()
    start_metrics_server(f"127.0.0.1:{port}")
    before = scrape(port)
    with ThreadPoolExecutor(6) as pool:
        stored = list(
            pool.map(
                lambda i: stub.UploadData(requests(os.urandom(1000 + i), f"{i}.bin")), range(6)
            )
        )
    after = scrape(port)

    def grew(name: str) -> float:
        return after.get((name, ()), 0.0) - before.get((name, ()), 0.0)

    assert len({response.data.id for response in stored}) == 6
    assert grew("metalake_catalog_batch_items_sum") == 6  # every item, in some batch
    batches = grew("metalake_catalog_batch_items_count")
    assert 1 <= batches <= 6
    assert grew("metalake_catalog_batch_duration_seconds_count") == batches
    assert grew("metalake_catalog_batch_duration_seconds_sum") > 0


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
    # At debug: each stored item's line too, with its request id (and no secret in any line).
    configure_logging(logging.DEBUG, json_output=True, stream=stream)
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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS + CONTENT_LOGGERS}
    show_warning = warnings.showwarning
    try:
        yield
    finally:
        warnings.showwarning = show_warning
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize(
    ("terminal", "env", "expected"),
    [
        (True, None, "text"),
        (False, None, "json"),
        (True, "json", "json"),
        (False, "text", "text"),
        (False, " TEXT ", "text"),
        (True, "xml", "text"),  # unknown: the default, and a warning saying so
    ],
)
def test_the_log_format_follows_the_terminal_unless_told(
    terminal: bool,
    env: str | None,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    if env is None:
        monkeypatch.delenv("METALAKE_LOG_FORMAT", raising=False)
    else:
        monkeypatch.setenv("METALAKE_LOG_FORMAT", env)
    stream = _Terminal() if terminal else io.StringIO()
    configure_logging(stream=stream)
    logging.getLogger("metalake.server.app").info("hello")
    lines = stream.getvalue().splitlines()
    if expected == "json":
        assert [json.loads(line)["message"] for line in lines] == ["hello"]
    else:
        assert all(not line.startswith("{") for line in lines)
        assert lines[-1].endswith("INFO    metalake.server.app: hello")
        if env == "xml":
            assert "METALAKE_LOG_FORMAT='xml' is not json or text" in lines[0]


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        (None, ["info", "warning", "error"]),
        ("debug", ["debug", "info", "warning", "error"]),
        (" WARNING ", ["warning", "error"]),
        ("error", ["error"]),
        ("loud", ["info", "warning", "error"]),  # unknown: info, and a warning saying so
    ],
)
def test_the_log_level_is_info_unless_told(
    env: str | None, shown: list[str], monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    if env is None:
        monkeypatch.delenv("METALAKE_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("METALAKE_LOG_LEVEL", env)
    stream = io.StringIO()
    configure_logging(json_output=True, stream=stream)
    log = logging.getLogger("metalake.server.ingest.pipeline")
    for level in ("debug", "info", "warning", "error"):
        getattr(log, level)(level)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    if env == "loud":
        assert "METALAKE_LOG_LEVEL='loud' is not one of debug, info" in records.pop(0)["message"]
    assert [r["message"] for r in records] == shown


def test_text_logs_keep_request_ids_and_every_logger_is_under_metalake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.setenv("METALAKE_LOG_FORMAT", "text")
    monkeypatch.setenv("METALAKE_LOG_LEVEL", "debug")
    stream = io.StringIO()
    configure_logging(stream=stream)
    settings = Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0")
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        pb_grpc.DatalakeServiceStub(channel).UploadData(
            requests(b"bytes", "a.bin"), metadata=(("x-request-id", "req-456"),)
        )
    # Other libraries: their chatter is quieted, their warnings come under metalake.lib.
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    logging.getLogger("botocore.credentials").warning("no credentials")
    lines = stream.getvalue().splitlines()
    line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) +(\S+): (.*)$")
    parsed = [line.match(text) for text in lines]
    assert all(parsed), lines
    names = {match.group(2) for match in parsed if match}
    assert all(name.startswith("metalake.") for name in names), names
    assert "metalake.lib.botocore.credentials" in names
    assert not any("Context impl" in text for text in lines)
    stored = [text for text in lines if ": stored " in text]
    assert len(stored) == 1
    assert stored[0].endswith("[req-456]")
    assert any("catalog schema migrated from empty to" in text for text in lines)


def test_json_logs_put_every_logger_under_metalake(
    tmp_path: Path, json_logs: io.StringIO, restore_logging: None
) -> None:
    settings = Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0")
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        pb_grpc.DatalakeServiceStub(channel).UploadData(
            requests(b"bytes", "a.bin"), metadata=(("x-request-id", "req-789"),)
        )
    logging.getLogger("alembic.runtime.migration").warning("a warning")
    records = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    assert records
    assert all(r["logger"].startswith("metalake.") for r in records), records
    assert {"logger": "metalake.lib.alembic.runtime.migration", "message": "a warning"}.items() <= (
        records[-1].items()
    )
    assert [r["request_id"] for r in records if r["message"].startswith("stored ")] == ["req-789"]


@pytest.mark.skipif(sys.platform != "linux", reason="thread names as the kernel shows them")
def test_the_servers_io_threads_are_named_where_top_and_perf_see_them(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0")
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        pb_grpc.DatalakeServiceStub(channel).UploadData(requests(b"bytes", "a.bin"))
        names = set()
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                names.add(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    assert "metalake-io" in names  # the catalog's and the blob store's threads


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


@pytest.mark.parametrize("json_output", [False, True])
def test_log_times_read_as_logging_formats_them(json_output: bool, restore_logging: None) -> None:
    """The server formats each second's date and time once; every line's time still reads as
    logging's own formatting of it would, in either format."""
    configure_logging(stream=io.StringIO(), json_output=json_output)
    formatter = logging.getLogger().handlers[0].formatter
    assert formatter is not None
    reference = logging.Formatter(datefmt=formatter.datefmt)
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_600_000_000.25):
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created % 1) * 1000
        for datefmt in (formatter.datefmt, None, "%H:%M:%S"):
            assert formatter.formatTime(record, datefmt) == reference.formatTime(record, datefmt)


def _tiff_claiming_samples_per_pixel(samples: int) -> bytes:
    """A small TIFF whose SamplesPerPixel (tag 277) says `samples`: Pillow refuses it, logging an
    ERROR of its own as it does."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if struct.unpack_from("<H", data, entry)[0] == 277:
            struct.pack_into("<HHIH", data, entry, 277, 3, 1, samples)
            return bytes(data)
    raise AssertionError("Pillow wrote no SamplesPerPixel")


def _json_logs_at(level: str, monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The server's logging set up as METALAKE_LOG_LEVEL=`level` makes it, into a string."""
    monkeypatch.setenv("METALAKE_LOG_LEVEL", level)
    stream = io.StringIO()
    configure_logging(json_output=True, stream=stream)
    return stream


@pytest.mark.parametrize(("level", "shown"), [("info", False), ("debug", True)])
def test_each_stored_item_is_logged_only_at_debug(
    level: str,
    shown: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """A line per stored item would be thousands a second under load, and cost 5-7% of the
    server's CPU per small file: the default (info) writes none, debug follows every upload."""
    stream = _json_logs_at(level, monkeypatch)
    settings = Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0")
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        for name in ("a.bin", "b.bin"):
            stub.UploadData(requests(name.encode(), name))
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any(r["level"] == "INFO" for r in records)  # the server's start, at both levels
    stored = [r for r in records if r["message"].startswith("stored ")]
    assert [r["level"] for r in stored] == (["DEBUG", "DEBUG"] if shown else [])


@pytest.mark.parametrize(("level", "shown"), [("info", False), ("debug", True)])
def test_what_pillow_logs_about_a_clients_file_shows_only_at_debug(
    level: str,
    shown: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    stream = _json_logs_at(level, monkeypatch)
    path = tmp_path / "bad.tif"
    path.write_bytes(_tiff_claiming_samples_per_pixel(65535))
    assert thumbnails.render(path, 64, filename="bad.tif") is None  # no preview, no failure
    pillow = [
        json.loads(line)
        for line in stream.getvalue().splitlines()
        if "samples per pixel" in line.lower()
    ]
    if shown:
        assert [(r["level"], r["logger"]) for r in pillow] == [
            ("ERROR", "metalake.lib.PIL.TiffImagePlugin")
        ]
    else:
        assert pillow == []  # a client's broken file is no error of the server's


@pytest.mark.parametrize(("level", "pillows_shown"), [("info", False), ("debug", True)])
def test_python_warnings_are_json_lines_and_pillows_show_only_at_debug(
    level: str,
    pillows_shown: bool,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    stream = _json_logs_at(level, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # Pillow's own warning about a client's file, from where Pillow issues it...
        with Image.open(io.BytesIO(_truncated_exif_jpeg())) as image:
            image.getexif()
        # ...and anybody else's.
        warnings.warn_explicit("the old way is going", FutureWarning, "elsewhere.py", 7)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]  # JSON, every line
    other = [r for r in records if r["logger"] == "metalake.lib.py.warnings"]
    assert [r["message"] for r in other] == ["FutureWarning: the old way is going (elsewhere.py:7)"]
    pillow = [r for r in records if r["logger"] == "metalake.lib.PIL"]
    assert bool(pillow) == pillows_shown
    assert all("Corrupt EXIF data" in r["message"] for r in pillow)


def _truncated_exif_jpeg() -> bytes:
    """A JPEG whose EXIF directory claims more than its segment holds: Pillow warns "Corrupt
    EXIF data" as it reads it."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x010F] = "Acme"
    Image.new("RGB", (4, 4)).save(buffer, "JPEG", exif=exif)
    data = bytearray(buffer.getvalue())
    tiff = data.index(b"Exif\x00\x00") + 6
    struct.pack_into("<H", data, tiff + 8, 40)  # IFD0's entry count, past the segment's end
    return bytes(data)
