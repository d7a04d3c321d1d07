"""The Python SDK against a real server, as a Picsellia user would call it."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from metalake import (
    FIELDS,
    Client,
    ConflictError,
    Data,
    IntegrityError,
    InvalidArgumentError,
    MetalakeError,
    NotFoundError,
    ResourceExhaustedError,
    UploadError,
)
from metalake import client as client_module
from metalake.metadata import InvalidMetadataError
from metalake.server.config import Settings
from metalake.v1 import datalake_pb2 as pb
from tests.conftest import serving


def write_jpeg(path: Path, *, make: str | None = None, color: int = 0) -> Path:
    image = Image.new("RGB", (16, 16), (color, 10, 10))
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def client(server_target: str) -> Iterator[Client]:
    with Client(server_target) as client:
        yield client


@pytest.fixture
def small_limit_target(tmp_path: Path) -> Iterator[str]:
    """A server that refuses files over 50,000 bytes: a real per-file failure."""
    settings = Settings(data_dir=tmp_path / "limited", listen="127.0.0.1:0")
    with serving(replace(settings, max_file_size=50_000)) as handle:
        yield handle.target


class NoCalls:
    """Stands in for the stub where no RPC may be made."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} was called")


ALL_FIELDS: dict[str, Any] = {
    "latitude": -12.5,
    "longitude": 130.25,
    "altitude": -3.0,
    "acquired_at": datetime(2021, 4, 11, 15, 47, 53, 250000, tzinfo=timezone(timedelta(hours=9))),
    "acquired_by": "USER-178",
    "weather": "rain",
    "resolution_x": 72.0,
    "resolution_y": 300.0,
    "resolution_unit": "inches",
    "compression": "JPEG (old-style)",
    "manufacturer": "Canon",
    "software": "GIMP 2.10",
    "color_space": "sRGB",
    "custom_id": "cid-1",
    "reference": "7NGOMI",
}


def test_one_path_gives_one_data_with_metadata_attributes(client: Client, tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "photo.jpg")
    data = client.get_datalake().upload_data(
        str(path),
        metadata={
            "reference": "7NGOMI",
            "acquired_by": "USER-178",
            "acquired_at": datetime(2024, 5, 1, 12, 0),
            "latitude": 0,
        },
        tags=["field"],
    )
    assert data.filename == "photo.jpg"
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data.reference == "7NGOMI"
    assert data.latitude == 0.0
    assert data.longitude is None
    assert data.acquired_at == datetime(2024, 5, 1, 12, 0)
    assert data.acquired_at.tzinfo is None  # a naive time stays a wall time
    assert data.tags == ["field"]
    assert data.metadata_sources["reference"] == "client"


def test_an_aware_time_keeps_its_offset(client: Client, tmp_path: Path) -> None:
    when = datetime(2021, 4, 11, 15, 47, 53, tzinfo=timezone(timedelta(hours=-5)))
    data = client.get_datalake().upload_data(
        write_jpeg(tmp_path / "a.jpg"), metadata={"acquired_at": when}
    )
    assert data.refresh().acquired_at == when
    assert data.acquired_at is not None
    assert data.acquired_at.utcoffset() == timedelta(hours=-5)


def test_a_list_gives_a_list_in_order_and_fill_metadata_fills(
    client: Client, tmp_path: Path
) -> None:
    paths = [write_jpeg(tmp_path / f"{i}.jpg", make=f"Maker{i}", color=i) for i in range(5)]
    datas = client.get_datalake().upload_data(
        paths, metadata=[{"latitude": 43.0 + i / 10} for i in range(5)], fill_metadata=True
    )
    assert [d.filename for d in datas] == [p.name for p in paths]
    assert [d.latitude for d in datas] == [43.0, 43.1, 43.2, 43.3, 43.4]
    assert [d.manufacturer for d in datas] == [f"Maker{i}" for i in range(5)]
    assert datas[0].metadata_sources == {"latitude": "client", "manufacturer": "pillow"}


