"""Small blobs packed into append-only pack files (LocalBlobStore.put): found through the
index, read in parts, stored once whichever way identical content came, their bytes punched
out when deleted, never indexed before they are durable, one pack per process, and a crash's
torn record harmless. The contract every store keeps is in test_blobstores.py."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from metalake.server import blobstore
from metalake.server.app import open_blob_store
from metalake.server.blobstore import LocalBlobStore
from metalake.server.config import Settings
from tests.pagecache import cached_bytes

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def get(store: LocalBlobStore, key: str, offset: int = 0, chunk_size: int = 100_000) -> bytes:
    return b"".join([c async for c in store.read(key, offset=offset, chunk_size=chunk_size)])


@pytest.fixture(autouse=True, params=[True, False], ids=["direct", "page-cache"])
def direct(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every test runs against packs appended directly (O_DIRECT: the default where the
    filesystem takes it) and through the page cache (where it does not)."""
    if request.param and not _takes_direct_io(request.getfixturevalue("tmp_path")):
        pytest.skip("this filesystem refuses O_DIRECT: packs go through the page cache here")
    monkeypatch.setattr(blobstore, "DIRECT_PACKS", request.param)
    return bool(request.param)


def _takes_direct_io(directory: Path) -> bool:
    probe = directory / "direct-io-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | blobstore._O_DIRECT, 0o644))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return blobstore._O_DIRECT != 0


