"""The datalake: what each RPC does, in domain terms, over a catalog and a blob store.

Every RPC that brings a file's bytes in goes through the ingest pipeline (`DatalakeCore.ingest`,
metalake.server.ingest.pipeline); the rest is here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from collections.abc import (
    AsyncIterator,
    Collection,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from metalake import labels as label_rules
from metalake.metadata import FIELDS, FieldViolation, MetadataDict, has_control_characters
from metalake.server import importing, thumbnails
from metalake.server.blobstore import (
    BlobStore,
    LocalBlobStore,
    create_spool_file,
    spool_name,
)
from metalake.server.catalog import (
    FACET_FIELDS,
    Catalog,
    DataRecord,
    Event,
    LabelChange,
    Page,
    ThumbnailRecord,
    new_item_id,
)
from metalake.server.decoding import DecoderCrashed, Decoders
from metalake.server.errors import (
    InvalidRequest,
    NotFound,
    OffsetOutOfRange,
    Refusal,
    invalid_field,
)
from metalake.server.ingest import (
    MAX_FILENAME_LENGTH,
    Filled,
    MetadataExtractor,
    detect_content_type,
    fill_metadata,
)
from metalake.server.ingest.pipeline import Ingest, Limits, delete_blob_if_unused
from metalake.server.locks import KeyedLocks
from metalake.server.staging import StagingArea

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Download:
    record: DataRecord
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class ThumbnailDownload:
    """A preview (always a JPEG, thumbnails.CONTENT_TYPE) and its bytes."""

    record: ThumbnailRecord
    chunks: AsyncIterator[bytes]


class DatalakeCore:
    """The server's datalake: what every RPC and HTTP route does, over a catalog and a blob store.

    Uploads and extraction go through its ingest pipeline (`ingest`, metalake.server.ingest);
    reading, changing and deleting items, previews, imports and garbage collection are here.

    Not to be confused with the SDK's `metalake.client.Datalake`, which calls a server. It is
    stateless over its catalog and blob store: any number of these can share them.
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
        download_chunk_size: int,
        upload_ttl: timedelta = timedelta(hours=24),
        limits: Limits | None = None,
        event_retention: timedelta = timedelta(days=7),
        watch_interval: float = 0.25,
    ) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.staging = staging
        self.extractor = extractor
        self._spool_dir = spool_dir
        self._fill_timeout = fill_timeout
        self._download_chunk_size = download_chunk_size
        self._upload_ttl = upload_ttl
        self._event_retention = event_retention
        self._watch_interval = watch_interval
        # Every RPC that brings bytes in: UploadData, UploadDataStream, the resumable upload,
        # ExtractMetadata.
        self.ingest = Ingest(
            catalog,
            blobs,
            staging,
            extractor=extractor,
            spool_dir=spool_dir,
            fill_timeout=fill_timeout,
            upload_ttl=upload_ttl,
            limits=limits or Limits(),
        )
        self._thumbnail_locks = KeyedLocks()
        # Clients' images are decoded (previews here, hashes in similarity) in processes of
        # their own: a decoder's crash must not end the server (see server.decoding).
        self.decoders = Decoders()
        # Previews are CPU work: one per core at most, so that a page of 100 new thumbnails
        # does not starve uploads (nor hold 100 decoded images at once).
        self._render_slots = asyncio.Semaphore(os.cpu_count() or 1)
        # Reads the objects of items registered in place (ImportObjects).
        self._bucket_reader = importing.LazyReader()

    @property
    def draining(self) -> bool:
        """Whether this server refuses new uploads because it is stopping."""
        return self.ingest.draining

    def start_draining(self) -> None:
        """Refuse new uploads from now on; those in flight go on."""
        self.ingest.start_draining()

    async def idle(self) -> None:
        """Return once no upload is in flight."""
        await self.ingest.idle()

    async def collect_garbage(self, *, orphan_age: timedelta = timedelta(hours=1)) -> Garbage:
        """Reclaim what no item needs: expired uploads, and blobs without an item.

        A blob is committed a moment before its catalog row, so only blobs older than
        `orphan_age` count as orphans.
        """
        now = datetime.now(UTC)
        garbage = Garbage()
        for upload in await self.catalog.expired_uploads(now):
            await self.ingest.drop_upload(upload)
            garbage.expired_uploads += 1
        staged = await asyncio.to_thread(self.staging.staging_keys)
        in_use = await self.catalog.staging_keys_in_use(staged)
        for key in staged:
            if key not in in_use:
                await self.staging.discard(key)
                garbage.orphan_staging_files += 1
        cutoff = now - orphan_age
        await self.catalog.prune_events(now - self._event_retention)
        # An upload still running after its TTL is abandoned, whichever server began it.
        garbage.abandoned_uploads = await asyncio.to_thread(
            self.blobs.discard_abandoned, now - self._upload_ttl
        )
        for key, modified in await asyncio.to_thread(self.blobs.blob_keys):
            if modified < cutoff:
                async with self.catalog.hold_blob(key):
                    if not await self.catalog.blob_in_use(key):
                        await self.blobs.delete(key)
                        garbage.orphan_blobs += 1
        return garbage

    async def get(self, org: str, data_id: str) -> DataRecord:
        _check_id(data_id)
        return await self.catalog.get(org, data_id)

    async def list(
        self, org: str, *, filter: str, order_by: str, page_size: int, page_token: str
    ) -> Page:
        return await self.catalog.list_page(
            org, filter=filter, order_by=order_by, page_size=page_size, page_token=page_token
        )

    async def update_metadata(
        self,
        org: str,
        data_id: str,
        values: MetadataDict,
        mask: Collection[str],
        *,
        etag: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> DataRecord:
        """Set the fields in `mask` to their value in `values`, or clear them when absent.

        An empty mask means every field present in `values` (and every label in `labels`); "*"
        means every metadata field. Path "labels" replaces all labels with `labels`;
        "labels.KEY" sets KEY to labels[KEY], or removes it when absent.
        """
        _check_id(data_id)
        given_labels = dict(labels or {})
        violations = label_rules.validate(given_labels)
        if violations:
            raise InvalidRequest("labels are invalid", violations)
        label_paths = [p for p in mask if p == "labels" or p.startswith("labels.")]
        field_paths = [p for p in mask if p not in label_paths]
        change: LabelChange | None = None
        if label_paths:
            change = _label_change(label_paths, given_labels)
        elif given_labels and not mask:
            change = LabelChange(set=given_labels)
        elif given_labels:
            raise invalid_field("labels", "given but update_mask names no label (labels.KEY)")
        if change is not None and not field_paths and (label_paths or not values):
            # Only labels change.
            return await self.catalog.update_metadata(
                org, data_id, {}, [], updated_at=datetime.now(UTC), etag=etag, labels=change
            )
        mask = field_paths
        paths = list(mask) or list(values)
        if "*" in paths:
            if len(paths) > 1:
                raise invalid_field("update_mask", "'*' must be the only path")
            paths = list(FIELDS)
        unknown = [p for p in paths if p not in FIELDS]
        if unknown:
            raise InvalidRequest(
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
            org, data_id, to_set, to_clear, updated_at=datetime.now(UTC), etag=etag, labels=change
        )

    async def delete(self, org: str, data_id: str, *, etag: str = "") -> None:
        _check_id(data_id)
        # A preview made between this read and the delete loses its blob to garbage collection
        # (it is an orphan then) instead of here.
        previews = await self.catalog.thumbnail_keys(org, data_id)
        record = await self.catalog.delete(org, data_id, etag=etag)
        for key in {record.blob_key, *previews}:
            if not importing.is_reference(key):  # a customer's object: never ours to delete
                await self._release_blob(key)

    async def _release_blob(self, blob_key: str) -> None:
        """Delete a blob no item refers to any more; identical content shares one blob."""
        async with self.catalog.hold_blob(blob_key):
            await self._delete_blob_if_unused(blob_key)

    async def _delete_blob_if_unused(self, blob_key: str) -> None:
        # Callers hold the blob's lock, so no upload of the same content commits meanwhile.
        await delete_blob_if_unused(self.catalog, self.blobs, blob_key)

    async def download(self, org: str, data_id: str, *, offset: int = 0) -> Download:
        _check_id(data_id)
        record = await self.catalog.get(org, data_id)
        if not 0 <= offset <= record.size:
            raise invalid_field("read_offset", f"must be within [0, {record.size}], got {offset}")
        if importing.is_reference(record.blob_key):
            # The first read answers whether the object is still there, before the item is sent.
            stream = await importing.open_stream(
                self._bucket_reader(), record.blob_key, offset, self._download_chunk_size
            )
            return Download(record, stream)
        chunks = self.blobs.read(
            record.blob_key, offset=offset, chunk_size=self._download_chunk_size
        )
        return Download(record, chunks)

    async def facet(self, org: str, field: str, limit: int = 30) -> tuple[str, ...]:
        """Distinct values of an indexed field (manufacturer, reference, custom_id), of the
        organization's tags ("tags"), label keys ("labels") or the values of one label key
        ("labels.KEY"), in order, at most `limit`: what the console offers as quick filters.
        An index walk that never counts items."""
        if field.startswith("labels."):
            problem = label_rules.check_key(field.removeprefix("labels."))
            if problem:
                raise invalid_field("field", problem)
        elif field not in FACET_FIELDS and field not in ("tags", "labels"):
            choices = ", ".join([*sorted(FACET_FIELDS), "tags", "labels", "labels.KEY"])
            raise invalid_field("field", f"must be one of {choices}, got {field!r}")
        if not 1 <= limit <= 1000:
            raise invalid_field("limit", f"must be within [1, 1000], got {limit}")
        return tuple(await self.catalog.distinct_values(org, field, limit))

    async def thumbnail(self, org: str, data_id: str, size: int) -> ThumbnailDownload:
        """The item's preview, `size` px on its long side: made on the first request, then kept
        as a blob beside the item's (counted in the organization's usage, deleted with the item).

        NotFound when the item does not exist or its content cannot be previewed. Uploads
        never wait for previews: nothing is made until someone asks.
        """
        if size not in thumbnails.SIZES:
            raise invalid_field(
                "size", f"must be one of {', '.join(map(str, thumbnails.SIZES))}, got {size}"
            )
        _check_id(data_id)
        # The common case, a preview made before: one catalog read (scoped to the org).
        kept = await self.catalog.thumbnail(org, data_id, size)
        if kept is None:
            record = await self.catalog.get(org, data_id)
            async with self._thumbnail_locks.hold(f"{record.id}/{size}"):
                kept = await self.catalog.thumbnail(org, record.id, size)
                if kept is None:
                    kept = await self._make_thumbnail(record, size)
        if kept.blob_key is None:
            raise NotFound(data_id, kind="preview of data")
        chunks = self.blobs.read(kept.blob_key, chunk_size=self._download_chunk_size)
        return ThumbnailDownload(kept, chunks)

    async def _make_thumbnail(self, record: DataRecord, size: int) -> ThumbnailRecord:
        if importing.is_reference(record.blob_key):
            # An object registered in place has no sha256 to share previews by, and a preview
            # would read the customer's whole object: it has none.
            raise NotFound(record.id, kind="preview of data")
        shared = await self.catalog.shared_thumbnail(record.sha256, size)
        if shared is not None:
            # Identical content was previewed for another item: share its blob (or its finding
            # that there is no preview), counted for this item too.
            adopted = replace(
                shared, data_id=record.id, org=record.org, created_at=datetime.now(UTC)
            )
            kept = await self._keep_thumbnail(adopted, None)
            if kept is not None:
                return kept
        preview = None
        if thumbnails.can_preview(record.content_type, record.filename):
            async with self._render_slots, self._local_copy(record) as path:
                try:
                    preview = await self.decoders.run(
                        thumbnails.render, path, size, filename=record.filename
                    )
                except DecoderCrashed:
                    preview = None  # recorded as no preview, like any file no reader can read
        made = ThumbnailRecord(
            data_id=record.id,
            size=size,
            org=record.org,
            source_sha256=record.sha256,
            blob_key=hashlib.sha256(preview.content).hexdigest() if preview else None,
            bytes=len(preview.content) if preview else 0,
            width=preview.width if preview else 0,
            height=preview.height if preview else 0,
            created_at=datetime.now(UTC),
        )
        kept = await self._keep_thumbnail(made, preview.content if preview else None)
        assert kept is not None  # with the content at hand, it is always kept
        return kept

    async def _keep_thumbnail(
        self, made: ThumbnailRecord, content: bytes | None
    ) -> ThumbnailRecord | None:
        """Store a preview's blob (when `content` is given), then its catalog row; None when
        `content` is not given and the blob it names is gone."""
        key = made.blob_key
        if key is None:
            return await self.catalog.add_thumbnail(made)
        async with self.catalog.hold_blob(key):
            if content is None:
                if not await self.blobs.exists(key):
                    return None
            else:
                # In one step, as a small upload's: a preview is small (packed, when local).
                await self.blobs.put(key, content)
            try:
                return await self.catalog.add_thumbnail(made)
            except BaseException:
                await self._delete_blob_if_unused(key)
                raise

    @asynccontextmanager
    async def _local_copy(self, record: DataRecord) -> AsyncIterator[Path]:
        """A local file with the item's bytes: the blob itself when it is a local file (not a
        packed one: see LocalBlobStore)."""
        if isinstance(self.blobs, LocalBlobStore):
            local = await asyncio.to_thread(self.blobs.local_path, record.blob_key)
            if local is not None:
                yield local
                return
        # A spool file like an upload's: whatever a crash leaves of it is discarded at the
        # next start, like theirs.
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        path = self._spool_dir / spool_name(".preview")
        try:
            handle = await create_spool_file(path)
            try:
                async for chunk in self.blobs.read(record.blob_key, chunk_size=1024 * 1024):
                    await asyncio.to_thread(handle.write, chunk)
            finally:
                handle.close()
            yield path
        finally:
            path.unlink(missing_ok=True)

    async def import_objects(
        self, org: str, source: str, *, extensions: Sequence[str], fill_metadata: bool
    ) -> importing.ImportReport:
        """Register every object under `source` (s3://bucket/prefix) as an item referencing it;
        on a rerun add new objects, update changed ones (ETag), label vanished ones."""
        bucket, prefix = importing.parse_source(source)
        reader = self._bucket_reader()
        report = importing.ImportReport()
        seen: set[str] = set()
        pages = reader.pages(bucket, prefix)
        while (page := await asyncio.to_thread(next, pages, None)) is not None:
            for obj in page:
                if not importing.wanted(obj.key, extensions):
                    continue
                report.listed += 1
                seen.add(importing.request_id(bucket, obj.key))
                try:
                    await self._register(org, reader, bucket, obj, fill_metadata, report)
                except Refusal as error:
                    report.failures.append((f"s3://{bucket}/{obj.key}", str(error)))
        everything = importing.request_id(bucket, prefix)
        for data_id, request in await self.catalog.imported_under(org, everything):
            if request in seen:
                continue
            record = await self.catalog.get(org, data_id)
            if record.labels.get("import_state") != "vanished":
                await self.catalog.update_metadata(
                    org,
                    data_id,
                    {},
                    [],
                    datetime.now(UTC),
                    labels=LabelChange(set=dict(importing.VANISHED)),
                )
                report.vanished += 1
        return report

    async def _register(
        self,
        org: str,
        reader: importing.BucketReader,
        bucket: str,
        obj: importing.ListedObject,
        fill: bool,
        report: importing.ImportReport,
    ) -> None:
        request = importing.request_id(bucket, obj.key)
        reference = importing.reference(obj, bucket)
        existing = await self.catalog.find_request(org, request)
        if existing is not None and existing.blob_key == reference:
            report.unchanged += 1
            if existing.labels.get("import_state") == "vanished":  # it came back
                await self.catalog.update_metadata(
                    org,
                    existing.id,
                    {},
                    [],
                    datetime.now(UTC),
                    labels=LabelChange(remove=("import_state",)),
                )
            return
        limit = min(obj.size, importing.HEADER_BYTES)
        head = b""
        if fill and limit:
            head = await asyncio.to_thread(reader.head, bucket, obj.key, obj.etag, limit)
            report.bytes_read += len(head)
        filename = obj.key.rsplit("/", 1)[-1] or obj.key
        if len(filename) > MAX_FILENAME_LENGTH or has_control_characters(filename):
            raise invalid_field("filename", "the object's name is not a usable filename")
        filled = Filled({}, {})
        if fill:
            # At most HEADER_BYTES: extracted from memory, as a small upload is.
            filled = await fill_metadata(
                self.extractor,
                head,
                filename=filename,
                given={},
                time_limit=self._fill_timeout,
            )
        now = datetime.now(UTC)
        record = DataRecord(
            id=existing.id if existing is not None else new_item_id(),
            org=org,
            filename=filename,
            size=obj.size,
            sha256="",  # never read whole: unknown
            content_type=detect_content_type(head, filename),
            blob_key=reference,
            created_at=existing.created_at if existing is not None else now,
            updated_at=now,
            metadata=filled.metadata,
            metadata_sources=filled.sources,
            request_id=request,
            labels={**(existing.labels if existing is not None else {})},
        )
        if existing is None:
            await self.catalog.add(record)
            report.added += 1
        else:
            await self.catalog.replace_content(org, record)
            report.updated += 1

    async def watch(
        self, org: str, *, filter: str, resume_token: str
    ) -> AsyncIterator[tuple[Event, str]]:
        """The organization's events after the token (or from now), each with its own token.

        Polls the catalog, so every server sees every server's changes. Raises OffsetOutOfRange
        when events the watcher has not seen were already discarded.
        """
        after = (
            _decode_resume_token(resume_token)
            if resume_token
            else await self.catalog.last_event_seq()
        )
        while True:
            pruned = await self.catalog.pruned_through()
            if after < pruned:
                raise OffsetOutOfRange(
                    f"this watcher fell too far behind: events up to {pruned} were discarded "
                    f"(kept {self._event_retention}). List the data again, then watch from now."
                )
            events = await self.catalog.events_after(org, after, filter=filter, limit=500)
            for event in events:
                after = event.seq
                yield event, _encode_resume_token(event.seq)
            if not events:
                await asyncio.sleep(self._watch_interval)


@dataclass
class Garbage:
    """What one garbage collection reclaimed."""

    expired_uploads: int = 0
    orphan_staging_files: int = 0
    orphan_blobs: int = 0
    abandoned_uploads: int = 0


def _encode_resume_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"ev1:{seq}".encode()).decode().rstrip("=")


