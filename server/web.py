"""The HTTP face: a JSON API, byte downloads, previews, a change stream and the web console.

It runs on the gRPC server's event loop, in the same process (`start_http`), over the same
`DatalakeCore` and `Tokens`: every route is a thin translation to the domain layer, like the gRPC
servicer, and domain errors map to the same google.rpc codes, then to HTTP statuses (HTTP_STATUS).

Starlette (routing, requests, streaming responses) served by uvicorn: both are the reference
ASGI pieces, and uvicorn's `Server.serve` runs as one task beside grpc.aio, so one process, one
loop and one set of worker threads serve both protocols.

Routes (docs/api.md, "HTTP"):

    GET   /                              the web console (static files under /console/)
    GET   /healthz                       200 while serving, 503 while stopping
    GET   /v1/config                     what the console needs before a token: auth, tiles
    GET   /v1/data?filter=&order_by=&page_size=&page_token=
    GET   /v1/data/{id}
    PATCH /v1/data/{id}                  {"metadata": {...}, "update_mask": [...], "etag": "..."}
    GET   /v1/data/{id}/content          Range, ETag / If-None-Match, Content-Disposition
    GET   /v1/data/{id}/thumbnail?size=256
    GET   /v1/watch?filter=              Server-Sent Events from WatchData's change log
    GET   /v1/facets/{field}?limit=30    distinct manufacturer / reference / custom_id values
                                         tags, label keys (labels), values of labels.KEY
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import uvicorn
from google.protobuf import json_format
from google.rpc import code_pb2
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metalake import metadata as md
from metalake.server import thumbnails
from metalake.server.auth import Caller, Role, Tokens
from metalake.server.calls import worker_metadata
from metalake.server.config import Settings
from metalake.server.datalake import DatalakeCore
from metalake.server.errors import InvalidRequest, Refusal, invalid_field
from metalake.server.faults import backend_fault
from metalake.server.filtering import EVENTS, FilterError, compile_filter
from metalake.server.servicer import code_of, data_to_proto
from metalake.v1 import datalake_pb2 as pb

log = logging.getLogger(__name__)

# google.rpc.Code -> HTTP status, as google/rpc/code.proto documents each code.
HTTP_STATUS: dict[int, int] = {
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}

CONSOLE_DIR = Path(str(resources.files("metalake.server") / "console"))
REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Seconds between keep-alive comments on an idle event stream: proxies close silent ones.
SSE_KEEPALIVE = 15.0
# A content type is echoed only when it is a plain `type/subtype`; anything else is served as
# bytes (a client chose it, and it must never smuggle header syntax).
_SAFE_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9!#$&^_.+-]+$")
# RFC 5987 attr-char, besides letters and digits (which quote() always keeps).
_ATTR_CHARS = "!#$&+-.^_`|~"


class HttpError(Exception):
    """A refusal decided here (authentication, a malformed parameter), as a google.rpc code."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.code = code
        self.headers = headers or {}
        super().__init__(message)


@dataclass(frozen=True)
class ConsoleConfig:
    # A map tile URL template ({z}/{x}/{y}); None: the bundled world outline only.
    tile_url: str | None = None


def error_response(
    code: int,
    message: str,
    violations: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Google's JSON error shape: {"error": {"code", "status", "message", "details"}}."""
    status = HTTP_STATUS.get(code, 500)
    body: dict[str, Any] = {
        "code": status,
        "status": code_pb2.Code.Name(code),
        "message": message,
    }
    if violations:
        body["details"] = [
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}
        ]
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def domain_error_response(error: Refusal) -> JSONResponse:
    code = code_of(error)
    violations: list[dict[str, Any]] = []
    for violation in getattr(error, "violations", []):
        entry: dict[str, Any] = {"field": violation.field, "description": violation.description}
        position = getattr(error, "position", None)
        if position is not None and violation.field == "filter":
            entry["position"] = position  # 0-based offset in the filter of the problem
        violations.append(entry)
    headers = {}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    if code == code_pb2.INTERNAL:
        log.error("internal error: %s", error)
        return error_response(code, "internal error; see the server log")
    return error_response(code, str(error), violations, headers)