def pack_size(batches: list[list[bytes]], direct: bool) -> int:
    """A pack's size once these batches of blobs (each one group commit) were appended."""
    size = 0
    for batch in batches:
        size += sum(blobstore._RECORD.size + len(data) for data in batch)
        if direct:
            size = -(-size // blobstore.DIRECT_ALIGN) * blobstore.DIRECT_ALIGN
    return size


def walk(pack: Path) -> list[str]:
    """The keys of a pack's records, in order, read from its headers alone (as a tool rebuilding
    the index would); the padding after a directly written batch must be zeros."""
    data, keys, at = pack.read_bytes(), [], 0
    while at < len(data):
        if data[at : at + 4] == bytes(4):  # padding, up to the next block
            block_end = -(-(at + 1) // blobstore.DIRECT_ALIGN) * blobstore.DIRECT_ALIGN
            assert data[at:block_end] == bytes(block_end - at)
            at = block_end
            continue
        magic, key, length = blobstore._RECORD.unpack_from(data, at)
        assert magic == blobstore._MAGIC
        keys.append(key.hex())
        at += blobstore._RECORD.size + length
    return keys


def packs(root: Path) -> list[Path]:
    return sorted((root / "blobs" / "packs").glob("*.pack"))


def blob_files(root: Path) -> list[Path]:
    """Blobs stored as files of their own (not packed)."""
    return [p for p in (root / "blobs").glob("*/*/*") if p.is_file()]


def killed(store: LocalBlobStore) -> None:
    """What the death of the store's process does to it: its files are closed (its lock on
    its active pack released), whatever it was doing left unfinished."""
    if store._active is not None:
        store._close(store._active)


def append(store: LocalBlobStore, data: bytes) -> blobstore._Appended:
    """Append a record without syncing or indexing it: what a process killed meanwhile left."""
    [outcome] = store._append_all([blobstore._Queued(sha(data), data)])
    assert isinstance(outcome, blobstore._Appended)
    return outcome


def disk_writes(monkeypatch: pytest.MonkeyPatch, write: Any) -> None:
    """Make `write` (os.write's signature) the disk's answer to every write; a writev writes its
    buffers as one, a pwrite (a pack's direct append) at its position."""

    def pwrite(fd: int, data: Any, position: int) -> int:
        os.lseek(fd, position, os.SEEK_SET)
        return int(write(fd, data))

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "writev", lambda fd, buffers: write(fd, b"".join(buffers)))
    monkeypatch.setattr(os, "pwrite", pwrite)


def indexed(root: Path) -> list[str]:
    """What a process that just started finds in the index."""
    other = LocalBlobStore(root)
    try:
        return sorted(key for key, _ in other.blob_keys())
    finally:
        other.close()


async def test_packed_blobs_round_trip_in_parts_and_from_offsets(
    tmp_path: Path, direct: bool
) -> None:
    store = LocalBlobStore(tmp_path)
    blobs = [os.urandom(size) for size in (160 * 1024, 1, 0, MiB, 12_345, 3 * MiB + 1)]
    for data in blobs:
        await store.put(sha(data), data)
    assert blob_files(tmp_path) == []  # no file, no directory per blob
    (pack,) = packs(tmp_path)
    assert pack.stat().st_size == pack_size([[d] for d in blobs], direct)
    assert walk(pack) == [sha(d) for d in blobs]
    for data in blobs:
        key = sha(data)
        assert await store.exists(key)
        assert store.local_path(key) is None  # read through the store, not as a file
        assert await get(store, key) == data
        parts = [c async for c in store.read(key, chunk_size=1000)]
        assert all(len(p) == 1000 for p in parts[:-1])
        assert b"".join(parts) == data
        for offset in {0, 1, len(data) // 2, max(len(data) - 1, 0), len(data), len(data) + 10}:
            assert await get(store, key, offset=offset, chunk_size=777) == data[offset:]
    assert sorted(k for k, _ in store.blob_keys()) == sorted({sha(d) for d in blobs})
    assert indexed(tmp_path) == sorted({sha(d) for d in blobs})  # durable, seen by another

    gone = blobs[0]
    await store.delete(sha(gone))
    assert not await store.exists(sha(gone))
    with pytest.raises(FileNotFoundError):
        await get(store, sha(gone))
    await store.delete(sha(gone))  # a missing blob is not an error
    for data in blobs[1:]:
        assert await get(store, sha(data)) == data
    # Stored again after its deletion: packed again, readable again.
    await store.put(sha(gone), gone)
    assert await get(store, sha(gone)) == gone
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_identical_content_is_stored_once_packed_or_as_a_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = os.urandom(50_000)
    await store.put(sha(data), data)
    size = packs(tmp_path)[0].stat().st_size
    await store.put(sha(data), data)
    assert packs(tmp_path)[0].stat().st_size == size  # not appended twice
    assert [k for k, _ in store.blob_keys()] == [sha(data)]

    # Stored as a file first (a streamed or resumable upload, an older version's data dir):
    # a put finds it there and packs nothing.
    other = os.urandom(60_000)
    writer = await store.create_writer(spool=False)
    await writer.write(other)
    await writer.commit(sha(other))
    await store.put(sha(other), other)
    assert packs(tmp_path)[0].stat().st_size == size
    assert store.local_path(sha(other)) == store.path_for(sha(other))
    assert sorted(k for k, _ in store.blob_keys()) == sorted([sha(data), sha(other)])
    assert await get(store, sha(other), offset=5) == other[5:]

    # Packed and then also committed as a file: listed once, deleted both ways at once.
    writer = await store.create_writer(spool=False)
    await writer.write(data)
    await writer.commit(sha(data))
    assert sorted(k for k, _ in store.blob_keys()) == sorted([sha(data), sha(other)])
    assert await get(store, sha(data)) == data
    await store.delete(sha(data))
    await store.delete(sha(other))
    assert not await store.exists(sha(data))
    assert store.blob_keys() == []
    assert blob_files(tmp_path) == []


async def test_blobs_stored_as_files_by_an_older_version_still_read(tmp_path: Path) -> None:
    data = os.urandom(70_000)
    old = LocalBlobStore(tmp_path, packed=False)
    await old.put(sha(data), data)
    assert [p.name for p in blob_files(tmp_path)] == [sha(data)]
    assert packs(tmp_path) == []

    store = LocalBlobStore(tmp_path)
    assert await store.exists(sha(data))
    assert await get(store, sha(data), offset=3) == data[3:]
    assert [k for k, _ in store.blob_keys()] == [sha(data)]
    assert store.local_path(sha(data)) == store.path_for(sha(data))
    await store.delete(sha(data))
    assert blob_files(tmp_path) == []
    assert not await store.exists(sha(data))


@pytest.mark.parametrize("punching", [True, False], ids=["hole", "zeros"])
async def test_a_deleted_blob_s_bytes_are_gone_from_its_pack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, punching: bool
) -> None:
    if not punching:  # a filesystem (or OS) that cannot punch holes: overwritten with zeros
        monkeypatch.setattr(blobstore, "_FALLOCATE", None)
    store = LocalBlobStore(tmp_path)
    first, deleted, last = (os.urandom(256 * 1024) for _ in range(3))
    for data in (first, deleted, last):
        await store.put(sha(data), data)
    (pack,) = packs(tmp_path)
    size = pack.stat().st_size
    assert deleted in pack.read_bytes()
    await store.delete(sha(deleted))
    content = pack.read_bytes()
    assert deleted[:4096] not in content
    assert deleted[-4096:] not in content
    assert first in content
    assert last in content
    assert bytes(len(deleted)) in content  # reads as zeros now
    assert pack.stat().st_size == size  # offsets of the others unchanged
    if punching and sys.platform == "linux":
        # Its blocks returned to the filesystem (tmp_path: ext4, xfs or tmpfs, which all punch).
        assert pack.stat().st_blocks * 512 <= size - 200 * 1024
    assert await get(store, sha(first)) == first
    assert await get(store, sha(last)) == last


async def test_no_blob_is_indexed_before_its_pack_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path)
    data = os.urandom(100_000)
    seen_at_sync: list[list[str]] = []
    real = os.fdatasync

    def observed(fd: int) -> None:
        seen_at_sync.append(indexed(tmp_path))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", observed)
    await store.put(sha(data), data)
    assert seen_at_sync == [[]]  # synced while not yet indexed
    assert indexed(tmp_path) == [sha(data)]  # indexed once synced

    def fails(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", fails)
    lost = os.urandom(100_000)
    with pytest.raises(OSError, match="Input/output error"):
        await store.put(sha(lost), lost)
    assert not await store.exists(sha(lost))
    assert indexed(tmp_path) == [sha(data)]
    with pytest.raises(FileNotFoundError):
        await get(store, sha(lost))
    # Nothing more goes into a pack whose sync failed: the next put starts another.
    monkeypatch.setattr(os, "fdatasync", real)
    await store.put(sha(lost), lost)
    assert len(packs(tmp_path)) == 2
    assert await get(store, sha(lost)) == lost
    assert await get(store, sha(data)) == data


async def test_an_index_on_a_full_disk_fails_the_put_with_enospc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path)
    kept = os.urandom(1000)
    await store.put(sha(kept), kept)
    real = store._writer

    class Full:
        def __init__(self, index: Any) -> None:
            self.index = index

        def executemany(self, *args: Any) -> Any:
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = 13
            raise error

        def __getattr__(self, name: str) -> Any:
            return getattr(self.index, name)

    monkeypatch.setattr(store, "_writer", lambda: Full(real()))
    data = os.urandom(1000)
    with pytest.raises(OSError, match="No space left") as caught:
        await store.put(sha(data), data)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert indexed(tmp_path) == [sha(kept)]  # rolled back: nothing half-indexed
    await store.put(sha(data), data)
    assert await get(store, sha(data)) == data


