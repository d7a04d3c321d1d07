"""Webhooks against a real HTTP receiver on loopback: signatures, order, retries, a receiver
that is down or stuck, one delivery per event across servers, organizations, the CLI."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from metalake import Client, NotFoundError, PermissionDeniedError, WebhookDelivery
from metalake.cli import EXIT_OK, main
from metalake.server.auth import Role
from metalake.server.catalog import EventType, SqlCatalog
from metalake.server.config import Settings
from metalake.server.webhooks import DeliverySettings, Webhooks
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, serving
from tests.test_auth import create_token
from tests.test_catalog import ORG, record
from tests.test_service import requests


def fast(settings: Settings, timeout: float = 2.0) -> Settings:
    """Deliveries polled, retried and timed out in test time."""
    return replace(
        settings, webhook_interval=0.05, webhook_retry_base=0.05, webhook_timeout=timeout
    )


def settled(client: Client, webhook_id: str, count: int) -> list[WebhookDelivery]:
    """The delivery log once `count` deliveries are no longer pending."""
    deadline = time.monotonic() + 60
    while True:
        log = list(client.get_datalake().webhook_deliveries(webhook_id))
        if sum(d.status != "pending" for d in log) >= count or time.monotonic() > deadline:
            return log
        time.sleep(0.02)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, object]:
        payload: dict[str, object] = json.loads(self.body)
        return payload


@dataclass
class Receiver:
    """An HTTP endpoint on loopback that records what it is sent and answers as told."""

    url: str
    received: list[Received] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # next answers; then 200
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.delivered()) >= count:
                    return self.delivered()
            time.sleep(0.02)
        raise AssertionError(f"{len(self.delivered())} deliveries arrived, not {count}")

    def delivered(self) -> list[Received]:
        return [r for r in self.received if r.headers.get("x-answer") == "200"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            target = state[0]
            body = self.rfile.read(int(self.headers["content-length"]))
            target.release.wait(60)  # a stuck receiver until released
            with target.lock:
                code = target.answers.pop(0) if target.answers else 200
                headers = {k.lower(): v for k, v in self.headers.items()}
                headers["x-answer"] = str(code)
                target.received.append(Received(headers, body))
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver = Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook")
    receiver.release.set()
    state.append(receiver)
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def fast_server(tmp_path: Path) -> Iterator[ServerHandle]:
    settings = fast(Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0"))
    with serving(settings) as handle:
        yield handle


def verify(secret: str, received: Received) -> bool:
    """Standard Webhooks verification, written from the specification, not from the server."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = b".".join(
        [
            received.headers["webhook-id"].encode(),
            received.headers["webhook-timestamp"].encode(),
            received.body,
        ]
    )
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    signatures = received.headers["webhook-signature"].split()
    return any(s.partition(",")[2] == expected for s in signatures if s.startswith("v1,"))


def test_every_change_is_posted_signed_and_in_order(
    fast_server: ServerHandle, receiver: Receiver
) -> None:
    with Client(fast_server.target) as client, grpc.insecure_channel(fast_server.target) as ch:
        datalake = client.get_datalake()
        stub = pb_grpc.DatalakeServiceStub(ch)
        webhook = datalake.add_webhook(receiver.url)
        assert webhook.secret.startswith("whsec_")
        assert [w.id for w in datalake.list_webhooks()] == [webhook.id]
        assert all(not w.secret for w in datalake.list_webhooks())
        item = stub.UploadData(requests(b"bytes", "a.jpg", {"reference": "r1"})).data
        datalake.get_data(item.id).update_metadata(weather="rain")
        datalake.delete_data(item.id)

        got = receiver.wait_for(3)
        assert [r.payload["type"] for r in got] == ["data.created", "data.updated", "data.deleted"]
        for received in got:
            assert verify(webhook.secret, received)
            assert not verify("whsec_" + base64.b64encode(b"x" * 24).decode(), received)
            data = received.payload["data"]
            assert isinstance(data, dict)
            assert data["id"] == item.id
            assert abs(int(received.headers["webhook-timestamp"]) - time.time()) < 600
        updated = got[1].payload["data"]
        assert isinstance(updated, dict)
        assert updated["metadata"] == {"reference": "r1", "weather": "rain"}
        assert len({r.headers["webhook-id"] for r in got}) == 3

        log = settled(client, webhook.id, 3)
        assert [d.event_type for d in log] == ["data.deleted", "data.updated", "data.created"]
        assert {d.status for d in log} == {"delivered"}
        assert {d.response_status for d in log} == {200}

        # Finished deliveries older than the retention are forgotten; others are kept.
        webhooks = fast_server.running.webhooks
        assert webhooks is not None
        prune = webhooks.prune(datetime.now(UTC) - timedelta(days=1))
        assert asyncio.run_coroutine_threadsafe(prune, fast_server.loop).result(30) == 0
        prune = webhooks.prune(datetime.now(UTC) + timedelta(seconds=1))
        assert asyncio.run_coroutine_threadsafe(prune, fast_server.loop).result(30) == 3
        assert list(datalake.webhook_deliveries(webhook.id)) == []


