"""The blob store contract, run against every implementation: local files, and S3 (moto's
server mode, over real HTTP on loopback)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.blobstore import BlobStore, LocalBlobStore
from server.s3blobstore import MIN_PART_SIZE, S3BlobStore, S3BlobWriter, S3ConfigurationError
from tests.conftest import S3_ENV


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
    else:
        url: str = request.getfixturevalue("s3_url")
        s3 = S3BlobStore.from_url(url, staging_dir=tmp_path / "staging")
        s3.part_size = MIN_PART_SIZE
        yield s3


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def put(store: BlobStore, data: bytes, chunk: int = 64 * 1024) -> str:
    writer = await store.create_writer()
    for start in range(0, len(data), chunk):
        await writer.write(data[start : start + chunk])
    assert writer.sha256() == sha(data)
    assert writer.size == len(data)
    await writer.commit(sha(data))
    return sha(data)


async def get(store: BlobStore, key: str, offset: int = 0) -> bytes:
    return b"".join([c async for c in store.read(key, offset=offset, chunk_size=100_000)])


def leftovers(store: BlobStore) -> list[Any]:
    """Anything an upload in flight keeps: spool files, S3 temporary objects and uploads."""
    found: list[Any] = []
    if isinstance(store, S3BlobStore):
        objects = store.client.list_objects_v2(Bucket=store.bucket, Prefix="lake/tmp/")
        found += objects.get("Contents", [])
        found += store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        found += list((store._spool).iterdir())
    else:
        found += list((store._tmp).iterdir())  # type: ignore[attr-defined]
    return found


async def test_round_trip_and_ranged_reads(store: BlobStore) -> None:
    data = os.urandom(300_000)
    key = await put(store, data)
    assert await store.exists(key)
    assert await get(store, key) == data
    assert await get(store, key, offset=123_456) == data[123_456:]
    assert await get(store, key, offset=len(data)) == b""
    assert leftovers(store) == []


async def test_a_multipart_upload_is_byte_identical_and_bounded(store: BlobStore) -> None:
    data = os.urandom(12 * 1024 * 1024 + 5)
    writer = await store.create_writer(spool=False)
    peak = 0
    for start in range(0, len(data), 256 * 1024):
        await writer.write(data[start : start + 256 * 1024])
        if isinstance(writer, S3BlobWriter):
            peak = max(peak, writer.buffered)
    await writer.commit(sha(data))
    assert await get(store, sha(data)) == data
    if isinstance(store, S3BlobStore):
        # Parts left for S3 as they filled: never more than one part in memory.
        assert 0 < peak < store.part_size
    assert leftovers(store) == []


async def test_nothing_is_visible_before_commit_and_abort_leaves_nothing(
    store: BlobStore,
) -> None:
    data = os.urandom(7 * 1024 * 1024)  # enough to start a multipart upload on S3
    writer = await store.create_writer()
    await writer.write(data)
    await writer.flush()
    spool = writer.spool_path
    assert spool is not None
    assert spool.read_bytes() == data  # extractors read the spool
    assert not await store.exists(sha(data))
    await writer.abort()
    await writer.abort()  # twice is fine
    assert not await store.exists(sha(data))
    assert leftovers(store) == []


async def test_identical_content_is_stored_once(store: BlobStore) -> None:
    data = b"the same frame"
    first = await put(store, data)
    second = await put(store, data)
    assert first == second
    assert [k for k, _ in store.blob_keys()] == [first]
    await store.delete(first)
    assert not await store.exists(first)
    await store.delete(first)  # a missing blob is not an error
    with pytest.raises(FileNotFoundError):
        await get(store, first)


def test_plain_http_endpoints_need_consent(tmp_path: Path) -> None:
    env = {**S3_ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    del env["AWS_ALLOW_HTTP"]
    with pytest.raises(S3ConfigurationError, match="AWS_ALLOW_HTTP"):
        S3BlobStore.from_url("s3://bucket/p", staging_dir=tmp_path, environ=env)
    with pytest.raises(S3ConfigurationError, match="s3://"):
        S3BlobStore.from_url("https://bucket/p", staging_dir=tmp_path, environ=S3_ENV)


async def test_a_staged_resumable_upload_commits_into_the_store(store: BlobStore) -> None:
    data = os.urandom(200_000)
    staged = store.staging_path("0123456789abcdef0123456789abcdef")
    staged.write_bytes(data)
    writer = await store.adopt_staged("0123456789abcdef0123456789abcdef")
    assert writer.sha256() == sha(data)
    assert writer.size == len(data)
    await writer.abort()
    assert staged.read_bytes() == data  # aborting keeps what the client may still finish

    writer = await store.adopt_staged("0123456789abcdef0123456789abcdef")
    await writer.commit(sha(data))
    assert await get(store, sha(data)) == data
    assert not staged.exists()
    with pytest.raises(ValueError, match="invalid upload id"):
        store.staging_path("../escape")