def data_json(message: pb.Data) -> dict[str, Any]:
    """The protobuf JSON mapping, with the proto's field names (those filters use)."""
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """RFC 6266 with RFC 5987's filename*: the stored name's last path segment, without control
    characters; an ASCII fallback for old clients, the exact name percent-encoded for others.
    Nothing of the name can end the header or add a parameter."""
    name = re.split(r"[/\\]", filename)[-1]
    name = "".join(c for c in name if c.isprintable()).strip().lstrip(".") or "download"
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\%;' else "_" for c in name)
    return (
        f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe=_ATTR_CHARS)}"
    )


def content_security_policy(tile_url: str | None) -> str:
    images = "'self' blob: data:"
    if tile_url:
        parts = urlsplit(tile_url)
        host = parts.netloc.replace("{s}.", "*.")
        images += f" {parts.scheme}://{host}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        f"img-src {images}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _matches(header: str | None, etag: str) -> bool:
    """If-None-Match / If-Range semantics: a list of (possibly weak) tags, or *."""
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """One `bytes=` range as (start, end inclusive); None to serve everything (no header, a
    syntax this server does not honour such as several ranges); "unsatisfiable"."""
    if not header or not header.startswith("bytes="):
        return None
    spec = header.removeprefix("bytes=").strip()
    if "," in spec:
        return None  # several ranges: RFC 9110 lets a server send the whole content instead
    match = re.fullmatch(r"(\d*)-(\d*)", spec)
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return "unsatisfiable"
    return start, end


async def _limited(chunks: AsyncIterator[bytes], length: int) -> AsyncIterator[bytes]:
    try:
        left = length
        async for chunk in chunks:
            if left <= 0:
                break
            piece = chunk[:left]
            left -= len(piece)
            yield piece
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


