"""Several server processes on one port: a supervisor and its workers.

One Python process runs on one core (the GIL). `metalake serve --workers N` starts a supervisor
that does the once-only start-up work (migrations, discarding a previous run's half-written
uploads), reserves the listen port (and the HTTP face's, METALAKE_HTTP_LISTEN, when set), and
starts N worker processes, each a complete server bound to those ports with SO_REUSEPORT: the
kernel spreads incoming connections over them. This is gRPC's documented pattern for Python
(grpc/grpc examples/python/multiprocessing); workers are
spawned, not forked, so that no gRPC or database state is ever copied into a child.

The workers share everything through the catalog and the blob store, as separate servers do.
The supervisor replaces a worker that dies (its acknowledged uploads are committed already; its
half-written ones are discarded), drains every worker on SIGTERM or SIGINT, and serves the
Prometheus metrics of all of them (prometheus_client's multiprocess mode). Modelled on
gunicorn's arbiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from metalake._version import __version__
from metalake.server.config import Settings
from metalake.server.decoding import die_with

log = logging.getLogger(__name__)

# Seconds a worker may take to start serving; past it, the server gives up (it is misconfigured).
START_TIMEOUT = 60.0
# A worker that dies sooner than this after starting is replaced only after this delay, so that
# one that cannot run does not spin.
RESTART_DELAY = 1.0
# Beyond the drain grace period, seconds a stopping worker gets to exit before it is killed.
EXIT_MARGIN = 5.0


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    started: float


class _WorkerFailed(RuntimeError):
    pass


def supervise(settings: Settings) -> None:
    """Serve with `settings.workers` processes until SIGTERM or SIGINT, then drain them all."""
    from metalake.server.app import StartupError, prepare

    # Held (shared) until every worker has stopped: another server started on this data
    # directory meanwhile must not take our workers' uploads in flight for a dead run's.
    data_dir_lock = prepare(settings)
    configured_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = _metrics_directory() if settings.metrics_listen else None
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stopping.set())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    workers: dict[int, _Worker] = {}
    try:
        with contextlib.ExitStack() as reserved:
            host, port = reserved.enter_context(_reserve_port(settings.listen))
            if metrics_dir is not None and settings.metrics_listen:
                _serve_metrics(settings.metrics_listen, metrics_dir)
                log.info("metrics of every worker on http://%s/metrics", settings.metrics_listen)
            listen = f"{host}:{port}"
            worker_settings = replace(settings, listen=listen)
            if settings.http_listen:
                # The HTTP face too: port 0 becomes one free port that every worker binds.
                http_host, http_port = reserved.enter_context(_reserve_port(settings.http_listen))
                worker_settings = replace(worker_settings, http_listen=f"{http_host}:{http_port}")
                log.info("HTTP face of every worker on %s", worker_settings.http_listen)
            try:
                for worker in _start_workers(context, worker_settings, [*range(settings.workers)]):
                    workers[worker.process.pid or 0] = worker
            except _WorkerFailed as error:
                raise StartupError(str(error)) from None
            # The line tests and operators wait for: every worker takes calls now.
            log.info(
                "metalake serving on %s with %d workers (pids %s), data in %s, version %s",
                listen,
                len(workers),
                " ".join(map(str, workers)),
                settings.data_dir.resolve(),
                __version__,
            )
            _watch(context, worker_settings, workers, stopping, metrics_dir)
            log.info(
                "stopping: draining %d workers for up to %.0fs",
                len(workers),
                settings.shutdown_grace,
            )
            _stop_all(workers, settings.shutdown_grace + EXIT_MARGIN)
    finally:
        _stop_all(workers, EXIT_MARGIN)
        data_dir_lock.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics_dir is not None and not configured_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _start_workers(
    context: multiprocessing.context.SpawnContext, settings: Settings, indexes: list[int]
) -> list[_Worker]:
    """Start workers (at once: each takes a second or two to import) and wait until every one
    serves; _WorkerFailed says why one could not, once the others are stopped."""
    starting = []
    for index in indexes:
        theirs, ours = context.Pipe(duplex=False)
        process = context.Process(
            target=run_worker,
            args=(settings, index, ours, os.getpid()),
            name=f"metalake-worker-{index}",
        )
        process.start()
        ours.close()
        starting.append((_Worker(index, process, time.monotonic()), theirs))
    failures = []
    for worker, theirs in starting:
        with theirs:
            if not theirs.poll(START_TIMEOUT):
                message = f"worker {worker.index} did not start within {START_TIMEOUT:.0f}s"
            else:
                try:
                    message = theirs.recv()
                except EOFError:
                    worker.process.join(5)
                    message = (
                        f"worker {worker.index} exited at start-up ({worker.process.exitcode})"
                    )
        if message != "ready":
            failures.append(str(message))
    if failures:
        for worker, _ in starting:
            worker.process.kill()
            worker.process.join()
        raise _WorkerFailed("; ".join(dict.fromkeys(failures)))
    return [worker for worker, _ in starting]


def _watch(
    context: multiprocessing.context.SpawnContext,
    settings: Settings,
    workers: dict[int, _Worker],
    stopping: threading.Event,
    metrics_dir: Path | None,
) -> None:
    """Replace workers that die until asked to stop."""
    while not stopping.is_set():
        sentinels = {w.process.sentinel: pid for pid, w in workers.items()}
        for ended in wait(list(sentinels), timeout=0.2):
            if stopping.is_set():
                return
            dead = workers.pop(sentinels[ended])  # type: ignore[index]
            dead.process.join()
            _clean_up_after(settings, dead, metrics_dir)
            lived = time.monotonic() - dead.started
            if lived < RESTART_DELAY:
                time.sleep(RESTART_DELAY - lived)
            while not stopping.is_set():
                try:
                    [worker] = _start_workers(context, settings, [dead.index])
                except _WorkerFailed as error:
                    log.error("could not replace worker %d: %s; retrying", dead.index, error)
                    time.sleep(RESTART_DELAY)
                    continue
                workers[worker.process.pid or 0] = worker
                log.info("worker %d replaced by pid %d", dead.index, worker.process.pid)
                break


def _clean_up_after(settings: Settings, dead: _Worker, metrics_dir: Path | None) -> None:
    """What a dead worker leaves: its half-received uploads' spool files, its live gauges."""
    from metalake.server.app import open_blob_store

    pid = dead.process.pid or 0
    code = dead.process.exitcode
    how = (
        f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"code {code}"
    )
    log.warning("worker %d (pid %d) exited with %s; replacing it", dead.index, pid, how)
    try:
        discarded = open_blob_store(settings).discard_spooled(owner=pid)
    except Exception:
        log.exception("could not discard the spool files of pid %d; gc will", pid)
    else:
        if discarded:
            log.info("discarded %d unfinished upload(s) of pid %d", discarded, pid)
    if metrics_dir is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]


