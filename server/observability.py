"""What an operator sees: Prometheus metrics, structured logs, and a request id per call.

Metrics are per server process, as Prometheus expects (it scrapes each instance). Logs never
carry tokens or metadata values: handlers log ids, sizes, types and outcomes only.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TextIO

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from pythonjsonlogger.json import JsonFormatter

from metalake.server.auth import Handler, rebuild_handler

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
UPLOADS_IN_FLIGHT = Gauge("metalake_uploads_in_flight", "Uploads being received right now.")
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

REQUEST_ID_KEY = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_request_id: ContextVar[str] = ContextVar("metalake_request_id", default="-")


def current_request_id() -> str:
    return _request_id.get()


def record_extraction(
    sources: Mapping[str, str], errors: list[tuple[str, str]], timings: Mapping[str, float]
) -> None:
    """Count one file's extraction: per extractor, a hit, a miss or an error, and its time."""
    filled = set(sources.values())
    failed = {name for name, _ in errors}
    for name in set(timings) | failed:
        result = "error" if name in failed else "hit" if name in filled else "miss"
        EXTRACTOR_RESULTS.labels(name, result).inc()
    for name, seconds in timings.items():
        EXTRACTOR_SECONDS.labels(name).observe(seconds)


def start_metrics_server(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Gives each call a request id (the client's `x-request-id`, else a new one), returns it in
    trailing metadata, and counts and times the call by method and status code."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = (details.method or "").rsplit("/", 1)[-1]
        offered = dict(details.invocation_metadata or ()).get(REQUEST_ID_KEY)
        request_id = (
            offered
            if isinstance(offered, str) and _CLIENT_REQUEST_ID.match(offered)
            else uuid.uuid4().hex
        )

        def begin(context: Any) -> float:
            _request_id.set(request_id)
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            return time.perf_counter()

        def end(context: Any, started: float, error: BaseException | None) -> None:
            code = context.code()
            if code is None:
                code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            RPCS.labels(method, name).inc()
            RPC_SECONDS.labels(method).observe(time.perf_counter() - started)

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
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request is not a valid protobuf message of this method: {request.reason}",
        ((REQUEST_ID_KEY, current_request_id()),),
    )


class _SecondCache(logging.Formatter):
    """logging's default time format, with the date and time formatted once per second: each
    stored item is logged, and strftime on every record cost as much as the rest of the line."""

    _second = -1
    _formatted = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:  # handlers format under their lock: no race here
            self._formatted = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._formatted},{int(record.msecs):03d}"  # logging's default_msec_format


class _Formatter(_SecondCache):
    pass


class _JsonFormatter(_SecondCache, JsonFormatter):
    pass


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        return True


def configure_logging(
    level: int = logging.INFO, *, json_output: bool | None = None, stream: TextIO | None = None
) -> None:
    """JSON lines when stderr is not a terminal (log collectors), readable lines when it is."""
    stream = stream or sys.stderr
    if json_output is None:
        json_output = not stream.isatty()
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
        handler.setFormatter(
            _Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
