"""The blob store contract, run against every implementation: local files, and S3 (moto's
server mode, over real HTTP on loopback).

Tests that name one store check what only it has (S3's multipart uploads, its configuration);
everything else runs on both.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, ResponseStreamingError

from metalake.server import blobstore
from metalake.server.blobstore import BlobStore, BlobWriter, LocalBlobStore
from metalake.server.s3blobstore import (
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    S3BlobStore,
    S3BlobWriter,
    S3ConfigurationError,
)
from metalake.server.staging import StagingArea
from tests.conftest import S3_ENV
from tests.pagecache import cached_bytes

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
    else:
        url: str = request.getfixturevalue("s3_url")
        # The smallest parts S3 allows, so a few MiB exercise multipart uploads, and copies.
        s3 = S3BlobStore.from_url(url, local_dir=tmp_path / "staging", part_size=MIN_PART_SIZE)
        s3.copy_part_size = MIN_PART_SIZE
        yield s3


@pytest.fixture
async def s3(tmp_path: Path, s3_url: str) -> S3BlobStore:
    return S3BlobStore.from_url(s3_url, local_dir=tmp_path / "staging", part_size=MIN_PART_SIZE)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def write_all(writer: BlobWriter, data: bytes, chunk: int = 64 * 1024) -> None:
    for start in range(0, len(data), chunk):
        await writer.write(data[start : start + chunk])


async def put(store: BlobStore, data: bytes, chunk: int = 64 * 1024) -> str:
    writer = await store.create_writer()
    await write_all(writer, data, chunk)
    assert writer.sha256() == sha(data)
    assert writer.size == len(data)
    await writer.commit(sha(data))
    return sha(data)


async def get(store: BlobStore, key: str, offset: int = 0) -> bytes:
    return b"".join([c async for c in store.read(key, offset=offset, chunk_size=100_000)])


def pending_uploads(store: S3BlobStore) -> list[Any]:
    return list(store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []))


def leftovers(store: BlobStore) -> list[Any]:
    """Anything an upload in flight keeps: spool files, S3 temporary objects and uploads."""
    found: list[Any] = []
    if isinstance(store, S3BlobStore):
        objects = store.client.list_objects_v2(Bucket=store.bucket, Prefix="lake/tmp/")
        found += objects.get("Contents", [])
        found += pending_uploads(store)
        found += list(store._spool.iterdir())
    else:
        found += list((store._tmp).iterdir())  # type: ignore[attr-defined]
    return found


async def upload(store: BlobStore, chunks: AsyncIterator[bytes]) -> str:
    """What the ingest pipeline does: stream, commit under the hash, abort on any failure."""
    writer = await store.create_writer(spool=False)
    try:
        async for chunk in chunks:
            await writer.write(chunk)
        await writer.commit(writer.sha256())
        return writer.sha256()
    except BaseException:
        await writer.abort()
        raise


async def test_round_trip_and_ranged_reads(store: BlobStore) -> None:
    data = os.urandom(300_000)
    key = await put(store, data)
    assert await store.exists(key)
    assert await get(store, key) == data
    assert await get(store, key, offset=123_456) == data[123_456:]
    assert await get(store, key, offset=len(data) - 1) == data[-1:]
    assert await get(store, key, offset=len(data)) == b""
    assert leftovers(store) == []


async def test_an_empty_blob_round_trips(store: BlobStore) -> None:
    key = await put(store, b"")
    assert key == sha(b"")
    assert await store.exists(key)
    assert await get(store, key) == b""


async def test_a_multipart_upload_is_byte_identical_and_bounded(store: BlobStore) -> None:
    data = os.urandom(12 * MiB + 5)
    writer = await store.create_writer(spool=False)
    # Chunk sizes that do not divide a part, and one chunk larger than a part.
    sizes = [256 * 1024, 1_000_003, 6 * MiB, 77]
    start = 0
    while start < len(data):
        chunk = data[start : start + sizes[start % len(sizes)]]
        start += len(chunk)
        await writer.write(chunk)
        if isinstance(writer, S3BlobWriter) and isinstance(store, S3BlobStore):
            # Full parts left for S3 as they filled: less than one part stays in memory.
            assert writer.buffered < store.part_size
            assert writer.buffered == writer.size % store.part_size
    if isinstance(store, S3BlobStore):
        # Two full parts already sit in S3 while the client has not finished sending.
        (started,) = pending_uploads(store)
        parts = store.client.list_parts(
            Bucket=store.bucket, Key=started["Key"], UploadId=started["UploadId"]
        )
        assert [p["Size"] for p in parts["Parts"]] == [store.part_size] * 2
    await writer.commit(sha(data))
    assert await get(store, sha(data)) == data
    assert await get(store, sha(data), offset=7 * MiB + 3) == data[7 * MiB + 3 :]
    assert leftovers(store) == []


async def test_nothing_is_visible_before_commit_and_abort_leaves_nothing(
    store: BlobStore,
) -> None:
    data = os.urandom(7 * MiB)  # enough to start a multipart upload on S3
    writer = await store.create_writer(spool=True)
    await writer.write(data)
    await writer.flush()
    spool = writer.spool_path
    assert spool is not None
    assert spool.read_bytes() == data  # extractors read the spool
    assert not await store.exists(sha(data))
    assert store.blob_keys() == []
    with pytest.raises(FileNotFoundError):
        await get(store, sha(data))
    await writer.abort()
    await writer.abort()  # twice is fine
    assert not spool.exists()
    assert not await store.exists(sha(data))
    assert leftovers(store) == []


async def test_without_spool_an_s3_writer_keeps_no_local_file(s3: S3BlobStore) -> None:
    writer = await s3.create_writer(spool=False)
    await writer.write(b"x" * 1000)
    assert writer.spool_path is None
    assert list(s3._spool.iterdir()) == []
    await writer.commit(sha(b"x" * 1000))


async def test_a_committed_spool_file_is_removed(s3: S3BlobStore) -> None:
    writer = await s3.create_writer(spool=True)
    await write_all(writer, os.urandom(6 * MiB))
    assert writer.spool_path is not None
    assert writer.spool_path.exists()
    await writer.commit(writer.sha256())
    assert leftovers(s3) == []


@pytest.mark.parametrize("size", [1000, 6 * MiB], ids=["single-put", "multipart"])
async def test_identical_content_is_stored_once(store: BlobStore, size: int) -> None:
    data = os.urandom(size)
    first = await put(store, data)
    second = await put(store, data)
    assert first == second
    assert [k for k, _ in store.blob_keys()] == [first]
    assert await get(store, first) == data
    assert leftovers(store) == []
    await store.delete(first)
    assert not await store.exists(first)
    await store.delete(first)  # a missing blob is not an error
    with pytest.raises(FileNotFoundError):
        await get(store, first)


async def test_a_stream_that_breaks_mid_upload_leaves_nothing(store: BlobStore) -> None:
    async def breaking() -> AsyncIterator[bytes]:
        for _ in range(12):  # 6 MiB: one part already in S3
            yield os.urandom(512 * 1024)
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        await upload(store, breaking())
    assert store.blob_keys() == []
    assert leftovers(store) == []


async def test_a_part_that_s3_refuses_aborts_the_multipart_upload(
    s3: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = s3.client.upload_part
    calls = 0

    def second_part_fails(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ClientError({"Error": {"Code": "InternalError"}}, "UploadPart")
        return real(**kwargs)

    monkeypatch.setattr(s3.client, "upload_part", second_part_fails)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(12):
            yield os.urandom(MiB)

    with pytest.raises(ClientError, match="InternalError"):
        await upload(s3, chunks())
    assert calls == 2
    assert leftovers(s3) == []


@pytest.mark.parametrize("failing", ["complete_multipart_upload", "copy_object"])
async def test_a_commit_that_fails_leaves_nothing(
    s3: S3BlobStore, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "SlowDown"}}, failing)

    # copy_object is the store's own method (boto3's managed copy); the other is the client's.
    monkeypatch.setattr(s3 if failing == "copy_object" else s3.client, failing, fail)
    data = os.urandom(6 * MiB)
    writer = await s3.create_writer(spool=True)
    await write_all(writer, data)
    with pytest.raises(ClientError, match="SlowDown"):
        await writer.commit(sha(data))
    await writer.abort()
    assert not await s3.exists(sha(data))
    assert leftovers(s3) == []


async def test_an_upload_cancelled_while_a_part_is_sent_leaves_nothing(
    s3: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline aborts as soon as the upload is cancelled, while the write that started the
    multipart upload still runs in its thread: the abort must wait for it, then abort it."""
    real = s3.client.create_multipart_upload
    started, created = threading.Event(), threading.Event()

    def slow(**kwargs: Any) -> Any:
        started.set()
        time.sleep(0.5)
        try:
            return real(**kwargs)
        finally:
            created.set()

    monkeypatch.setattr(s3.client, "create_multipart_upload", slow)
    writer = await s3.create_writer(spool=True)
    writing = asyncio.create_task(writer.write(os.urandom(6 * MiB)))
    await asyncio.to_thread(started.wait, 5)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    await writer.abort()
    # Whatever that thread started exists by now; the abort must have waited for it.
    assert created.wait(5)
    assert leftovers(s3) == []
    with pytest.raises(RuntimeError, match="already committed or aborted"):
        await writer.write(b"more")


