"""Webhooks: every change-log event POSTed to the endpoints an organization registered, signed
the Standard Webhooks way (https://www.standardwebhooks.com).

Delivery is a background job on every server, apart from the request path:

1. Fan-out: for each webhook (PostgreSQL: row-locked with SKIP LOCKED, so one server at a time
   per webhook), the organization's events after the webhook's cursor that match its event types
   and filter become rows of `webhook_deliveries`, with the exact body to send; the cursor moves in
   the same transaction. (webhook, event) is unique: an event becomes one delivery, once.
2. Lease: due deliveries are leased with SELECT ... FOR UPDATE SKIP LOCKED, each lease marked
   with a token and an expiry longer than the send timeout: two servers never send the same
   delivery at once. A delivery is due only when no earlier delivery of the same item to the same
   webhook is still pending, so each item's events arrive in order.
3. Send: an HTTP POST with a timeout, on a small thread pool of its own, never the one catalog
   and blob calls use, so a receiver that is down, slow or failing never slows an upload. A 2xx
   answer is delivered; anything else is retried with exponential backoff (base x 2^attempt,
   capped at an hour) until a day after the event, then marked failed. A server that dies
   mid-send leaves a lease that expires: another server sends again (at least once; receivers
   deduplicate by webhook-id, which stays the same across attempts).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, insert, or_, select, update

from metalake import metadata as md
from metalake.metadata import FieldViolation
from metalake.server.catalog import (
    DataRecord,
    Event,
    EventType,
    SqlCatalog,
    _from_micros,
    _labels_of,
    _row_to_record,
    _to_micros,
)
from metalake.server.errors import InvalidRequest, NotFound, invalid_field
from metalake.server.faults import backend_fault
from metalake.server.filtering import EVENTS, FilterError, compile_filter
from metalake.server.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from metalake.server.schema import (
    event_labels_table,
    event_tags_table,
    events_table,
    webhook_deliveries_table,
    webhooks_table,
)

log = logging.getLogger(__name__)

EVENT_NAMES = {
    EventType.CREATED: "data.created",
    EventType.UPDATED: "data.updated",
    EventType.DELETED: "data.deleted",
}
TEST_EVENT = "webhook.test"
MAX_URL = 2048
_URL = re.compile(r"^https?://[^\s/?#]+([/?#]\S*)?$")
_FAN_OUT_BATCH = 500
_MAX_BACKOFF = 3600.0
_PRUNE_EVERY = 3600.0  # seconds between prunings of the delivery log

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass(frozen=True)
class Webhook:
    id: str
    org: str
    url: str
    events: tuple[EventType, ...]
    filter: str
    created_at: datetime


@dataclass(frozen=True)
class NewWebhook:
    """A webhook as created: `secret` is shown this once."""

    webhook: Webhook
    secret: str


@dataclass(frozen=True)
class Delivery:
    id: str
    webhook_id: str
    event_type: str
    data_id: str
    status: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    response_status: int | None
    error: str


@dataclass(frozen=True)
class DeliverySettings:
    timeout: float = 10.0  # seconds per POST
    retry_base: float = 5.0  # seconds before the first retry; doubles each time
    retry_for: float = 24 * 3600.0  # seconds after the event to keep trying
    concurrency: int = 8  # POSTs in flight per server
    keep_for: float = 7 * 24 * 3600.0  # seconds a finished delivery stays in the log


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: `v1,` and the base64 HMAC-SHA256, keyed with the secret's
    base64 part, of `id.timestamp.body`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def data_json(record: DataRecord) -> dict[str, Any]:
    """An item as JSON: the same fields as the SDK's Data.to_json."""
    return {
        "id": record.id,
        "filename": record.filename,
        "size": record.size,
        "sha256": record.sha256,
        "content_type": record.content_type,
        "tags": list(record.tags),
        "created_at": md.format_datetime(record.created_at),
        "updated_at": md.format_datetime(record.updated_at),
        "etag": record.etag,
        "metadata": md.to_jsonable(record.metadata),
        "metadata_sources": record.metadata_sources,
        "labels": record.labels,
    }


