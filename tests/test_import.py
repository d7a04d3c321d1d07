"""Buckets registered in place, against moto's S3 server over real HTTP."""

from __future__ import annotations

import io
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from PIL import Image

from metalake import Client, InvalidArgumentError, NotFoundError
from metalake.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from metalake.server.config import Settings
from metalake.server.importing import HEADER_BYTES
from tests.conftest import S3_ENV, serving
from tests.test_cli import run


def jpeg(make: str, padding: int = 0) -> bytes:
    """A JPEG with EXIF Make, followed by `padding` bytes (a big file's tail)."""
    exif = Image.Exif()
    exif[0x010F] = make
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue() + os.urandom(padding)


@pytest.fixture
def catalog_target(catalog_url: str, tmp_path: Path) -> Iterator[str]:
    """A server on SQLite, then on PostgreSQL (the scale-out catalog)."""
    settings = Settings(
        data_dir=tmp_path / "data", listen="127.0.0.1:0", catalog_url=catalog_url, migrate=True
    )
    with serving(settings) as handle:
        yield handle.target


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """A customer's bucket; the AWS_* environment (which the server reads) points at moto."""
    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    name = f"customer-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=name)
    return name, s3


def test_a_bucket_is_registered_in_place_and_kept_in_step(
    catalog_target: str, bucket: tuple[str, Any], tmp_path: Path
) -> None:
    server_target = catalog_target  # SQLite, then PostgreSQL
    name, s3 = bucket
    big = jpeg("Canon", padding=3 * HEADER_BYTES)
    s3.put_object(Bucket=name, Key="photos/a.jpg", Body=big)
    s3.put_object(Bucket=name, Key="photos/sub/c.JPG", Body=jpeg("NIKON"))
    s3.put_object(Bucket=name, Key="photos/notes.txt", Body=b"not a photo")
    s3.put_object(Bucket=name, Key="other/x.jpg", Body=jpeg("SONY"))
    with Client(server_target) as client:
        datalake = client.get_datalake()
        created: list[str] = []
        watch = datalake.watch('content_type = "image/jpeg"')

        def read_two() -> None:
            for event in watch:
                created.append(event["data"]["filename"])
                if len(created) == 2:
                    return

        reader = threading.Thread(target=read_two)
        reader.start()
        time.sleep(0.5)  # the watch starts "from now"

        report = datalake.import_objects(
            f"s3://{name}/photos/", extensions=["jpg"], fill_metadata=True
        )
        assert report["listed"] == 2
        assert (report["added"], report["updated"], report["vanished"]) == (2, 0, 0)
        # Only the head of each object was read, however big the object.
        assert report["header_bytes_limit"] == HEADER_BYTES
        assert report["bytes_read"] <= 2 * HEADER_BYTES < len(big)
        items = {d.filename: d for d in datalake.list_data()}
        assert set(items) == {"a.jpg", "c.JPG"}
        a = items["a.jpg"]
        assert (a.manufacturer, a.size, a.content_type) == ("Canon", len(big), "image/jpeg")
        assert items["c.JPG"].manufacturer == "NIKON"
        reader.join(15)
        assert sorted(created) == ["a.jpg", "c.JPG"]  # WatchData sees them as any item

        # Downloads stream the object itself, verified by size.
        assert datalake.download_data(a.id, tmp_path / "a.jpg").read_bytes() == big
        results = datalake.download_data(filter="size > 0", target=tmp_path / "all")
        assert sorted(r.status for r in results) == ["downloaded", "downloaded"]
        assert (tmp_path / "all" / "a.jpg").read_bytes() == big

        # A rerun: one object changed, one vanished, one new.
        changed = jpeg("FUJIFILM")
        s3.put_object(Bucket=name, Key="photos/a.jpg", Body=changed)
        s3.delete_object(Bucket=name, Key="photos/sub/c.JPG")
        s3.put_object(Bucket=name, Key="photos/d.jpg", Body=jpeg("Apple"))
        report = datalake.import_objects(
            f"s3://{name}/photos/", extensions=[".JPG"], fill_metadata=True
        )
        assert (report["listed"], report["added"], report["updated"]) == (2, 1, 1)
        assert (report["unchanged"], report["vanished"]) == (0, 1)
        again = datalake.get_data(a.id)  # the same item, now the new object
        assert (again.size, again.manufacturer) == (len(changed), "FUJIFILM")
        gone = datalake.get_data(items["c.JPG"].id)
        assert gone.labels == {"import_state": "vanished"}
        assert [d.id for d in datalake.list_data('labels.import_state = "vanished"')] == [gone.id]
        with pytest.raises(NotFoundError, match="changed or vanished"):
            datalake.download_data(gone.id, tmp_path / "gone.jpg")
        report = datalake.import_objects(f"s3://{name}/photos/", extensions=["jpg"])
        assert (report["unchanged"], report["added"], report["vanished"]) == (2, 0, 0)

        # Deleting an item never deletes the customer's object.
        datalake.delete_data(a.id)
        assert s3.get_object(Bucket=name, Key="photos/a.jpg")["Body"].read() == changed


