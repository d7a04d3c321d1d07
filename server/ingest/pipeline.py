"""The ingest pipeline: every RPC that brings a file's bytes in goes through `Ingest`.

    check the header -> admit -> receive (hash, spool) -> extract -> commit (blob, then catalog)

- UploadData, and each file of UploadDataStream (multiplex.py): `Ingest.upload`. A file of at most
  SMALL_FILE bytes is gathered in memory and stored in one step (`_store_small`), together with
  the small files that arrive about when it does (gate.py); a larger one is streamed into a blob
  writer, which hashes it and spools it locally when extraction is asked (`receive`, then
  `_store`).
- Resumable uploads: `start_upload` checks the header and records it; `write_upload` appends to
  the upload's staged file (staging.py) and, on the write that finishes it, commits it from
  there (`_finish_upload`).
- ExtractMetadata: `Ingest.extract`, received as an upload is (in memory, or into a spool file)
  and extracted from, then dropped: nothing is committed.

Every upload commits through `_commit`: blob first, then its catalog row, both under the blob's
lock. A request id makes an upload idempotent (`_earlier_try`); `expected_sha256` is checked
before anything is stored. The header is checked once, by `check_header` (header.py), where
each of these begins.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from metalake.metadata import FieldViolation
from metalake.server import importing
from metalake.server.blobstore import BlobStore, BlobWriter
from metalake.server.catalog import (
    AddComing,
    Catalog,
    DataRecord,
    DuplicateRequestError,
    Organization,
    UploadRecord,
    new_item_id,
)
from metalake.server.errors import (
    ContentMismatch,
    LimitReached,
    NotFound,
    Unavailable,
    invalid_field,
)
from metalake.server.ingest.extract import Filled, MetadataExtractor, fill_metadata
from metalake.server.ingest.gate import SmallFileGate
from metalake.server.ingest.header import UploadHeader, check_extraction_header, check_header
from metalake.server.ingest.receiving import (
    Spooled,
    SpoolFile,
    detect_content_type,
    gather_head,
    prepend,
    receive,
    sniff_content_type,
)
from metalake.server.locks import KeyedLocks
from metalake.server.observability import UPLOADS_IN_FLIGHT
from metalake.server.staging import SYNC_EVERY, UPLOAD_ID, StagedFile, StagingArea, UploadWrite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one server accepts; both bound its memory and disk use under any load."""

    max_concurrent_uploads: int = 256
    max_file_size: int | None = None  # bytes; None: no limit
    # Defaults for organizations without limits of their own (metalake org limits).
    org_max_file_size: int | None = None
    org_storage_quota: int | None = None