async def test_a_full_disk_while_appending_cuts_the_record_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    store = LocalBlobStore(tmp_path)
    first = os.urandom(10_000)
    await store.put(sha(first), first)
    (pack,) = packs(tmp_path)
    size = pack.stat().st_size
    real = os.write

    def short_then_full(fd: int, data: Any) -> int:
        if len(data) > 1000:
            # A direct write takes whole blocks.
            real(fd, memoryview(data)[: blobstore.DIRECT_ALIGN if direct else 500])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    disk_writes(monkeypatch, short_then_full)
    big = os.urandom(50_000)
    with pytest.raises(OSError, match="No space left") as caught:
        await store.put(sha(big), big)
    assert caught.value.errno == errno.ENOSPC
    assert pack.stat().st_size == size  # what was written of it is gone
    monkeypatch.undo()
    assert not await store.exists(sha(big))
    await store.put(sha(big), big)  # appended where the failed one began
    assert packs(tmp_path) == [pack]
    assert pack.stat().st_size == pack_size([[first], [big]], direct)
    assert await get(store, sha(first)) == first
    assert await get(store, sha(big)) == big


async def test_a_blob_that_cannot_be_appended_fails_alone_in_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group commit appends every put queued meanwhile: a full disk on one of them fails that
    upload only; the others are stored, durable and indexed."""
    store = LocalBlobStore(tmp_path)
    fits, too_big = os.urandom(2_000), os.urandom(60_000)
    real = os.write

    def full_past_50k(fd: int, data: Any) -> int:
        if len(data) > 50_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    disk_writes(monkeypatch, full_past_50k)
    results = await asyncio.gather(
        store.put(sha(too_big), too_big), store.put(sha(fits), fits), return_exceptions=True
    )
    monkeypatch.undo()
    assert isinstance(results[0], OSError)
    assert results[0].errno == errno.ENOSPC
    assert results[1] is None
    assert indexed(tmp_path) == [sha(fits)]
    assert await get(store, sha(fits)) == fits
    assert not await store.exists(sha(too_big))


async def test_concurrent_puts_share_one_sync_and_one_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: the puts that arrive while a sync runs are covered by the next one."""
    store = LocalBlobStore(tmp_path)
    syncing, release = threading.Event(), threading.Event()
    syncs: list[int] = []
    real = os.fdatasync

    def slow(fd: int) -> None:
        syncs.append(fd)
        syncing.set()
        release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    blobs = [os.urandom(20_000) for _ in range(6)]
    first = asyncio.create_task(store.put(sha(blobs[0]), blobs[0]))
    assert await asyncio.to_thread(syncing.wait, 10)
    rest = [asyncio.create_task(store.put(sha(d), d)) for d in blobs[1:]]
    for _ in range(1000):  # until every other put appended and waits
        if len(store._pending) == len(rest):
            break
        await asyncio.sleep(0.01)
    assert len(store._pending) == len(rest)
    assert indexed(tmp_path) == []
    release.set()
    await asyncio.gather(first, *rest)
    assert len(syncs) == 2
    assert indexed(tmp_path) == sorted(sha(d) for d in blobs)