async def test_abandoned_uploads_are_discarded_once_old(store: BlobStore) -> None:
    writer = await store.create_writer(spool=False)
    await writer.write(os.urandom(6 * MiB))  # a multipart upload in S3
    now = datetime.now(UTC)
    if not isinstance(store, S3BlobStore):
        # moto reports every multipart upload as initiated in 2010, so only this store can
        # show that a recent upload is kept.
        assert store.discard_abandoned(now - timedelta(hours=1)) == 0
    assert leftovers(store) != []
    assert store.discard_abandoned(now + timedelta(minutes=1)) == 1
    assert leftovers(store) == []
    await writer.abort()  # what it started is gone already: still fine


async def test_a_download_resumes_where_a_broken_connection_left_it(
    s3: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1_000_000)
    key = await put(s3, data)
    real = s3.client.get_object
    ranges: list[str] = []

    def flaky(**kwargs: Any) -> Any:
        ranges.append(kwargs["Range"])
        response = real(**kwargs)
        if len(ranges) == 1:
            body = response["Body"]
            monkeypatch.setattr(body, "read", breaks_after_one_read(body.read))
        return response

    monkeypatch.setattr(s3.client, "get_object", flaky)
    assert await get(s3, key, offset=10) == data[10:]
    assert ranges == ["bytes=10-", "bytes=100010-"]


