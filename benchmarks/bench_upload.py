"""Uploads: throughput and memory of big files, files per second of many small ones.

Every figure is beside a baseline measured in the same run: a bare grpc.aio server that only
discards the same streams (benchmarks/bare_server.py), so the ratio is what metalake's work
(hashing, writing, fsync, catalog commits, extraction) costs on top of gRPC itself.

    METALAKE_BENCH_SCALE=0.1 python -m benchmarks upload    # 100 MiB big file, 200 small files
"""

from __future__ import annotations

import io
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from PIL import Image

from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.serverprocess import ServerProcess

SCALE = float(os.environ.get("METALAKE_BENCH_SCALE", "1"))
GIB = 1024**3
MIB = 1024**2
CHUNK_SIZES = (64 * 1024, 256 * 1024, 1024 * 1024)  # 256 KiB is the SDK's
SMALL_FILES = max(100, int(2000 * SCALE))
CLIENTS = 16
WINDOW = 16


def big_stream(size: int, chunk: int) -> Iterator[pb.UploadDataRequest]:
    """A `size`-byte file as chunks of one random block: the client holds one chunk."""
    yield pb.UploadDataRequest(header=pb.UploadDataHeader(filename="big.bin"))
    block = os.urandom(chunk)
    sent = 0
    while sent < size:
        piece = block[: min(chunk, size - sent)]
        yield pb.UploadDataRequest(chunk=piece)
        sent += len(piece)


def upload_big(target: str, size: int, chunk: int) -> float:
    """MB/s of one upload of `size` bytes."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        started = time.perf_counter()
        stub.UploadData(big_stream(size, chunk), timeout=600)
        return size / MIB / (time.perf_counter() - started)


def small_jpegs(count: int) -> list[bytes]:
    """Real ~100 KiB JPEGs with EXIF, each distinct (a different trailer after EOI)."""
    rng = random.Random(3)
    image = Image.frombytes("RGB", (290, 290), rng.randbytes(290 * 290 * 3))
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0132] = "2024:05:01 12:00:00"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif)
    base = buffer.getvalue()
    return [base + i.to_bytes(8, "big") for i in range(count)]


def _file_requests(name: str, content: bytes, fill: bool) -> Iterator[pb.UploadDataRequest]:
    yield pb.UploadDataRequest(header=pb.UploadDataHeader(filename=name, fill_metadata=fill))
    for start in range(0, len(content), 256 * 1024):
        yield pb.UploadDataRequest(chunk=content[start : start + 256 * 1024])


def per_call(target: str, files: list[bytes], fill: bool) -> float:
    """Files/s with one UploadData call per file from CLIENTS concurrent clients."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)

        def send(index: int) -> None:
            stub.UploadData(_file_requests(f"{index}.jpg", files[index], fill), timeout=120)

        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(send, range(len(files))))
        return len(files) / (time.perf_counter() - started)


def streamed(target: str, files: list[bytes], fill: bool) -> float:
    """Files/s over one UploadDataStream, WINDOW files in flight."""
    window = threading.Semaphore(WINDOW)

    def requests() -> Iterator[pb.UploadDataStreamRequest]:
        for index, content in enumerate(files):
            window.acquire()
            yield pb.UploadDataStreamRequest(
                header=pb.UploadDataHeader(filename=f"{index}.jpg", fill_metadata=fill)
            )
            for start in range(0, len(content), 256 * 1024):
                yield pb.UploadDataStreamRequest(chunk=content[start : start + 256 * 1024])
            yield pb.UploadDataStreamRequest(finish=True)

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        started = time.perf_counter()
        answers = 0
        for answer in stub.UploadDataStream(requests(), timeout=600):
            if answer.WhichOneof("result") != "data":
                raise RuntimeError(f"file {answer.file_index} failed: {answer.error.message}")
            answers += 1
            window.release()
        assert answers == len(files)
        return len(files) / (time.perf_counter() - started)


def _server(scratch: Path, name: str, bare: bool = False) -> ServerProcess:
    return ServerProcess(
        scratch / name,
        scratch / f"{name}.log",
        module="benchmarks.bare_server" if bare else "server",
        METALAKE_MAX_CONCURRENT_UPLOADS="1024",
    )


def _row(label: str, ours: float, bare: float, unit: str) -> None:
    print(f"| {label} | {ours:,.0f} {unit} | {bare:,.0f} {unit} | {ours / bare:.2f} |", flush=True)


def main() -> None:
    big = int(GIB * SCALE)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        print(f"| big file ({big / MIB:,.0f} MiB), UploadData | metalake | bare gRPC | ratio |")
        print("|---|---|---|---|")
        with _server(scratch, "lake") as lake, _server(scratch, "bare", bare=True) as bare:
            for chunk in CHUNK_SIZES:
                ours = upload_big(lake.target, big, chunk)
                ceiling = upload_big(bare.target, big, chunk)
                _row(f"chunks of {chunk // 1024} KiB", ours, ceiling, "MB/s")

        print()
        print("| server peak memory (VmHWM) | after start | after upload | growth |")
        print("|---|---|---|---|")
        for size in (10 * MIB, big):
            with _server(scratch, f"memory-{size}") as lake:
                idle = lake.peak_memory()
                upload_big(lake.target, size, 256 * 1024)
                peak = lake.peak_memory()
            print(
                f"| {size / MIB:,.0f} MiB upload | {idle / MIB:.0f} MiB | {peak / MIB:.0f} MiB "
                f"| {(peak - idle) / MIB:.0f} MiB |",
                flush=True,
            )

        files = small_jpegs(SMALL_FILES)
        average = sum(map(len, files)) / len(files) / 1024
        print()
        print(f"| {len(files):,} JPEGs of {average:.0f} KiB | metalake | bare gRPC | ratio |")
        print("|---|---|---|---|")
        runs: list[tuple[str, Callable[[str, list[bytes], bool], float], bool]] = [
            (f"one call per file, {CLIENTS} clients", per_call, False),
            (f"one call per file, {CLIENTS} clients, fill_metadata", per_call, True),
            (f"one stream, window of {WINDOW}", streamed, False),
            (f"one stream, window of {WINDOW}, fill_metadata", streamed, True),
        ]
        with _server(scratch, "small") as lake, _server(scratch, "bare-small", bare=True) as bare:
            for label, run, fill in runs:
                ours = run(lake.target, files, fill)
                ceiling = run(bare.target, files, fill)
                _row(label, ours, ceiling, "files/s")


if __name__ == "__main__":
    main()