class Ingest:
    """Receives files and commits them, over a catalog, a blob store and a staging area.

    Also bounds the uploads running at once (`Limits`) and refuses new ones while draining.
    """

    def __init__(
        self,
        catalog: Catalog,
        blobs: BlobStore,
        staging: StagingArea,
        *,
        extractor: MetadataExtractor | None,
        spool_dir: Path,
        fill_timeout: float,
        upload_ttl: timedelta,
        limits: Limits,
    ) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.staging = staging
        self.extractor = extractor
        self._spool_dir = spool_dir
        self._fill_timeout = fill_timeout
        self._upload_locks = KeyedLocks()
        self._upload_ttl = upload_ttl
        self._limits = limits
        self._organizations: dict[str, tuple[float, Organization]] = {}
        self._small_files = SmallFileGate(linger=SMALL_FILE_LINGER, most=SMALL_FILES_TOGETHER)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    async def upload(
        self, org: str, header: UploadHeader, chunks: AsyncIterator[bytes]
    ) -> DataRecord:
        """Store one file for `org`; nothing of it is visible unless this returns."""
        check_header(header)
        earlier = await self._earlier_try(org, header)
        if earlier is not None:
            return earlier
        max_size = await self._admit_organization(org)
        # Until it proves large or fails, the upload's catalog add is on its way: a batch about
        # to commit waits a little for it, so that files arriving together commit together.
        with (
            self._admission(),
            self.catalog.add_coming() as coming,
            self._small_files.coming() as turn,
        ):
            head = await gather_head(chunks, max_size=max_size)
            if head.complete:
                await turn.arrive()  # goes on with other small files, if any come soon
                return await self._store_small(org, header, head.data(), coming)
            turn.leave()
            coming.arrived()  # a large file: its add is far off
            writer = await self.blobs.create_writer(spool=header.fill_metadata)
            try:
                spooled = await receive(
                    prepend(head.chunks, chunks),
                    writer,
                    filename=header.filename,
                    content_type=header.content_type,
                    max_size=max_size,
                )
                return await self._store(org, header, writer, spooled)
            except BaseException:
                await writer.abort()
                raise

    async def extract(self, filename: str, chunks: AsyncIterator[bytes]) -> Filled:
        """What fill_metadata would fill for this file (ExtractMetadata); nothing is stored.

        Received as an upload is, in memory or into a spool file, and never committed.
        """
        check_extraction_header(filename)
        max_size = self._limits.max_file_size
        with self._admission():
            head = await gather_head(chunks, max_size=max_size)
            if head.complete:
                return await self._fill(_extraction(filename), head.data())
            spool = await SpoolFile.create(self._spool_dir)
            try:
                await receive(
                    prepend(head.chunks, chunks), spool, filename=filename, max_size=max_size
                )
                await spool.flush()
                return await self._fill(_extraction(filename), spool.path)
            finally:
                spool.discard()

    # Admission: how many uploads run at once, and whether the organization may add more.

    @property
    def draining(self) -> bool:
        """Whether this server refuses new uploads because it is stopping."""
        return self._draining

    def start_draining(self) -> None:
        """Refuse new uploads from now on; those in flight go on."""
        self._draining = True

    async def idle(self) -> None:
        """Return once no upload is in flight."""
        await self._idle.wait()

    @contextmanager
    def _admission(self) -> Iterator[None]:
        """Bound the uploads this server runs at once; beyond, ask the client to come back."""
        if self._draining:
            raise Unavailable("this server is shutting down: retry, another one will answer")
        if self._in_flight >= self._limits.max_concurrent_uploads:
            raise LimitReached(
                f"this server is running its maximum of {self._limits.max_concurrent_uploads} "
                "uploads: retry shortly",
                retry_after=1.0,
            )
        self._in_flight += 1
        UPLOADS_IN_FLIGHT.inc()
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            UPLOADS_IN_FLIGHT.dec()
            if not self._in_flight:
                self._idle.set()

    async def _admit_organization(self, org: str) -> int | None:
        """Refuse an upload of an organization already at its quota; its largest file size.

        Reads the organization at most every few seconds: this early refusal may be a little
        late, but the catalog enforces the quota exactly when the item is committed.
        """
        cached = self._organizations.get(org)
        if cached is not None and cached[0] > time.monotonic():
            organization = cached[1]
        else:
            organization = await self.catalog.organization(org)
            self._organizations[org] = (
                time.monotonic() + _ORGANIZATION_CACHE_SECONDS,
                organization,
            )
        quota = _first_set(organization.storage_quota, self._limits.org_storage_quota)
        if quota is not None and organization.used_bytes >= quota:
            raise LimitReached(f"organization {org!r} has used its storage quota of {quota} bytes")
        sizes = [
            self._limits.max_file_size,
            _first_set(organization.max_file_size, self._limits.org_max_file_size),
        ]
        return min((s for s in sizes if s is not None), default=None)

    # The steps every upload takes.

    async def _earlier_try(self, org: str, header: UploadHeader) -> DataRecord | None:
        """The item a previous try of this upload stored (AIP-155), if any."""
        if not header.request_id:
            return None
        return await self.catalog.find_request(org, header.request_id)

    async def _store(
        self, org: str, header: UploadHeader, writer: BlobWriter, spooled: Spooled
    ) -> DataRecord:
        """Check, fill and commit a file fully received by `writer`: blob first, then its
        catalog row."""
        _check_expected_sha256(header, spooled.sha256)
        if header.fill_metadata:
            await writer.flush()
        filled = await self._fill(header, writer.spool_path)
        record = _new_record(org, header, spooled, filled)
        return await self._commit(record, functools.partial(writer.commit, record.blob_key))

    async def _store_small(
        self, org: str, header: UploadHeader, data: bytes, coming: AddComing
    ) -> DataRecord:
        """A file gathered whole in memory: filled from memory, written in one step, no spool.

        Hashed here, on the event loop: the key must be known before its lock is taken, and a
        small file hashes in about the time a thread hop takes (hashlib releases the GIL).
        """
        sha256 = hashlib.sha256(data).hexdigest()
        _check_expected_sha256(header, sha256)
        content_type = header.content_type or sniff_content_type(data, header.filename)
        filled = await self._fill(header, data)
        record = _new_record(org, header, Spooled(len(data), sha256, content_type), filled)
        return await self._commit(record, data, coming=coming)

    async def _fill(self, header: UploadHeader, content: Path | bytes | None) -> Filled:
        """The item's metadata: the client's, completed by the extractors if it asks, from the
        file's bytes in memory or on local disk."""
        if not header.fill_metadata:
            return _given(header)
        if content is None:
            raise NotImplementedError("metadata extraction needs a store that spools locally")
        return await fill_metadata(
            self.extractor,
            content,
            filename=header.filename,
            given=header.metadata,
            time_limit=self._fill_timeout,
        )

    async def _commit(
        self,
        record: DataRecord,
        blob: bytes | Callable[[], Awaitable[None]],
        *,
        upload: UploadRecord | None = None,
        coming: AddComing | None = None,
    ) -> DataRecord:
        """Store the blob (`blob`: its bytes, or what stores it), then the item: both under the
        blob's lock, so that no deletion of the same content decides in between that the blob
        is unused.

        Bytes in memory the store may take deferred (BlobStore.put_deferred): the catalog's
        batch then makes them durable in its own thread just before committing their item, one
        thread hop (and one batch) for both instead of one each.

        `coming`: the upload's add, announced to the catalog since its bytes began to arrive
        (else announced here, while the blob is stored)."""
        async with self.catalog.hold_blob(record.blob_key):
            store: Callable[[], Awaitable[None]]
            if isinstance(blob, bytes):
                made_durable = self.blobs.put_deferred(record.blob_key, blob)
                store = functools.partial(self.blobs.put, record.blob_key, blob)
            else:
                made_durable, store = None, blob
            # A batch committing may wait for it.
            with coming or self.catalog.add_coming() as on_its_way:
                if made_durable is None:
                    await store()
            try:
                await self.catalog.add(
                    record,
                    upload=upload,
                    default_quota=self._limits.org_storage_quota,
                    before_commit=made_durable,
                    on_its_way_since=on_its_way.since,
                )
            except DuplicateRequestError as duplicate:
                # A retry of this upload finished first: its item is this upload's answer.
                await self._delete_blob_if_unused(record.blob_key)
                return duplicate.existing
            except BaseException:
                await self._delete_blob_if_unused(record.blob_key)
                raise
        log.debug("stored %s (%s, %d bytes)", record.id, record.content_type, record.size)
        return record

    async def _delete_blob_if_unused(self, blob_key: str) -> None:
        # Callers hold the blob (catalog.hold_blob), so no deletion of the same content runs
        # meanwhile.
        await delete_blob_if_unused(self.catalog, self.blobs, blob_key)

    # Resumable uploads (google.bytestream style): bytes staged until a write finishes them.

    async def start_upload(self, org: str, header: UploadHeader, upload_id: str) -> UploadRecord:
        """Open a resumable upload, or return the state of the one with this id."""
        check_header(header)
        upload_id = upload_id or uuid.uuid4().hex
        if not UPLOAD_ID.match(upload_id):
            raise invalid_field(
                "upload_id", "must be 1 to 128 of [A-Za-z0-9._-], starting with a letter or digit"
            )
        now = datetime.now(UTC)
        record = UploadRecord(
            org=org,
            id=upload_id,
            staging_key=uuid.uuid4().hex,
            header=header.to_json(),
            committed_size=0,
            created_at=now,
            expires_at=now + self._upload_ttl,
        )
        return await self.catalog.start_upload(record)

    async def query_upload(
        self, org: str, upload_id: str
    ) -> tuple[UploadRecord, DataRecord | None]:
        upload = await self._live_upload(org, upload_id)
        data = await self.catalog.get(org, upload.data_id) if upload.data_id else None
        return upload, data

    async def write_upload(
        self, org: str, upload_id: str, writes: AsyncIterator[UploadWrite]
    ) -> tuple[int, DataRecord | None]:
        """Append to a resumable upload; store it when a write says finish.

        Returns the committed size and, once finished, the stored item. Bytes the server already
        committed are skipped, so a client may resend from any offset up to the committed size.
        """
        async with self._upload_locks.hold(f"{org}/{upload_id}"):
            with self._admission():
                return await self._write_upload(org, upload_id, writes)

    async def _live_upload(self, org: str, upload_id: str) -> UploadRecord:
        upload = await self.catalog.get_upload(org, upload_id) if upload_id else None
        if upload is None or upload.expires_at <= datetime.now(UTC):
            raise NotFound(upload_id, kind="upload")
        return upload

    async def _write_upload(
        self, org: str, upload_id: str, writes: AsyncIterator[UploadWrite]
    ) -> tuple[int, DataRecord | None]:
        upload = await self._live_upload(org, upload_id)
        if upload.data_id:
            return upload.committed_size, await self.catalog.get(org, upload.data_id)
        staged = self.staging.file(
            upload.staging_key, upload.committed_size, await self._admit_organization(org)
        )
        finished = False
        try:
            await staged.open()
            if staged.committed < upload.committed_size:
                await self.catalog.set_upload_committed(upload, staged.committed)
            async for write in writes:
                await staged.write(write.offset, write.data)
                if staged.unsynced >= SYNC_EVERY:
                    await self.catalog.set_upload_committed(upload, await staged.sync())
                if write.finish:
                    finished = True
                    break
        finally:
            # Whatever arrived before the stream ended or broke is kept, durably. One task does
            # it all, shielded: a broken stream cancels this call (possibly more than once), and
            # the bytes must still be recorded as committed for the client's resumption.
            persisting = asyncio.ensure_future(self._persist_committed(upload, staged))
            committed = await asyncio.shield(persisting)
        if not finished:
            return committed, None
        return committed, await self._finish_upload(upload)

    async def _persist_committed(self, upload: UploadRecord, staged: StagedFile) -> int:
        committed = await staged.close()
        await self.catalog.set_upload_committed(upload, committed)
        return committed

    async def _finish_upload(self, upload: UploadRecord) -> DataRecord:
        header = UploadHeader.from_json(upload.header)
        earlier = await self._earlier_try(upload.org, header)
        if earlier is not None:
            await self.drop_upload(upload)
            return earlier
        path = self.staging.path(upload.staging_key)
        sha256, size = await self.staging.hash(upload.staging_key)
        head = await asyncio.to_thread(_read_head, path)
        content_type = header.content_type or detect_content_type(head, header.filename)
        try:
            return await self._store_staged(upload, header, Spooled(size, sha256, content_type))
        except ContentMismatch:
            # The bytes are not what the client meant: resuming cannot fix them.
            await self.drop_upload(upload)
            raise

    async def _store_staged(
        self, upload: UploadRecord, header: UploadHeader, spooled: Spooled
    ) -> DataRecord:
        """Check, fill and commit a finished resumable upload, from its staged file. Its staged
        file stays until the blob is stored: a failure before leaves the upload to finish."""
        path = self.staging.path(upload.staging_key)
        _check_expected_sha256(header, spooled.sha256)
        filled = await self._fill(header, path)
        record = _new_record(upload.org, header, spooled, filled)

        async def store_blob() -> None:
            await self.blobs.store_file(path, record.blob_key)
            await self.staging.discard(upload.staging_key)

        return await self._commit(record, store_blob, upload=upload)

    async def drop_upload(self, upload: UploadRecord) -> None:
        """Forget a resumable upload: its staged bytes, then its row."""
        await self.staging.discard(upload.staging_key)
        await self.catalog.delete_upload(upload)


