"""Load: many client processes at once against one server; nothing fails, nothing is lost."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from metalake import Client
from tests import loadclient
from tests.serverprocess import ServerProcess

PROCESSES, THREADS, PER_THREAD = 16, 4, 3  # 64 concurrent streams


@pytest.mark.slow
def test_64_concurrent_streams_from_separate_processes(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    for process in range(PROCESSES):
        for index in range(THREADS * PER_THREAD):
            size = [10_000, 150_000, 600_000][index % 3]
            (files / f"p{process:02d}-{index:02d}.bin").write_bytes(os.urandom(size))
    # Fewer upload slots than streams: half the clients are told to come back, and must.
    with ServerProcess(
        tmp_path / "data", tmp_path / "server.log", METALAKE_MAX_CONCURRENT_UPLOADS="32"
    ) as server:
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            results = manager.list()
            start = context.Barrier(PROCESSES)
            clients = [
                context.Process(
                    target=loadclient.run,
                    args=(server.target, str(files), p, THREADS, PER_THREAD, start, results),
                )
                for p in range(PROCESSES)
            ]
            for client in clients:
                client.start()
            for client in clients:
                client.join(300)
            assert [c.exitcode for c in clients] == [0] * PROCESSES
            acknowledged = list(results)

        expected = PROCESSES * THREADS * PER_THREAD
        assert len(acknowledged) == expected
        stored = {d.id: d for d in Client(server.target).get_datalake().list_data(page_size=1000)}
        assert len(stored) == expected
        for name, sha256, data_id in acknowledged:
            assert stored[data_id].sha256 == sha256
            assert stored[data_id].custom_id == name
        assert list((tmp_path / "data" / "tmp").iterdir()) == []


def test_server_memory_stays_flat_for_a_large_upload(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        block = os.urandom(1024 * 1024)
        for _ in range(200):
            handle.write(block)
    with ServerProcess(tmp_path / "data", tmp_path / "server.log") as server:
        # Warm up (imports, pools) with a small file, not the big one: its peak is what we watch.
        small = tmp_path / "small.bin"
        small.write_bytes(os.urandom(1024 * 1024))
        Client(server.target).get_datalake().upload_data(small)
        before = server.peak_memory()
        data = Client(server.target).get_datalake().upload_data(big)
        grew = server.peak_memory() - before
    assert data.size == 200 * 1024 * 1024
    assert grew < 64 * 1024 * 1024, f"peak memory grew by {grew / 2**20:.0f} MiB for 200 MiB"