def _stop_all(workers: dict[int, _Worker], timeout: float) -> None:
    """SIGTERM every worker (each drains), wait for them, then SIGKILL any that remain."""
    for worker in workers.values():
        if worker.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid or 0, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers.values():
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            log.warning("worker pid %d did not stop in time: killing it", worker.process.pid)
            worker.process.kill()
            worker.process.join()
    workers.clear()


@contextlib.contextmanager
def _reserve_port(listen: str) -> Iterator[tuple[str, int]]:
    """Bind (without listening) the listen address with SO_REUSEPORT, for the supervisor's
    lifetime: port 0 becomes a fixed free port every worker binds, and no other program can
    take the port while a worker is being replaced."""
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    family, kind, proto, _, address = socket.getaddrinfo(
        bare or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        yield host, sock.getsockname()[1]
    finally:
        sock.close()


def _metrics_directory() -> Path:
    """PROMETHEUS_MULTIPROC_DIR, emptied (the client library requires it between runs), or a
    fresh temporary directory; set in the environment the workers inherit."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob("*.db"):
            leftover.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix="metalake-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def _serve_metrics(listen: str, directory: Path) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)


# --- the worker side ---------------------------------------------------------------------------


def run_worker(settings: Settings, index: int, ready: Connection, supervisor: int) -> None:
    """A worker process's entry point: serve `settings.listen` until SIGTERM, then drain."""
    # Killed when the supervisor dies, even by SIGKILL: a worker without its supervisor would
    # serve on unsupervised, beside the next server started on its data directory.
    die_with(supervisor)
    from metalake.server.app import tune_malloc
    from metalake.server.calls import name_worker_in_answers
    from metalake.server.observability import configure_logging

    tune_malloc()
    configure_logging()
    name_worker_in_answers()
    try:
        asyncio.run(_serve_worker(settings, index, ready))
    except Exception as error:
        # The supervisor reports it (and stops, if the server cannot start at all).
        log.debug("worker %d failed", index, exc_info=True)
        with contextlib.suppress(OSError, ValueError):
            ready.send(str(error))  # the same for every worker: the supervisor says it once
        sys.exit(1)


async def _serve_worker(settings: Settings, index: int, ready: Connection) -> None:
    from metalake.server.app import freeze_startup_heap, start

    running = await start(settings, worker=index)
    freeze_startup_heap()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    ready.send("ready")
    ready.close()
    log.info("worker %d (pid %d) taking calls on %s", index, os.getpid(), settings.listen)
    if running.http is not None:
        log.info("worker %d (pid %d) serving HTTP on %s", index, os.getpid(), settings.http_listen)
    await stopping.wait()
    await running.stop(settings.shutdown_grace)
