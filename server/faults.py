"""Backend faults in domain terms: which failures of the catalog, the bucket or the local disk a
client can retry, and which mean the storage is full.

The catalog (SQLAlchemy over SQLite or PostgreSQL) and the blob stores (files; on S3, boto3 and
obstore) raise their own exceptions. A backend that is unreachable, timing out or dropping the
connection is temporary: `Unavailable` with a retry delay, so clients retry (an upload with a
request id, a read, a resumable upload from its committed size). A full disk, here or under the
catalog, is `LimitReached`. Everything else (constraint violations, bugs) is left alone, and
stays an internal error.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from collections.abc import Awaitable, Callable, Iterator

from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError
from obstore.exceptions import GenericError as ObjectStoreError
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from metalake.server.errors import LimitReached, Refusal, Unavailable

BackendFault = Unavailable | LimitReached

log = logging.getLogger(__name__)

# Seconds a client is asked to wait before retrying after a backend fault.
RETRY_AFTER = 1.0
# Seconds the health probe waits for the catalog's answer.
PROBE_TIMEOUT = 10.0

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# SQLite's transient failures: another writer held the lock beyond the busy timeout.
_SQLITE_TRANSIENT = ("database is locked", "database table is locked")
_SQLITE_FULL = "database or disk is full"
# PostgreSQL SQLSTATEs worth retrying: connection exceptions (class 08), the server shutting
# down or starting (57P01-57P03), a statement timeout or cancel (57014), too many connections
# (53300), out of memory (53200), a lock not available (55P03), serialization failures and
# deadlocks (40001, 40P01).
_POSTGRES_TRANSIENT = {"57P01", "57P02", "57P03", "57014", "53300", "53200", "55P03", "40001"}
_POSTGRES_TRANSIENT |= {"40P01"}
_POSTGRES_DISK_FULL = "53100"
# S3 answers that mean "come back later".
_S3_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
}
# What obstore's catch-all error says of an answer the bucket gave (it has no attributes for
# them): "... Server returned non-2xx status code: 503 Service Unavailable: <Error><Code>...".
# Without a status the request never got an answer: refused, reset, timed out.
_OBSTORE_STATUS = re.compile(r"status code: (\d{3})\b")
_S3_ERROR_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")


def backend_fault(error: BaseException) -> BackendFault | None:
    """The domain error a backend failure stands for, or None when it is not one.

    Looks through the chain of causes: libraries wrap each other's errors (boto3's transfer
    manager, SQLAlchemy around its driver).
    """
    for cause in _chain(error):
        if isinstance(cause, Refusal):
            return None  # already a domain error, raised on purpose
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            return disk_full(cause)
        found = _catalog_fault(cause) or _bucket_fault(cause)
        if found is not None:
            return found
    return None


def disk_full(error: OSError) -> LimitReached:
    where = f" ({error.filename})" if error.filename else ""
    return LimitReached(
        f"the server's storage is full{where}: {error.strerror or 'no space left'}. Nothing of "
        "this call was kept; retry later or on another server once an operator freed space"
    )


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _catalog_fault(error: BaseException) -> BackendFault | None:
    if isinstance(error, DisconnectionError | PoolTimeoutError):
        return _unavailable("the catalog", error)
    if not isinstance(error, DBAPIError):
        return None
    original = error.orig
    if type(original).__module__.startswith("sqlite3"):
        message = str(original).lower()
        if _SQLITE_FULL in message:
            return LimitReached(
                "the catalog's storage is full (database or disk is full). Nothing of this call "
                "was kept; retry later once an operator freed space"
            )
        if any(text in message for text in _SQLITE_TRANSIENT):
            return _unavailable("the catalog", error)
        return None
    sqlstate = getattr(original, "sqlstate", None)
    if sqlstate == _POSTGRES_DISK_FULL:
        return LimitReached(
            "the catalog's storage is full. Nothing of this call was kept; retry later once an "
            "operator freed space"
        )
    if error.connection_invalidated:
        return _unavailable("the catalog", error)
    if sqlstate is None:
        # No SQLSTATE: the driver never got an answer (cannot connect, connection lost).
        if type(error).__name__ in ("OperationalError", "InterfaceError"):
            return _unavailable("the catalog", error)
        return None
    if sqlstate.startswith("08") or sqlstate in _POSTGRES_TRANSIENT:
        return _unavailable("the catalog", error)
    return None


def _bucket_fault(error: BaseException) -> BackendFault | None:
    if isinstance(error, HTTPClientError | BotoConnectionError | IncompleteReadError):
        return _unavailable("the object store", error)
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if _transient_answer(status, code):
            return _unavailable("the object store", error)
    if isinstance(error, ObjectStoreError):
        # obstore's other errors are answers that retrying does not change: not found, already
        # exists, a failed precondition, access denied (PermissionDeniedError), no valid
        # credentials (UnauthenticatedError). This one is everything else: retries spent on a
        # bucket that did not answer, or answered 5xx; or a client error with no class of its own.
        message = str(error)
        answered = _OBSTORE_STATUS.search(message)
        if answered is None:
            return _unavailable("the object store", error)
        named = _S3_ERROR_CODE.search(message)
        if _transient_answer(int(answered.group(1)), named.group(1) if named else ""):
            return _unavailable("the object store", error)
    return None


def _transient_answer(status: int, code: str) -> bool:
    """Whether S3 answering `status` with the error `code` means "come back later"."""
    return status >= 500 or status == 429 or code in _S3_TRANSIENT_CODES


def _unavailable(backend: str, error: BaseException) -> Unavailable:
    # The driver's message can name hosts and ports: operators find it in the log, clients get
    # what they can act on.
    return Unavailable(
        f"{backend} is unreachable or timed out ({type(error).__name__}); retry shortly",
        retry_after=RETRY_AFTER,
    )


async def watch_catalog(
    ping: Callable[[], Awaitable[None]],
    set_serving: Callable[[bool], Awaitable[None]],
    *,
    interval: float,
) -> None:
    """Every `interval` seconds, a trivial catalog query: health turns NOT_SERVING (through
    `set_serving`) when it fails, and SERVING again once it answers, so that a load balancer
    sends calls elsewhere meanwhile. Runs until cancelled."""
    serving = True
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.wait_for(ping(), PROBE_TIMEOUT)
            healthy, problem = True, ""
        except Exception as error:
            healthy, problem = False, f"{type(error).__name__}: {error}"
        if healthy == serving:
            continue
        serving = healthy
        if healthy:
            log.info("the catalog answers again: health is SERVING")
        else:
            log.warning("the catalog is unreachable, health is NOT_SERVING: %s", problem)
        await set_serving(healthy)
