"""Assembling and running a metalake server: storage, extractors, gRPC, health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import signal
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio re-exports
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from metalake._version import __version__
from metalake.extractors.registry import ExtractorRegistry
from metalake.server.auth import AuthInterceptor, Tokens
from metalake.server.blobstore import BlobStore, LocalBlobStore
from metalake.server.catalog import SqlCatalog
from metalake.server.config import Settings
from metalake.server.datadir import DataDirectoryLock
from metalake.server.datalake import DatalakeCore
from metalake.server.datasets import Datasets
from metalake.server.faults import watch_catalog
from metalake.server.ingest import MetadataExtractor
from metalake.server.ingest.pipeline import Limits
from metalake.server.observability import (
    ObservabilityInterceptor,
    configure_logging,
    name_native_thread,
    start_metrics_server,
)
from metalake.server.s3blobstore import S3BlobStore
from metalake.server.servicer import DatalakeServicer
from metalake.server.similarity import Similarity, keep_hashing
from metalake.server.staging import StagingArea
from metalake.server.web import HttpFace, start_http
from metalake.server.webhooks import DeliverySettings, Webhooks, keep_delivering
from metalake.v1 import datalake_pb2, datalake_pb2_grpc

log = logging.getLogger(__name__)

# Seconds between looks for new images to hash when there were none (near-duplicate search).
HASH_INTERVAL = 1.0

SERVICE_NAME = datalake_pb2.DESCRIPTOR.services_by_name["DatalakeService"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    datalake: DatalakeCore
    health: health_aio.HealthServicer
    tokens: Tokens
    background: list[asyncio.Task[None]] = field(default_factory=list)
    http: HttpFace | None = None  # the HTTP face and console, when settings.http_listen is set
    data_dir_lock: DataDirectoryLock | None = None  # held while serving
    similarity: Similarity | None = None
    webhooks: Webhooks | None = None

    async def stop(self, grace: float | None) -> None:
        """Drain, then stop: health turns NOT_SERVING and new uploads are refused (UNAVAILABLE)
        at once; uploads in flight get up to `grace` seconds to finish; then every call ends."""
        await self.health.enter_graceful_shutdown()
        self.datalake.start_draining()
        for task in self.background:
            task.cancel()
        # Let them finish cancelling on this loop, not be destroyed half-way when it closes.
        await _bounded(
            "cancelling the background jobs",
            asyncio.gather(*self.background, return_exceptions=True),
        )
        if grace:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.datalake.idle(), grace)
        if self.http is not None:
            await self.http.stop()
        await _bounded("stopping gRPC", self.server.stop(grace=1.0))
        if self.webhooks is not None:
            self.webhooks.close()
        self.datalake.decoders.close()
        await _bounded("closing the catalog", self.datalake.catalog.close())
        if self.data_dir_lock is not None:
            self.data_dir_lock.release()


# How long a step of stopping may take (cancelled background jobs finishing, gRPC's calls
# ending after their grace, the catalog's connections closing) before the server stops without
# it: a backend that stopped answering must not make SIGTERM hang.
STOP_STEP_SECONDS = 10.0


async def _bounded(step: str, work: Awaitable[object]) -> None:
    """Await `work` for at most STOP_STEP_SECONDS; past that, log what the loop still runs and
    go on (the process is stopping: what is left ends with it)."""
    running = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({running}, timeout=STOP_STEP_SECONDS)
    if running in done:
        running.result()
        return
    log.warning(
        "stopping: %s took over %g s; going on without it. Still running:\n%s",
        step,
        STOP_STEP_SECONDS,
        _tasks_now(),
    )


def _tasks_now() -> str:
    """Every other task of this loop running Python code, each with the chain of awaits it is
    suspended in."""
    lines = []
    for task in asyncio.all_tasks():
        chain = _awaiting(task.get_coro())
        # gRPC's own tasks waiting for the next call (its Cython, .pxi) are always there.
        if task is not asyncio.current_task() and any(".py:" in step for step in chain):
            lines.append(f"  {task.get_name()}: {' -> '.join(chain)}")
    return "\n".join(lines)


def _awaiting(awaitable: object) -> list[str]:
    """Where a suspended coroutine waits, outermost first: each coroutine or generator it awaits
    through (a task's own stack shows only its outermost frame), then what it awaits last."""
    chain: list[str] = []
    while awaitable is not None and len(chain) < 20:
        frame = _first_of(awaitable, ("cr_frame", "gi_frame", "ag_frame"))
        if frame is None:
            chain.append(type(awaitable).__name__)
            break
        where = frame.f_code.co_filename.rsplit("/", 1)[-1]
        chain.append(f"{frame.f_code.co_name} ({where}:{frame.f_lineno})")
        awaitable = _first_of(awaitable, ("cr_await", "gi_yieldfrom", "ag_await"))
    return chain


def _first_of(thing: object, names: tuple[str, ...]) -> Any:
    return next((v for v in (getattr(thing, n, None) for n in names) if v is not None), None)


def prepare(settings: Settings) -> DataDirectoryLock:
    """What a supervisor (metalake.server.workers) does once before starting its workers:
    migrate the catalog (when asked, or the embedded default) and discard what a dead process
    left half-written in the data directory, unless another live process uses it. Returns the
    data directory's lock, held shared: the supervisor keeps it for its life, and its workers
    take theirs beside it (a server with one process does all this in `start`)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalog_url, migrate = settings.catalog()
    catalog = SqlCatalog.open(catalog_url, migrate=migrate)
    asyncio.run(catalog.close())
    return _discard_leftovers(settings, open_blob_store(settings))


def open_blob_store(settings: Settings) -> BlobStore:
    if settings.blob_url:
        # data_dir still holds this server's spool (and, beside, resumable uploads' staging).
        return S3BlobStore.from_url(settings.blob_url, local_dir=settings.data_dir)
    return LocalBlobStore(settings.data_dir, packed=settings.blob_packs)


def build_datalake(settings: Settings, *, migrate: bool | None = None) -> DatalakeCore:
    """The datalake on the configured catalog and blob store; `migrate` overrides the
    settings' choice (workers do not migrate: their supervisor did)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalog_url, migrate_by_default = settings.catalog()
    catalog = SqlCatalog.open(
        catalog_url, migrate=migrate_by_default if migrate is None else migrate
    )
    return DatalakeCore(
        catalog,
        open_blob_store(settings),
        StagingArea(settings.data_dir / "uploads"),
        extractor=load_extractor(),
        spool_dir=settings.data_dir / "tmp",
        fill_timeout=settings.fill_timeout,
        download_chunk_size=settings.download_chunk_size,
        upload_ttl=timedelta(seconds=settings.upload_ttl),
        limits=Limits(
            max_concurrent_uploads=settings.max_concurrent_uploads,
            max_file_size=settings.max_file_size,
            org_max_file_size=settings.org_max_file_size,
            org_storage_quota=settings.org_storage_quota,
        ),
        event_retention=timedelta(seconds=settings.event_retention),
    )


def load_extractor() -> MetadataExtractor:
    """The extractor registry: built-ins, then installed plugins, per METALAKE_*PLUGINS."""
    registry = ExtractorRegistry.from_environment()
    log.info("extractors: %s", ", ".join(registry.names) or "none")
    return registry


# HTTP/2 flow control: a fixed window of 4 MiB per stream instead of gRPC's default, which
# starts at 64 KiB and grows with its bandwidth-delay estimate. Growing, the window let a
# server whose disk stalled for a moment buffer more the longer an upload ran: the peak memory
# of one 1 GiB upload varied from 114 to 130 MiB over six runs, 113 to 116 MiB with this fixed
# window, at no cost in throughput here. The cost is on long, fast links: one upload's stream
# moves at most 4 MiB per round trip (40 MiB/s at 100 ms); concurrent uploads each have theirs.
TRANSPORT_OPTIONS = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024))