async def test_a_batch_is_appended_in_one_write_across_a_pack_s_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """A group commit's blobs go to the pack in one write per pack (not two writes per blob,
    each a hand-off of the GIL): a pwrite from the aligned buffer when direct, else a writev of
    the records; a full pack still ends at the record that fills it."""
    store = LocalBlobStore(tmp_path)
    store.pack_size = 100_000
    writes: list[int] = []
    real_write, real_writev, real_pwrite = os.write, os.writev, os.pwrite

    def write(fd: int, data: Any) -> int:
        writes.append(1)
        return real_write(fd, data)

    def writev(fd: int, buffers: Any) -> int:
        writes.append(len(buffers))
        return real_writev(fd, buffers)

    def pwrite(fd: int, data: Any, position: int) -> int:
        writes.append(-1)
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "writev", writev)
    monkeypatch.setattr(os, "pwrite", pwrite)
    blobs = [os.urandom(30_000 + i) for i in range(7)]
    steps = [store.put_deferred(sha(data), data) for data in blobs]
    assert steps[0] is not None
    await asyncio.to_thread(steps[0])  # commits all seven: one batch
    monkeypatch.undo()
    # 4 records fill the first pack past 100 kB, 3 go to the next: a write each.
    assert writes == ([-1, -1] if direct else [8, 6])
    assert sorted(p.stat().st_size for p in packs(tmp_path)) == sorted(
        [pack_size([part], direct) for part in (blobs[:4], blobs[4:])]
    )
    assert indexed(tmp_path) == sorted(sha(d) for d in blobs)
    for data in blobs:
        assert await get(store, sha(data)) == data


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here (macOS)")
async def test_synced_blobs_leave_the_page_cache_but_the_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Packs are written once and read seldom, and every stored blob would fill the page cache:
    appended directly, they never enter it; appended through it, all but their last
    CACHED_TAIL bytes are let go of it once synced."""
    monkeypatch.setattr(blobstore, "CACHED_TAIL", 2 * MiB)
    store = LocalBlobStore(tmp_path)
    blobs = [os.urandom(MiB // 2 + i) for i in range(24)]  # 12 MiB, no blob a block multiple
    for data in blobs:
        await store.put(sha(data), data)
    (pack,) = packs(tmp_path)
    cached = cached_bytes(pack)
    if direct:
        assert cached == 0
    else:
        # The tail, and at most one step of pages not yet let go.
        assert cached <= 2 * MiB + blobstore._UNCACHE_STEP + MiB // 2
        assert cached >= 2 * MiB - MiB // 2  # the latest blobs are still cached
    for data in blobs:  # read back from the disk
        assert await get(store, sha(data)) == data


async def test_a_deferred_put_is_stored_when_made_durable_with_those_queued_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """put_deferred queues the bytes; the function it returns (the catalog's batch runs it)
    stores them, and every blob queued meanwhile, with one sync; the others' functions then
    find theirs durable already."""
    store = LocalBlobStore(tmp_path)
    syncs: list[int] = []
    real = os.fdatasync

    def counted(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    blobs = [os.urandom(20_000) for _ in range(3)]
    steps = [store.put_deferred(sha(data), data) for data in blobs]
    assert not await store.exists(sha(blobs[0]))
    assert indexed(tmp_path) == []
    for step in steps:
        assert step is not None
        await asyncio.to_thread(step)
    assert len(syncs) == 1
    assert indexed(tmp_path) == sorted(sha(d) for d in blobs)
    assert [await get(store, sha(d)) for d in blobs] == blobs


async def test_a_pack_that_cannot_be_created_fails_each_blob_of_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No room for a new pack: every blob of the batch fails with the disk's error, each its
    own; once there is room again, puts succeed."""
    store = LocalBlobStore(tmp_path)
    real = store._new_pack

    def no_room() -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "_new_pack", no_room)
    blobs = [os.urandom(1_000 + i) for i in range(3)]
    results = await asyncio.gather(*(store.put(sha(d), d) for d in blobs), return_exceptions=True)
    assert all(isinstance(r, OSError) and r.errno == errno.ENOSPC for r in results)
    assert len({id(r) for r in results}) == len(results)  # raised in three callers at once
    monkeypatch.setattr(store, "_new_pack", real)
    for data in blobs:
        await store.put(sha(data), data)
        assert await get(store, sha(data)) == data