def _decode_resume_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, seq = text.split(":")
        if version != "ev1":
            raise ValueError(version)
        return int(seq)
    except (ValueError, UnicodeDecodeError):
        raise invalid_field("resume_token", "is not a token this service issued") from None


def _label_change(paths: list[str], given: dict[str, str]) -> LabelChange:
    """The label update that mask paths "labels" / "labels.KEY" ask for."""
    if "labels" in paths:
        if len(paths) > 1:
            raise invalid_field("update_mask", "'labels' replaces every label: name no label too")
        return LabelChange(set=given, replace=True)
    keys = [p.removeprefix("labels.") for p in paths]
    problems = [
        FieldViolation("update_mask", f"{p!r}: {why}")
        for p, key in zip(paths, keys, strict=True)
        if (why := label_rules.check_key(key)) is not None
    ]
    if problems:
        raise InvalidRequest("update_mask names invalid labels", problems)
    unnamed = sorted(set(given) - set(keys))
    if unnamed:
        raise invalid_field(
            "labels", f"{', '.join(unnamed)}: given but not named in update_mask (labels.KEY)"
        )
    return LabelChange(
        set={k: given[k] for k in keys if k in given},
        remove=tuple(k for k in keys if k not in given),
    )


def _check_id(data_id: str) -> None:
    if not data_id:
        raise invalid_field("id", "must not be empty")