class StartupError(RuntimeError):
    """The server refuses to start as configured; the message says why and what to do."""


_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0]
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


async def start(settings: Settings, *, worker: int | None = None) -> RunningServer:
    """Start serving `settings.listen` (port 0 picks a free port, see RunningServer.port).

    As `worker` i of a supervisor (metalake.server.workers), the supervisor has done the
    start-up work (`prepare`), and only worker 0 collects garbage. Every server process binds
    its port with SO_REUSEPORT, so that a supervisor's workers share one port.
    """
    # Catalog and blob calls run in worker threads; asyncio's default pool (a handful of
    # threads on a small machine) would make concurrent uploads queue behind each other.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(
            max_workers=64,
            thread_name_prefix="metalake-io",
            initializer=name_native_thread,
            initargs=("metalake-io",),
        )
    )
    if worker is None:
        datalake = build_datalake(settings)
        data_dir_lock = _discard_leftovers(settings, datalake.blobs)
    else:  # the supervisor migrated and discarded leftovers; its lock stands beside this one
        datalake = build_datalake(settings, migrate=False)
        data_dir_lock = DataDirectoryLock(settings.data_dir, shared=True)
    tokens = Tokens(datalake.catalog, cache_seconds=settings.auth_cache_seconds)
    exposed = [a for a in (settings.listen, settings.http_listen) if a and not is_loopback(a)]
    if exposed and not (settings.insecure_no_auth or await tokens.required()):
        data_dir_lock.release()
        await datalake.catalog.close()
        raise StartupError(
            f"refusing to serve {exposed[0]} without authentication: no API token exists. "
            "Create one with `metalake token create --org ORG --role admin` (same catalog "
            "settings), listen on loopback, or pass --insecure-no-auth to serve anyone."
        )
    # Outermost first: every call, refused ones included, gets a request id and is counted.
    server = grpc.aio.server(
        interceptors=[ObservabilityInterceptor(), AuthInterceptor(tokens)],
        options=[("grpc.so_reuseport", 1), *TRANSPORT_OPTIONS],
    )
    assert isinstance(datalake.catalog, SqlCatalog)
    datasets = Datasets(
        datalake.catalog, datalake.blobs, download_chunk_size=settings.download_chunk_size
    )
    similarity = Similarity(
        datalake.catalog,
        datalake.blobs,
        spool_dir=settings.data_dir / "tmp",
        decoders=datalake.decoders,
    )
    webhooks = Webhooks(
        datalake.catalog,
        DeliverySettings(
            timeout=settings.webhook_timeout,
            retry_base=settings.webhook_retry_base,
            retry_for=settings.webhook_retry_for,
            keep_for=settings.event_retention,
        ),
    )
    datalake_pb2_grpc.add_DatalakeServiceServicer_to_server(
        DatalakeServicer(datalake, datasets, similarity, webhooks), server
    )
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = _add_port(server, settings)
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    background = []
    if not worker:  # one collector per server is enough; several would race for the same work
        background.append(
            asyncio.create_task(
                _collect_garbage(
                    datalake, settings.gc_interval, timedelta(seconds=settings.orphan_age)
                )
            )
        )

    async def set_serving(serving: bool) -> None:
        state = health_pb2.HealthCheckResponse.SERVING if serving else _NOT_SERVING
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, state)

    # Every worker probes: each answers health checks for the connections it was given.
    background.append(
        asyncio.create_task(
            watch_catalog(datalake.catalog.ping, set_serving, interval=settings.health_interval)
        )
    )
    if not worker:  # per server, like the collector: workers would each do the same work
        if settings.hash_images:
            background.append(asyncio.create_task(keep_hashing(similarity, HASH_INTERVAL)))
        # Deliveries run beside the request path, on threads of their own (see server.webhooks).
        background.append(asyncio.create_task(keep_delivering(webhooks, settings.webhook_interval)))
    try:
        http = await start_http(settings, datalake, tokens)
    except BaseException:
        for task in background:
            task.cancel()
        await server.stop(grace=None)
        webhooks.close()
        await datalake.catalog.close()
        data_dir_lock.release()
        raise
    return RunningServer(
        server,
        port,
        datalake,
        health_servicer,
        tokens,
        background,
        http=http,
        data_dir_lock=data_dir_lock,
        similarity=similarity,
        webhooks=webhooks,
    )


