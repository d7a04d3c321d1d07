"""Small blobs' PutObject requests, sent without botocore's per-request work (see DirectPuts).

A small upload on S3 is one conditional PutObject. botocore spends about 1.2 ms of CPU on each
beyond the HTTP exchange itself (parameter validation, serialization, endpoint rules, an event
emitted at every step, hashing the body again to sign it, parsing the answer), and a worker
thread hop on top: most of the server's CPU per small file on PostgreSQL + S3. What a PutObject
of a blob needs is known once botocore has sent one: its URL (endpoint, addressing style,
bucket and prefix, as botocore resolved them) and its signing scope.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import logging
import ssl
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials, RefreshableCredentials
from botocore.exceptions import BotoCoreError
from botocore.httpsession import get_cert_path

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# Keep-alive connections kept open for direct puts sent on the event loop, per store.
MAX_IDLE_CONNECTIONS = 16
# An answer to a PutObject is a few headers and, at most, a short XML error.
_MAX_ANSWER_BODY = 64 * 1024


@dataclass(frozen=True)
class _Target:
    """Where and how botocore sent a blob's PutObject."""

    url: str  # up to the blob's key (the last part of the path)
    user_agent: str
    service: str
    region: str
    # For the event loop's sender: None when it cannot be used (a proxy, client certificates,
    # TLS verification turned off: botocore's HTTP session handles those).
    scheme: str | None
    host: str  # the Host header, as botocore signs it
    hostname: str
    port: int
    path: str  # URL path up to the blob's key, as sent (and signed: S3 does not normalize it)
    verify: str | bool


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class DirectPuts:
    """Conditional PutObjects of small blobs (If-None-Match: *), sent without botocore.

    A `before-send` handler notes, from the first blob PutObject botocore sends, its URL and
    signing scope. Later puts are signed with SigV4 here (tested to give botocore's signature)
    and sent either by `send`, on the event loop over keep-alive connections of its own (no
    worker thread hop), or, where that cannot be used, by `put` in a worker thread, on the
    client's own HTTP session (its pool, TLS, proxy and timeout settings).

    Integrity as through botocore, at no cost: the payload is signed with its SHA-256, which is
    the blob's key, so S3 refuses a body altered on the way (botocore hashed the body again to
    sign it). Anything but "stored" (200) or "already there" (412) -- an error answer, a broken
    or timed out connection -- returns False: the caller then sends the put through botocore,
    which retries, and raises what the client is told. An answer that botocore would not get
    either (a 4xx other than 409: refused, forbidden) turns direct puts off for good, in case
    this endpoint does not take them.
    """

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        blob_prefix: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._blob_prefix = blob_prefix
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._target: _Target | None = None
        self._off = False
        self._idle: list[_Connection] = []
        self._idle_loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(max_connections)  # connections in use, at most
        self._tls: ssl.SSLContext | None = None
        self._signing_key: tuple[tuple[str, str, str, str], bytes] | None = None
        client.meta.events.register("before-send.s3.PutObject", self._learn)

    # Learning from botocore.

    def _learn(self, request: Any, **_: Any) -> None:
        """botocore's `before-send` event: note how it sends a blob's PutObject."""
        if self._target is not None or self._off:
            return
        try:
            context = request.context
            params = context["input_params"]
            signing = context["signing"]
            url, key = request.url, params["Key"]
            if (
                params["Bucket"] != self._bucket
                or not key.startswith(self._blob_prefix)
                or context.get("auth_type") not in ("v4", "s3v4")
                or signing.get("signing_name") != "s3"
                or not signing.get("region")
            ):
                return
            blob = key[len(self._blob_prefix) :]
            if len(blob) != 64 or not url.endswith("/" + blob) or "?" in url:
                return
            agent = request.headers.get("User-Agent", b"")
            self._target = _target(
                self._client,
                url[: -len(blob)],
                agent.decode() if isinstance(agent, bytes) else str(agent),
                signing["signing_name"],
                signing["region"],
            )
        except (KeyError, AttributeError, TypeError, ValueError):
            return  # a botocore that keeps these elsewhere: every put goes through it

    def _credentials(self) -> ReadOnlyCredentials | None:
        """The client's credentials now; None when there are none, or when they are due for a
        refresh (which may ask a metadata service: botocore does that, in a worker thread)."""
        credentials = self._client._request_signer._credentials  # type: ignore[attr-defined]
        if credentials is None:
            return None
        if isinstance(credentials, RefreshableCredentials) and credentials.refresh_needed():
            return None
        frozen: ReadOnlyCredentials = credentials.get_frozen_credentials()
        return frozen if frozen.access_key and frozen.secret_key else None

    # On the event loop.

    async def send(self, object_key: str, data: bytes) -> bool | None:
        """Store a blob whose key (its SHA-256) ends `object_key` with a request sent on the
        event loop, unless identical content is there. True when stored; False when sent but
        not stored (the caller then goes through botocore); None when not sent."""
        target, blob = self._target, object_key.rsplit("/", 1)[-1]
        if target is None or target.scheme is None or self._off or len(blob) != 64:
            return None
        credentials = self._credentials()
        if credentials is None:
            return None
        headers = self.signed_headers(target, credentials, blob, _now())
        lines = [f"PUT {target.path}{blob} HTTP/1.1", f"Content-Length: {len(data)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        if self._idle_loop is not loop:  # another loop's connections are no use here
            self._idle, self._idle_loop = [], loop
            self._slots = asyncio.Semaphore(self._max_connections)
        async with self._slots:
            status = await self._exchange(target, head, data)
        return self._stored(status)

    def signed_headers(
        self, target: _Target, credentials: ReadOnlyCredentials, blob: str, now: datetime.datetime
    ) -> dict[str, str]:
        """The headers of a blob's conditional PutObject, signed with SigV4 as botocore's
        S3SigV4Auth signs them (the payload's hash is the blob's key)."""
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        signed = {
            "host": target.host,
            "if-none-match": "*",
            "x-amz-content-sha256": blob,
            "x-amz-date": stamp,
        }
        if credentials.token:
            signed["x-amz-security-token"] = credentials.token
        names = ";".join(signed)  # already in order
        canonical = "\n".join(
            [
                "PUT",
                target.path + blob,
                "",  # no query
                "".join(f"{name}:{value}\n" for name, value in signed.items()),
                names,
                blob,
            ]
        )
        scope = f"{day}/{target.region}/{target.service}/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = self._key(credentials.secret_key or "", day, target.region, target.service)
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        return {
            "Host": target.host,
            "User-Agent": target.user_agent,
            "If-None-Match": "*",
            "X-Amz-Content-SHA256": blob,
            "X-Amz-Date": stamp,
            **({"X-Amz-Security-Token": credentials.token} if credentials.token else {}),
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
                f"SignedHeaders={names}, Signature={signature}"
            ),
        }

    def _key(self, secret: str, day: str, region: str, service: str) -> bytes:
        """SigV4's signing key, derived once a day (and per secret)."""
        scope = (secret, day, region, service)
        cached = self._signing_key
        if cached is not None and cached[0] == scope:
            return cached[1]
        key = ("AWS4" + secret).encode()
        for part in (day, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        self._signing_key = (scope, key)
        return key

    async def _exchange(self, target: _Target, head: bytes, data: bytes) -> int | None:
        """Send one request, on a kept connection if there is one (once more on a new one if
        that had been closed meanwhile); the answer's status, None when there was none."""
        while True:
            kept = self._idle.pop() if self._idle else None
            try:
                connection = kept or await self._connect(target)
            except (OSError, TimeoutError, ssl.SSLError) as error:
                log.debug("a direct PutObject could not connect (%s)", error)
                return None
            try:
                status, reusable = await self._request(connection, head, data)
            except (
                OSError,
                TimeoutError,
                ssl.SSLError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ) as error:
                connection.writer.close()
                if kept is not None:
                    continue  # closed by the server while it was kept: try a new one
                log.debug("a direct PutObject failed (%s)", error)
                return None
            except BaseException:
                connection.writer.close()  # cancelled mid-way: the connection is unusable
                raise
            if reusable and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(connection)
            else:
                connection.writer.close()
            return status

    async def _connect(self, target: _Target) -> _Connection:
        tls = None
        if target.scheme == "https":
            if self._tls is None:
                # botocore's CA bundle: the one configured, else its default.
                cafile = target.verify if isinstance(target.verify, str) else get_cert_path(True)
                self._tls = ssl.create_default_context(
                    cafile=cafile if isinstance(cafile, str) else None
                )
            tls = self._tls
        async with asyncio.timeout(self._connect_timeout):
            reader, writer = await asyncio.open_connection(target.hostname, target.port, ssl=tls)
        return _Connection(reader, writer)

    async def _request(self, connection: _Connection, head: bytes, data: bytes) -> tuple[int, bool]:
        """(status, whether the connection can be used again)."""
        reader, writer = connection.reader, connection.writer
        if reader.at_eof():
            raise ConnectionResetError("closed by the server while kept")
        async with asyncio.timeout(self._read_timeout):
            writer.write(head)
            writer.write(data)
            await writer.drain()
            answer = await reader.readuntil(b"\r\n\r\n")
            lines = answer.decode("latin-1").split("\r\n")
            version, code = lines[0].split(" ", 2)[:2]
            status = int(code)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            reusable = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            length = headers.get("content-length")
            if "transfer-encoding" in headers or length is None:
                reusable = False  # not read to its end: the connection goes
            elif int(length) <= _MAX_ANSWER_BODY:
                await reader.readexactly(int(length))
            else:
                reusable = False
        return status, reusable

    def close(self) -> None:
        for connection in self._idle:
            connection.writer.close()
        self._idle = []

    # In a worker thread.

    def put(self, object_key: str, data: bytes) -> bool:
        """What `send` does, blocking, on the client's HTTP session (its proxies and TLS
        settings): for a worker thread."""
        target, blob = self._target, object_key.rsplit("/", 1)[-1]
        if target is None or self._off or len(blob) != 64:
            return False
        credentials = self._client._request_signer._credentials  # type: ignore[attr-defined]
        if credentials is None:
            return False
        request = AWSRequest(
            method="PUT",
            url=target.url + blob,
            data=data,
            headers={"If-None-Match": "*", "User-Agent": target.user_agent},
        )
        request.context["payload_sha256"] = blob
        try:
            _KnownPayloadAuth(
                credentials.get_frozen_credentials(), target.service, target.region
            ).add_auth(request)
            response = self._client._endpoint.http_session.send(  # type: ignore[attr-defined]
                request.prepare()
            )
            response.content  # noqa: B018 -- read to the end: the connection goes back to the pool
        except BotoCoreError as error:
            log.debug("a direct PutObject failed (%s); sending it through botocore", error)
            return False
        return self._stored(response.status_code)

    def _stored(self, status: int | None) -> bool:
        if status in (200, 412):
            return True
        if status is not None and 400 <= status < 500 and status != 409:
            self._off = True
            log.warning(
                "the S3 endpoint answered %d to a direct PutObject: small blobs go through "
                "botocore from now on",
                status,
            )
        return False


class _KnownPayloadAuth(S3SigV4Auth):
    """SigV4 for S3 with the body's SHA-256 already known (the blob's key), not hashed again."""

    def payload(self, request: Any) -> str:
        known: str = request.context["payload_sha256"]
        return known


def _target(client: Any, url: str, user_agent: str, service: str, region: str) -> _Target:
    """Where a blob's PutObject goes; whether the event loop's sender can go there directly."""
    parts = urlsplit(url)
    scheme: str | None = parts.scheme if parts.scheme in ("http", "https") else None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    if parts.port and parts.port != (443 if parts.scheme == "https" else 80):
        host = f"{host}:{parts.port}"  # botocore signs the port unless it is the default
    session = client._endpoint.http_session
    verify = getattr(session, "_verify", None)
    if (
        not parts.hostname
        or ":" in parts.hostname  # an IPv6 literal: left to botocore's session
        or client.meta.config.proxies
        or urllib.request.getproxies()
        or getattr(session, "_cert_file", True)  # client certificates (or a session unknown)
        or verify is False
        or verify is None
    ):
        scheme = None
    return _Target(
        url=url,
        user_agent=user_agent,
        service=service,
        region=region,
        scheme=scheme,
        host=host,
        hostname=parts.hostname or "",
        port=port,
        path=parts.path,
        verify=verify if verify is not None else True,
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
