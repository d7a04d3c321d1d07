"""Dataset snapshots against a real server: frozen versions, diffs, downloads, gc, orgs, CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_status import rpc_status

from metalake import Client, NotFoundError
from metalake.cli import EXIT_OK, EXIT_USAGE, main
from metalake.server.auth import Role
from metalake.server.config import Settings
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, serving
from tests.test_auth import auth, create_token
from tests.test_service import requests


@pytest.fixture
def server(tmp_path: Path, catalog_url: str) -> Iterator[ServerHandle]:
    """A server on SQLite and on PostgreSQL (the snapshot isolation differs)."""
    settings = Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0", catalog_url=catalog_url)
    with serving(replace(settings, migrate=True)) as handle:
        yield handle


def collect_garbage(handle: ServerHandle) -> None:
    datalake = handle.running.datalake
    asyncio.run_coroutine_threadsafe(
        datalake.collect_garbage(orphan_age=timedelta(0)), handle.loop
    ).result(60)


def upload(stub: pb_grpc.DatalakeServiceStub, content: bytes, name: str, **meta: object) -> pb.Data:
    return stub.UploadData(requests(content, name, meta or None)).data  # type: ignore[arg-type]


def test_a_manifest_is_byte_identical_after_a_month_of_changes(
    server: ServerHandle, tmp_path: Path
) -> None:
    with Client(server.target) as client, grpc.insecure_channel(server.target) as channel:
        datalake = client.get_datalake()
        stub = pb_grpc.DatalakeServiceStub(channel)
        frozen = [
            upload(stub, f"day 0 photo {i}".encode(), f"p{i}.jpg", reference="train")
            for i in range(12)
        ]
        other = upload(stub, b"not selected", "other.jpg", reference="test")
        version = datalake.create_dataset("train", 'reference = "train"', description="v1")
        assert (version.name, version.version, version.item_count) == ("train", 1, 12)
        assert version.total_size == sum(d.size for d in frozen)
        before = datalake.dataset_manifest("train", 1)
        items_before = [d.to_json() for d in datalake.dataset_items("train", 1)]

        # A month of changes: every day new uploads, metadata updates and deletions, some of
        # them of frozen items (and of their content: the same bytes uploaded again).
        deleted: set[str] = set()
        for day in range(1, 31):
            upload(stub, f"day {day} photo".encode(), f"d{day}.jpg", reference="train")
            target = frozen[day % len(frozen)]
            if target.id not in deleted:
                stub.UpdateMetadata(
                    pb.UpdateMetadataRequest(
                        id=target.id,
                        metadata=pb.Metadata(weather=f"day {day}", reference="train"),
                    )
                )
            if day % 5 == 0:
                victim = frozen[day // 5]
                stub.DeleteData(pb.DeleteDataRequest(id=victim.id))
                deleted.add(victim.id)
        stub.DeleteData(pb.DeleteDataRequest(id=other.id))
        collect_garbage(server)

        assert datalake.dataset_manifest("train", 1) == before
        assert [d.to_json() for d in datalake.dataset_items("train", 1)] == items_before
        assert datalake.get_dataset("train", 1).item_count == 12
        # The deleted items' bytes are still there: the whole version downloads, verified.
        written = datalake.download_dataset("train", tmp_path / "v1", version=1)
        assert len(written) == 12
        for data, path in written:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == data.sha256
        assert (tmp_path / "v1" / "manifest.jsonl").read_bytes() == before

        # A new version sees today's items; the diff names what changed.
        datalake.create_dataset("train", 'reference = "train"')
        changes = {c.data_id: c.change for c in datalake.diff_datasets("train", 1, 2)}
        assert {i for i, c in changes.items() if c == "removed"} == deleted
        assert sum(c == "added" for c in changes.values()) == 30
        updated = {frozen[day % 12].id for day in range(1, 31)} - deleted
        assert {i for i, c in changes.items() if c == "changed"} == updated
        assert datalake.dataset_manifest("train", 1) == before


def test_a_version_freezes_labels_and_diffs_their_changes(server: ServerHandle) -> None:
    with Client(server.target) as client, grpc.insecure_channel(server.target) as channel:
        datalake = client.get_datalake()
        stub = pb_grpc.DatalakeServiceStub(channel)
        labelled = stub.UploadData(
            requests(b"labelled", "l.jpg", labels={"split": "train", "annotator": "ann"})
        ).data
        plain = upload(stub, b"no labels", "p.jpg")
        datalake.create_dataset("labels")
        frozen = {d.id: d.labels for d in datalake.dataset_items("labels", 1)}
        assert frozen == {labelled.id: {"annotator": "ann", "split": "train"}, plain.id: {}}
        manifest = datalake.dataset_manifest("labels", 1)
        lines = {json.loads(line).get("id"): line for line in manifest.decode().splitlines()}
        # Keys sorted, whatever order they were given in.
        assert '"labels":{"annotator":"ann","split":"train"}' in lines[labelled.id]
        assert '"labels":{}' in lines[plain.id]

        # Labels change after the version: it keeps the ones it froze.
        stub.UpdateMetadata(
            pb.UpdateMetadataRequest(
                id=labelled.id,
                labels={"split": "test", "reviewed": "yes"},
                update_mask=FieldMask(
                    paths=["labels.split", "labels.reviewed", "labels.annotator"]
                ),
            )
        )
        now = {"reviewed": "yes", "split": "test"}
        assert stub.GetData(pb.GetDataRequest(id=labelled.id)).data.labels == now
        assert datalake.dataset_manifest("labels", 1) == manifest
        page = stub.ListDatasetItems(pb.ListDatasetItemsRequest(name="labels", version=1))
        assert {d.id: dict(d.labels) for d in page.data} == frozen
        request = pb.DownloadDatasetItemRequest(name="labels", version=1, data_id=labelled.id)
        first = next(iter(stub.DownloadDatasetItem(request)))
        assert first.data.labels == {"annotator": "ann", "split": "train"}

        # The next version freezes today's labels; the diff names the label change.
        datalake.create_dataset("labels")
        assert {d.id: d.labels for d in datalake.dataset_items("labels", 2)} == {
            labelled.id: now,
            plain.id: {},
        }
        (entry,) = stub.DiffDatasets(
            pb.DiffDatasetsRequest(name="labels", from_version=1, to_version=2)
        ).entries
        assert (entry.change, entry.data_id) == (pb.DATASET_CHANGE_CHANGED, labelled.id)
        assert entry.before.labels == {"annotator": "ann", "split": "train"}
        assert entry.after.labels == now
        assert datalake.dataset_manifest("labels", 1) == manifest


def test_deleting_an_item_keeps_its_bytes_only_while_a_version_holds_them(
    server: ServerHandle, tmp_path: Path
) -> None:
    with Client(server.target) as client, grpc.insecure_channel(server.target) as channel:
        datalake = client.get_datalake()
        stub = pb_grpc.DatalakeServiceStub(channel)
        kept = upload(stub, b"kept by a snapshot", "kept.jpg", reference="a")
        loose = upload(stub, b"held by nothing", "loose.jpg", reference="b")
        datalake.create_dataset("a", 'reference = "a"')
        for item in (kept, loose):
            stub.DeleteData(pb.DeleteDataRequest(id=item.id))
        collect_garbage(server)
        blobs = server.running.datalake.blobs
        exists = [
            asyncio.run_coroutine_threadsafe(blobs.exists(d.sha256), server.loop).result(30)
            for d in (kept, loose)
        ]
        assert exists == [True, False]
        with pytest.raises(NotFoundError):
            datalake.get_data(kept.id)
        request = pb.DownloadDatasetItemRequest(name="a", version=1, data_id=kept.id)
        messages = list(stub.DownloadDatasetItem(request))
        assert messages[0].data.id == kept.id
        assert b"".join(m.chunk for m in messages[1:]) == b"kept by a snapshot"
        # An item that is not in the version is not found there.
        missing = pb.DownloadDatasetItemRequest(name="a", version=1, data_id=loose.id)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.DownloadDatasetItem(missing))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_items_and_diffs_page_through_everything_once(server_target: str) -> None:
    with grpc.insecure_channel(server_target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        ids = [upload(stub, f"item {i}".encode(), f"{i}.jpg").id for i in range(7)]
        stub.CreateDataset(pb.CreateDatasetRequest(name="all"))
        stub.DeleteData(pb.DeleteDataRequest(id=ids[0]))
        ids += [upload(stub, f"item {i}".encode(), f"{i}.jpg").id for i in range(7, 10)]
        stub.CreateDataset(pb.CreateDatasetRequest(name="all"))

        seen, token = [], ""
        while True:
            page = stub.ListDatasetItems(
                pb.ListDatasetItemsRequest(name="all", version=1, page_size=2, page_token=token)
            )
            assert len(page.data) <= 2
            seen += [d.id for d in page.data]
            token = page.next_page_token
            if not token:
                break
        assert seen == sorted(ids[:7])

        entries, token = [], ""
        while True:
            diff = stub.DiffDatasets(
                pb.DiffDatasetsRequest(name="all", from_version=1, page_size=1, page_token=token)
            )
            entries += [(e.data_id, e.change) for e in diff.entries]
            token = diff.next_page_token
            if not token:
                break
        expected = [(ids[0], pb.DATASET_CHANGE_REMOVED)]
        expected += [(i, pb.DATASET_CHANGE_ADDED) for i in ids[7:]]
        assert entries == sorted(expected)

        listed = stub.ListDatasets(pb.ListDatasetsRequest(page_size=1))
        assert [(d.name, d.version) for d in listed.datasets] == [("all", 2)]
        rest = stub.ListDatasets(pb.ListDatasetsRequest(page_token=listed.next_page_token))
        assert [(d.name, d.version) for d in rest.datasets] == [("all", 1)]
        assert not rest.next_page_token


def test_bad_requests_name_their_fields(server_target: str) -> None:
    with grpc.insecure_channel(server_target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        cases: list[tuple[Callable[[], object], str]] = [
            (lambda: stub.CreateDataset(pb.CreateDatasetRequest(name="../x")), "name"),
            (
                lambda: stub.CreateDataset(pb.CreateDatasetRequest(name="ok", filter="size >")),
                "filter",
            ),
            (
                lambda: stub.ListDatasetItems(
                    pb.ListDatasetItemsRequest(name="ok", page_token="junk")
                ),
                "page_token",
            ),
        ]
        stub.CreateDataset(pb.CreateDatasetRequest(name="ok"))
        for call, field in cases:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
            assert status is not None
            assert field.encode() in status.details[0].value
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetDataset(pb.GetDatasetRequest(name="ok", version=9))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_datasets_stay_within_their_organization_and_follow_roles(tmp_path: Path) -> None:
    settings = replace(
        Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0"), auth_cache_seconds=0
    )
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        acme_write = auth(create_token(handle, "acme", Role.WRITE))
        acme_read = auth(create_token(handle, "acme", Role.READ))
        globex = auth(create_token(handle, "globex", Role.ADMIN))
        item = stub.UploadData(requests(b"acme's", "a.jpg"), metadata=acme_write).data
        stub.UploadData(requests(b"globex's", "g.jpg"), metadata=globex)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateDataset(pb.CreateDatasetRequest(name="d"), metadata=acme_read)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        created = stub.CreateDataset(pb.CreateDatasetRequest(name="d"), metadata=acme_write)
        assert created.dataset.item_count == 1  # globex's item is not acme's to freeze
        page = stub.ListDatasetItems(pb.ListDatasetItemsRequest(name="d"), metadata=acme_read)
        assert [d.id for d in page.data] == [item.id]
        calls: list[Callable[[tuple[tuple[str, str]]], object]] = [
            lambda m: stub.GetDataset(pb.GetDatasetRequest(name="d"), metadata=m),
            lambda m: stub.ListDatasetItems(pb.ListDatasetItemsRequest(name="d"), metadata=m),
            lambda m: stub.DiffDatasets(
                pb.DiffDatasetsRequest(name="d", from_version=1), metadata=m
            ),
            lambda m: list(
                stub.DownloadDatasetItem(
                    pb.DownloadDatasetItemRequest(name="d", data_id=item.id), metadata=m
                )
            ),
        ]
        for call in calls:
            call(acme_read)
            with pytest.raises(grpc.RpcError) as caught:
                call(globex)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert not stub.ListDatasets(pb.ListDatasetsRequest(), metadata=globex).datasets
        # globex may use the same name: its version 1 is its own.
        own = stub.CreateDataset(pb.CreateDatasetRequest(name="d"), metadata=globex).dataset
        assert (own.version, own.item_count) == (1, 1)


def test_the_dataset_commands(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", server_target)
    with grpc.insecure_channel(server_target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        first = upload(stub, b"one", "one.jpg", reference="x")
    assert main(["dataset", "create", "set", "--filter", 'reference = "x"', "--json", *t]) == 0
    created = json.loads(capsys.readouterr().out)
    assert (created["name"], created["version"], created["item_count"]) == ("set", 1, 1)
    with grpc.insecure_channel(server_target) as channel:
        upload(pb_grpc.DatalakeServiceStub(channel), b"two", "two.jpg", reference="x")
    assert main(["dataset", "create", "set", "--filter", 'reference = "x"', *t]) == EXIT_OK
    assert "set v2  2 items" in capsys.readouterr().out

    assert main(["dataset", "ls", "--json", *t]) == EXIT_OK
    assert [json.loads(line)["version"] for line in capsys.readouterr().out.splitlines()] == [2, 1]
    assert main(["dataset", "show", "set", "--version", "1", "--items", "--json", *t]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [first.id]
    assert main(["dataset", "diff", "set", "1", "2", "--json", *t]) == EXIT_OK
    (change,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert change["change"] == "added"
    assert change["after"]["filename"] == "two.jpg"
    assert main(["dataset", "show", "set", "--version", "1", "--manifest", *t]) == EXIT_OK
    manifest = capsys.readouterr().out.splitlines()
    assert json.loads(manifest[0])["format"] == "metalake-dataset-manifest/1"
    assert [json.loads(line)["id"] for line in manifest[1:]] == [first.id]

    out_dir = tmp_path / "set-v2"
    assert main(["dataset", "download", "set", "-o", str(out_dir), *t]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    contents = sorted(p.read_bytes() for p in out_dir.iterdir() if p.name != "manifest.jsonl")
    assert contents == [b"one", b"two"]
    assert main(["dataset", "show", "nope", *t]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["dataset", "create", "bad/name", *t]) == EXIT_USAGE