class Webhooks:
    """Registering endpoints, and delivering the change log to them."""

    def __init__(self, catalog: SqlCatalog, settings: DeliverySettings | None = None) -> None:
        self._catalog = catalog
        self._engine = catalog.engine
        self._settings = settings or DeliverySettings()
        self._postgres = self._engine.dialect.name == "postgresql"
        # Its own threads: a slow receiver can hold these, never the catalog's or the blobs'.
        # Twice the sends in flight: a POST that timed out may hold its thread a little longer.
        self._pool = ThreadPoolExecutor(2 * self._settings.concurrency, "metalake-webhook")
        self._opener = urllib.request.build_opener(_NoRedirects())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # Registering.

    async def create(self, org: str, url: str, events: list[EventType], filter: str) -> NewWebhook:
        violations = []
        if len(url) > MAX_URL or not _URL.match(url):
            violations.append(
                FieldViolation("url", f"must be an http:// or https:// URL of at most {MAX_URL}")
            )
        if not events:
            violations.append(FieldViolation("event_types", "name at least one event type"))
        try:
            compile_filter(filter, EVENTS)
        except FilterError as error:
            violations.append(FieldViolation("filter", str(error)))
        if violations:
            raise InvalidRequest("the webhook is invalid", violations)
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        webhook = Webhook(
            id="wh_" + secrets.token_hex(8),
            org=org,
            url=url,
            events=tuple(sorted(set(events))),
            filter=filter,
            created_at=datetime.now(UTC),
        )
        # From now on: events already in the log are not sent to a new endpoint.
        after = await self._catalog.last_event_seq()
        values = {
            "id": webhook.id,
            "org": org,
            "url": url,
            "events": ",".join(str(int(e)) for e in webhook.events),
            "filter": filter,
            "secret": secret,
            "created_at": _to_micros(webhook.created_at),
            "after_seq": after,
        }
        await self._catalog.run(
            lambda: self._execute(insert(webhooks_table).values(values)), write=True
        )
        return NewWebhook(webhook, secret)

    async def registered(self, org: str) -> list[Webhook]:
        statement = (
            select(webhooks_table)
            .where(webhooks_table.c.org == org)
            .order_by(webhooks_table.c.created_at, webhooks_table.c.id)
        )

        def work() -> list[Webhook]:
            with self._engine.connect() as connection:
                return [_webhook(row) for row in connection.execute(statement).mappings()]

        return await self._catalog.run(work)

    async def delete(self, org: str, webhook_id: str) -> None:
        hooks = webhooks_table.c

        def work() -> int:
            with self._engine.begin() as connection:
                connection.execute(
                    delete(webhook_deliveries_table).where(
                        webhook_deliveries_table.c.webhook_id == webhook_id,
                        exists().where(hooks.id == webhook_id, hooks.org == org),
                    )
                )
                return int(
                    connection.execute(
                        delete(webhooks_table).where(hooks.id == webhook_id, hooks.org == org)
                    ).rowcount
                )

        if not await self._catalog.run(work, write=True):
            raise NotFound(webhook_id, kind="webhook")

    async def _get(self, org: str, webhook_id: str) -> tuple[Webhook, str]:
        statement = select(webhooks_table).where(
            webhooks_table.c.id == webhook_id, webhooks_table.c.org == org
        )

        def work() -> Any:
            with self._engine.connect() as connection:
                return connection.execute(statement).mappings().first()

        row = await self._catalog.run(work) if webhook_id else None
        if row is None:
            raise NotFound(webhook_id, kind="webhook")
        return _webhook(row), row["secret"]

    async def deliveries(
        self, org: str, webhook_id: str, *, page_size: int, page_token: str
    ) -> tuple[list[Delivery], str]:
        """A webhook's delivery log, newest first."""
        await self._get(org, webhook_id)
        if page_size < 0:
            raise invalid_field("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        columns = webhook_deliveries_table.c
        statement = select(webhook_deliveries_table).where(columns.webhook_id == webhook_id)
        if page_token:
            try:
                created, delivery_id = json.loads(base64.urlsafe_b64decode(page_token + "=="))
            except (ValueError, TypeError):
                raise invalid_field("page_token", "is not a token this service issued") from None
            statement = statement.where(
                or_(
                    columns.created_at < created,
                    and_(columns.created_at == created, columns.id < delivery_id),
                )
            )
        statement = statement.order_by(columns.created_at.desc(), columns.id.desc()).limit(size + 1)

        def work() -> list[Any]:
            with self._engine.connect() as connection:
                return list(connection.execute(statement).mappings())

        rows = await self._catalog.run(work)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = json.dumps([rows[-1]["created_at"], rows[-1]["id"]]).encode()
            token = base64.urlsafe_b64encode(last).decode().rstrip("=")
        return [_delivery(row) for row in rows], token

    async def test(self, org: str, webhook_id: str) -> Delivery:
        """Send a test event now, through the delivery log; returns it after the first try
        (pending, to be retried, if that failed)."""
        webhook, secret = await self._get(org, webhook_id)
        now = datetime.now(UTC)
        delivery_id = "msg_" + uuid.uuid4().hex
        body = _body(TEST_EVENT, now, {"webhook_id": webhook.id, "url": webhook.url})
        token = uuid.uuid4().hex
        lease_until = now + timedelta(seconds=self._settings.timeout * 2 + 30)
        values = {
            "id": delivery_id,
            "webhook_id": webhook.id,
            "org": org,
            "event_seq": None,
            "data_id": None,
            "event_type": TEST_EVENT,
            "payload": body.decode(),
            "created_at": _to_micros(now),
            "status": PENDING,
            "attempts": 0,
            "next_attempt_at": _to_micros(now),
            "lease_token": token,
            "lease_until": _to_micros(lease_until),
        }
        await self._catalog.run(
            lambda: self._execute(insert(webhook_deliveries_table).values(values)), write=True
        )
        await self._send(_Leased(delivery_id, webhook.url, secret, body, 0, _to_micros(now), token))
        found, _ = await self.deliveries(org, webhook.id, page_size=MAX_PAGE_SIZE, page_token="")
        return next(d for d in found if d.id == delivery_id)

    # Delivering.

    async def run(self, interval: float) -> None:
        """Deliver forever: fan events out, lease as many deliveries as there are free send
        slots, send them concurrently; look again when one finishes or `interval` passes.
        Finished attempts are recorded in the transaction that leases the next ones: one
        commit per round, not two per delivery."""
        sending: set[asyncio.Task[_Outcome]] = set()
        finished: list[_Outcome] = []
        next_prune = 0.0
        try:
            while True:
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + _PRUNE_EVERY
                    with contextlib.suppress(Exception):
                        before = datetime.now(UTC) - timedelta(seconds=self._settings.keep_for)
                        await self.prune(before)
                free = self._settings.concurrency - len(sending)
                try:
                    webhook_ids = await self._catalog.run(self._webhook_ids)
                    if webhook_ids:  # else nothing to do, and no writer lock taken for it
                        await self._catalog.run(
                            functools.partial(self._fan_out, webhook_ids), write=True
                        )
                    if finished or (free and webhook_ids):
                        leased = await self._catalog.run(
                            functools.partial(
                                self._record_and_lease, finished, free if webhook_ids else 0
                            ),
                            write=True,
                        )
                        finished = []
                        sending |= {asyncio.create_task(self._attempt(d)) for d in leased}
                except Exception as error:
                    fault = backend_fault(error)
                    if fault is None:
                        log.exception("webhook delivery failed; retrying in %.1fs", interval)
                    else:  # one line per retry during an outage, not a traceback
                        log.warning("webhook delivery waits for the backend (%s); retrying", fault)
                if sending:
                    done, _ = await asyncio.wait(
                        sending, timeout=interval, return_when=asyncio.FIRST_COMPLETED
                    )
                    sending -= done
                    finished += [task.result() for task in done]
                else:
                    await asyncio.sleep(interval)
        finally:
            for task in sending:
                task.cancel()
            if finished:  # stopping: record what is known, or the leases expire and resend
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(
                        self._catalog.run(
                            functools.partial(self._record_and_lease, finished, 0), write=True
                        )
                    )

    async def prune(self, before: datetime) -> int:
        """Forget delivered and failed deliveries of events older than `before`."""
        columns = webhook_deliveries_table.c
        statement = delete(webhook_deliveries_table).where(
            columns.status.in_([DELIVERED, FAILED]), columns.created_at < _to_micros(before)
        )

        def work() -> int:
            with self._engine.begin() as connection:
                return int(connection.execute(statement).rowcount)

        return await self._catalog.run(work, write=True)

    def _webhook_ids(self) -> list[str]:
        with self._engine.connect() as connection:
            return list(connection.execute(select(webhooks_table.c.id)).scalars())

    def _fan_out(self, webhook_ids: list[str]) -> None:
        hooks = webhooks_table.c
        for webhook_id in webhook_ids:
            with self._engine.begin() as connection:
                locking = select(webhooks_table).where(hooks.id == webhook_id)
                if self._postgres:
                    locking = locking.with_for_update(skip_locked=True)
                row = connection.execute(locking).mappings().first()
                if row is None:
                    continue  # deleted, or another server is fanning it out right now
                self._fan_out_one(connection, row)

    def _fan_out_one(self, connection: Any, row: Any) -> None:
        events = events_table.c
        conditions = [events.org == row["org"], events.seq > row["after_seq"]]
        wanted = [int(e) for e in row["events"].split(",")]
        last_seen = connection.execute(
            select(events.seq).where(*conditions).order_by(events.seq.desc()).limit(1)
        ).scalar()
        if last_seen is None:
            return
        last_seen = min(last_seen, row["after_seq"] + _FAN_OUT_BATCH)
        conditions += [events.seq <= last_seen, events.event_type.in_(wanted)]
        condition = compile_filter(row["filter"], EVENTS)
        if condition is not None:
            conditions.append(condition)
        rows = list(
            connection.execute(
                select(events_table).where(*conditions).order_by(events.seq)
            ).mappings()
        )
        tags: dict[int, list[str]] = {r["seq"]: [] for r in rows}
        if rows:
            for seq, tag in connection.execute(
                select(event_tags_table.c.seq, event_tags_table.c.tag)
                .where(event_tags_table.c.seq.in_(list(tags)))
                .order_by(event_tags_table.c.seq, event_tags_table.c.tag)
            ):
                tags[seq].append(tag)
        labels = _labels_of(connection, event_labels_table.c.seq, list(tags)) if rows else {}
        deliveries = []
        for event_row in rows:
            event = Event(
                seq=event_row["seq"],
                type=EventType(event_row["event_type"]),
                time=_from_micros(event_row["event_time"]),
                record=_row_to_record(
                    event_row, tuple(tags[event_row["seq"]]), labels.get(event_row["seq"])
                ),
            )
            name = EVENT_NAMES[event.type]
            deliveries.append(
                {
                    "id": f"msg_{row['id']}_{event.seq}",
                    "webhook_id": row["id"],
                    "org": row["org"],
                    "event_seq": event.seq,
                    "data_id": event.record.id,
                    "event_type": name,
                    "payload": _body(name, event.time, data_json(event.record)).decode(),
                    "created_at": _to_micros(event.time),
                    "status": PENDING,
                    "attempts": 0,
                    # Due since its event: deliveries are leased oldest event first, so the
                    # events fanned out together reach every webhook in turn. Due since the
                    # fan-out, one webhook's whole batch came first, and a receiver that hangs
                    # held every send slot for the POST timeout before another was tried.
                    "next_attempt_at": _to_micros(event.time),
                    "lease_token": None,
                    "lease_until": None,
                }
            )
        if deliveries:
            connection.execute(insert(webhook_deliveries_table), deliveries)
        connection.execute(
            update(webhooks_table)
            .where(webhooks_table.c.id == row["id"])
            .values(after_seq=last_seen)
        )

    def _record_and_lease(self, finished: list[_Outcome], limit: int) -> list[_Leased]:
        columns = webhook_deliveries_table.c
        earlier = webhook_deliveries_table.alias("earlier")
        now = _to_micros(datetime.now(UTC))
        statement = (
            select(
                columns.id,
                columns.payload,
                columns.attempts,
                columns.created_at,
                webhooks_table.c.url,
                webhooks_table.c.secret,
            )
            .join(webhooks_table, webhooks_table.c.id == columns.webhook_id)
            .where(
                columns.status == PENDING,
                columns.next_attempt_at <= now,
                or_(columns.lease_until.is_(None), columns.lease_until < now),
                ~exists().where(
                    earlier.c.webhook_id == columns.webhook_id,
                    earlier.c.data_id == columns.data_id,
                    earlier.c.status == PENDING,
                    earlier.c.event_seq < columns.event_seq,
                ),
            )
            .order_by(columns.next_attempt_at, columns.event_seq)
            .limit(limit)
        )
        if self._postgres:
            statement = statement.with_for_update(skip_locked=True, of=webhook_deliveries_table)
        lease_until = now + int((self._settings.timeout + 30) * 1e6)
        leased: list[_Leased] = []
        with self._engine.begin() as connection:
            for outcome in finished:
                connection.execute(outcome.statement())
            if not limit:
                return leased
            for row in connection.execute(statement):
                token = uuid.uuid4().hex
                connection.execute(
                    update(webhook_deliveries_table)
                    .where(columns.id == row.id)
                    .values(lease_token=token, lease_until=lease_until)
                )
                leased.append(
                    _Leased(
                        row.id,
                        row.url,
                        row.secret,
                        row.payload.encode(),
                        row.attempts,
                        row.created_at,
                        token,
                    )
                )
        return leased

    async def _attempt(self, delivery: _Leased) -> _Outcome:
        """POST one delivery; what to record of it (nothing is written here)."""
        started = datetime.now(UTC)
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "metalake-webhooks/1",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(delivery.secret, delivery.id, timestamp, delivery.body),
        }
        request = urllib.request.Request(
            delivery.url, data=delivery.body, headers=headers, method="POST"
        )
        status: int | None = None
        error = ""
        try:
            status = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._pool, self._post, request),
                self._settings.timeout,
            )
        except TimeoutError:
            error = f"no answer within {self._settings.timeout:g} s"
        except urllib.error.HTTPError as answer:
            status, error = answer.code, f"answered {answer.code}"
        except (urllib.error.URLError, OSError, ValueError) as failure:
            error = str(getattr(failure, "reason", failure)) or type(failure).__name__
        delivered = status is not None and 200 <= status < 300
        if status is not None and not delivered and not error:
            error = f"answered {status}"
        attempts = delivery.attempts + 1
        age = (started - _from_micros(delivery.created_at)).total_seconds()
        delay = min(self._settings.retry_base * 2 ** (attempts - 1), _MAX_BACKOFF)
        if delivered:
            outcome = DELIVERED
        elif age + delay > self._settings.retry_for:
            outcome = FAILED
        else:
            outcome = PENDING
        values: dict[str, Any] = {
            "status": outcome,
            "attempts": attempts,
            "last_attempt_at": _to_micros(started),
            "response_status": status,
            "error": error[:1000],
            "lease_token": None,
            "lease_until": None,
            "next_attempt_at": _to_micros(started + timedelta(seconds=delay)),
        }
        if not delivered:
            log.info(
                "webhook delivery %s to %s: %s (%s)", delivery.id, delivery.url, error, outcome
            )
        return _Outcome(delivery.id, delivery.lease_token, values)

    async def _send(self, delivery: _Leased) -> None:
        """Attempt one delivery and record the outcome at once."""
        outcome = await self._attempt(delivery)
        await asyncio.shield(
            self._catalog.run(lambda: self._execute(outcome.statement()), write=True)
        )

    def _post(self, request: urllib.request.Request) -> int:
        with self._opener.open(request, timeout=self._settings.timeout) as response:
            response.read(65536)  # the body is not used; read a little so the server can finish
            return int(response.status)

    def _execute(self, statement: Any) -> None:
        with self._engine.begin() as connection:
            connection.execute(statement)