def test_mismatched_lists_and_unknown_keys_fail_before_sending(
    client: Client, tmp_path: Path
) -> None:
    datalake = client.get_datalake()
    paths = [write_jpeg(tmp_path / "a.jpg"), write_jpeg(tmp_path / "b.jpg")]
    with pytest.raises(ValueError, match="2 files but 1 metadata"):
        datalake.upload_data(paths, metadata=[{"latitude": 1.0}])
    with pytest.raises(InvalidMetadataError, match="valid fields are: latitude"):
        datalake.upload_data(paths[0], metadata={"colour": "red"})
    assert list(datalake.list_data()) == []


def test_bad_arguments_are_refused_before_any_rpc(tmp_path: Path) -> None:
    paths = [write_jpeg(tmp_path / "a.jpg"), write_jpeg(tmp_path / "b.jpg")]
    with Client("127.0.0.1:1") as client:
        client._stub = NoCalls()  # type: ignore[assignment]
        datalake = client.get_datalake()
        with pytest.raises(ValueError, match="2 files but 3 metadata mappings"):
            datalake.upload_data(paths, metadata=[{}, {}, {}])
        with pytest.raises(ValueError, match="one metadata mapping, not a list"):
            datalake.upload_data(paths[0], metadata=[{}])  # type: ignore[call-overload]
        with pytest.raises(InvalidMetadataError) as caught:
            datalake.upload_data(paths, metadata=[{"latitude": 43.6}, {"latitude": 95}])
        assert [v.field for v in caught.value.violations] == ["metadata[1] (b.jpg).latitude"]
        assert "must be within [-90, 90], got 95.0" in str(caught.value)
        with pytest.raises(InvalidMetadataError, match="valid fields are: latitude, longitude"):
            datalake.iter_upload(paths, metadata={"lat": 1.0})  # checked before iterating


def test_every_field_round_trips_as_attributes_and_json(client: Client, tmp_path: Path) -> None:
    data = client.get_datalake().upload_data(write_jpeg(tmp_path / "a.jpg"), ALL_FIELDS)
    again = client.get_datalake().get_data(data.id)
    for field, value in ALL_FIELDS.items():
        assert getattr(again, field) == value, field
    assert again.metadata == ALL_FIELDS
    assert again.acquired_at is not None
    assert again.acquired_at.utcoffset() == timedelta(hours=9)
    assert set(again.metadata_sources.values()) == {"client"}
    as_json = again.to_json()
    assert list(as_json)[:7] == [
        "id",
        "filename",
        "size",
        "sha256",
        "content_type",
        "tags",
        "created_at",
    ]
    assert as_json["content_type"] == "image/jpeg"
    assert as_json["metadata"]["acquired_at"] == "2021-04-11T15:47:53.250000+09:00"
    assert list(as_json["metadata"]) == list(FIELDS)  # in the contract's field order
    assert as_json["created_at"].endswith("Z")


def test_data_has_one_typed_attribute_per_field_and_they_are_read_only(
    client: Client, tmp_path: Path
) -> None:
    declared = {n for n, v in vars(Data).items() if isinstance(v, client_module._Field)}
    assert declared == set(FIELDS)
    data = client.get_datalake().upload_data(write_jpeg(tmp_path / "a.jpg"), {"weather": "fog"})
    with pytest.raises(AttributeError, match=r"use data.update_metadata\(weather=...\)"):
        data.weather = "sun"
    assert data.weather == "fog"
    with pytest.raises(AttributeError):
        data.colour  # type: ignore[attr-defined]  # noqa: B018


def test_failed_files_do_not_stop_the_others_and_are_reported(
    client: Client, tmp_path: Path
) -> None:
    good = [write_jpeg(tmp_path / f"{i}.jpg", color=i) for i in range(3)]
    missing = tmp_path / "gone.jpg"
    paths = [good[0], missing, good[1], good[2]]
    with pytest.raises(UploadError) as caught:
        client.get_datalake().upload_data(paths)
    results = caught.value.results
    assert [type(r).__name__ for r in results] == ["Data", "FileNotFoundError", "Data", "Data"]
    assert [p for p, _ in caught.value.failed] == [missing]
    assert "gone.jpg" in str(caught.value)
    mixed = client.get_datalake().upload_data(paths, raise_on_error=False)
    assert isinstance(mixed[1], FileNotFoundError)
    assert len(list(client.get_datalake().list_data())) == 6


