"""The ingest pipeline: stream -> hash -> spool -> extract -> (the datalake commits).

Bytes go to the blob store's writer as they arrive; the writer hashes them on the way. Nothing
here holds more than one chunk (and the first few hundred bytes, for content sniffing) in memory.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import mimetypes
import re
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import filetype

from metalake import labels
from metalake.metadata import (
    FIELDS,
    FieldViolation,
    MetadataDict,
    check_string,
    check_value,
    normalize,
    to_jsonable,
)
from metalake.server.blobstore import BlobWriter
from metalake.server.errors import LimitReached
from metalake.server.observability import record_extraction

log = logging.getLogger(__name__)

MAX_FILENAME_LENGTH = 1024
MAX_TAGS = 100
MAX_REQUEST_ID_LENGTH = 128
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Bytes written to the blob store per thread hop (see receive).
WRITE_BATCH = 1024 * 1024
# Files up to this size are gathered whole in memory and stored in one step (see gather_head):
# no more than a larger upload holds in its write batches.
SMALL_FILE = WRITE_BATCH
_SNIFF_BYTES = 512  # filetype needs the first 261 bytes; a little more costs nothing.
_CONTENT_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+(\s*;.*)?$")


@dataclass(frozen=True)
class UploadHeader:
    """What the client says about a file before its bytes arrive."""

    filename: str
    metadata: MetadataDict = field(default_factory=dict)
    fill_metadata: bool = False
    tags: tuple[str, ...] = ()
    content_type: str = ""
    request_id: str = ""
    expected_sha256: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """For a resumable upload's catalog row."""
        fields = asdict(self)
        fields["metadata"] = to_jsonable(self.metadata)
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UploadHeader:
        fields = json.loads(text)
        metadata = normalize(fields.pop("metadata"))
        return cls(metadata=metadata, tags=tuple(fields.pop("tags")), **fields)

    def violations(self) -> list[FieldViolation]:
        """Every reason this header cannot be accepted, with the field at fault."""
        found = check_filename(self.filename, "header.filename")
        if len(self.tags) > MAX_TAGS:
            found.append(
                FieldViolation("header.tags", f"at most {MAX_TAGS} tags, got {len(self.tags)}")
            )
        for i, tag in enumerate(self.tags):
            problem = "must not be empty" if not tag else check_string(tag)
            if problem:
                found.append(FieldViolation(f"header.tags[{i}]", problem))
        if self.content_type and not (
            len(self.content_type) <= 255 and _CONTENT_TYPE.match(self.content_type)
        ):
            found.append(
                FieldViolation("header.content_type", "must be a MIME type like image/jpeg")
            )
        if len(self.request_id) > MAX_REQUEST_ID_LENGTH:
            found.append(
                FieldViolation(
                    "header.request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters"
                )
            )
        if self.expected_sha256 and not _SHA256.match(self.expected_sha256):
            found.append(
                FieldViolation("header.expected_sha256", "must be 64 lowercase hex digits")
            )
        for name, value in self.metadata.items():
            problem = check_value(name, value)
            if problem:
                found.append(FieldViolation(f"header.metadata.{name}", problem))
        found.extend(labels.validate(self.labels, prefix="header.labels"))
        return found


def check_filename(filename: str, field_path: str) -> list[FieldViolation]:
    """A filename is a label: any text but empty, over-long or with control characters."""
    if not filename.strip():
        return [FieldViolation(field_path, "must not be empty")]
    if len(filename) > MAX_FILENAME_LENGTH:
        return [
            FieldViolation(
                field_path,
                f"must be at most {MAX_FILENAME_LENGTH} characters, got {len(filename)}",
            )
        ]
    if any(ord(c) < 32 or ord(c) == 127 for c in filename):
        return [FieldViolation(field_path, "must not contain control characters")]
    return []


class Extraction(Protocol):
    """What an extractor registry returns for one file."""

    @property
    def values(self) -> Mapping[str, object]: ...

    @property
    def sources(self) -> Mapping[str, str]: ...

    @property
    def errors(self) -> list[tuple[str, str]]: ...

    @property
    def timings(self) -> Mapping[str, float]: ...


class MetadataExtractor(Protocol):
    """The extractor registry, as the pipeline sees it (see extractors.registry)."""

    def extract(self, path: Path, *, filename: str, missing: Collection[str]) -> Extraction: ...

    def extract_data(
        self, data: bytes, *, filename: str, missing: Collection[str]
    ) -> Extraction: ...


@dataclass(frozen=True)
class Spooled:
    """A file fully received by a writer, not yet committed."""

    size: int
    sha256: str
    content_type: str


@dataclass(frozen=True)
class Head:
    """The first chunks of an upload, gathered in memory: the whole file when `complete`."""

    chunks: list[bytes]
    complete: bool

    def data(self) -> bytes:
        return b"".join(self.chunks)  # a single chunk is returned as is, not copied