@dataclass(frozen=True)
class _Outcome:
    """An attempt's result, applied only while its lease is still this attempt's."""

    delivery_id: str
    lease_token: str
    values: dict[str, Any]

    def statement(self) -> Any:
        columns = webhook_deliveries_table.c
        return (
            update(webhook_deliveries_table)
            .where(columns.id == self.delivery_id, columns.lease_token == self.lease_token)
            .values(self.values)
        )


@dataclass(frozen=True)
class _Leased:
    id: str
    url: str
    secret: str
    body: bytes
    attempts: int
    created_at: int
    lease_token: str


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer that is not 2xx: the endpoint must be the URL registered."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _body(event_type: str, at: datetime, data: dict[str, Any]) -> bytes:
    payload = {"type": event_type, "timestamp": md.format_datetime(at), "data": data}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _webhook(row: Any) -> Webhook:
    return Webhook(
        id=row["id"],
        org=row["org"],
        url=row["url"],
        events=tuple(EventType(int(e)) for e in row["events"].split(",")),
        filter=row["filter"],
        created_at=_from_micros(row["created_at"]),
    )


def _delivery(row: Any) -> Delivery:
    pending = row["status"] == PENDING
    return Delivery(
        id=row["id"],
        webhook_id=row["webhook_id"],
        event_type=row["event_type"],
        data_id=row["data_id"] or "",
        status=row["status"],
        attempts=row["attempts"],
        created_at=_from_micros(row["created_at"]),
        next_attempt_at=_from_micros(row["next_attempt_at"]) if pending else None,
        last_attempt_at=(
            _from_micros(row["last_attempt_at"]) if row["last_attempt_at"] is not None else None
        ),
        response_status=row["response_status"],
        error=row["error"] or "",
    )


async def keep_delivering(webhooks: Webhooks, interval: float) -> None:
    """The background job: deliver, forever; poll every `interval` seconds when idle."""
    await webhooks.run(interval)