def test_a_file_the_server_refuses_fails_alone(small_limit_target: str, tmp_path: Path) -> None:
    small = [write_jpeg(tmp_path / f"{i}.jpg", color=i) for i in range(4)]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(60_000))
    paths = [small[0], small[1], big, small[2], small[3]]
    metadata = [{"custom_id": f"c{i}"} for i in range(5)]
    with Client(small_limit_target) as client:
        with pytest.raises(UploadError) as caught:
            client.get_datalake().upload_data(paths, metadata)
        results = caught.value.results
        assert [r.custom_id if isinstance(r, Data) else None for r in results] == [
            "c0",
            "c1",
            None,
            "c3",
            "c4",
        ]
        [(failed_path, error)] = caught.value.failed
        assert failed_path == big
        assert isinstance(error, ResourceExhaustedError)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maximum file size" in str(error)
        assert "1 of 5 files failed" in str(caught.value)
        assert len(list(client.get_datalake().list_data())) == 4


def test_server_violations_are_decoded_per_field(client: Client, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.get_datalake().upload_data(write_jpeg(tmp_path / "a.jpg"), tags=["x" * 2000])
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in error.violations] == ["header.tags[0]"]
    assert isinstance(error, ValueError)  # one `except ValueError` covers local checks too


def test_server_rejections_carry_the_field(client: Client, tmp_path: Path) -> None:
    with pytest.raises(InvalidMetadataError):  # caught locally, before sending
        client.get_datalake().upload_data(write_jpeg(tmp_path / "a.jpg"), {"latitude": 91})
    with pytest.raises(InvalidArgumentError) as caught:
        list(client.get_datalake().list_data("colour = 1"))
    assert caught.value.violations[0][0] == "filter"


def test_update_download_delete(client: Client, tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "a.jpg")
    data = client.get_datalake().upload_data(path, {"weather": "rain", "reference": "R"})
    stale = client.get_datalake().get_data(data.id)
    data.update_metadata(weather="sun", clear=["reference"])
    assert data.weather == "sun"
    assert data.reference is None
    with pytest.raises(ConflictError):
        stale.update_metadata(weather="hail", if_unchanged=True)

    copy = data.download(tmp_path / "copy.jpg")
    assert copy.read_bytes() == path.read_bytes()
    into_dir = data.download(tmp_path)
    assert into_dir == tmp_path / "a.jpg"

    data.delete()
    with pytest.raises(NotFoundError) as caught:
        client.get_datalake().get_data(data.id)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError):
        data.delete()


def test_update_metadata_sends_only_the_named_fields(client: Client, tmp_path: Path) -> None:
    data = client.get_datalake().upload_data(
        write_jpeg(tmp_path / "a.jpg"), {"weather": "rain", "reference": "R", "latitude": 1.0}
    )
    data.update_metadata({"latitude": 2}, reference=None)  # None clears, like clear=[...]
    assert data.metadata == {"weather": "rain", "latitude": 2.0}
    assert data.refresh().metadata == {"weather": "rain", "latitude": 2.0}
    naive = datetime(2024, 5, 1, 12, 0)
    data.update_metadata(acquired_at=naive)
    assert data.acquired_at == naive
    assert data.acquired_at.tzinfo is None
    with pytest.raises(ValueError, match="weather: both set and cleared"):
        data.update_metadata(weather="sun", clear=["weather"])
    with pytest.raises(InvalidMetadataError, match="valid fields are"):
        data.update_metadata(clear=["colour"])
    with pytest.raises(InvalidMetadataError, match="latitude: must be within"):
        data.update_metadata(latitude=95)
    assert data.refresh().weather == "rain"


def test_download_refuses_bytes_that_do_not_match(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_jpeg(tmp_path / "a.jpg")
    data = client.get_datalake().upload_data(path)
    real = client._stub.DownloadData

    class Corrupted:
        """The real stream with one bit of the content flipped on the way."""

        def __init__(self, request: pb.DownloadDataRequest, **kwargs: Any) -> None:
            self.stream = real(request, **kwargs)

        def __iter__(self) -> Iterator[pb.DownloadDataResponse]:
            for message in self.stream:
                if message.HasField("chunk"):
                    message.chunk = bytes([message.chunk[0] ^ 1]) + message.chunk[1:]
                yield message

        def cancel(self) -> None:
            self.stream.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs

    monkeypatch.setattr(client._stub, "DownloadData", Corrupted)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match=f"expected {data.size} bytes with sha256"):
        data.download(out / "copy.jpg")
    assert list(out.iterdir()) == []  # neither the file nor its temporary


