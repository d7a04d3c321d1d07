"""DatalakeService over a real channel: the contract as any client sees it."""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from metalake import metadata as md
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, stored_blobs

Stub = pb_grpc.DatalakeServiceStub


def jpeg_bytes(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def requests(
    content: bytes,
    filename: str = "photo.jpg",
    metadata: dict[str, md.MetadataValue] | None = None,
    chunk_size: int = 64 * 1024,
    **header: object,
) -> Iterator[pb.UploadDataRequest]:
    yield pb.UploadDataRequest(
        header=pb.UploadDataHeader(
            filename=filename,
            metadata=md.to_proto(metadata or {}),
            **header,  # type: ignore[arg-type]
        )
    )
    for start in range(0, len(content), chunk_size):
        yield pb.UploadDataRequest(chunk=content[start : start + chunk_size])


def upload(stub: Stub, content: bytes, filename: str = "photo.jpg", **kwargs: object) -> pb.Data:
    response: pb.UploadDataResponse = stub.UploadData(requests(content, filename, **kwargs))  # type: ignore[arg-type]
    return response.data


def violations(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    found: dict[str, str] = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            for violation in bad_request.field_violations:
                found[violation.field] = violation.description
    return found


def stored_files(data_dir: Path) -> list[Path]:
    """Every file in the blob store and its spool area."""
    return sorted(p for p in data_dir.rglob("*") if p.is_file() and p.parent.name != "data")


def assert_nothing_stored(stub: Stub, data_dir: Path) -> None:
    assert list(stub.ListData(pb.ListDataRequest()).data) == []
    assert stored_blobs(data_dir) == []
    assert [p for p in (data_dir / "tmp").rglob("*") if p.is_file()] == []


def test_upload_then_get_round_trips_content_and_metadata(stub: Stub) -> None:
    content = jpeg_bytes()
    metadata: dict[str, md.MetadataValue] = {
        "latitude": 0.0,  # the equator: a real value, not "absent"
        "longitude": -0.0,
        "reference": "7NGOMI",
        "acquired_by": "USER-178",
        "acquired_at": datetime(2024, 5, 1, 12, 0),
    }
    data = upload(stub, content, "photo.jpg", metadata=metadata, tags=["field", "day-1"])

    assert data.size == len(content)
    assert data.sha256 == hashlib.sha256(content).hexdigest()
    assert data.content_type == "image/jpeg"
    assert list(data.tags) == ["day-1", "field"]  # a set, kept sorted
    assert data.metadata.HasField("latitude")
    assert data.metadata.latitude == 0.0
    assert not data.metadata.HasField("altitude")
    assert dict(data.metadata_sources) == dict.fromkeys(metadata, "client")

    fetched = stub.GetData(pb.GetDataRequest(id=data.id)).data
    assert fetched == data
    values, problems = md.from_proto(fetched.metadata)
    assert problems == []
    assert values == metadata


@pytest.mark.parametrize(
    "acquired_at",
    [
        datetime(2021, 4, 11, 15, 47, 53, tzinfo=timezone(timedelta(hours=-5))),
        datetime(2021, 4, 11, 15, 47, 53),  # no offset recorded: a different fact
        datetime(2021, 4, 11, 15, 47, 53, tzinfo=UTC),
    ],
)
def test_acquired_at_keeps_whether_and_which_offset_is_known(
    stub: Stub, acquired_at: datetime
) -> None:
    data = upload(stub, b"x", "a.bin", metadata={"acquired_at": acquired_at})
    values, _ = md.from_proto(stub.GetData(pb.GetDataRequest(id=data.id)).data.metadata)
    back = values["acquired_at"]
    assert isinstance(back, datetime)
    assert back == acquired_at
    assert back.utcoffset() == acquired_at.utcoffset()
    assert md.format_datetime(back) == md.format_datetime(acquired_at)


def test_a_large_file_streams_through_intact(stub: Stub, running_server: ServerHandle) -> None:
    content = os.urandom(3 * 1024 * 1024 + 17)
    data = upload(stub, content, "big.bin", chunk_size=1024 * 1024)
    assert data.size == len(content)
    assert data.sha256 == hashlib.sha256(content).hexdigest()
    received = b"".join(
        m.chunk for m in stub.DownloadData(pb.DownloadDataRequest(id=data.id)) if m.chunk
    )
    assert received == content


def test_download_starts_with_the_item_then_streams_from_an_offset(stub: Stub) -> None:
    content = bytes(range(256)) * 100
    data = upload(stub, content, "bytes.bin")
    messages = list(stub.DownloadData(pb.DownloadDataRequest(id=data.id, read_offset=1000)))
    assert messages[0].WhichOneof("content") == "data"
    assert messages[0].data.sha256 == data.sha256
    assert b"".join(m.chunk for m in messages[1:]) == content[1000:]


def test_filename_is_a_label_never_a_path(stub: Stub, running_server: ServerHandle) -> None:
    data = upload(stub, b"secret", "../../etc/passwd")
    assert data.filename == "../../etc/passwd"
    files = [p for p in running_server.data_dir.rglob("*") if p.is_file()]
    assert all(running_server.data_dir in p.parents for p in files)
    assert not any("passwd" in str(p) for p in files)


def test_content_type_is_sniffed_from_bytes_not_trusted_from_name(stub: Stub) -> None:
    assert upload(stub, jpeg_bytes(), "not-really.txt").content_type == "image/jpeg"
    assert upload(stub, b"plain words", "notes.txt").content_type == "text/plain"
    assert upload(stub, b"\x00\x01", "blob").content_type == "application/octet-stream"
    assert upload(stub, b"x", "x", content_type="image/x-raw").content_type == "image/x-raw"


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"latitude": 90.5}, "header.metadata.latitude"),
        ({"latitude": -91.0}, "header.metadata.latitude"),
        ({"longitude": 180.01}, "header.metadata.longitude"),
        ({"altitude": math.nan}, "header.metadata.altitude"),
        ({"altitude": math.inf}, "header.metadata.altitude"),
        ({"resolution_x": 0.0}, "header.metadata.resolution_x"),
        ({"resolution_y": -72.0}, "header.metadata.resolution_y"),
        ({"weather": "x" * 1025}, "header.metadata.weather"),
        ({"reference": "a\x00b"}, "header.metadata.reference"),
    ],
)
def test_invalid_metadata_is_rejected_with_the_field_and_nothing_is_stored(
    stub: Stub, running_server: ServerHandle, metadata: dict[str, md.MetadataValue], field: str
) -> None:
    message = pb.Metadata()
    for name, value in metadata.items():
        setattr(message, name, value)
    header = pb.UploadDataHeader(filename="a.jpg", metadata=message)
    with pytest.raises(grpc.RpcError) as caught:
        stub.UploadData(
            iter([pb.UploadDataRequest(header=header), pb.UploadDataRequest(chunk=b"x")])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(caught.value)
    assert_nothing_stored(stub, running_server.data_dir)


def test_every_violation_is_reported_at_once(stub: Stub) -> None:
    header = pb.UploadDataHeader(
        filename="", metadata=pb.Metadata(latitude=100, longitude=200), tags=[""]
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.UploadData(iter([pb.UploadDataRequest(header=header)]))
    assert set(violations(caught.value)) == {
        "header.filename",
        "header.metadata.latitude",
        "header.metadata.longitude",
        "header.tags[0]",
    }


def test_each_violation_of_a_header_is_reported_once_whichever_rpc_takes_it(stub: Stub) -> None:
    """One check of the header, one list: a value the server cannot even read (an offset without
    its timestamp) beside invalid values and fields, none of them twice."""
    header = pb.UploadDataHeader(
        filename="",
        metadata=pb.Metadata(latitude=100, acquired_at_utc_offset=Duration(seconds=3600)),
        tags=[""],
    )
    expected = [
        "header.filename",
        "header.metadata.acquired_at_utc_offset",
        "header.metadata.latitude",
        "header.tags[0]",
    ]

    def fields(error: grpc.RpcError) -> list[str]:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        found = []
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                found += [v.field for v in bad_request.field_violations]
        return sorted(found)

    with pytest.raises(grpc.RpcError) as caught:
        stub.UploadData(iter([pb.UploadDataRequest(header=header)]))
    assert fields(caught.value) == expected
    with pytest.raises(grpc.RpcError) as caught:
        stub.StartUpload(pb.StartUploadRequest(header=header))
    assert fields(caught.value) == expected
    (answer,) = stub.UploadDataStream(
        iter([pb.UploadDataStreamRequest(header=header), pb.UploadDataStreamRequest(finish=True)])
    )
    assert sorted(v.field for v in answer.error.field_violations) == expected


@pytest.mark.parametrize(
    "filename", ["", "   ", "x" * 1025, "a\nb", "nul\x00.jpg", "\x1f.jpg", "del\x7f.jpg"]
)
def test_bad_filenames_are_rejected(
    stub: Stub, running_server: ServerHandle, filename: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, b"data", filename)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.filename" in violations(caught.value)
    assert_nothing_stored(stub, running_server.data_dir)


def test_any_other_text_is_a_filename(stub: Stub) -> None:
    # Control characters are C0 and DEL only: spaces, punctuation, C1 and any script pass.
    filename = "été \u0080 ~ 写真 (1).jpg"
    assert upload(stub, b"data", filename).filename == filename


def test_a_stream_must_start_with_its_only_header(stub: Stub, running_server: ServerHandle) -> None:
    header = pb.UploadDataRequest(header=pb.UploadDataHeader(filename="a"))
    chunk = pb.UploadDataRequest(chunk=b"abc")
    for stream, description in [
        ([], "empty stream"),
        ([chunk, header], "header not first"),
        ([header, chunk, header, chunk], "second header"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.UploadData(iter(stream))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, description
        assert "header" in violations(caught.value), description
    assert_nothing_stored(stub, running_server.data_dir)


def test_unknown_ids_are_not_found_everywhere(stub: Stub) -> None:
    calls: list[Callable[[], object]] = [
        lambda: stub.GetData(pb.GetDataRequest(id="nope")),
        lambda: stub.DeleteData(pb.DeleteDataRequest(id="nope")),
        lambda: stub.UpdateMetadata(
            pb.UpdateMetadataRequest(id="nope", metadata=pb.Metadata(weather="sun"))
        ),
        lambda: list(stub.DownloadData(pb.DownloadDataRequest(id="nope"))),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in (caught.value.details() or "")


def test_update_metadata_sets_and_clears_by_field_mask(stub: Stub) -> None:
    data = upload(stub, b"x", "a", metadata={"weather": "rain", "latitude": 10.0, "reference": "r"})
    updated = stub.UpdateMetadata(
        pb.UpdateMetadataRequest(
            id=data.id,
            metadata=pb.Metadata(weather="sun", latitude=0.0),
            update_mask=FieldMask(paths=["weather", "latitude", "reference"]),
        )
    ).data
    assert updated.metadata.weather == "sun"
    assert updated.metadata.HasField("latitude")
    assert updated.metadata.latitude == 0.0
    assert not updated.metadata.HasField("reference")  # in the mask, absent: cleared
    assert "reference" not in updated.metadata_sources
    assert updated.updated_at.ToDatetime() >= data.updated_at.ToDatetime()
    assert stub.GetData(pb.GetDataRequest(id=data.id)).data == updated


def test_update_metadata_validates_like_upload(stub: Stub) -> None:
    data = upload(stub, b"x", "a")
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateMetadata(
            pb.UpdateMetadataRequest(id=data.id, metadata=pb.Metadata(latitude=1000))
        )
    assert "metadata.latitude" in violations(caught.value)
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateMetadata(
            pb.UpdateMetadataRequest(id=data.id, update_mask=FieldMask(paths=["colour"]))
        )
    assert "update_mask" in violations(caught.value)
    assert stub.GetData(pb.GetDataRequest(id=data.id)).data == data


def test_delete_removes_the_item_and_bytes_no_other_item_uses(
    stub: Stub, running_server: ServerHandle
) -> None:
    first = upload(stub, b"same bytes", "a")
    second = upload(stub, b"same bytes", "b")
    assert len(stored_blobs(running_server.data_dir)) == 1  # stored once

    stub.DeleteData(pb.DeleteDataRequest(id=first.id))
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetData(pb.GetDataRequest(id=first.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    content = b"".join(m.chunk for m in stub.DownloadData(pb.DownloadDataRequest(id=second.id)))
    assert content == b"same bytes"

    stub.DeleteData(pb.DeleteDataRequest(id=second.id))
    assert_nothing_stored(stub, running_server.data_dir)


def test_list_pages_are_stable_while_new_data_arrives(stub: Stub) -> None:
    ids = [upload(stub, str(i).encode(), f"{i}.bin").id for i in range(7)]
    seen: list[str] = []
    token = ""
    while True:
        page = stub.ListData(pb.ListDataRequest(page_size=3, page_token=token))
        seen += [d.id for d in page.data]
        upload(stub, b"late", "late.bin")  # arrives mid-listing, sorts after everything seen
        token = page.next_page_token
        if not token or len(seen) >= len(ids):
            break
    assert seen[: len(ids)] == ids


def test_list_filters_and_orders(stub: Stub) -> None:
    a = upload(stub, b"a", "a.jpg", metadata={"latitude": 43.6, "longitude": 1.4}, tags=["x"])
    b = upload(stub, b"b", "b.jpg", metadata={"latitude": 48.8, "longitude": 2.3})
    upload(stub, b"c", "c.png")
    box = "latitude >= 43.5 AND latitude <= 43.7 AND longitude >= 1.3 AND longitude <= 1.5"
    assert [d.id for d in stub.ListData(pb.ListDataRequest(filter=box)).data] == [a.id]
    assert [d.id for d in stub.ListData(pb.ListDataRequest(filter='tags:"x"')).data] == [a.id]
    ordered = stub.ListData(pb.ListDataRequest(filter="latitude > 0", order_by="latitude desc"))
    assert [d.id for d in ordered.data] == [b.id, a.id]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListDataRequest(filter="latitude >>= 3"), "filter"),
        (pb.ListDataRequest(filter="colour = 'red'"), "filter"),
        (pb.ListDataRequest(order_by="colour"), "order_by"),
        (pb.ListDataRequest(page_size=-1), "page_size"),
        (pb.ListDataRequest(page_token="garbage!"), "page_token"),
    ],
)
def test_bad_list_requests_are_invalid_arguments(
    stub: Stub, request_: pb.ListDataRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListData(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(caught.value)


def test_a_page_token_is_bound_to_its_filter(stub: Stub) -> None:
    for i in range(3):
        upload(stub, bytes([i]), f"{i}")
    token = stub.ListData(pb.ListDataRequest(page_size=1)).next_page_token
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListData(pb.ListDataRequest(page_size=1, page_token=token, filter="size > 0"))
    assert "page_token" in violations(caught.value)


def test_a_cancelled_upload_leaves_nothing(stub: Stub, running_server: ServerHandle) -> None:
    def stream() -> Iterator[pb.UploadDataRequest]:
        yield pb.UploadDataRequest(header=pb.UploadDataHeader(filename="a"))
        yield pb.UploadDataRequest(chunk=b"x" * 100_000)
        raise RuntimeError("the device lost its link")

    with pytest.raises(grpc.RpcError) as caught:
        stub.UploadData(stream())
    assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    # The server notices the cancellation asynchronously.
    for _ in range(100):
        try:
            assert_nothing_stored(stub, running_server.data_dir)
            break
        except AssertionError:
            time.sleep(0.05)
    assert_nothing_stored(stub, running_server.data_dir)


def test_health_and_reflection_are_on(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "metalake.v1.DatalakeService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert "metalake.v1.DatalakeService" in names


def exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x0131] = "GIMP 2.4.5"  # Software
    exif[0x0132] = "2008:05:30 15:56:01"  # DateTime
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (43.0, 36.0, 0.0), 3: "E", 4: (1.0, 26.0, 24.0)})
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def test_fill_metadata_fills_what_the_client_did_not_give(stub: Stub) -> None:
    data = upload(
        stub, exif_jpeg(), "canon.jpg", metadata={"manufacturer": "Mine"}, fill_metadata=True
    )
    values, _ = md.from_proto(data.metadata)
    assert values["manufacturer"] == "Mine"  # the client's value wins
    assert values["software"] == "GIMP 2.4.5"
    assert values["acquired_at"] == datetime(2008, 5, 30, 15, 56, 1)
    assert values["latitude"] == pytest.approx(43.6)
    assert values["longitude"] == pytest.approx(1.44)
    assert data.metadata_sources["manufacturer"] == "client"
    assert data.metadata_sources["software"] == "pillow"
    assert data.metadata_sources["latitude"] == "gps"
    without = upload(stub, exif_jpeg(), "canon.jpg")
    assert not without.metadata.HasField("software")  # nothing filled unless asked


def test_a_file_the_extractors_choke_on_still_uploads(stub: Stub) -> None:
    broken = exif_jpeg()[:200] + b"\xff" * 64 + os.urandom(500)
    data = upload(stub, broken, "broken.jpg", fill_metadata=True, metadata={"weather": "rain"})
    assert data.size == len(broken)
    values, problems = md.from_proto(data.metadata)
    assert problems == []  # whatever was salvaged is valid
    assert values["weather"] == "rain"
    assert data.metadata_sources["weather"] == "client"