def test_the_posted_item_carries_its_labels(fast_server: ServerHandle, receiver: Receiver) -> None:
    with Client(fast_server.target) as client, grpc.insecure_channel(fast_server.target) as ch:
        datalake = client.get_datalake()
        stub = pb_grpc.DatalakeServiceStub(ch)
        datalake.add_webhook(receiver.url, ["created", "updated"])
        item = stub.UploadData(requests(b"bytes", "a.jpg", labels={"rig": "A"})).data
        datalake.get_data(item.id).update_metadata(labels={"rig": "B", "site": "north"})
        got = receiver.wait_for(2)
    labels = []
    for received in got:
        data = received.payload["data"]
        assert isinstance(data, dict)
        labels.append(data["labels"])
    assert labels == [{"rig": "A"}, {"rig": "B", "site": "north"}]


def test_failures_are_retried_without_breaking_an_items_order(
    fast_server: ServerHandle, receiver: Receiver
) -> None:
    receiver.answers = [500, 500]  # the first two attempts fail
    with Client(fast_server.target) as client, grpc.insecure_channel(fast_server.target) as ch:
        datalake = client.get_datalake()
        stub = pb_grpc.DatalakeServiceStub(ch)
        webhook = datalake.add_webhook(receiver.url, ["created", "updated"])
        item = stub.UploadData(requests(b"bytes", "a.jpg")).data
        datalake.get_data(item.id).update_metadata(weather="sun")
        got = receiver.wait_for(2)
        assert [r.payload["type"] for r in got] == ["data.created", "data.updated"]
        # The updated event waited for the created one, which needed three attempts.
        attempts = [r.headers["webhook-id"] for r in receiver.received]
        created_id = got[0].headers["webhook-id"]
        assert attempts[:3] == [created_id] * 3
        log = {d.event_type: d for d in settled(client, webhook.id, 2)}
        assert log["data.created"].attempts == 3
        assert log["data.updated"].attempts == 1
        assert log["data.created"].status == "delivered"