def _discard_leftovers(settings: Settings, blobs: BlobStore) -> DataDirectoryLock:
    """Discard what a dead process left half-written in the data directory (spool, scratch,
    S3 multipart uploads it began), unless another live process uses the directory. Not in
    build_datalake: `metalake gc` builds one too, beside a server whose uploads are running."""
    lock = DataDirectoryLock(settings.data_dir)
    try:
        if lock.alone:
            discarded = blobs.discard_spooled()
            if discarded:
                log.info("discarded %d unfinished upload(s) left by a previous run", discarded)
        else:
            log.info("another live process uses %s: leaving its uploads", settings.data_dir)
    finally:
        lock.share()
    return lock


_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _collect_garbage(datalake: DatalakeCore, interval: float, orphan_age: timedelta) -> None:
    """At start-up, then every `interval` seconds: expired uploads, orphaned blobs."""
    while True:
        try:
            garbage = await datalake.collect_garbage(orphan_age=orphan_age)
            if garbage.expired_uploads or garbage.orphan_blobs or garbage.orphan_staging_files:
                log.info("garbage collected: %s", garbage)
        except Exception:
            log.exception("garbage collection failed; retrying in %.0fs", interval)
        await asyncio.sleep(interval)


def _add_port(server: grpc.aio.Server, settings: Settings) -> int:
    if settings.tls_cert is None and settings.tls_key is None:
        return server.add_insecure_port(settings.listen)
    if settings.tls_cert is None or settings.tls_key is None:
        raise StartupError(
            "TLS needs both a certificate (METALAKE_TLS_CERT) and its key (METALAKE_TLS_KEY)"
        )
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    credentials = grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return server.add_secure_port(settings.listen, credentials)


