"""What an operator sees: Prometheus metrics, structured logs, and a request id per call.

Metrics are per server, as Prometheus expects (it scrapes each instance); a server with several
worker processes adds theirs up (metalake.server.workers). Logs never
carry tokens or metadata values: handlers log ids, sizes, types and outcomes only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import random
import re
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from pythonjsonlogger.json import JsonFormatter

from metalake.server.calls import (
    REQUEST_ID_KEY,
    Handler,
    abort,
    begin_call,
    current_request_id,
    rebuild_handler,
    status,
)

RPCS = Counter(
    "metalake_rpcs_total", "RPCs answered, by method and status code.", ["method", "code"]
)
RPC_SECONDS = Histogram(
    "metalake_rpc_duration_seconds",
    "Time to answer an RPC, by method.",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
BYTES_RECEIVED = Counter("metalake_bytes_received_total", "File bytes received from clients.")
BYTES_SENT = Counter("metalake_bytes_sent_total", "File bytes sent to clients.")
# livesum: with several worker processes (PROMETHEUS_MULTIPROC_DIR), the sum over live ones.
UPLOADS_IN_FLIGHT = Gauge(
    "metalake_uploads_in_flight", "Uploads being received right now.", multiprocess_mode="livesum"
)
EXTRACTOR_RESULTS = Counter(
    "metalake_extractor_results_total",
    "Extractor runs by outcome: hit (filled a field), miss (filled none), error.",
    ["extractor", "result"],
)
EXTRACTOR_SECONDS = Histogram(
    "metalake_extractor_duration_seconds",
    "Time one extractor spent on one file.",
    ["extractor"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2, 10),
)

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def record_extraction(
    sources: Mapping[str, str], errors: list[tuple[str, str]], timings: Mapping[str, float]
) -> None:
    """Count one file's extraction: per extractor, a hit, a miss or an error, and its time."""
    # A derived value is sourced "<extractor>+<how>" ("pillow+gps-clock"): count the extractor.
    filled = {source.partition("+")[0] for source in sources.values()}
    failed = {name for name, _ in errors}
    for name, seconds in timings.items():
        result = "error" if name in failed else "hit" if name in filled else "miss"
        _result_counter(name, result).inc()
        _duration_histogram(name).observe(seconds)
    for name in failed.difference(timings):  # timed out or stuck: no time of its own
        _result_counter(name, "error").inc()


# Each file counts every extractor: the labelled children are looked up once, not per file
# (`labels()` validates and locks every time).
_result_counter = functools.cache(EXTRACTOR_RESULTS.labels)
_duration_histogram = functools.cache(EXTRACTOR_SECONDS.labels)