def breaks_after_one_read(read: Callable[[int | None], bytes]) -> Callable[[int | None], bytes]:
    reads = 0

    def read_once(size: int | None = None) -> bytes:
        nonlocal reads
        reads += 1
        if reads > 1:
            raise ResponseStreamingError(error="connection reset")
        return read(size)

    return read_once


async def test_a_closed_writer_refuses_more(s3: S3BlobStore) -> None:
    writer = await s3.create_writer()
    await writer.write(b"abc")
    await writer.commit(sha(b"abc"))
    with pytest.raises(RuntimeError, match="already committed"):
        await writer.write(b"d")
    await writer.abort()  # after commit: nothing to do, the blob stays
    assert await s3.exists(sha(b"abc"))


def test_plain_http_endpoints_need_consent(tmp_path: Path) -> None:
    env = {**S3_ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    del env["AWS_ALLOW_HTTP"]
    with pytest.raises(S3ConfigurationError, match="AWS_ALLOW_HTTP"):
        S3BlobStore.from_url("s3://bucket/p", local_dir=tmp_path, environ=env)
    with pytest.raises(S3ConfigurationError, match="AWS_ALLOW_HTTP"):
        S3BlobStore.from_url(
            "s3://bucket/p", local_dir=tmp_path, environ={**env, "AWS_ALLOW_HTTP": "false"}
        )
    allowed = S3BlobStore.from_url(
        "s3://bucket/p", local_dir=tmp_path, environ={**env, "AWS_ALLOW_HTTP": "true"}
    )
    assert allowed.client.meta.endpoint_url == "http://127.0.0.1:9000"


def test_configuration_from_the_url_and_environment(tmp_path: Path) -> None:
    env = {
        "AWS_ENDPOINT_URL": "https://minio.internal:9000",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
    store = S3BlobStore.from_url("s3://acme-lake/metalake/", local_dir=tmp_path, environ=env)
    assert (store.bucket, store.prefix, store.part_size) == ("acme-lake", "metalake", 8 * MiB)
    assert store.part_size == DEFAULT_PART_SIZE
    assert store.client.meta.region_name == "eu-west-3"
    assert store.client.meta.endpoint_url == "https://minio.internal:9000"
    config = vars(store.client.meta.config)  # botocore's stubs do not list its options
    # S3-compatible servers: path-style keys, and no checksums they may not understand.
    assert config["s3"]["addressing_style"] == "path"
    assert config["request_checksum_calculation"] == "when_required"
    assert store.blob_key("ab" * 32) == "metalake/blobs/" + "ab" * 32
    with pytest.raises(ValueError, match="invalid blob key"):
        store.blob_key("../x")

    aws = S3BlobStore.from_url("s3://bucket", environ={"AWS_REGION": "us-west-2"})
    assert aws.prefix == ""
    assert aws.blob_key("ab") == "blobs/ab"
    assert aws.client.meta.region_name == "us-west-2"
    assert vars(aws.client.meta.config)["request_checksum_calculation"] == "when_supported"

    with pytest.raises(S3ConfigurationError, match="s3://"):
        S3BlobStore.from_url("https://bucket/p", local_dir=tmp_path, environ=S3_ENV)
    with pytest.raises(S3ConfigurationError, match="https://"):
        S3BlobStore.from_url("s3://bucket/p", environ={"AWS_ENDPOINT_URL": "minio.internal:9000"})
    with pytest.raises(S3ConfigurationError, match="at least"):
        S3BlobStore.from_url("s3://bucket/p", part_size=MiB, environ={})


async def test_a_finished_resumable_upload_is_stored_from_its_staged_file(
    store: BlobStore, tmp_path: Path
) -> None:
    staging = StagingArea(tmp_path / "uploads")
    key = "0123456789abcdef0123456789abcdef"
    data = os.urandom(200_000)
    staged = staging.path(key)
    staged.write_bytes(data)
    (staging.directory / "not-an-upload").mkdir()  # whatever else is there is left alone
    assert staging.staging_keys() == [key]
    assert await staging.hash(key) == (sha(data), len(data))
    assert staged.read_bytes() == data  # hashing keeps what the client may still finish

    await store.store_file(staged, sha(data))
    await staging.discard(key)
    assert await get(store, sha(data)) == data
    assert not staged.exists()
    assert staging.staging_keys() == []
    assert leftovers(store) == []
    # Identical content staged again is stored again without harm.
    staged.write_bytes(data)
    await store.store_file(staged, sha(data))
    await staging.discard(key)
    assert await get(store, sha(data)) == data
    with pytest.raises(ValueError, match="invalid upload id"):
        staging.path("../escape")


async def test_put_stores_a_small_blob_in_one_step(store: BlobStore) -> None:
    data = os.urandom(200_000)
    await store.put(sha(data), data)
    assert await store.exists(sha(data))
    assert await get(store, sha(data)) == data
    # The same content again (by put or by a writer) changes nothing and leaves nothing.
    await store.put(sha(data), data)
    assert await put(store, data) == sha(data)
    assert await get(store, sha(data)) == data
    await store.put(sha(b""), b"")
    assert await get(store, sha(b"")) == b""
    assert leftovers(store) == []
    assert sorted(key for key, _ in store.blob_keys()) == sorted([sha(data), sha(b"")])


async def test_a_local_writer_starts_writing_back_behind_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every WRITE_BEHIND bytes, the kernel is asked to start writing what came since the last
    time (so the fsync at commit has little left to wait for); the bytes stay whole."""
    started: list[tuple[int, int]] = []
    start_writeback = blobstore.start_writeback

    def recording(fd: int, offset: int) -> None:
        started.append((offset, os.fstat(fd).st_size))
        start_writeback(fd, offset)

    monkeypatch.setattr(blobstore, "start_writeback", recording)
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(2 * blobstore.WRITE_BEHIND + 3 * MiB + 5)
    await put(store, data, chunk=MiB)
    step = blobstore.WRITE_BEHIND
    # From where the last one began to the end: what was written so far, once each.
    assert started == [(0, step), (step, 2 * step)]
    assert await get(store, sha(data)) == data


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here (macOS)")
async def test_a_big_blob_s_pages_leave_the_page_cache_behind_its_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob a writer streams is written once and read seldom: at each write-behind step the
    pages already on disk are let go (and the next writes reuse them), and at commit all of
    them; a big upload does not fill the page cache."""
    monkeypatch.setattr(blobstore, "WRITE_BEHIND", MiB)
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(9 * MiB)
    writer = await store.create_writer()
    await write_all(writer, data[: 8 * MiB], MiB)
    spool = writer.spool_path
    assert spool is not None
    with spool.open("rb") as handle:
        os.fdatasync(handle.fileno())  # the disk caught up with the writer
    await writer.write(data[8 * MiB :])  # the next step lets go of all it wrote back
    assert cached_bytes(spool) <= MiB  # the last step's, still being written
    await writer.commit(sha(data))
    assert cached_bytes(store.path_for(sha(data))) == 0
    assert await get(store, sha(data)) == data


def test_starting_writeback_is_a_hint_that_never_fails(tmp_path: Path) -> None:
    if sys.platform == "linux":
        assert blobstore._SYNC_FILE_RANGE is not None  # the write-behind runs where it matters
    path = tmp_path / "file"
    path.write_bytes(os.urandom(MiB))
    with path.open("rb+") as handle:
        blobstore.start_writeback(handle.fileno(), 0)
    assert path.stat().st_size == MiB
    reading, writing = os.pipe()  # no pages to write back: the call fails, quietly
    try:
        blobstore.start_writeback(writing, 0)
    finally:
        os.close(reading)
        os.close(writing)


async def test_put_makes_each_new_directory_durable_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new blob directory's entry is durable only once its parent is fsynced: every put
    fsyncs what its blob needs (its directory, and the parents of directories this process
    has not made durable), and no parent twice once this process made it durable. (A put of
    a file per blob, what `packed=False` keeps; writers place their files the same way.)"""
    store = LocalBlobStore(tmp_path / "store", packed=False)
    synced: list[Path] = []
    real = blobstore._fsync_directory

    def recorded(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(blobstore, "_fsync_directory", recorded)
    # Two blobs under the same first level (`ab/`), in different blob directories.
    first, second = b"", b""
    for index in range(10_000):
        data = str(index).encode()
        if first == b"":
            first = data
        elif sha(data)[:2] == sha(first)[:2] and sha(data)[2:4] != sha(first)[2:4]:
            second = data
            break
    blobs = tmp_path / "store" / "blobs"
    for data in (first, second):
        synced.clear()
        await store.put(sha(data), data)
        target = store.path_for(sha(data))
        assert target.parent in synced
        assert target.parent.parent in synced
        if data is first:
            assert blobs in synced  # the first level is new too
        else:
            assert blobs not in synced  # made durable by the first put already
        assert await get(store, sha(data)) == data
    # Another process (a restarted server) trusts nothing it did not make durable itself: a
    # process may have created the directories and died before its fsync.
    third = next(
        data
        for data in (f"third {index}".encode() for index in range(10_000_000))
        if sha(data)[:4] == sha(second)[:4]
    )
    restarted = LocalBlobStore(tmp_path / "store", packed=False)
    synced.clear()
    await restarted.put(sha(third), third)
    target = store.path_for(sha(third))
    assert {target.parent, target.parent.parent, blobs} <= set(synced)


async def test_a_directory_fsync_that_fails_fails_the_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path / "store", packed=False)

    def fail(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blobstore, "_fsync_directory", fail)
    data = os.urandom(1000)
    with pytest.raises(OSError, match="Input/output error"):
        await store.put(sha(data), data)
    monkeypatch.undo()
    # Nothing was taken for durable: the next put fsyncs every level again.
    synced: list[Path] = []
    monkeypatch.setattr(blobstore, "_fsync_directory", synced.append)
    await store.put(sha(data), data)
    target = store.path_for(sha(data))
    assert {target.parent, target.parent.parent, tmp_path / "store" / "blobs"} <= set(synced)


def _restarted(store: BlobStore, tmp_path: Path) -> BlobStore:
    """The same store as a new process would open it, after this one was killed."""
    if isinstance(store, S3BlobStore):
        url = f"s3://{store.bucket}/{store.prefix}"
        return S3BlobStore.from_url(url, local_dir=tmp_path / "staging", part_size=MIN_PART_SIZE)
    return LocalBlobStore(tmp_path / "blobs")


async def test_start_up_discards_whatever_a_killed_process_left(
    store: BlobStore, tmp_path: Path
) -> None:
    kept = await put(store, os.urandom(1000))
    # Killed mid-upload (never committed nor aborted), with a part in S3 already.
    writer = await store.create_writer(spool=True)
    await writer.write(os.urandom(6 * MiB))
    await writer.flush()
    assert leftovers(store) != []
    # What older versions and other crashes left: an extraction's scratch directory, a file.
    root = tmp_path / "staging" if isinstance(store, S3BlobStore) else tmp_path / "blobs"
    scratch = root / "tmp" / "tmpq1w2e3r4"
    scratch.mkdir()
    (scratch / "spool").write_bytes(b"half an extraction")
    (root / "tmp" / "stray").write_bytes(b"?")

    restarted = _restarted(store, tmp_path)
    assert restarted.discard_spooled() >= 3
    assert leftovers(restarted) == []  # S3: the multipart upload is aborted, not left billed
    assert await get(restarted, kept) == await get(store, kept)


async def test_start_up_with_the_bucket_away_keeps_what_it_could_not_abort(
    s3: S3BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = await s3.create_writer(spool=False)
    await writer.write(os.urandom(6 * MiB))
    assert len(pending_uploads(s3)) == 1
    url = f"s3://{s3.bucket}/{s3.prefix}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    away = S3BlobStore.from_url(url, local_dir=tmp_path / "staging")
    assert away.discard_spooled() == 0  # starts all the same
    assert len(pending_uploads(s3)) == 1
    # The next start, with the bucket back, finishes the job.
    back = S3BlobStore.from_url(
        url, local_dir=tmp_path / "staging", environ={**os.environ, **_moto_env(s3)}
    )
    assert back.discard_spooled() == 1
    assert leftovers(s3) == []


def _moto_env(s3: S3BlobStore) -> dict[str, str]:
    return {**S3_ENV, "AWS_ENDPOINT_URL": s3.client.meta.endpoint_url}