async def delete_blob_if_unused(catalog: Catalog, blobs: BlobStore, blob_key: str) -> None:
    """Delete a blob no item refers to; the caller holds it (catalog.hold_blob)."""
    if importing.is_reference(blob_key):
        return  # a customer's object registered in place: never ours to delete
    if not await catalog.blob_in_use(blob_key):
        await blobs.delete(blob_key)


_ORGANIZATION_CACHE_SECONDS = 5.0
# Small files whose bytes are in wait for others at most this long, and go on together once this
# many wait (see ingest/gate.py). Over 3,000 bench JPEGs, one stream of 16 in flight went on in
# turns of 4.1 files on average, 16 clients with a call per file in turns of 4.6.
SMALL_FILE_LINGER = 0.003
SMALL_FILES_TOGETHER = 8


def _first_set(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _read_head(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(512)


def _check_expected_sha256(header: UploadHeader, sha256: str) -> None:
    if header.expected_sha256 and header.expected_sha256 != sha256:
        raise ContentMismatch(
            f"the content received hashes to {sha256}, not the expected "
            f"{header.expected_sha256}: it was corrupted on the way; upload it again",
            [FieldViolation("header.expected_sha256", "does not match the content")],
        )


def _given(header: UploadHeader) -> Filled:
    """The metadata as the client gave it: no extraction asked for."""
    return Filled(dict(header.metadata), dict.fromkeys(header.metadata, "client"))


def _new_record(org: str, header: UploadHeader, spooled: Spooled, filled: Filled) -> DataRecord:
    now = datetime.now(UTC)
    return DataRecord(
        id=new_item_id(),
        org=org,
        filename=header.filename,
        size=spooled.size,
        sha256=spooled.sha256,
        content_type=spooled.content_type,
        blob_key=spooled.sha256,
        created_at=now,
        updated_at=now,
        metadata=filled.metadata,
        metadata_sources=filled.sources,
        tags=tuple(sorted(set(header.tags))),
        request_id=header.request_id,
        labels=dict(sorted(header.labels.items())),
    )


def _extraction(filename: str) -> UploadHeader:
    """ExtractMetadata's file, as an upload that asks for every field to be filled."""
    return UploadHeader(filename=filename, fill_metadata=True)