def test_a_stuck_or_missing_receiver_never_holds_uploads(
    tmp_path: Path, receiver: Receiver
) -> None:
    settings = fast(Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0"), timeout=30.0)
    receiver.release.clear()  # every POST hangs until released
    with serving(settings) as handle, Client(handle.target) as client:
        datalake = client.get_datalake()
        stuck = datalake.add_webhook(receiver.url)
        gone = datalake.add_webhook("http://127.0.0.1:9/nobody-listens")
        with grpc.insecure_channel(handle.target) as channel:
            stub = pb_grpc.DatalakeServiceStub(channel)
            ids = [stub.UploadData(requests(b"%d" % i, f"{i}.jpg")).data.id for i in range(40)]
            # Every upload was answered while deliveries hang, more than the sender has threads.
            listed = stub.ListData(pb.ListDataRequest(page_size=100)).data
            assert {d.id for d in listed} == set(ids)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            refused = list(datalake.webhook_deliveries(gone.id))
            if refused and refused[-1].attempts:
                break
            time.sleep(0.05)
        assert refused[-1].status == "pending"
        assert refused[-1].error
        assert refused[-1].response_status is None
        receiver.release.set()
        assert len(receiver.wait_for(40)) >= 40
        assert stuck.id


def test_one_delivery_per_event_across_servers(
    tmp_path: Path, postgres_url: str, receiver: Receiver
) -> None:
    base = fast(Settings(listen="127.0.0.1:0", catalog_url=postgres_url, migrate=True))
    with (
        serving(replace(base, data_dir=tmp_path / "a")) as first,
        serving(replace(base, data_dir=tmp_path / "b")) as second,
        serving(replace(base, data_dir=tmp_path / "c")) as third,
    ):
        with Client(first.target) as client:
            client.get_datalake().add_webhook(receiver.url)
        for index in range(30):
            target = (first, second, third)[index % 3].target
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.DatalakeServiceStub(channel)
                stub.UploadData(requests(b"%d" % index, f"{index}.jpg"))
        receiver.wait_for(30)
        time.sleep(1)  # room for any duplicate to arrive
        ids = [r.headers["webhook-id"] for r in receiver.received]
        assert len(ids) == 30
        assert len(set(ids)) == 30


def test_webhooks_belong_to_an_organization_and_need_admin(
    tmp_path: Path, receiver: Receiver
) -> None:
    settings = fast(
        replace(Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0"), auth_cache_seconds=0)
    )
    with serving(settings) as handle:
        acme_admin = create_token(handle, "acme", Role.ADMIN)
        acme_write = create_token(handle, "acme", Role.WRITE)
        globex_admin = create_token(handle, "globex", Role.ADMIN)
        with (
            Client(handle.target, token=acme_admin) as acme,
            Client(handle.target, token=acme_write) as writer,
            Client(handle.target, token=globex_admin) as globex,
        ):
            with pytest.raises(PermissionDeniedError):
                writer.get_datalake().add_webhook(receiver.url)
            webhook = acme.get_datalake().add_webhook(receiver.url)
            calls: list[Callable[[], object]] = [
                lambda: globex.get_datalake().delete_webhook(webhook.id),
                lambda: list(globex.get_datalake().webhook_deliveries(webhook.id)),
                lambda: globex.get_datalake().test_webhook(webhook.id),
            ]
            for call in calls:
                with pytest.raises(NotFoundError):
                    call()
            assert globex.get_datalake().list_webhooks() == []
            with grpc.insecure_channel(handle.target) as channel:
                stub = pb_grpc.DatalakeServiceStub(channel)
                theirs = (("authorization", f"Bearer {globex_admin}"),)
                ours = (("authorization", f"Bearer {acme_write}"),)
                stub.UploadData(requests(b"globex's", "g.jpg"), metadata=theirs)
                mine = stub.UploadData(requests(b"acme's", "a.jpg"), metadata=ours).data
            (got,) = receiver.wait_for(1)
            data = got.payload["data"]
            assert isinstance(data, dict)
            assert data["id"] == mine.id
            time.sleep(0.5)
            assert len(receiver.received) == 1


def test_filters_event_types_and_the_commands(
    fast_server: ServerHandle, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fast_server.target)
    assert (
        main(
            [
                "webhook",
                "add",
                receiver.url,
                "--events",
                "created,deleted",
                "--filter",
                'reference = "keep"',
                "--json",
                *t,
            ]
        )
        == EXIT_OK
    )
    created = json.loads(capsys.readouterr().out)
    assert created["secret"].startswith("whsec_")
    assert created["events"] == ["created", "deleted"]
    assert main(["webhook", "ls", "--json", *t]) == EXIT_OK
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "secret" not in listed
    assert main(["webhook", "add", receiver.url, "--events", "created,moved", *t]) == 2
    capsys.readouterr()

    with grpc.insecure_channel(fast_server.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        kept = stub.UploadData(requests(b"1", "k.jpg", {"reference": "keep"})).data
        stub.UploadData(requests(b"2", "o.jpg", {"reference": "other"}))
        stub.UpdateMetadata(pb.UpdateMetadataRequest(id=kept.id, metadata=pb.Metadata(weather="x")))
        stub.DeleteData(pb.DeleteDataRequest(id=kept.id))
    got = receiver.wait_for(2)
    assert [r.payload["type"] for r in got] == ["data.created", "data.deleted"]
    assert verify(created["secret"], got[0])

    assert main(["webhook", "test", created["id"], "--json", *t]) == EXIT_OK
    tested = json.loads(capsys.readouterr().out)
    assert (tested["event_type"], tested["status"], tested["attempts"]) == (
        "webhook.test",
        "delivered",
        1,
    )
    assert receiver.received[-1].payload["type"] == "webhook.test"
    assert verify(created["secret"], receiver.received[-1])
    assert main(["webhook", "deliveries", created["id"], "--json", *t]) == EXIT_OK
    log = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["event_type"] for d in log] == ["webhook.test", "data.deleted", "data.created"]
    assert main(["webhook", "rm", created["id"], *t]) == EXIT_OK
    capsys.readouterr()
    assert main(["webhook", "ls", *t]) == EXIT_OK
    assert capsys.readouterr().out == ""


async def test_events_fanned_out_together_reach_every_webhook_in_turn(catalog: SqlCatalog) -> None:
    """A burst of events, fanned out for one webhook, then (a moment later) for another: the
    send slots go to both in turn, oldest event first, so a receiver that hangs cannot hold
    every slot while the other webhook's deliveries wait for its timeout."""
    webhooks = Webhooks(catalog, DeliverySettings(concurrency=2))
    try:
        made = [
            await webhooks.create(ORG, f"http://127.0.0.1:9/{name}", [EventType.CREATED], "")
            for name in ("first", "second")
        ]
        for _ in range(6):
            await catalog.add(record())
        for new in made:
            await catalog.run(functools.partial(webhooks._fan_out, [new.webhook.id]), write=True)
            await asyncio.sleep(0.01)
        leased = await catalog.run(lambda: webhooks._record_and_lease([], 2), write=True)
    finally:
        webhooks.close()
    assert sorted(delivery.url for delivery in leased) == [new.webhook.url for new in made]