def test_download_and_delete_by_id(client: Client, tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "a.jpg")
    datalake = client.get_datalake()
    data = datalake.upload_data(path)
    out = tmp_path / "out"
    out.mkdir()
    assert datalake.download_data(data.id, out) == out / "a.jpg"
    assert (out / "a.jpg").read_bytes() == path.read_bytes()
    datalake.delete_data(data.id)
    with pytest.raises(NotFoundError):
        datalake.download_data(data.id, out / "again.jpg")
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg"]


@pytest.mark.parametrize(
    ("label", "written"), [("../../etc/passwd", "passwd"), ("..", None), ("a\\b.jpg", "b.jpg")]
)
def test_download_into_a_directory_keeps_it_there(
    client: Client, tmp_path: Path, label: str, written: str | None
) -> None:
    # The filename is a label from whoever uploaded: it must not steer where bytes land.
    requests = iter(
        [
            pb.UploadDataRequest(header=pb.UploadDataHeader(filename=label)),
            pb.UploadDataRequest(chunk=b"payload"),
        ]
    )
    item = client._stub.UploadData(requests).data
    out = tmp_path / "out"
    out.mkdir()
    target = client.get_datalake().download_data(item.id, out)
    assert target == out / (written or item.id)
    assert target.read_bytes() == b"payload"


def test_progress_counts_each_byte_once_across_retries() -> None:
    sent: list[int] = []
    report = client_module._FileProgress(sent.append)
    report(0, 100)
    report(100, 200)
    report(0, 100)  # a retry sends the file again from the start
    report(100, 250)
    assert sum(sent) == 250
    resumed: list[int] = []
    report = client_module._FileProgress(resumed.append)
    report(1000, 1100)  # a rerun resuming at 1000: what came before is not this run's
    assert resumed == [100]


def test_progress_finishes_a_stored_file_whatever_grpc_s_thread_has_reported() -> None:
    # gRPC pulls the request iterator (which reports) from its own thread and may resume it a
    # last time only after the server answered: the result must not wait for that.
    sent: list[int] = []
    report = client_module._FileProgress(sent.append)
    report(0, 0)  # the iterator started at offset 0
    report.finish(300)
    report(0, 300)  # gRPC's thread, late: nothing more
    assert sent == [300]
    resumed: list[int] = []
    report = client_module._FileProgress(resumed.append)
    report(1000, 1000)  # a rerun resuming at 1000
    report(1000, 1200)
    report.finish(1500)
    assert resumed == [200, 300]


def test_progress_is_complete_before_each_result_is_yielded(client: Client, tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.bin" for i in range(24)]
    for i, path in enumerate(paths):
        path.write_bytes(os.urandom(1000 + i))
    lock, sent = threading.Lock(), [0]

    def progress(count: int) -> None:
        with lock:
            sent[0] += count

    # The second run is answered from its request ids, maybe before the bytes are read: the
    # files are done all the same (this is what left the CLI's bar at 0% now and then).
    for _ in range(2):
        sent[0] = done = 0
        results = client.get_datalake().iter_upload(paths, progress=progress, rerun_safe=True)
        for path, result in results:
            assert not isinstance(result, Exception)
            done += path.stat().st_size
            with lock:
                assert sent[0] >= done  # this file's bytes (and maybe others') are counted
        assert sent[0] == done


def test_uploads_stream_from_disk_header_first_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(2 * client_module.CHUNK_SIZE + 10))
    header = pb.UploadDataHeader(filename="f.bin")
    requests = client_module._upload_requests(path, header, None)
    assert next(requests).header == header
    sizes = [len(r.chunk) for r in requests]
    assert sizes == [client_module.CHUNK_SIZE, client_module.CHUNK_SIZE, 10]