def start_metrics_server(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Gives each call a request id (the client's `x-request-id`, else a new one), returns it in
    trailing metadata, and counts and times the call by method and status code.

    Each method's handler is wrapped once and reused while the interceptors after this one
    return the same handler (they do unless they wrap it per call, as auth does for a token's
    caller): wrapping per call rebuilt the handler and its closures on every upload."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method or ""
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _observed(handler, method.rsplit("/", 1)[-1])
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _observed(handler: Handler, method: str) -> Handler:
    """`handler` with every call given its request id, counted and timed."""
    counted = functools.partial(_rpc_counter, method)
    timer = _rpc_timer(method)

    def begin(context: Any) -> float:
        begin_call(context, _request_id_of(context))
        return time.perf_counter()

    def end(context: Any, started: float, error: BaseException | None) -> None:
        code = context.code()
        if code is None:
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
        counted(code.name if isinstance(code, grpc.StatusCode) else str(code)).inc()
        timer.observe(time.perf_counter() - started)

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: Any) -> Any:
            started, error = begin(context), None
            try:
                return await behaviour(await _decoded(request, context), context)
            except BaseException as caught:
                error = caught
                raise
            finally:
                end(context, started, error)

        return run

    def streaming(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: Any) -> Any:
            started, error = begin(context), None
            try:
                async for response in behaviour(await _decoded(request, context), context):
                    yield response
            except BaseException as caught:
                error = caught
                raise
            finally:
                end(context, started, error)

        return run

    return rebuild_handler(handler, unary, streaming, _tolerant)


def _request_id_of(context: Any) -> str:
    """The client's `x-request-id` when it is a sensible one, else a new random id."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            if isinstance(value, str) and _CLIENT_REQUEST_ID.match(value):
                return value
            break
    # Not a secret, only unique: no system call per request, as uuid4's urandom is.
    return f"{random.getrandbits(128):032x}"


# Every call is counted and timed: the labelled children are looked up once, as the
# extractors' are (`labels()` takes a lock and builds a key on every call).
_rpc_counter = functools.cache(RPCS.labels)
_rpc_timer = functools.cache(RPC_SECONDS.labels)


@dataclass(frozen=True)
class _Undecodable:
    """A request message protobuf could not parse (broken UTF-8, garbage bytes)."""

    reason: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns _Undecodable instead of raising, so that the call can be
    answered INVALID_ARGUMENT rather than gRPC's generic UNKNOWN."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            return _Undecodable(str(error))

    return parse


async def _decoded(request: Any, context: Any) -> Any:
    if isinstance(request, _Undecodable):
        await _refuse_undecodable(context, request)
    if hasattr(request, "__aiter__"):
        return _decoded_stream(request, context)
    return request


async def _decoded_stream(messages: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for message in messages:
        if isinstance(message, _Undecodable):
            await _refuse_undecodable(context, message)
        yield message


async def _refuse_undecodable(context: Any, request: _Undecodable) -> None:
    await abort(
        context,
        status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid protobuf message of this method: {request.reason}",
        ),
    )


def name_native_thread(name: str) -> None:
    """Show `name` for the calling thread where the kernel shows threads (top -H, ps -L, perf,
    /proc/<pid>/task/*/comm; Linux only, at most 15 bytes). Python's thread names are its own:
    there, every thread of the server was `python`."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):  # no prctl: the name is a convenience
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


_PR_SET_NAME = 15  # from linux/prctl.h


LOG_FORMAT_ENV = "METALAKE_LOG_FORMAT"
LOG_FORMATS = ("json", "text")
LOG_LEVEL_ENV = "METALAKE_LOG_LEVEL"
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Every line the server writes has a logger name under this prefix. Other libraries' records keep
# their own name behind it ("metalake.lib.alembic.runtime.migration"), so that a collector can
# select the server's whole output by one prefix and still see where a line came from.
LOGGER_PREFIX = "metalake"
FOREIGN_PREFIX = "metalake.lib."
# Libraries whose INFO lines mean nothing to an operator (alembic's "Context impl SQLiteImpl",
# botocore's "Found credentials in environment variables"): only their warnings and errors show.
# metalake logs what matters itself (the catalog's schema revision, the blob store in use).
QUIET_LOGGERS = ("alembic", "botocore", "boto3", "s3transfer", "urllib3")
# Libraries that read clients' files: what they log says what is wrong with a file a client sent
# (Pillow logs "More samples per pixel than can be decoded" at ERROR), never with the server,
# which reports the outcome itself (no preview, fewer fields filled). Shown at debug only.
CONTENT_LOGGERS = ("PIL",)


class _RequestIdFilter(logging.Filter):
    """Adds the call's request id to each record and puts foreign loggers under FOREIGN_PREFIX."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        if record.name != LOGGER_PREFIX and not record.name.startswith(LOGGER_PREFIX + "."):
            record.name = FOREIGN_PREFIX + record.name
        return True


class _SecondCache(logging.Formatter):
    """logging's time formats, with the date and time formatted once per second: each stored
    item is logged, and strftime on every record cost as much as the rest of the line."""

    _second = -1
    _datefmt: str | None = None
    _formatted = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second or datefmt != self._datefmt:
            # Handlers format under their lock: no race here.
            self._formatted = time.strftime(
                datefmt or self.default_time_format, self.converter(second)
            )
            self._second, self._datefmt = second, datefmt
        if datefmt:
            return self._formatted
        return f"{self._formatted},{int(record.msecs):03d}"  # logging's default_msec_format


class _JsonFormatter(_SecondCache, JsonFormatter):
    pass


class TextFormatter(_SecondCache):
    """One readable line: `2026-12-01 09:30:00 INFO  metalake.server.app: message [request id]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", "-")
        if request_id == "-":
            return line
        first, newline, rest = line.partition("\n")  # a traceback follows the first line
        return f"{first} [{request_id}]{newline}{rest}"


def log_format(stream: TextIO, environ: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """`json` or `text`: METALAKE_LOG_FORMAT if set, else text on a terminal and JSON elsewhere
    (log collectors). Returns the format and, for an unknown value, why it was ignored."""
    value = (os.environ if environ is None else environ).get(LOG_FORMAT_ENV, "").strip().lower()
    default = "text" if stream.isatty() else "json"
    if not value:
        return default, None
    if value not in LOG_FORMATS:
        return default, f"{LOG_FORMAT_ENV}={value!r} is not json or text; writing {default}"
    return value, None


def log_level(environ: Mapping[str, str] | None = None) -> tuple[int, str | None]:
    """METALAKE_LOG_LEVEL's level (`info` if unset), and, for an unknown value, why it was
    ignored."""
    value = (os.environ if environ is None else environ).get(LOG_LEVEL_ENV, "").strip().lower()
    if not value:
        return logging.INFO, None
    if value not in LOG_LEVELS:
        return logging.INFO, (
            f"{LOG_LEVEL_ENV}={value!r} is not one of {', '.join(LOG_LEVELS)}; logging at info"
        )
    return LOG_LEVELS[value], None


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Python's warnings as log lines, as `logging.captureWarnings` makes them, but those raised
    in a library of CONTENT_LOGGERS under its logger: Pillow warns of each client's truncated or
    odd file ("Truncated File Read", "Corrupt EXIF data"), which would otherwise be raw text
    in the middle of the JSON lines on stderr."""
    if file is not None:  # someone asked for a stream of their own
        _show_warning(message, category, filename, lineno, file, line)
        return
    name = next(
        (package for package in CONTENT_LOGGERS if f"{os.sep}{package}{os.sep}" in filename),
        "py.warnings",
    )
    logging.getLogger(name).warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


_show_warning = warnings.showwarning


def configure_logging(
    level: int | None = None, *, json_output: bool | None = None, stream: TextIO | None = None
) -> None:
    """Log lines on `stream` (stderr): JSON lines or readable text (see `log_format`), each with
    its request id, from `level` up (else METALAKE_LOG_LEVEL's); `json_output` overrides the
    format's choice (tests)."""
    stream = stream or sys.stderr
    problems = []
    if level is None:
        level, problem = log_level()
        problems.append(problem)
    if json_output is None:
        chosen, problem = log_format(stream)
        json_output = chosen == "json"
        problems.append(problem)
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestIdFilter())
    if json_output:
        handler.setFormatter(
            _JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    for name in CONTENT_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.WARNING if level <= logging.DEBUG else logging.CRITICAL + 1
        )
    warnings.showwarning = _log_warning
    for problem in problems:
        if problem:
            logging.getLogger(__name__).warning(problem)
