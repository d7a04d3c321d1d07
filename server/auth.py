"""Who is calling: API tokens, organizations and roles, checked in one interceptor.

Tokens travel as `authorization: Bearer <token>` metadata. Only their SHA-256 is stored. Each
token belongs to one organization and has a role: read < write < admin. Once any token exists,
every DatalakeService call needs one; until then every call acts for the default organization
(and the server listens on loopback only, see server.app). Health and reflection stay open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

import grpc

from metalake.server.calls import Behaviour, Handler, abort, rebuild_handler, status
from metalake.server.catalog import TokenCatalog, TokenRecord
from metalake.server.errors import Unavailable
from metalake.server.faults import backend_fault

log = logging.getLogger(__name__)

DEFAULT_ORG = "default"
SERVICE_PREFIX = "/metalake.v1.DatalakeService/"
ORG_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# How long a token check, or the answer to "are there tokens at all", is reused. A revoked token
# stops working on every server within this time; no server keeps anything else.
CACHE_SECONDS = 5.0


class Role(IntEnum):
    """Ordered: each role may do what the ones below it may."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r}: use read, write or admin") from None


# The role each RPC needs. A method not listed needs admin.
REQUIRED_ROLE: dict[str, Role] = {
    "GetData": Role.READ,
    "ListData": Role.READ,
    "DownloadData": Role.READ,
    "WatchData": Role.READ,
    "GetThumbnail": Role.READ,
    "QueryUpload": Role.READ,
    "ExtractMetadata": Role.READ,
    "UploadData": Role.WRITE,
    "UploadDataStream": Role.WRITE,
    "StartUpload": Role.WRITE,
    "WriteUpload": Role.WRITE,
    "UpdateMetadata": Role.WRITE,
    "DeleteData": Role.WRITE,
    "CreateDataset": Role.WRITE,
    "ListDatasets": Role.READ,
    "GetDataset": Role.READ,
    "ListDatasetItems": Role.READ,
    "DiffDatasets": Role.READ,
    "DownloadDatasetItem": Role.READ,
    "FindSimilar": Role.READ,
    # Webhooks send the organization's data elsewhere: admin only.
    "CreateWebhook": Role.ADMIN,
    "ListWebhooks": Role.ADMIN,
    "DeleteWebhook": Role.ADMIN,
    "ListWebhookDeliveries": Role.ADMIN,
    "TestWebhook": Role.ADMIN,
}


@dataclass(frozen=True)
class Caller:
    org: str
    role: Role
    token_id: str = ""


_DEFAULT_CALLER = Caller(DEFAULT_ORG, Role.ADMIN)
_caller: ContextVar[Caller] = ContextVar("metalake_caller")


def current_caller() -> Caller:
    """The caller of the RPC being served (the default organization when auth is off)."""
    return _caller.get(_DEFAULT_CALLER)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class NewToken:
    """A token as created: `secret` is shown once and never stored."""

    id: str
    secret: str
    org: str
    role: Role


class Tokens:
    """Creating, listing, revoking and checking tokens, stored in the catalog."""

    def __init__(self, catalog: TokenCatalog, *, cache_seconds: float = CACHE_SECONDS) -> None:
        self._catalog = catalog
        self._cache_seconds = cache_seconds
        self._checked: dict[str, tuple[float, Caller | None]] = {}
        self._required: tuple[float, bool] = (0.0, False)

    async def create(self, org: str, role: Role, description: str = "") -> NewToken:
        if not ORG_NAME.match(org):
            raise ValueError(f"organization {org!r} must be 1-64 of [a-z0-9_-]")
        token_id = secrets.token_hex(8)
        secret = f"mlk_{secrets.token_urlsafe(32)}"
        await self._catalog.add_token(
            TokenRecord(
                id=token_id,
                token_hash=hash_token(secret),
                org=org,
                role=role.name.lower(),
                description=description,
                created_at=datetime.now(UTC),
            )
        )
        return NewToken(token_id, secret, org, role)

    async def list(self) -> list[TokenRecord]:
        return await self._catalog.list_tokens()

    async def revoke(self, token_id: str) -> bool:
        return await self._catalog.revoke_token(token_id, datetime.now(UTC))

    async def required(self) -> bool:
        """Whether calls need a token: once any active token exists, they do."""
        expires, required = self._required
        if time.monotonic() >= expires:
            required = await self._catalog.has_active_tokens()
            self._required = (time.monotonic() + self._cache_seconds, required)
        return required

    async def check(self, presented: str) -> Caller | None:
        """The caller a token stands for; None for unknown and revoked tokens alike."""
        presented_hash = hash_token(presented)
        cached = self._checked.get(presented_hash)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        record = await self._catalog.find_token(presented_hash)
        caller = None
        # The lookup is by hash, so timing reveals nothing of the secret; compare_digest keeps
        # the final comparison constant-time all the same.
        if (
            record is not None
            and record.revoked_at is None
            and hmac.compare_digest(record.token_hash, presented_hash)
        ):
            caller = Caller(record.org, Role.parse(record.role), record.id)
        if len(self._checked) > 10_000:  # bounded, whatever tokens clients throw at us
            self._checked.clear()
        self._checked[presented_hash] = (time.monotonic() + self._cache_seconds, caller)
        return caller


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates every DatalakeService call and runs it as its caller."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        try:
            if not await self._tokens.required():
                return handler
            token = bearer_token(details.invocation_metadata)
            caller = await self._tokens.check(token) if token else None
        except Exception as error:
            fault = backend_fault(error)
            if fault is None:
                raise
            # The catalog holds the tokens: without it no call can be authenticated, for now.
            log.warning("%s: %s (%s: %s)", method, fault, type(error).__name__, error)
            code = (
                grpc.StatusCode.UNAVAILABLE
                if isinstance(fault, Unavailable)
                else grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            return _refusal(handler, code, str(fault), retry_after=fault.retry_after)
        if caller is None:
            return _refusal(
                handler, grpc.StatusCode.UNAUTHENTICATED, "a valid API token is required"
            )
        needed = REQUIRED_ROLE.get(method.removeprefix(SERVICE_PREFIX), Role.ADMIN)
        if caller.role < needed:
            return _refusal(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token's role ({caller.role.name.lower()}) may not call "
                f"{method.removeprefix(SERVICE_PREFIX)}; it needs {needed.name.lower()}",
            )
        return _as_caller(handler, caller)


def _as_caller(handler: Handler, caller: Caller) -> Handler:
    """The same handler, run with `caller` as the current caller."""

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: Any) -> Any:
            _caller.set(caller)
            return await behaviour(request, context)

        return run

    def streaming(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: Any) -> Any:
            _caller.set(caller)
            async for response in behaviour(request, context):
                yield response

        return run

    return rebuild_handler(handler, unary, streaming)


def _refusal(
    handler: Handler, code: grpc.StatusCode, message: str, *, retry_after: float | None = None
) -> Handler:
    refusal = status(code, message, retry_after=retry_after)

    def refuse(_: Behaviour) -> Behaviour:
        async def run(request: Any, context: Any) -> Any:
            await abort(context, refusal)

        return run

    def refuse_streaming(_: Behaviour) -> Behaviour:
        async def run(request: Any, context: Any) -> Any:
            await abort(context, refusal)
            yield  # pragma: no cover - abort raises; this makes a generator

        return run

    return rebuild_handler(handler, refuse, refuse_streaming)
