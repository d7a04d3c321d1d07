"""Small files: the server's CPU time per stored file, beside files/s, against a bare server.

Distinct camera JPEGs of about 160 KiB (EXIF with GPS), as one UploadData per file from 16
concurrent clients and over one UploadDataStream with 16 files in flight, each without and with
fill_metadata; on the embedded default (SQLite + local files) and on PostgreSQL + S3 (moto's
server, in a process of its own); with 1 and 2 server processes (`--workers`). Every run is
measured beside a bare grpc.aio server that only discards the same streams
(benchmarks/bare_server.py), in the same run.

CPU per file is utime + stime of the server's processes (from /proc/<pid>/stat, the server and
any process it started) over a run, divided by the files it stored. It is the figure that holds
on a shared machine: files/s moves with the neighbours' load, the CPU a file costs barely does.
PostgreSQL's and moto's own CPU is not counted (they are other services). Nothing here asserts
a timing. The runs without and with fill_metadata go back to back on each server, round after
round, and what fill_metadata adds is the median of the rounds' paired differences.

The servers run without the background hashing of images for near-duplicate search
(METALAKE_HASH_IMAGES=0): it is not the upload's path, and it runs when it gets to it, so the
share of its work a run's window catches would vary from run to run. Its cost is measured apart,
at the end: the CPU per image of a server with hashing on, over a run and until the server is idle
again (the hasher caught up), minus the same for a server with hashing off.

    python -m benchmarks small_files                              # 1,000 files a run, 3 runs
    METALAKE_BENCH_SCALE=0.2 python -m benchmarks small_files     # 200 files, 1 run: quick
    METALAKE_BENCH_BACKENDS=sqlite python -m benchmarks small_files   # the embedded default only
    METALAKE_BENCH_WORKERS=1 python -m benchmarks small_files     # one server process only
    METALAKE_BENCH_COMPARE=../main python -m benchmarks small_files  # and another checkout's

METALAKE_BENCH_COMPARE names another checkout of metalake (e.g. `git worktree add ../main
main`): its server runs beside this one's and the bare one, interleaved, so a change is measured
against what it changes in the same conditions, the only comparison that holds on a busy machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import boto3
import grpc
import sqlalchemy

from benchmarks.images import camera_jpegs
from metalake.client import CHUNK_SIZE
from metalake.server.schema_versions import engine_url
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.serverprocess import ServerProcess

SCALE = float(os.environ.get("METALAKE_BENCH_SCALE", "1"))
FILES = max(50, round(1000 * SCALE))
ROUNDS = 3 if SCALE >= 0.5 else 1  # runs per row and server; CPU: the median, files/s: the best
BACKENDS = os.environ.get("METALAKE_BENCH_BACKENDS", "sqlite,postgresql").split(",")
COMPARE = os.environ.get("METALAKE_BENCH_COMPARE")
WORKERS = [int(w) for w in os.environ.get("METALAKE_BENCH_WORKERS", "1,2").split(",")]
POSTGRES_URL = os.environ.get(
    "METALAKE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
CLIENTS = 16  # concurrent clients of the one-call-per-file runs, a channel each
WINDOW = 16  # files in flight on the stream
SIDE = 460  # pixels: about 160 KiB at quality 85, like a small camera JPEG
_TICKS = os.sysconf("SC_CLK_TCK")


# --- what the server spends ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and of every process it started that is still alive."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses: fields start after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICKS
    family, grew = {pid}, True
    while grew:  # children, then their children
        grew = False
        for child, parent in parents.items():
            if parent in family and child not in family:
                family.add(child)
                grew = True
    return sum(times.get(member, 0.0) for member in family)


# --- the files ---------------------------------------------------------------------------------


def jpegs(count: int, salt: str) -> list[bytes]:
    """`count` distinct JPEGs of about 160 KiB with camera EXIF; `salt` keeps one run's files
    apart from another's, so no file of any run is a duplicate (the blob store would
    deduplicate it)."""
    return camera_jpegs(count, side=SIDE, salt=salt)


# --- the clients -------------------------------------------------------------------------------


def _call_requests(name: str, content: bytes, fill: bool) -> list[pb.UploadDataRequest]:
    header = pb.UploadDataHeader(filename=name, fill_metadata=fill)
    chunks = [content[i : i + CHUNK_SIZE] for i in range(0, len(content), CHUNK_SIZE)]
    return [pb.UploadDataRequest(header=header), *(pb.UploadDataRequest(chunk=c) for c in chunks)]


async def per_call(
    target: str, files: list[bytes], fill: bool, measure: Callable[[], Any]
) -> float:
    """Files/s with one UploadData call per file, from CLIENTS concurrent clients.

    `measure` is called when the first call starts and when the last answer arrived; channels
    connect before and close after, outside the measured span.
    """
    remaining = list(enumerate(files))
    remaining.reverse()
    ready, answered, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()
    idle = 0

    async def client() -> None:
        nonlocal idle
        # A channel (a connection) per client, as separate devices would have.
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.DatalakeServiceStub(channel)
            await channel.channel_ready()
            await ready.wait()
            while remaining:
                index, content = remaining.pop()
                requests = _call_requests(f"{index}.jpg", content, fill)
                response = await stub.UploadData(iter(requests), timeout=120)
                if response.data.size != len(content):
                    raise RuntimeError(f"file {index}: {response.data.size} bytes stored")
            idle += 1
            if idle == CLIENTS:
                answered.set()
            await finished.wait()

    clients = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    await asyncio.sleep(0.3)  # let every client connect: connecting is not what is measured
    measure()
    started = perf_counter()
    ready.set()
    waiting = asyncio.create_task(answered.wait())
    await asyncio.wait([waiting, *clients], return_when=asyncio.FIRST_COMPLETED)
    elapsed = perf_counter() - started
    measure()
    finished.set()
    await asyncio.gather(*clients)  # re-raises a client's failure
    waiting.cancel()
    return len(files) / elapsed


async def streamed(
    target: str, files: list[bytes], fill: bool, measure: Callable[[], Any]
) -> float:
    """Files/s over one UploadDataStream, the client keeping WINDOW files in flight."""
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        stub = pb_grpc.DatalakeServiceStub(channel)
        window = asyncio.Semaphore(WINDOW)

        async def requests() -> AsyncIterator[pb.UploadDataStreamRequest]:
            for index, content in enumerate(files):
                await window.acquire()  # released by the file's answer
                header = pb.UploadDataHeader(filename=f"{index}.jpg", fill_metadata=fill)
                yield pb.UploadDataStreamRequest(header=header)
                for start in range(0, len(content), CHUNK_SIZE):
                    yield pb.UploadDataStreamRequest(chunk=content[start : start + CHUNK_SIZE])
                yield pb.UploadDataStreamRequest(finish=True)

        measure()
        started = perf_counter()
        answers = 0
        call = stub.UploadDataStream(requests(), timeout=600)
        async for answer in call:
            if answer.WhichOneof("result") != "data":
                raise RuntimeError(f"file {answer.file_index} failed: {answer.error.message}")
            answers += 1
            window.release()
        elapsed = perf_counter() - started
        measure()
    if answers != len(files):
        raise RuntimeError(f"{answers} answers for {len(files)} files")
    return len(files) / elapsed


# --- the run -----------------------------------------------------------------------------------

Run = Callable[[str, list[bytes], bool, Callable[[], Any]], Coroutine[Any, Any, float]]
RUNS: list[tuple[str, Run]] = [
    (f"one call per file, {CLIENTS} clients", per_call),
    (f"one stream, {WINDOW} files in flight", streamed),
]


@dataclass(frozen=True)
class Measured:
    """One row: metalake and the bare server (and another checkout's) on the same streams."""

    label: str
    fill: bool
    workers: int
    rate: float  # files/s, best run
    bare_rate: float
    cpu_ms: float  # server CPU per file, median run
    bare_cpu_ms: float
    compared_rate: float | None = None
    compared_cpu_ms: float | None = None
    # For a fill_metadata row: the CPU it adds per file, the median over the rounds of each
    # round's difference to the run without it (run back to back on the same server).
    fill_added_ms: float | None = None
    compared_fill_added_ms: float | None = None

    @property
    def cpu_ratio(self) -> float:
        return self.cpu_ms / self.bare_cpu_ms


class Checkout(ServerProcess):
    """The server of another checkout: `python -m` imports the package of its working
    directory first."""

    def __init__(self, checkout: Path, data_dir: Path, log: Path, **env: str) -> None:
        super().__init__(data_dir, log, **env)
        self.checkout = checkout

    def start(self, timeout: float = 60) -> ServerProcess:
        with contextlib.chdir(self.checkout):
            return super().start(timeout)


def _measure_once(
    server: ServerProcess, run: Run, files: list[bytes], fill: bool
) -> tuple[float, float]:
    """(files/s, server CPU ms per file) of one run."""
    assert server.process is not None
    pid = server.process.pid
    samples: list[float] = []
    rate = asyncio.run(run(server.target, files, fill, lambda: samples.append(cpu_seconds(pid))))
    return rate, (samples[1] - samples[0]) * 1000 / len(files)


def measure_rows(servers: dict[str, ServerProcess], label: str, run: Run) -> list[Measured]:
    """ROUNDS rounds; in each, every server in turn takes a run without fill_metadata and one
    with it, back to back (which first alternates from round to round), each with files never
    sent before. A row per fill_metadata setting and worker count, each beside the bare server's
    runs of the same rounds.

    What fill_metadata adds is the median of each round's paired difference: the difference of
    two medians taken minutes apart moved with the machine's load as much as with the code."""
    rates: dict[tuple[str, bool], list[float]] = {}
    cpus: dict[tuple[str, bool], list[float]] = {}
    for round_ in range(ROUNDS):
        for name, server in servers.items():
            for fill in (False, True) if round_ % 2 == 0 else (True, False):
                files = jpegs(FILES, f"{label} {fill} {round_} {name} {uuid.uuid4().hex}")
                rate, cpu = _measure_once(server, run, files, fill)
                rates.setdefault((name, fill), []).append(rate)
                cpus.setdefault((name, fill), []).append(cpu)

    def added(name: str) -> float:
        return statistics.median(
            with_fill - without
            for with_fill, without in zip(cpus[name, True], cpus[name, False], strict=True)
        )

    rows = []
    for fill in (False, True):
        for workers in WORKERS:
            lake, compared = f"lake {workers}", f"compared {workers}"
            has_compared = compared in servers
            rows.append(
                Measured(
                    label,
                    fill,
                    workers,
                    max(rates[lake, fill]),
                    max(rates["bare", fill]),
                    statistics.median(cpus[lake, fill]),
                    statistics.median(cpus["bare", fill]),
                    max(rates[compared, fill]) if has_compared else None,
                    statistics.median(cpus[compared, fill]) if has_compared else None,
                    added(lake) if fill else None,
                    added(compared) if fill and has_compared else None,
                )
            )
    return rows


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def _moto(scratch: Path) -> Iterator[str]:
    """moto's S3 server in a process of its own (its CPU is not the server's); its endpoint."""
    port = _free_port()
    with (scratch / "moto.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"moto did not start: {(scratch / 'moto.log').read_text()}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(30)


@contextlib.contextmanager
def _postgres_schema() -> Iterator[str]:
    """A fresh schema in the test database, dropped afterwards; its URL."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(engine_url(POSTGRES_URL))
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextlib.contextmanager
def backend_env(name: str, scratch: Path) -> Iterator[dict[str, str]]:
    """The server environment of a backend: {} is the embedded default."""
    if name == "sqlite":
        yield {}
        return
    if name != "postgresql":
        raise ValueError(f"unknown backend {name!r}: sqlite or postgresql")
    with _postgres_schema() as catalog_url, _moto(scratch) as endpoint:
        s3 = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
            "AWS_ENDPOINT_URL": endpoint,
        }
        bucket = f"metalake-bench-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        yield {
            **s3,
            "METALAKE_CATALOG_URL": catalog_url,
            "METALAKE_MIGRATE": "1",
            "METALAKE_BLOB_URL": f"s3://{bucket}/lake",
        }


_TITLES = {"sqlite": "SQLite + local files", "postgresql": "PostgreSQL + S3 (moto)"}


def _print(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def small_files(scratch: Path, backend: str) -> list[Measured]:
    size = sum(map(len, jpegs(4, "size"))) / 4 / 1024
    other = " | compared files/s | compared CPU ms/file | CPU / compared" if COMPARE else ""
    _print(
        "",
        f"| {_TITLES[backend]}: {FILES:,} JPEGs of {size:.0f} KiB | workers | files/s "
        f"| bare files/s | server CPU ms/file | bare CPU ms/file | CPU / bare{other} |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if COMPARE else ""),
    )
    rows = []
    with contextlib.ExitStack() as stack:
        servers: dict[str, ServerProcess] = {
            "bare": ServerProcess(
                scratch / f"{backend}-bare",
                scratch / f"{backend}-bare.log",
                module="benchmarks.bare_server",
            ),
        }
        for workers in WORKERS:
            # Each its own catalog schema or data directory: runs of one do not slow another's.
            lake_env = stack.enter_context(backend_env(backend, scratch))
            lake_env.update(METALAKE_WORKERS=str(workers), METALAKE_HASH_IMAGES="0")
            name = f"{backend}-{workers}"
            servers[f"lake {workers}"] = ServerProcess(
                scratch / name, scratch / f"{name}.log", **lake_env
            )
            if COMPARE:
                servers[f"compared {workers}"] = Checkout(
                    Path(COMPARE).resolve(),
                    scratch / f"{name}-compared",
                    scratch / f"{name}-compared.log",
                    **stack.enter_context(backend_env(backend, scratch)),
                    METALAKE_WORKERS=str(workers),
                    METALAKE_HASH_IMAGES="0",
                )
        for server in servers.values():
            stack.enter_context(server)
            # First calls pay for imports and caches: not measured.
            _measure_once(server, streamed, jpegs(64, f"warm-up {uuid.uuid4().hex}"), True)
        for label, run in RUNS:
            for row in measure_rows(servers, label, run):
                rows.append(row)
                line = (
                    f"| {label}{', fill_metadata' if row.fill else ''} | {row.workers} "
                    f"| {row.rate:,.0f} | {row.bare_rate:,.0f} | {row.cpu_ms:.2f} "
                    f"| {row.bare_cpu_ms:.2f} | {row.cpu_ratio:.1f}x |"
                )
                if row.compared_cpu_ms is not None and row.compared_rate is not None:
                    line += (
                        f" {row.compared_rate:,.0f} | {row.compared_cpu_ms:.2f} "
                        f"| {row.cpu_ms / row.compared_cpu_ms:.2f} |"
                    )
                _print(line)
    return rows


def _cpu_until_idle(pid: int) -> float:
    """The server's CPU seconds once it has been idle for a while: background work caught up.

    Idle: under 10 ms of CPU over 1.5 s, which spans the hasher's one-second poll interval.
    """
    deadline = time.monotonic() + 120
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(1.5)
        now = cpu_seconds(pid)
        if now - last < 0.010:
            return now
        last = now
    raise RuntimeError("the server did not become idle within 2 minutes")


def hashing_cost(scratch: Path) -> float:
    """Server CPU ms per image that the background near-duplicate hashing adds: one call per
    file, measured until the server is idle again, with hashing on minus with it off (the
    embedded default, one process, ROUNDS runs each, alternating; the median of each)."""
    cpus: dict[str, list[float]] = {"on": [], "off": []}
    with contextlib.ExitStack() as stack:
        servers = {
            hashing: stack.enter_context(
                ServerProcess(
                    scratch / f"hashing-{hashing}",
                    scratch / f"hashing-{hashing}.log",
                    METALAKE_HASH_IMAGES="1" if hashing == "on" else "0",
                )
            )
            for hashing in cpus
        }
        for server in servers.values():
            _measure_once(server, streamed, jpegs(64, f"warm-up {uuid.uuid4().hex}"), False)
        for _ in range(ROUNDS):
            for hashing, server in servers.items():
                assert server.process is not None
                pid = server.process.pid
                _cpu_until_idle(pid)
                before = cpu_seconds(pid)
                files = jpegs(FILES, f"hashing {hashing} {uuid.uuid4().hex}")
                asyncio.run(per_call(server.target, files, False, lambda: None))
                cpus[hashing].append((_cpu_until_idle(pid) - before) * 1000 / len(files))
    return statistics.median(cpus["on"]) - statistics.median(cpus["off"])


def _available(backend: str) -> bool:
    if backend != "postgresql":
        return True
    try:
        engine = sqlalchemy.create_engine(engine_url(POSTGRES_URL))
        with engine.connect():
            pass
        engine.dispose()
        return True
    except sqlalchemy.exc.OperationalError:
        _print("", f"(no PostgreSQL at {POSTGRES_URL}: the PostgreSQL + S3 rows are skipped)")
        return False


def main() -> None:
    _print(
        f"{FILES:,} files per run, {ROUNDS} run(s) per row and server, alternating; "
        "files/s: the best run, CPU: the median run."
    )
    results: dict[str, list[Measured]] = {}
    with tempfile.TemporaryDirectory(prefix="metalake-bench-") as scratch_name:
        for backend in BACKENDS:
            if _available(backend):
                results[backend] = small_files(Path(scratch_name), backend)
        hashed = hashing_cost(Path(scratch_name))
    _print(
        "",
        f"Near-duplicate hashing in the background (on by default, off in the rows above): "
        f"{hashed:.2f} ms of server CPU per image, SQLite + local files, one process.",
    )
    _print("", "| aim (issue 11), 1 worker | measured |", "|---|---:|")
    for backend, rows in results.items():
        plain = {row.label: row for row in rows if not row.fill and row.workers == 1}
        filled = {row.label: row for row in rows if row.fill and row.workers == 1}
        for label, row in plain.items():
            filled_row = filled[label]
            compared = filled_row.compared_fill_added_ms
            _print(
                f"| {_TITLES[backend]}, {label}: server CPU <= 3x bare "
                f"| {row.cpu_ratio:.1f}x ({row.cpu_ms:.2f} ms) |",
                f"| {_TITLES[backend]}, {label}: fill_metadata adds <= 0.5 ms (median of the "
                f"rounds' paired differences) | {filled_row.fill_added_ms:.2f} ms"
                + (f" (compared: {compared:.2f} ms)" if compared is not None else "")
                + " |",
            )


if __name__ == "__main__":
    main()