def test_progress_adds_up_to_every_file(client: Client, tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(os.urandom(1_500_000 * (i + 1)))
    lock, sent = threading.Lock(), []

    def progress(count: int) -> None:
        with lock:
            sent.append(count)

    client.get_datalake().upload_data(paths, progress=progress)
    assert sum(sent) == sum(p.stat().st_size for p in paths)


def test_iter_upload_yields_in_order_and_stopping_cancels_the_rest(
    server_target: str, tmp_path: Path
) -> None:
    paths = [tmp_path / f"{i}.bin" for i in range(40)]
    for path in paths:
        path.write_bytes(os.urandom(3_000_000))
    with Client(server_target, max_workers=2) as client:
        results = client.get_datalake().iter_upload(paths)
        first_path, first = next(results)
        assert first_path == paths[0]
        assert isinstance(first, Data)
        started = time.monotonic()
        results.close()  # as when a caller breaks out of the loop, or on Ctrl-C
        assert time.monotonic() - started < 5
        stored = list(client.get_datalake().list_data())
    assert 1 <= len(stored) < 10  # the queued files were never sent


def test_the_target_comes_from_the_environment(
    server_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METALAKE_TARGET", server_target)
    with Client() as client:
        assert client.target == server_target
        assert list(client.get_datalake().list_data()) == []


def test_list_data_pages_lazily_through_everything(client: Client, tmp_path: Path) -> None:
    paths = [write_jpeg(tmp_path / f"{i}.jpg", color=i) for i in range(7)]
    stored = client.get_datalake().upload_data(paths, metadata={"reference": "batch"})
    listed = list(client.get_datalake().list_data('reference = "batch"', page_size=2))
    assert sorted(d.id for d in listed) == sorted(d.id for d in stored)


def test_large_files_go_through_resumable_uploads(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "RESUMABLE_THRESHOLD", 100_000)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(1_000_000))
    sent: list[int] = []
    data = client.get_datalake().upload_data(path, progress=sent.append)
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sum(sent) == 1_000_000


def test_extract_metadata_stores_nothing(client: Client, tmp_path: Path) -> None:
    values, sources = client.get_datalake().extract_metadata(
        write_jpeg(tmp_path / "a.jpg", make="Canon")
    )
    assert values["manufacturer"] == "Canon"
    assert sources["manufacturer"] == "pillow"
    assert list(client.get_datalake().list_data()) == []


def test_created_at_is_aware_utc(client: Client, tmp_path: Path) -> None:
    data = client.get_datalake().upload_data(write_jpeg(tmp_path / "a.jpg"))
    assert data.created_at.tzinfo == UTC
    assert abs(datetime.now(UTC) - data.created_at) < timedelta(minutes=1)


def test_a_rerun_resumes_an_interrupted_big_upload(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "RESUMABLE_THRESHOLD", 100_000)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3_000_000))

    def drop_link(sent: int, seen: list[int] = []) -> None:  # noqa: B006
        seen.append(sent)
        if sum(seen) > 1_500_000:
            time.sleep(0.5)  # the server takes in what is on the wire, then the link drops
            raise ConnectionError("the link dropped")

    with pytest.raises(MetalakeError):  # gRPC reports the broken request stream
        client.get_datalake().upload_data(path, progress=drop_link, rerun_safe=True)
    time.sleep(0.5)  # a rerun comes after the server has noticed the broken stream
    resent: list[int] = []
    data = client.get_datalake().upload_data(path, progress=resent.append, rerun_safe=True)
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sum(resent) < 3_000_000  # only what the server had not kept
    assert len(list(client.get_datalake().list_data())) == 1


def test_watch_yields_changes_as_they_happen(client: Client, tmp_path: Path) -> None:
    events = client.get_datalake().watch('reference = "W"')
    received: list[dict[str, object]] = []

    def read_two() -> None:
        for event in events:
            received.append(event)
            if len(received) == 2:
                return

    reader = threading.Thread(target=read_two)
    reader.start()
    time.sleep(0.5)  # the watch starts "from now"
    data = client.get_datalake().upload_data(write_jpeg(tmp_path / "w.jpg"), {"reference": "W"})
    client.get_datalake().upload_data(write_jpeg(tmp_path / "x.jpg", color=9))  # filtered out
    data.delete()
    reader.join(15)
    assert [(e["type"], e["data_id"]) for e in received] == [
        ("created", data.id),
        ("deleted", data.id),
    ]
    assert received[0]["resume_token"]
