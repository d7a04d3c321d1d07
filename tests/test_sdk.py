"""The Python SDK against a real server, as a Picsellia user would call it."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from metalake import (
    Client,
    ConflictError,
    InvalidArgumentError,
    MetalakeError,
    NotFoundError,
    UploadError,
)
from metalake import client as client_module
from metalake.metadata import InvalidMetadataError


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
def client(server_target: str) -> Client:
    return Client(server_target)


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
    with pytest.raises(NotFoundError):
        client.get_datalake().get_data(data.id)


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