async def test_a_deferred_put_raises_what_failed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path)
    data = os.urandom(20_000)
    step = store.put_deferred(sha(data), data)
    assert step is not None

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    disk_writes(monkeypatch, full)
    with pytest.raises(OSError, match="No space left") as raised:
        await asyncio.to_thread(step)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert not await store.exists(sha(data))


async def test_only_blobs_to_pack_are_deferred(tmp_path: Path) -> None:
    """What is not packed (packs off, or over PACKED_MAX) is `put` as before: no deferral."""
    small, big = os.urandom(1_000), os.urandom(blobstore.PACKED_MAX + 1)
    assert LocalBlobStore(tmp_path / "off", packed=False).put_deferred(sha(small), small) is None
    assert LocalBlobStore(tmp_path / "on").put_deferred(sha(big), big) is None
    with pytest.raises(ValueError, match="invalid blob key"):
        LocalBlobStore(tmp_path / "on").put_deferred("../etc/passwd", small)


async def test_two_stores_on_one_directory_append_to_packs_of_their_own(tmp_path: Path) -> None:
    """What a server's worker processes do: each appends to its own pack, reads the other's."""
    one, two = LocalBlobStore(tmp_path), LocalBlobStore(tmp_path)
    mine = [os.urandom(30_000 + i) for i in range(20)]
    theirs = [os.urandom(40_000 + i) for i in range(20)]

    async def put_all(store: LocalBlobStore, blobs: list[bytes]) -> None:
        await asyncio.gather(*(store.put(sha(d), d) for d in blobs))

    await asyncio.gather(put_all(one, mine), put_all(two, theirs))
    assert len(packs(tmp_path)) == 2
    for data in mine + theirs:
        assert await get(one, sha(data)) == data
        assert await get(two, sha(data)) == data
    # Reclaiming spares a pack another live store appends to, even one with no blob left.
    for data in theirs:
        await one.delete(sha(data))
    assert one.discard_abandoned(datetime.now(UTC)) == 0
    assert len(packs(tmp_path)) == 2
    two.close()  # released (as a dead process's): nothing in it, it goes
    one.discard_abandoned(datetime.now(UTC))
    assert len(packs(tmp_path)) == 1
    for data in mine:
        assert await get(two, sha(data)) == data  # reopens what it closed