def test_cli_import_and_its_errors(
    server_target: str, bucket: tuple[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    name, s3 = bucket
    for i in range(3):
        s3.put_object(Bucket=name, Key=f"p/{i}.jpg", Body=jpeg(f"Maker{i}"))
    t = ("--target", server_target)
    code, out, err = run(capsys, "import", f"s3://{name}/p", "--fill-metadata", "--json", *t)
    assert code == EXIT_OK, err
    report = json.loads(out)
    assert (report["listed"], report["added"], report["failures"]) == (3, 3, [])
    code, out, _ = run(capsys, "import", f"s3://{name}/p", *t)
    assert "3 objects: 0 added, 0 updated, 3 unchanged, 0 vanished, 0 failed" in out
    code, _, err = run(capsys, "import", "https://example.com/x", *t)
    assert code == EXIT_USAGE
    code, _, err = run(capsys, "import", "s3://no-such-bucket-here/p", *t)
    assert code == EXIT_USAGE
    assert "does not exist" in err
    with Client(server_target) as client, pytest.raises(InvalidArgumentError) as caught:
        client.get_datalake().import_objects("s3:/nobucket")
    assert caught.value.violations[0][0] == "source"


def test_a_bucket_the_server_cannot_read_is_a_clear_error(
    server_target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}.items():
        monkeypatch.setenv(name, value)
    code, out, err = run(capsys, "import", "s3://customer/p", "--target", server_target)
    assert code == EXIT_FAILED
    assert out == ""
    assert "the server cannot list (s3:ListBucket) in bucket 'customer'" in err
    assert "Grant the server's credentials s3:ListBucket and s3:GetObject" in err
    with Client(server_target) as client:
        assert list(client.get_datalake().list_data()) == []


def test_imported_items_in_datasets_and_similarity(
    server_target: str, bucket: tuple[str, Any], tmp_path: Path
) -> None:
    name, s3 = bucket
    body = jpeg("Canon")
    s3.put_object(Bucket=name, Key="p/a.jpg", Body=body)
    with Client(server_target) as client:
        datalake = client.get_datalake()
        assert datalake.import_objects(f"s3://{name}/p")["added"] == 1
        [item] = list(datalake.list_data())
        datalake.create_dataset("imported")
        # Not hashed (that would read the whole object): not an image FindSimilar can use.
        with pytest.raises(InvalidArgumentError):
            list(datalake.find_similar(item.id))
        item.delete()
        # The version keeps the reference: its item streams from the bucket after the delete.
        [(frozen, path)] = datalake.download_dataset("imported", tmp_path / "out")
        assert frozen.id == item.id
        assert path.read_bytes() == body
        # Neither the delete nor the dataset touched the customer's object.
        assert s3.get_object(Bucket=name, Key="p/a.jpg")["Body"].read() == body
        s3.put_object(Bucket=name, Key="p/a.jpg", Body=jpeg("NIKON"))
        with pytest.raises(NotFoundError):
            datalake.download_dataset("imported", tmp_path / "again")


def test_an_item_registered_in_place_has_no_preview_and_its_object_stays(
    tmp_path: Path, bucket: tuple[str, Any]
) -> None:
    """Imported items carry no sha256 to share previews by, and a preview would read the whole
    customer object: they answer NOT_FOUND, while an uploaded copy of the same bytes previews."""
    name, s3 = bucket
    content = jpeg("Canon")
    s3.put_object(Bucket=name, Key="p/a.jpg", Body=content)
    s3.put_object(Bucket=name, Key="p/b.jpg", Body=jpeg("NIKON"))
    settings = Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0", migrate=True)
    with serving(settings) as handle, Client(handle.target) as client:
        datalake = client.get_datalake()
        datalake.import_objects(f"s3://{name}/p/")
        imported = {d.filename: d for d in datalake.list_data()}
        for item in imported.values():
            with pytest.raises(NotFoundError):
                datalake.get_thumbnail(item.id, 256)
        source = tmp_path / "a.jpg"
        source.write_bytes(content)
        uploaded = datalake.upload_data(source)
        assert datalake.get_thumbnail(uploaded.id, 256)[:2] == b"\xff\xd8"
        for item in imported.values():
            datalake.delete_data(item.id)
        assert s3.get_object(Bucket=name, Key="p/a.jpg")["Body"].read() == content
        assert len(s3.list_objects_v2(Bucket=name, Prefix="p/")["Contents"]) == 2