class _Api:
    """The routes, over one datalake and one token store."""

    def __init__(self, datalake: DatalakeCore, tokens: Tokens, console: ConsoleConfig) -> None:
        self.datalake = datalake
        self.tokens = tokens
        self.console = console

    async def caller(self, request: Request, role: Role) -> Caller:
        """The token's organization and role, as the gRPC AuthInterceptor decides them."""
        if not await self.tokens.required():
            return Caller("default", Role.ADMIN)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        caller = (
            await self.tokens.check(token.strip())
            if scheme.lower() == "bearer" and token.strip()
            else None
        )
        if caller is None:
            raise HttpError(
                code_pb2.UNAUTHENTICATED,
                "a valid API token is required",
                {"WWW-Authenticate": 'Bearer realm="metalake"'},
            )
        if caller.role < role:
            raise HttpError(
                code_pb2.PERMISSION_DENIED,
                f"this token's role ({caller.role.name.lower()}) may not do this; "
                f"it needs {role.name.lower()}",
            )
        return caller

    async def health(self, request: Request) -> Response:
        if self.datalake.draining:
            return JSONResponse({"status": "NOT_SERVING"}, status_code=503)
        return JSONResponse({"status": "SERVING"})

    async def config(self, request: Request) -> Response:
        return JSONResponse(
            {
                "auth_required": await self.tokens.required(),
                "tile_url": self.console.tile_url,
                "thumbnail_sizes": list(thumbnails.SIZES),
            }
        )

    async def index(self, request: Request) -> Response:
        return FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def list_data(self, request: Request) -> Response:
        caller = await self.caller(request, Role.READ)
        query = request.query_params
        page = await self.datalake.list(
            caller.org,
            filter=query.get("filter", ""),
            order_by=query.get("order_by", ""),
            page_size=_int_param(query.get("page_size"), "page_size", 0),
            page_token=query.get("page_token", ""),
        )
        return JSONResponse(
            {
                "data": [data_json(data_to_proto(r)) for r in page.records],
                "next_page_token": page.next_page_token,
            }
        )

    async def get_data(self, request: Request) -> Response:
        caller = await self.caller(request, Role.READ)
        record = await self.datalake.get(caller.org, request.path_params["id"])
        return JSONResponse(data_json(data_to_proto(record)), headers={"ETag": record.etag})

    async def facet(self, request: Request) -> Response:
        caller = await self.caller(request, Role.READ)
        limit = _int_param(request.query_params.get("limit"), "limit", 30)
        values = await self.datalake.facet(caller.org, request.path_params["field"], limit)
        return JSONResponse({"values": list(values)})

    async def update_data(self, request: Request) -> Response:
        caller = await self.caller(request, Role.WRITE)
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise invalid_field("body", "is not JSON") from None
        if not isinstance(body, dict):
            raise invalid_field("body", "must be a JSON object")
        try:
            message = json_format.ParseDict(body.get("metadata") or {}, pb.Metadata())
        except json_format.ParseError as error:
            raise invalid_field("metadata", str(error)) from None
        values, violations = md.from_proto(message)
        if violations:
            raise InvalidRequest("metadata is invalid", violations)
        mask = body.get("update_mask") or []
        if isinstance(mask, str):
            mask = [path.strip() for path in mask.split(",") if path.strip()]
        if not isinstance(mask, list) or not all(isinstance(p, str) for p in mask):
            raise invalid_field("update_mask", "must be a list of field names")
        etag = body.get("etag") or request.headers.get("if-match", "")
        record = await self.datalake.update_metadata(
            caller.org, request.path_params["id"], values, mask, etag=str(etag)
        )
        return JSONResponse(data_json(data_to_proto(record)), headers={"ETag": record.etag})

    async def content(self, request: Request) -> Response:
        caller = await self.caller(request, Role.READ)
        record = await self.datalake.get(caller.org, request.path_params["id"])
        etag = f'"{record.sha256}"'
        content_type = record.content_type
        if not _SAFE_CONTENT_TYPE.match(content_type):
            content_type = "application/octet-stream"
        headers = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Cache-Control": "private, no-cache",
            "Content-Disposition": content_disposition(record.filename),
            # The bytes are a client's: never run them as a page of this origin.
            "Content-Security-Policy": "default-src 'none'; sandbox",
        }
        if _matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        wanted = parse_range(request.headers.get("range"), record.size)
        if_range = request.headers.get("if-range")
        if if_range is not None and not _matches(if_range, etag):
            wanted = None  # the client's copy is of other content: send all of this one
        if wanted == "unsatisfiable":
            return Response(
                status_code=416, headers={**headers, "Content-Range": f"bytes */{record.size}"}
            )
        start, end = (0, record.size - 1) if not isinstance(wanted, tuple) else wanted
        length = max(0, end - start + 1)
        download = await self.datalake.download(caller.org, record.id, offset=start)
        headers["Content-Length"] = str(length)
        status = 200
        if isinstance(wanted, tuple):
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{record.size}"
        return StreamingResponse(
            _limited(download.chunks, length),
            status_code=status,
            headers=headers,
            media_type=content_type,
        )

    async def thumbnail(self, request: Request) -> Response:
        caller = await self.caller(request, Role.READ)
        size = _int_param(request.query_params.get("size"), "size", thumbnails.DEFAULT_SIZE)
        preview = await self.datalake.thumbnail(caller.org, request.path_params["id"], size)
        etag = f'"{preview.record.blob_key}"'
        headers = {
            "ETag": etag,
            # A preview never changes: browsers keep it (private: it came with a token).
            "Cache-Control": "private, max-age=86400",
            "Content-Length": str(preview.record.bytes),
        }
        if _matches(request.headers.get("if-none-match"), etag):
            await preview.chunks.aclose()  # type: ignore[attr-defined]
            del headers["Content-Length"]
            return Response(status_code=304, headers=headers)
        # A few hundred KiB at most: one body, no streaming machinery.
        content = b"".join([chunk async for chunk in preview.chunks])
        return Response(content, headers=headers, media_type=thumbnails.CONTENT_TYPE)

    async def watch(self, request: Request) -> Response:
        caller = await self.caller(request, Role.READ)
        filter = request.query_params.get("filter", "")
        try:
            compile_filter(filter, EVENTS)  # refused here, as a 400, rather than mid-stream
        except FilterError as error:
            raise invalid_field("filter", str(error), position=error.position) from None
        resume = request.headers.get("last-event-id") or request.query_params.get(
            "resume_token", ""
        )
        events = self.datalake.watch(caller.org, filter=filter, resume_token=resume)
        return StreamingResponse(
            _event_stream(events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


_EVENT_NAMES = {1: "created", 2: "updated", 3: "deleted"}


async def _event_stream(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """WatchData's events as Server-Sent Events: `id` is the resume token (a reconnecting
    EventSource sends it back as Last-Event-ID), `event` the type, `data` the item as JSON."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=100)

    async def pump() -> None:
        try:
            async for item in events:
                await queue.put(item)
        except Refusal as error:
            await queue.put(error)

    pumping = asyncio.create_task(pump())
    try:
        yield ": watching\n\n"  # sends the headers now: the client knows it is connected
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if isinstance(item, Refusal):
                body = json.loads(bytes(domain_error_response(item).body))
                yield f"event: error\ndata: {json.dumps(body)}\n\n"
                return
            event, token = item
            payload = json.dumps(data_json(data_to_proto(event.record)))
            yield f"id: {token}\nevent: {_EVENT_NAMES[int(event.type)]}\ndata: {payload}\n\n"
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pumping


def _int_param(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise invalid_field(name, f"must be a whole number, got {value!r}") from None


Handler = Callable[[Request], Awaitable[Response]]


def _translated(handler: Handler) -> Handler:
    """Domain errors and refusals as JSON errors; anything else logged, never shown."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except HttpError as error:
            return error_response(error.code, str(error), headers=error.headers)
        except Refusal as error:
            return domain_error_response(error)
        except Exception as error:
            fault = backend_fault(error)  # the catalog or the store away: 503, as gRPC does
            if fault is not None:
                log.warning("%s %s: %s (%s)", request.method, request.url.path, fault, error)
                return domain_error_response(fault)
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(code_pb2.INTERNAL, "internal error; see the server log")

    return run


class _Headers:
    """A request id on every answer, and the security headers every page gets.

    Plain ASGI (not BaseHTTPMiddleware, which costs a task and a stream per request): it only
    adds headers to the response's start message.
    """

    def __init__(self, app: ASGIApp, csp: str) -> None:
        self._app = app
        self._csp = csp.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        offered = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = offered if _CLIENT_REQUEST_ID.match(offered) else uuid.uuid4().hex

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                for key, value in worker_metadata():  # as gRPC answers name their worker
                    headers[key] = value
                if "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = self._csp.decode()
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
                headers["X-Frame-Options"] = "DENY"
            await send(message)

        await self._app(scope, receive, send_with_headers)


def build_app(datalake: DatalakeCore, tokens: Tokens, console: ConsoleConfig) -> Starlette:
    api = _Api(datalake, tokens, console)
    routes = [
        Route("/", _translated(api.index)),
        Route("/healthz", _translated(api.health)),
        Route("/v1/config", _translated(api.config)),
        Route("/v1/data", _translated(api.list_data)),
        Route("/v1/data/{id}", _translated(api.get_data)),
        Route("/v1/data/{id}", _translated(api.update_data), methods=["PATCH"]),
        Route("/v1/data/{id}/content", _translated(api.content)),
        Route("/v1/data/{id}/thumbnail", _translated(api.thumbnail)),
        Route("/v1/watch", _translated(api.watch)),
        Route("/v1/facets/{field}", _translated(api.facet)),
        Mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console"),
    ]
    csp = content_security_policy(console.tile_url)
    return Starlette(routes=routes, middleware=[Middleware(_Headers, csp=csp)])


class _NoColour(logging.Filter):
    """uvicorn adds an ANSI-coloured copy of its messages, which JSON log lines would carry."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


logging.getLogger("uvicorn.error").addFilter(_NoColour())


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process's own (server.app) stop everything."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class HttpFace:
    """The HTTP listener, running as a task on the gRPC server's loop."""

    server: _Server
    task: asyncio.Task[None]
    port: int

    async def stop(self, grace: float = 2.0) -> None:
        """Stop accepting, give open requests `grace` seconds (event streams are cut)."""
        self.server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.task, grace + 5)


def _listen_socket(listen: str) -> socket.socket:
    """Bound with SO_REUSEPORT, like gRPC's: several server processes can share the port."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_http(settings: Settings, datalake: DatalakeCore, tokens: Tokens) -> HttpFace | None:
    """Serve the HTTP face on settings.http_listen (port 0: a free one); None when it is off."""
    if not settings.http_listen:
        return None
    sock = _listen_socket(settings.http_listen)
    app = build_app(datalake, tokens, ConsoleConfig(tile_url=settings.console_tile_url))
    tls: dict[str, Any] = {}
    if settings.tls_cert and settings.tls_key:
        tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
        if settings.tls_client_ca:
            tls |= {"ssl_ca_certs": str(settings.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=2,
        **tls,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises why it could not start
            raise OSError(f"cannot serve HTTP on {settings.http_listen}")
        await asyncio.sleep(0.01)
    return HttpFace(server, task, sock.getsockname()[1])