def test_stores_opening_a_new_index_at_once_all_succeed(tmp_path: Path) -> None:
    """What the worker processes of a server starting on a new data directory do: each opens
    the index at the same moment. Before the set-up was locked, about one round in twenty
    failed with "database is locked"."""
    for round_ in range(40):
        root = tmp_path / str(round_)
        stores = [LocalBlobStore(root) for _ in range(8)]
        start = threading.Barrier(len(stores))
        failures: list[Exception] = []

        def look_up(
            store: LocalBlobStore, start: threading.Barrier, failures: list[Exception]
        ) -> None:
            start.wait()
            try:
                store._locate("ab" * 32)
            except Exception as error:
                failures.append(error)

        threads = [
            threading.Thread(target=look_up, args=(store, start, failures)) for store in stores
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        for store in stores:
            store.close()


def test_another_process_puts_into_its_own_pack(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = os.urandom(100_000)
    asyncio.run(store.put(sha(data), data))
    script = (
        "import asyncio, hashlib, sys\n"
        "from pathlib import Path\n"
        "from metalake.server.blobstore import LocalBlobStore\n"
        "store = LocalBlobStore(Path(sys.argv[1]))\n"
        "data = bytes(range(256)) * 1000\n"
        "asyncio.run(store.put(hashlib.sha256(data).hexdigest(), data))\n"
        "print(hashlib.sha256(data).hexdigest())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True
    )
    theirs = done.stdout.strip()
    assert len(packs(tmp_path)) == 2
    assert asyncio.run(get(store, theirs)) == bytes(range(256)) * 1000
    # That process is gone and its pack holds a blob: kept, at start-up too.
    assert store.discard_spooled() == 0
    assert len(packs(tmp_path)) == 2
    more = os.urandom(1000)
    asyncio.run(store.put(sha(more), more))
    assert len(packs(tmp_path)) == 2  # still appending to its own
    assert asyncio.run(get(store, sha(data))) == data


async def test_a_torn_record_left_by_a_crash_is_harmless(tmp_path: Path) -> None:
    crashed = LocalBlobStore(tmp_path)
    kept = [os.urandom(80_000) for _ in range(3)]
    for data in kept:
        await crashed.put(sha(data), data)
    # Killed in the middle of appending the next one: half its bytes there, never indexed.
    torn = os.urandom(80_000)
    appended = append(crashed, torn)
    (pack,) = packs(tmp_path)
    os.truncate(pack, appended.offset + 1000)
    killed(crashed)

    restarted = LocalBlobStore(tmp_path)
    restarted.discard_spooled()
    assert packs(tmp_path) == [pack]  # blobs are left in it: kept
    for data in kept:
        assert await get(restarted, sha(data)) == data
    assert not await restarted.exists(sha(torn))
    await restarted.put(sha(torn), torn)  # into a pack of its own
    assert len(packs(tmp_path)) == 2
    assert await get(restarted, sha(torn)) == torn
    assert sorted(k for k, _ in restarted.blob_keys()) == sorted(sha(d) for d in [*kept, torn])


async def test_a_pack_left_with_nothing_indexed_is_removed_at_start_up(tmp_path: Path) -> None:
    crashed = LocalBlobStore(tmp_path)
    never = os.urandom(5000)
    append(crashed, never)
    killed(crashed)  # before its sync
    (pack,) = packs(tmp_path)
    restarted = LocalBlobStore(tmp_path)
    assert restarted.discard_spooled() == 0  # counts unfinished uploads, not packs
    assert packs(tmp_path) == []
    assert not await restarted.exists(sha(never))
    assert not pack.exists()


async def test_a_full_pack_is_followed_by_a_new_one(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.pack_size = 100_000
    blobs = [os.urandom(40_000 + i) for i in range(7)]
    for data in blobs:
        await store.put(sha(data), data)
    assert len(packs(tmp_path)) == 3  # 3 records fill one past 100 kB
    assert all(p.stat().st_size < 100_000 + 41_000 for p in packs(tmp_path))
    for data in blobs:
        assert await get(store, sha(data)) == data
    # Once every blob of the full ones is deleted, they go; the active one stays.
    for data in blobs:
        await store.delete(sha(data))
    store.discard_abandoned(datetime.now(UTC))
    assert len(packs(tmp_path)) == 1


async def test_a_read_never_returns_the_zeros_of_a_delete_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path)
    data = os.urandom(100_000)
    await store.put(sha(data), data)
    real = store._pread

    def deleted_right_after(location: Any, offset: int) -> bytes:
        real(location, offset)
        store._delete(sha(data))  # between the read and its check
        return real(location, offset)  # the zeros the punch left

    monkeypatch.setattr(store, "_pread", deleted_right_after)
    with pytest.raises(FileNotFoundError):
        await get(store, sha(data))


async def test_packs_can_be_turned_off(tmp_path: Path) -> None:
    packed = open_blob_store(Settings(data_dir=tmp_path))
    assert isinstance(packed, LocalBlobStore)
    data = os.urandom(1000)
    await packed.put(sha(data), data)
    files = open_blob_store(Settings(data_dir=tmp_path, blob_packs=False))
    assert isinstance(files, LocalBlobStore)
    assert packed.packed
    assert not files.packed
    other = os.urandom(1000)
    await files.put(sha(other), other)
    assert [p.name for p in blob_files(tmp_path)] == [sha(other)]
    assert await get(files, sha(data)) == data  # what was packed stays readable


async def test_a_batch_larger_than_the_direct_buffer_streams_through_it(
    tmp_path: Path, direct: bool
) -> None:
    store = LocalBlobStore(tmp_path)
    blobs = [os.urandom(700_000 + i) for i in range(6)]  # 4.2 MB, past the 2 MiB buffer
    steps = [store.put_deferred(sha(data), data) for data in blobs]
    assert steps[0] is not None
    await asyncio.to_thread(steps[0])  # commits all six: one batch
    (pack,) = packs(tmp_path)
    assert pack.stat().st_size == pack_size([blobs], direct)
    assert walk(pack) == [sha(d) for d in blobs]
    for data in blobs:
        assert await get(store, sha(data)) == data


async def test_a_filesystem_refusing_direct_io_gets_packs_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """tmpfs before Linux 6.6, some network filesystems: O_DIRECT is refused at open."""
    monkeypatch.setattr(blobstore, "DIRECT_PACKS", True)
    real_open = os.open

    def refusing_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & blobstore._O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_direct)
    store = LocalBlobStore(tmp_path)
    blobs = [os.urandom(10_000 + i) for i in range(3)]
    with caplog.at_level("INFO", logger="metalake.server.blobstore"):
        for data in blobs:
            await store.put(sha(data), data)
    assert "through the page cache" in caplog.text
    assert not store.direct
    (pack,) = packs(tmp_path)
    assert pack.stat().st_size == pack_size([[d] for d in blobs], direct=False)
    for data in blobs:
        assert await get(store, sha(data)) == data


async def test_a_disk_refusing_direct_writes_gets_packs_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_DIRECT taken at open, its writes refused (a block size the alignment does not meet):
    the batch is appended again through the page cache, in a new pack, and so is what follows."""
    monkeypatch.setattr(blobstore, "DIRECT_PACKS", True)

    def refused(fd: int, data: Any, position: int) -> int:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(os, "pwrite", refused)
    store = LocalBlobStore(tmp_path)
    first, second = os.urandom(10_000), os.urandom(20_000)
    await store.put(sha(first), first)
    await store.put(sha(second), second)
    assert not store.direct
    assert indexed(tmp_path) == sorted([sha(first), sha(second)])
    for data in (first, second):
        assert await get(store, sha(data)) == data