async def gather_head(
    chunks: AsyncIterator[bytes], *, limit: int = SMALL_FILE, max_size: int | None = None
) -> Head:
    """Gather chunks until the file ends or passes `limit` bytes.

    A small file then needs no spool file and no write per batch: the datalake stores it in one
    step, and the extractors read it from memory. A larger one goes on to `receive`, its head
    first (see `prepend`). Holds at most `limit` bytes and one chunk.
    """
    gathered: list[bytes] = []
    size = 0
    async for chunk in chunks:
        if not chunk:
            continue
        size += len(chunk)
        check_size(size, max_size)
        gathered.append(chunk)
        if size > limit:
            return Head(gathered, complete=False)
    return Head(gathered, complete=True)


async def prepend(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks already gathered, then the rest of the stream."""
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


def sniff_content_type(data: bytes, filename: str) -> str:
    """detect_content_type on the first bytes of a file held in memory."""
    return detect_content_type(data[:_SNIFF_BYTES], filename)


async def receive(
    chunks: AsyncIterator[bytes],
    writer: BlobWriter,
    *,
    filename: str,
    content_type: str = "",
    max_size: int | None = None,
) -> Spooled:
    """Stream every chunk into `writer`; sniff the content type from the first bytes.

    Chunks are gathered into batches of WRITE_BATCH bytes, and one batch is written (and hashed,
    off the event loop) while the next arrives: a thread hop costs about as much as receiving a
    small chunk, so a hop per chunk would halve throughput, and overlapping keeps the network
    and the disk busy at once. At most two batches are held per upload.
    """
    head = b""
    batch = bytearray()
    received = 0
    in_flight: asyncio.Future[None] | None = None
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            received += len(chunk)
            check_size(received, max_size)
            if len(head) < _SNIFF_BYTES:
                head += chunk[: _SNIFF_BYTES - len(head)]
            if batch or len(chunk) < WRITE_BATCH:
                batch += chunk
                if len(batch) < WRITE_BATCH:
                    continue
                write, batch = bytes(batch), bytearray()
            else:
                write = chunk  # a whole batch already (the SDK's 1 MiB chunks): no copy
            if in_flight is not None:
                await in_flight
            in_flight = asyncio.ensure_future(writer.write(write))
            del write  # the writer holds it until written; nothing else should
        if in_flight is not None:
            await in_flight
            in_flight = None
        if batch:
            await writer.write(bytes(batch))
    finally:
        if in_flight is not None and not in_flight.done():
            # The upload failed with a write still running: its outcome no longer matters, but
            # must not be reported as an exception nobody retrieved.
            in_flight.add_done_callback(_ignore_outcome)
    return Spooled(
        writer.size, writer.sha256(), content_type or detect_content_type(head, filename)
    )


def _ignore_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def check_size(size: int, max_size: int | None) -> None:
    if max_size is not None and size > max_size:
        raise LimitReached(f"the file exceeds this server's maximum file size of {max_size} bytes")


def detect_content_type(head: bytes, filename: str) -> str:
    """The content's own signature first (names lie), then the extension."""
    kind = filetype.guess(head) if head else None
    if kind is not None:
        return str(kind.mime)
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


@dataclass(frozen=True)
class Filled:
    metadata: MetadataDict
    sources: dict[str, str]


async def fill_metadata(
    extractor: MetadataExtractor | None,
    content: Path | bytes,
    *,
    filename: str,
    given: MetadataDict,
    time_limit: float,
) -> Filled:
    """The client's values, completed by the extractors for the fields it did not give.

    The client's values always win. Extraction runs in a worker thread, on the spooled file or
    on the bytes of a small file already in memory (`content`); an extractor failure or a
    timeout only means fewer fields are filled, never a failed upload.
    """
    metadata: MetadataDict = dict(given)
    sources = dict.fromkeys(given, "client")
    missing = [name for name in FIELDS if name not in given]
    if extractor is None or not missing:
        return Filled(metadata, sources)
    try:
        if isinstance(content, bytes):
            extract = functools.partial(extractor.extract_data, content)
        else:
            extract = functools.partial(extractor.extract, content)
        found = await asyncio.wait_for(
            asyncio.to_thread(extract, filename=filename, missing=missing), time_limit
        )
    except TimeoutError:
        log.warning("metadata extraction timed out after %.1fs for %r", time_limit, filename)
        return Filled(metadata, sources)
    except Exception:
        log.exception("metadata extraction failed for %r", filename)
        return Filled(metadata, sources)
    record_extraction(found.sources, found.errors, found.timings)
    for name, value in found.values.items():
        # The registry validates too; this keeps the promise even for a faulty registry.
        if name in missing and check_value(name, value) is None:
            metadata[name] = value  # type: ignore[assignment]  # checked just above
            sources[name] = found.sources.get(name, "unknown")
    return Filled(metadata, sources)
