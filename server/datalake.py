"""The datalake: what each RPC does, in domain terms, over a catalog and a blob store."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from metalake.metadata import FIELDS, FieldViolation, MetadataDict
from server.blobstore import BlobStore, BlobWriter
from server.catalog import Catalog, DataRecord, DuplicateRequestError, Page
from server.errors import DataLossError, InvalidArgumentError, invalid_field
from server.ingest import (
    Filled,
    MetadataExtractor,
    UploadHeader,
    check_filename,
    fill_metadata,
    receive,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Download:
    record: DataRecord
    chunks: AsyncIterator[bytes]


class Datalake:
    """Stateless over its catalog and blob store: any number of these can share them."""

    def __init__(
        self,
        catalog: Catalog,
        blobs: BlobStore,
        *,
        extractor: MetadataExtractor | None,
        spool_dir: Path,
        extract_timeout: float,
        download_chunk_size: int,
    ) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.extractor = extractor
        self._spool_dir = spool_dir
        self._extract_timeout = extract_timeout
        self._download_chunk_size = download_chunk_size
        self._blob_locks = _KeyedLocks()

    async def upload(self, header: UploadHeader, chunks: AsyncIterator[bytes]) -> DataRecord:
        """Store one file; nothing of it is visible unless this returns."""
        violations = header.violations()
        if violations:
            raise InvalidArgumentError("the upload header is invalid", violations)
        if header.request_id:
            earlier = await self.catalog.find_request(header.request_id)
            if earlier is not None:
                return earlier
        writer = await self.blobs.create_writer()
        try:
            spooled = await receive(
                chunks, writer, filename=header.filename, content_type=header.content_type
            )
            if header.expected_sha256 and header.expected_sha256 != spooled.sha256:
                raise DataLossError(
                    f"the content received hashes to {spooled.sha256}, not the expected "
                    f"{header.expected_sha256}: it was corrupted on the way; upload it again",
                    [FieldViolation("header.expected_sha256", "does not match the content")],
                )
            filled = await self._fill(header, writer)
            now = datetime.now(UTC)
            record = DataRecord(
                id=str(uuid.uuid4()),
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
            )
            async with self._blob_locks.hold(record.blob_key):
                await writer.commit(record.blob_key)
                try:
                    await self.catalog.add(record)
                except DuplicateRequestError as duplicate:
                    # A retry of this upload finished first: its item is this upload's answer.
                    await self._delete_blob_if_unused(record.blob_key)
                    return duplicate.existing
                except BaseException:
                    await self._delete_blob_if_unused(record.blob_key)
                    raise
        except BaseException:
            await writer.abort()
            raise
        log.info("stored %s (%s, %d bytes)", record.id, record.content_type, record.size)
        return record

    async def _fill(self, header: UploadHeader, writer: BlobWriter) -> Filled:
        if not header.fill_metadata:
            return Filled(dict(header.metadata), dict.fromkeys(header.metadata, "client"))
        spool = writer.spool_path
        if spool is None:
            raise NotImplementedError("metadata extraction needs a store that spools locally")
        return await fill_metadata(
            self.extractor,
            spool,
            filename=header.filename,
            given=header.metadata,
            time_limit=self._extract_timeout,
        )

    async def get(self, data_id: str) -> DataRecord:
        _check_id(data_id)
        return await self.catalog.get(data_id)

    async def list(self, *, filter: str, order_by: str, page_size: int, page_token: str) -> Page:
        return await self.catalog.list_page(
            filter=filter, order_by=order_by, page_size=page_size, page_token=page_token
        )

    async def update_metadata(
        self, data_id: str, values: MetadataDict, mask: Collection[str], *, etag: str = ""
    ) -> DataRecord:
        """Set the fields in `mask` to their value in `values`, or clear them when absent.

        An empty mask means every field present in `values`; "*" means every field.
        """
        _check_id(data_id)
        paths = list(mask) or list(values)
        if "*" in paths:
            if len(paths) > 1:
                raise invalid_field("update_mask", "'*' must be the only path")
            paths = list(FIELDS)
        unknown = [p for p in paths if p not in FIELDS]
        if unknown:
            raise InvalidArgumentError(
                "update_mask names unknown fields",
                [
                    FieldViolation(
                        "update_mask", f"{p!r} is not a metadata field; valid: {', '.join(FIELDS)}"
                    )
                    for p in unknown
                ],
            )
        if not paths:
            raise invalid_field("update_mask", "names no field and metadata sets none")
        to_set = {p: values[p] for p in paths if p in values}
        to_clear = [p for p in paths if p not in values]
        return await self.catalog.update_metadata(
            data_id, to_set, to_clear, updated_at=datetime.now(UTC), etag=etag
        )

    async def delete(self, data_id: str, *, etag: str = "") -> None:
        _check_id(data_id)
        record = await self.catalog.delete(data_id, etag=etag)
        await self._release_blob(record.blob_key)

    async def _release_blob(self, blob_key: str) -> None:
        """Delete a blob no item refers to any more; identical content shares one blob."""
        async with self._blob_locks.hold(blob_key):
            await self._delete_blob_if_unused(blob_key)

    async def _delete_blob_if_unused(self, blob_key: str) -> None:
        # Callers hold the blob's lock, so no upload of the same content commits meanwhile.
        if not await self.catalog.blob_in_use(blob_key):
            await self.blobs.delete(blob_key)

    async def download(self, data_id: str, *, offset: int = 0) -> Download:
        _check_id(data_id)
        record = await self.catalog.get(data_id)
        if not 0 <= offset <= record.size:
            raise invalid_field("read_offset", f"must be within [0, {record.size}], got {offset}")
        chunks = self.blobs.read(
            record.blob_key, offset=offset, chunk_size=self._download_chunk_size
        )
        return Download(record, chunks)

    async def extract(self, filename: str, chunks: AsyncIterator[bytes]) -> Filled:
        """What fill_metadata would fill for this file; nothing is stored."""
        violations = check_filename(filename, "header.filename")
        if violations:
            raise InvalidArgumentError("the extraction header is invalid", violations)
        with _temporary_file(self._spool_dir) as spool:
            with spool.open("wb") as handle:
                async for chunk in chunks:
                    await asyncio.to_thread(handle.write, chunk)
            return await fill_metadata(
                self.extractor,
                spool,
                filename=filename,
                given={},
                time_limit=self._extract_timeout,
            )


def _check_id(data_id: str) -> None:
    if not data_id:
        raise invalid_field("id", "must not be empty")


@contextmanager
def _temporary_file(directory: Path) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        yield Path(scratch) / "spool"


class _KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._users: defaultdict[str, int] = defaultdict(int)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        self._users[key] += 1
        try:
            async with self._locks[key]:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                del self._locks[key]