def tune_malloc() -> None:
    """Keep gRPC's message buffers in the heap instead of fresh mappings.

    With glibc's defaults every buffer of 128 KiB or more is mmapped, faulted in and unmapped
    again; raising both the mmap and the trim thresholds (either alone made things worse) lets
    them be reused, which doubled a bare grpc.aio server's upload throughput here. A no-op on
    other C libraries.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 64 * 1024 * 1024)
    mallopt(m_trim_threshold, 256 * 1024 * 1024)
    # glibc gives threads arenas of their own (up to 8 per core): a freed buffer stays in the
    # arena of the thread that allocated it, and with dozens of threads (gRPC's, the I/O pool)
    # the kept buffers multiplied, more the longer an upload ran. One arena keeps the peak of
    # a 4 GiB upload at that of a 1 GiB one (1.21-1.33x with the default, 0.96-0.99x with one
    # arena, 0.95-1.12x with two; docs/performance-log.md). Python's own small objects do not use
    # malloc's arenas, so threads contend only for large buffers, a few thousand a second.
    mallopt(m_arena_max, 1)


def freeze_startup_heap() -> None:
    """Put what the server allocated to start out of the garbage collector's sight, once it
    serves: modules, gRPC's handlers, the catalog's table metadata, live as long as the process.

    Every full collection walked them all: 47-57 ms with the event loop stopped, every few
    thousand calls (15.9-18.9 us per call over a run). `gc.freeze` is CPython's own answer for
    objects made at start-up; what the server allocates later is collected as before.
    """
    gc.collect()  # the garbage of starting up, not kept forever
    gc.freeze()
    log.debug("%d objects made at start-up left out of garbage collection", gc.get_freeze_count())


def serve_forever(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM, then drain in-flight calls: in this process, or with
    `settings.workers` > 1 in that many worker processes under a supervisor (this one)."""
    configure_logging()
    if settings.workers > 1:
        from metalake.server.workers import supervise

        supervise(settings)
        return
    tune_malloc()
    if settings.metrics_listen:
        start_metrics_server(settings.metrics_listen)
        log.info("metrics on http://%s/metrics", settings.metrics_listen)
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    running = await start(settings)
    freeze_startup_heap()
    host = settings.listen.rsplit(":", 1)[0]
    log.info(
        "metalake serving on %s:%d, data in %s, version %s",
        host,
        running.port,
        settings.data_dir.resolve(),
        __version__,
    )
    if running.http is not None and settings.http_listen:
        scheme = "https" if settings.tls_cert else "http"
        http_host = settings.http_listen.rsplit(":", 1)[0]
        log.info("web console on %s://%s:%d/", scheme, http_host, running.http.port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping: draining in-flight calls for up to %.0fs", settings.shutdown_grace)
    await running.stop(settings.shutdown_grace)
