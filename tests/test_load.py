"""Load: many client processes at once against one server process; nothing fails, nothing is lost.

And memory: a big upload does not grow the server by anything like the file's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests import loadclient
from tests.conftest import stored_blobs
from tests.serverprocess import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 64  # each with an UploadData and an UploadDataStream at once: 128 streams
FILES_PER_PROCESS = 8  # half over each
# Far fewer upload slots than files in flight, so that many are refused and must come back.
UPLOAD_SLOTS = 16
MIB = 1024 * 1024


def _list_everything(target: str) -> list[pb.Data]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        found: list[pb.Data] = []
        token = ""
        while True:
            page = stub.ListData(pb.ListDataRequest(page_size=1000, page_token=token), timeout=30)
            found += page.data
            if not (token := page.next_page_token):
                return found


@pytest.mark.slow
def test_64_client_processes_store_every_file_exactly_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with ServerProcess(
        data_dir, tmp_path / "server.log", METALAKE_MAX_CONCURRENT_UPLOADS=str(UPLOAD_SLOTS)
    ) as server:
        command = [sys.executable, "-m", "tests.loadclient", server.target]
        logs = [tmp_path / f"client-{p:03d}.log" for p in range(PROCESSES)]
        clients: list[subprocess.Popen[bytes]] = []
        for process, log in enumerate(logs):
            with log.open("wb") as stderr:
                clients.append(
                    subprocess.Popen(
                        [*command, str(process), str(FILES_PER_PROCESS)],
                        cwd=ROOT,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=stderr,
                    )
                )

        def kill_all() -> None:
            for client in clients:
                client.kill()

        # Clients give up on their own after loadclient.DEADLINE; this only guards against a hang.
        watchdog = threading.Timer(loadclient.DEADLINE + 30, kill_all)
        watchdog.start()
        try:
            for client in clients:  # all connected before any streams: they start together
                assert client.stdout is not None
                assert client.stdout.readline() == b"ready\n"
            for client in clients:
                assert client.stdin is not None
                client.stdin.write(b"go\n")
                client.stdin.close()
            outputs = [client.stdout.read() for client in clients if client.stdout is not None]
            codes = [client.wait() for client in clients]
        finally:
            watchdog.cancel()
            for client in clients:
                if client.poll() is None:
                    client.kill()
                    client.wait()
        failed = {p: logs[p].read_text()[-2000:] for p, code in enumerate(codes) if code != 0}
        assert not failed, f"client processes failed: {failed}"
        listed = _list_everything(server.target)
        assert server.process is not None
        assert server.process.poll() is None, "the server died"

    acknowledged: list[dict[str, Any]] = []
    retries = {"call": 0, "stream": 0}
    for output in outputs:
        for line in output.decode().splitlines():
            record = json.loads(line)
            if "retries" in record:
                for via, count in record["retries"].items():
                    retries[via] += count
            else:
                acknowledged.append(record)

    expected = PROCESSES * FILES_PER_PROCESS
    assert len(acknowledged) == expected
    assert len({a["name"] for a in acknowledged}) == expected  # every file, once
    assert {a["via"] for a in acknowledged} == {"call", "stream"}
    # Stored exactly once each: as many items as files, each under its own id.
    assert len(listed) == expected
    by_id = {data.id: data for data in listed}
    assert len(by_id) == expected
    for ack in acknowledged:
        data = by_id[ack["id"]]
        assert (data.filename, data.sha256, data.size) == (ack["name"], ack["sha256"], ack["size"])
    # The limit was reached and every refused upload came back and got in: the point of the test.
    assert retries["call"] + retries["stream"] > 0, "no upload was refused: raise the load"
    # Nothing left half-written, and one blob per distinct content (each file is distinct).
    assert list((data_dir / "tmp").iterdir()) == []
    assert len(stored_blobs(data_dir)) == expected


def _generated(size: int, chunk: int) -> Iterator[pb.UploadDataRequest]:
    """`size` bytes from one repeated random block: the client never holds the file."""
    yield pb.UploadDataRequest(header=pb.UploadDataHeader(filename="big.bin"))
    block = os.urandom(chunk)
    for _ in range(size // chunk):
        yield pb.UploadDataRequest(chunk=block)


@pytest.mark.slow
def test_server_memory_stays_flat_for_a_200_mib_upload(tmp_path: Path) -> None:
    with (
        ServerProcess(tmp_path / "data", tmp_path / "server.log") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.DatalakeServiceStub(channel)
        # Warm up (lazy imports, thread pools, the catalog) with a small upload first: the big
        # one's growth is what is measured.
        stub.UploadData(_generated(MIB, 256 * 1024), timeout=60)
        before = server.peak_memory()
        # A fast client on loopback: flow control, not the server's memory, must absorb it.
        answer = stub.UploadData(_generated(200 * MIB, 256 * 1024), timeout=120)
        grew = server.peak_memory() - before
    assert answer.data.size == 200 * MIB
    assert grew < 64 * MIB, f"server peak memory grew by {grew / MIB:.0f} MiB for 200 MiB"
