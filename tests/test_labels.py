"""Labels end to end: set at upload and by UpdateMetadata, shown, filtered on both engines,
bounded, and carried by the change log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from metalake import Client, InvalidArgumentError, InvalidMetadataError
from metalake.cli import EXIT_OK, EXIT_USAGE
from metalake.server.config import Settings
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import serving
from tests.test_cli import run
from tests.test_sdk import write_jpeg


@pytest.fixture
def any_catalog_target(catalog_url: str, tmp_path: Path) -> Iterator[str]:
    """A server on SQLite, then on PostgreSQL (the scale-out catalog)."""
    settings = Settings(
        data_dir=tmp_path / "data", listen="127.0.0.1:0", catalog_url=catalog_url, migrate=True
    )
    with serving(settings) as handle:
        yield handle.target


def violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    found = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found += [v.field for v in bad.field_violations]
    return found


def test_labels_are_stored_shown_and_filtered(any_catalog_target: str, tmp_path: Path) -> None:
    with Client(any_catalog_target) as client:
        datalake = client.get_datalake()
        a = datalake.upload_data(write_jpeg(tmp_path / "a.jpg"), labels={"rig": "A", "site": "S1"})
        b = datalake.upload_data(write_jpeg(tmp_path / "b.jpg", color=2), labels={"rig": "B"})
        c = datalake.upload_data(write_jpeg(tmp_path / "c.jpg", color=3))
        assert a.labels == {"rig": "A", "site": "S1"}
        assert datalake.get_data(a.id).labels == {"rig": "A", "site": "S1"}
        assert c.labels == {}

        def ids(expression: str) -> set[str]:
            return {d.id for d in datalake.list_data(expression)}

        assert ids('labels.rig = "A"') == {a.id}
        assert ids("labels.rig = B") == {b.id}
        assert ids("labels.rig:*") == {a.id, b.id}
        assert ids("NOT labels.rig:*") == {c.id}
        assert ids('labels.rig != "A"') == {b.id}  # never an item without the label
        assert ids('NOT labels.rig = "A"') == {b.id, c.id}
        assert ids('labels.site = "S*"') == {a.id}
        assert ids('labels.rig > "A"') == {b.id}
        assert ids('labels.rig = "a"') == set()  # case-sensitive, as every text filter
        assert ids('labels.rig = "A" OR labels.rig = "B"') == {a.id, b.id}
        assert ids("labels.Rig:*") == set()  # keys are case-sensitive
        with pytest.raises(InvalidArgumentError, match="a label key is at most 63"):
            ids(f'labels.{"k" * 64} = "x"')
        with pytest.raises(InvalidArgumentError, match="':' tests tags"):
            ids('labels.rig:"A"')


def test_update_metadata_sets_removes_and_replaces_labels(
    any_catalog_target: str, tmp_path: Path
) -> None:
    with Client(any_catalog_target) as client:
        datalake = client.get_datalake()
        data = datalake.upload_data(
            write_jpeg(tmp_path / "a.jpg"), {"weather": "sun"}, labels={"rig": "A", "old": "x"}
        )
        etag = data.etag
        data.update_metadata(labels={"rig": "B", "lens": "35mm", "old": None})
        assert data.labels == {"lens": "35mm", "rig": "B"}
        assert data.weather == "sun"
        assert data.etag != etag
        data.update_metadata(weather="rain", labels={"site": "S9"})
        assert data.refresh().labels == {"lens": "35mm", "rig": "B", "site": "S9"}
        assert data.weather == "rain"
        data.update_metadata(labels={"only": "this"}, replace_labels=True)
        assert data.refresh().labels == {"only": "this"}
        assert [d.id for d in datalake.list_data('labels.only = "this"')] == [data.id]
        assert list(datalake.list_data("labels.rig:*")) == []

    with grpc.insecure_channel(any_catalog_target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        # An empty mask sets the labels given and keeps the others.
        stub.UpdateMetadata(pb.UpdateMetadataRequest(id=data.id, labels={"more": "1"}))
        assert stub.GetData(pb.GetDataRequest(id=data.id)).data.labels == {
            "only": "this",
            "more": "1",
        }
        too_many = {f"k{i}": "v" for i in range(63)}
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpdateMetadata(
                pb.UpdateMetadataRequest(
                    id=data.id,
                    labels=too_many,
                    update_mask=FieldMask(paths=[f"labels.{k}" for k in too_many]),
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(caught.value) == ["labels"]
        assert "at most 64 labels" in str(caught.value.details())
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpdateMetadata(
                pb.UpdateMetadataRequest(
                    id=data.id, labels={"x": "1"}, update_mask=FieldMask(paths=["weather"])
                )
            )
        assert violations(caught.value) == ["labels"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpdateMetadata(
                pb.UpdateMetadataRequest(id=data.id, update_mask=FieldMask(paths=["labels.a-b"]))
            )
        assert violations(caught.value) == ["update_mask"]
        # Nothing of the refused updates was applied.
        assert stub.GetData(pb.GetDataRequest(id=data.id)).data.labels == {
            "only": "this",
            "more": "1",
        }


def test_label_bounds_are_field_violations(server_target: str, tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "a.jpg")
    with (
        Client(server_target) as client,
        pytest.raises(InvalidMetadataError, match=r"labels\.bad-key"),  # before sending
    ):
        client.get_datalake().upload_data(path, labels={"bad-key": "v"})
    bad = {
        "": "empty key",
        "9lives": "starts with a digit",
        "k" * 64: "long key",
        "long": "v" * 257,
        "ctl": "a\nb",
    }
    with grpc.insecure_channel(server_target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.UploadData(
                iter(
                    [
                        pb.UploadDataRequest(
                            header=pb.UploadDataHeader(filename="a.jpg", labels=bad)
                        ),
                        pb.UploadDataRequest(chunk=b"x"),
                    ]
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(violations(caught.value)) == sorted(f"header.labels.{k[:63]}" for k in bad)
        many = {f"k{i}": "v" for i in range(65)}
        with pytest.raises(grpc.RpcError) as caught:
            stub.UploadData(
                iter([pb.UploadDataRequest(header=pb.UploadDataHeader(filename="a", labels=many))])
            )
        assert violations(caught.value) == ["header.labels"]
        assert list(stub.ListData(pb.ListDataRequest()).data) == []


def test_watch_filters_and_carries_labels(server_target: str, tmp_path: Path) -> None:
    with grpc.insecure_channel(server_target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        start = stub.WatchData(pb.WatchDataRequest(filter="labels.rig:*"))
        # The watch starts "from now": once it answers, store one item it sees, one it does not.
        with Client(server_target) as client:
            time.sleep(0.5)
            seen = client.get_datalake().upload_data(
                write_jpeg(tmp_path / "a.jpg"), labels={"rig": "A"}
            )
            client.get_datalake().upload_data(write_jpeg(tmp_path / "b.jpg", color=4))
            seen.update_metadata(labels={"rig": None})  # no longer matches: not emitted
            seen.update_metadata(labels={"rig": "C"})
        events = []
        for event in start:
            events.append(event)
            if len(events) == 2:
                break
        start.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs
    assert [(e.type, e.data_id, dict(e.data.labels)) for e in events] == [
        (pb.EVENT_TYPE_CREATED, seen.id, {"rig": "A"}),
        (pb.EVENT_TYPE_UPDATED, seen.id, {"rig": "C"}),
    ]


def test_cli_labels(server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = ("--target", server_target)
    photo = str(write_jpeg(tmp_path / "a.jpg"))
    code, out, err = run(
        capsys, "upload", photo, "--label", "rig=A", "--label", "site=", "--json", *t
    )
    assert code == EXIT_OK, err
    item = json.loads(out)
    assert item["labels"] == {"rig": "A", "site": ""}
    code, out, _ = run(capsys, "get", item["id"], *t)
    assert "labels: rig=A, site=" in out
    code, out, _ = run(capsys, "ls", "--filter", 'labels.site = ""', "-q", *t)
    assert out.split() == [item["id"]]
    for bad in ("rig", "bad-key=1", f"k={'v' * 300}"):
        code, out, err = run(capsys, "upload", photo, "--label", bad, *t)
        assert code == EXIT_USAGE
        assert "--label" in err
    code, _, err = run(capsys, "upload", photo, "--label", "a=1", "--label", "a=2", *t)
    assert (code, "given twice" in err) == (EXIT_USAGE, True)


def test_manifest_label_columns(server_target: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        write_jpeg(root / f"{i}.jpg", color=i)
    (root / "m.csv").write_text("path,labels.rig,labels.site\n0.jpg,A,S1\n1.jpg,,S2\n")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": "photos/2.jpg", "labels": {"rig": "J"}}) + "\n")
    with Client(server_target) as client:
        datalake = client.get_datalake()
        results = datalake.upload_folder(root, manifest=root / "m.csv", labels={"batch": "7"})
        got = {r.filename: r.data.labels for r in results if r.data is not None}
        assert got == {
            "0.jpg": {"batch": "7", "rig": "A", "site": "S1"},
            "1.jpg": {"batch": "7", "site": "S2"},
            "2.jpg": {"batch": "7"},
        }
        [result] = datalake.upload_folder(manifest=jsonl)
        assert result.data is not None
        assert result.data.labels == {"rig": "J"}
    (root / "m.csv").write_text("path,labels.bad-key\n0.jpg,A\n")
    from metalake.bulk import ManifestError, read_manifest

    with pytest.raises(ManifestError, match=r"line 1, column 2 \(labels.bad-key\): label key"):
        read_manifest(root / "m.csv")


def test_label_pages_are_in_order_through_page_tokens(
    any_catalog_target: str, tmp_path: Path
) -> None:
    with Client(any_catalog_target) as client:
        datalake = client.get_datalake()
        paths = [write_jpeg(tmp_path / f"{i}.jpg", color=i) for i in range(9)]
        stored = [
            datalake.upload_data(
                path,
                {"reference": "odd" if i % 2 else "even"},
                labels={"rig": "A" if i < 7 else "B"},
            )
            for i, path in enumerate(paths)
        ]
        in_order = [d.id for d in sorted(stored, key=lambda d: (d.created_at, d.id))]
        rig_a = [i for i in in_order if i in {d.id for d in stored[:7]}]
        listed = [d.id for d in datalake.list_data('labels.rig = "A"', page_size=2)]
        assert listed == rig_a  # every page in created_at order, nothing twice
        both = 'labels.rig = "A" AND reference = "odd"'
        assert [d.id for d in datalake.list_data(both, page_size=1)] == [
            i for i in rig_a if i in {d.id for d in stored if d.reference == "odd"}
        ]
        newest_first = list(datalake.list_data('labels.rig = "A"', order_by="created_at desc"))
        assert [d.id for d in newest_first] == rig_a[::-1]


def test_label_presence_pages_and_combinations(any_catalog_target: str, tmp_path: Path) -> None:
    with Client(any_catalog_target) as client:
        datalake = client.get_datalake()
        stored = [
            datalake.upload_data(
                write_jpeg(tmp_path / f"{i}.jpg", color=i),
                labels={"rig": "AB"[i % 2], **({"site": "S1"} if i % 3 == 0 else {})},
            )
            for i in range(8)
        ]
        stored.append(datalake.upload_data(write_jpeg(tmp_path / "none.jpg", color=99)))
        in_order = [d.id for d in sorted(stored, key=lambda d: (d.created_at, d.id))]

        def ids(expression: str) -> list[str]:
            return [d.id for d in datalake.list_data(expression, page_size=2)]

        with_rig = {d.id for d in stored if "rig" in d.labels}
        assert ids("labels.rig:*") == [i for i in in_order if i in with_rig]
        both = {d.id for d in stored if "site" in d.labels and d.labels.get("rig") == "A"}
        assert ids('labels.site:* AND labels.rig = "A"') == [i for i in in_order if i in both]
        assert ids("NOT labels.rig:*") == [stored[-1].id]
