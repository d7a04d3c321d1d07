"""Wrapping RPC handlers: each call's request id, its statuses, and ending it with one.

The interceptors (observability, auth) and the servicer end calls through `abort`, the one place
that puts the call's request id in the trailing metadata, so that every answer carries it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from metalake.metadata import FieldViolation

if TYPE_CHECKING:  # grpc-stubs makes it generic; the runtime class is not subscriptable
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Behaviour = Callable[..., Any]

REQUEST_ID_KEY = "x-request-id"
# Trailing metadata naming the worker process that answered, on servers with several.
WORKER_KEY = "x-metalake-worker"
_request_id: ContextVar[str] = ContextVar("metalake_request_id", default="-")
_worker_trailer: tuple[tuple[str, str], ...] = ()


def current_request_id() -> str:
    """The request id of the call being served ("-" outside any call)."""
    return _request_id.get()


def name_worker_in_answers() -> None:
    """Answer every call with this process's pid in WORKER_KEY (a worker of a supervisor)."""
    global _worker_trailer
    _worker_trailer = ((WORKER_KEY, str(os.getpid())),)


def _request_id_trailer() -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_KEY, current_request_id()), *_worker_trailer)


def begin_call(context: Any, request_id: str) -> None:
    """Make `request_id` the current call's, and return it with the call's answer."""
    _request_id.set(request_id)
    context.set_trailing_metadata(_request_id_trailer())


def status(
    code: grpc.StatusCode | int,
    message: str,
    *,
    violations: Iterable[FieldViolation] = (),
    retry_after: float | None = None,
) -> grpc.Status:
    """A google.rpc.Status (`code` a grpc.StatusCode or a google.rpc.Code): a BadRequest
    detail naming each field at fault, and a RetryInfo detail when the refusal is temporary
    (clients retry after `retry_after` seconds)."""
    details = []
    field_violations = [
        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
        for v in violations
    ]
    if field_violations:
        details.append(error_details_pb2.BadRequest(field_violations=field_violations))
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromTimedelta(timedelta(seconds=retry_after))
        details.append(retry)
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(
        status_pb2.Status(
            code=code if isinstance(code, int) else code.value[0], message=message, details=packed
        )
    )


async def abort(context: Any, answer: grpc.Status) -> NoReturn:
    """End the call with `answer`, its trailing metadata carrying the request id."""
    # Aborting replaces the trailing metadata set so far: put the request id back.
    with_id = _Status(
        answer.code, answer.details, (*answer.trailing_metadata, *_request_id_trailer())
    )
    # grpc-stubs lags grpcio here: aio contexts have had abort_with_status since 1.33.
    await context.abort_with_status(with_id)
    raise AssertionError("abort_with_status returns only by raising")


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def rebuild_handler(
    handler: Handler,
    unary_response: Callable[[Behaviour], Behaviour],
    stream_response: Callable[[Behaviour], Behaviour],
    wrap_deserializer: Callable[[Any], Any] | None = None,
) -> Handler:
    """The same RPC method handler with its behaviour wrapped: `unary_response` for methods
    answering one message, `stream_response` for those answering a stream."""
    # grpc-stubs types the behaviours as synchronous; on an aio server they are coroutines.
    h: Any = handler
    deserialize, serialize = h.request_deserializer, h.response_serializer
    if wrap_deserializer is not None:
        deserialize = wrap_deserializer(deserialize)
    if h.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary_response(h.unary_unary), deserialize, serialize
        )
    if h.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary_response(h.stream_unary), deserialize, serialize
        )
    if h.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream_response(h.unary_stream), deserialize, serialize
        )
    return grpc.stream_stream_rpc_method_handler(
        stream_response(h.stream_stream), deserialize, serialize
    )
