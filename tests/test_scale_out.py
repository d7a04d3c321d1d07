"""Two real server processes sharing one PostgreSQL catalog and one S3 bucket."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from metalake import Client, ConflictError
from tests.conftest import S3_ENV
from tests.serverprocess import ServerProcess


@pytest.fixture
def two_servers(
    tmp_path: Path, postgres_url: str, s3_url: str, s3_endpoint: str
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    env = {
        **S3_ENV,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "METALAKE_CATALOG_URL": postgres_url,
        "METALAKE_BLOB_URL": s3_url,
        "METALAKE_MIGRATE": "true",
    }
    with (
        ServerProcess(tmp_path / "a", tmp_path / "a.log", **env) as a,
        ServerProcess(tmp_path / "b", tmp_path / "b.log", **env) as b,
    ):
        yield a, b


def blob_objects(s3_url: str, s3_endpoint: str) -> list[str]:
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    return [item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_one_datalake_through_either_server(
    two_servers: tuple[ServerProcess, ServerProcess],
    tmp_path: Path,
    s3_url: str,
    s3_endpoint: str,
) -> None:
    a, b = two_servers
    through_a = Client(a.target).get_datalake()
    through_b = Client(b.target).get_datalake()
    content = os.urandom(11 * 1024 * 1024)  # several S3 parts
    path = tmp_path / "drone.jpg"
    path.write_bytes(content)

    stored = through_a.upload_data(path, metadata={"reference": "R-1"})
    [listed] = list(through_b.list_data('reference = "R-1"'))
    assert listed.id == stored.id
    copy = listed.download(tmp_path / "copy.jpg")
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == stored.sha256
    listed.update_metadata(weather="fog")
    assert through_a.get_data(stored.id).weather == "fog"
    listed.delete()
    assert list(through_a.list_data()) == []
    assert not any("/blobs/" in key for key in blob_objects(s3_url, s3_endpoint))


def test_concurrent_updates_through_both_servers_lose_nothing(
    two_servers: tuple[ServerProcess, ServerProcess], tmp_path: Path
) -> None:
    a, b = two_servers
    path = tmp_path / "a.jpg"
    path.write_bytes(b"frame")
    item_id = Client(a.target).get_datalake().upload_data(path, metadata={"weather": ""}).id

    def append(target: str, marks: list[str]) -> None:
        datalake = Client(target).get_datalake()
        for mark in marks:
            while True:  # read, modify, write if unchanged; else read again
                data = datalake.get_data(item_id)
                try:
                    data.update_metadata(weather=(data.weather or "") + mark, if_unchanged=True)
                    break
                except ConflictError:
                    continue

    writers = [
        threading.Thread(target=append, args=(a.target, list("abcdefghij"))),
        threading.Thread(target=append, args=(b.target, list("ABCDEFGHIJ"))),
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    final = Client(b.target).get_datalake().get_data(item_id).weather
    assert sorted(final or "") == sorted("abcdefghijABCDEFGHIJ")


def test_identical_uploads_through_both_servers_store_the_bytes_once(
    two_servers: tuple[ServerProcess, ServerProcess],
    tmp_path: Path,
    s3_url: str,
    s3_endpoint: str,
) -> None:
    a, b = two_servers
    path = tmp_path / "same.jpg"
    path.write_bytes(os.urandom(300_000))
    results: list[str] = []

    def upload(target: str) -> None:
        results.append(Client(target).get_datalake().upload_data(path).sha256)

    threads = [threading.Thread(target=upload, args=(t,)) for t in [a.target, b.target] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 8
    assert len(set(results)) == 1
    blobs = [key for key in blob_objects(s3_url, s3_endpoint) if "/blobs/" in key]
    assert blobs == [f"lake/blobs/{results[0]}"]
    assert len(list(Client(a.target).get_datalake().list_data())) == 8
