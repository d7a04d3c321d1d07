"""The Python SDK: the familiar `client.get_datalake().upload_data(...)` over the gRPC contract.

    from metalake import Client
    datalake = Client("127.0.0.1:50051").get_datalake()
    data = datalake.upload_data("photo.jpg", metadata={"reference": "7NGOMI"}, fill_metadata=True)

Uploads stream files from disk in chunks and are safe to retry: every file gets a request id
(AIP-155), so a retry after a lost answer never stores it twice. Files above
`RESUMABLE_THRESHOLD` go through a resumable upload that continues where a dropped connection
left off. Temporary failures (server unavailable, load shedding) are retried with backoff.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar, overload

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from metalake import metadata as md
from metalake.errors import (
    IntegrityError,
    MetalakeError,
    UploadError,
    from_rpc_error,
    is_retryable,
)
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
# 1 MiB: measured fastest end to end here (benchmarks/bench_upload.py), well under gRPC's
# 4 MiB message limit; the server batches writes to 1 MiB anyway.
CHUNK_SIZE = 1024 * 1024
# Larger files use a resumable upload: after a dropped connection only the rest is resent.
RESUMABLE_THRESHOLD = 16 * 1024 * 1024
MAX_ATTEMPTS = 6

PathLike = str | os.PathLike[str]
MetadataInput = Mapping[str, Any]
Progress = Callable[[int], None]  # called with the number of bytes just sent
_T = TypeVar("_T")


class Client:
    """A connection to a metalake server.

    `target` defaults to METALAKE_TARGET, then 127.0.0.1:50051; `token` to METALAKE_TOKEN.
    Pass `credentials` (grpc.ssl_channel_credentials(...)) for TLS.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_workers: int = 8,
    ) -> None:
        self.target = target or os.environ.get("METALAKE_TARGET") or DEFAULT_TARGET
        token = token if token is not None else os.environ.get("METALAKE_TOKEN")
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._channel = (
            grpc.secure_channel(self.target, credentials)
            if credentials is not None
            else grpc.insecure_channel(self.target)
        )
        self._stub = pb_grpc.DatalakeServiceStub(self._channel)
        self._max_workers = max_workers

    def get_datalake(self) -> Datalake:
        return Datalake(self)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, method: Callable[..., _T], request: Any, **kwargs: Any) -> _T:
        """One RPC, with the token, errors turned into MetalakeError."""
        try:
            return method(request, metadata=self._metadata, **kwargs)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def with_retries(self, attempt: Callable[[], _T]) -> _T:
        """Retry what is safe to retry, with exponential backoff and jitter."""
        for number in range(1, MAX_ATTEMPTS + 1):
            try:
                return attempt()
            except MetalakeError as error:
                if number == MAX_ATTEMPTS or not is_retryable(error):
                    raise
                delay = min(30.0, 0.25 * 2**number) * random.uniform(0.5, 1.0)
                if error.retry_after is not None:
                    delay = max(delay, error.retry_after.total_seconds())
                time.sleep(delay)
        raise AssertionError("unreachable")


class Datalake:
    """The datalake behind a client: upload, find, change and fetch data."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @overload
    def upload_data(  # type: ignore[overload-overlap]  # a str is one path, not a sequence
        self,
        filepaths: PathLike,
        metadata: MetadataInput | None = None,
        *,
        fill_metadata: bool = False,
        tags: Iterable[str] = (),
        progress: Progress | None = None,
        raise_on_error: bool = True,
        rerun_safe: bool = False,
    ) -> Data: ...

    @overload
    def upload_data(
        self,
        filepaths: Sequence[PathLike],
        metadata: MetadataInput | Sequence[MetadataInput] | None = None,
        *,
        fill_metadata: bool = False,
        tags: Iterable[str] = (),
        progress: Progress | None = None,
        raise_on_error: bool = True,
        rerun_safe: bool = False,
    ) -> list[Data]: ...

    def upload_data(
        self,
        filepaths: PathLike | Sequence[PathLike],
        metadata: MetadataInput | Sequence[MetadataInput] | None = None,
        *,
        fill_metadata: bool = False,
        tags: Iterable[str] = (),
        progress: Progress | None = None,
        raise_on_error: bool = True,
        rerun_safe: bool = False,
    ) -> Data | list[Data] | list[Data | Exception]:
        """Upload one file (returns its Data) or several (returns a list in the same order).

        `metadata` is one mapping for every file or a list with one per file. Files upload in
        parallel; a failed file does not stop the others. If any failed, UploadError is raised
        once all are done, with every file's result; with raise_on_error=False the list holds
        the exception in the failed file's place instead.

        With rerun_safe=True, running the same upload again (same files, unchanged on disk, same
        metadata) after an interruption finishes it instead of storing anything twice: files
        already stored return their item, a big file resumes where it stopped.
        """
        if isinstance(filepaths, str | os.PathLike):
            if metadata is not None and not isinstance(metadata, Mapping):
                raise ValueError("one file takes one metadata mapping, not a list")
            return self._upload_one(
                Path(filepaths),
                md.normalize(metadata or {}),
                fill_metadata,
                tuple(tags),
                progress,
                rerun_safe,
            )
        paths = [Path(p) for p in filepaths]
        if metadata is None or isinstance(metadata, Mapping):
            per_file = [md.normalize(metadata or {})] * len(paths)
        else:
            if len(metadata) != len(paths):
                raise ValueError(
                    f"{len(paths)} files but {len(metadata)} metadata mappings: give one mapping "
                    "for all files or exactly one per file"
                )
            per_file = [md.normalize(m) for m in metadata]
        tags = tuple(tags)
        workers = max(1, min(self._client._max_workers, len(paths)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [
                pool.submit(
                    self._upload_one, path, values, fill_metadata, tags, progress, rerun_safe
                )
                for path, values in zip(paths, per_file, strict=True)
            ]
            results: list[Data | Exception] = []
            for future in futures:
                try:
                    results.append(future.result())
                except Exception as error:  # reported per file, below
                    results.append(error)
        if raise_on_error and any(isinstance(r, Exception) for r in results):
            raise UploadError(list(results), paths)
        return results

    def _upload_one(
        self,
        path: Path,
        metadata: md.MetadataDict,
        fill_metadata: bool,
        tags: tuple[str, ...],
        progress: Progress | None,
        rerun_safe: bool = False,
    ) -> Data:
        stat = path.stat()  # a missing file fails here, before anything is sent
        header = pb.UploadDataHeader(
            filename=path.name,
            metadata=md.to_proto(metadata),
            fill_metadata=fill_metadata,
            tags=tags,
        )
        if rerun_safe:
            # Derived from the file and the request, so that a rerun names the same upload.
            identity = hashlib.sha256(
                f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode()
                + header.SerializeToString(deterministic=True)
            ).hexdigest()[:32]
            header.request_id = f"rerun-{identity}"
        else:
            header.request_id = str(uuid.uuid4())  # the same for every retry of this file
        if stat.st_size > RESUMABLE_THRESHOLD:
            upload_id = header.request_id if rerun_safe else uuid.uuid4().hex
            return self._upload_resumable(path, header, upload_id, progress)

        def attempt() -> Data:
            response = self._client.call(
                self._client._stub.UploadData, _upload_requests(path, header, progress)
            )
            return Data(self._client, response.data)

        return self._client.with_retries(attempt)

    def _upload_resumable(
        self, path: Path, header: pb.UploadDataHeader, upload_id: str, progress: Progress | None
    ) -> Data:
        stub = self._client._stub

        def start() -> int:
            request = pb.StartUploadRequest(header=header, upload_id=upload_id)
            return self._client.call(stub.StartUpload, request).committed_size

        def attempt() -> Data:
            # After a drop, ask the server how much it kept and send only the rest.
            committed = self._client.call(
                stub.QueryUpload, pb.QueryUploadRequest(upload_id=upload_id)
            ).committed_size
            response = self._client.call(
                stub.WriteUpload, _write_requests(path, upload_id, committed, progress)
            )
            return Data(self._client, response.data)

        self._client.with_retries(start)
        return self._client.with_retries(attempt)

    def get_data(self, data_id: str) -> Data:
        response = self._client.call(self._client._stub.GetData, pb.GetDataRequest(id=data_id))
        return Data(self._client, response.data)

    def list_data(
        self, filter: str | None = None, *, order_by: str | None = None, page_size: int = 100
    ) -> Iterator[Data]:
        """Every item matching `filter` (AIP-160), fetched page by page as you iterate."""
        token = ""
        while True:
            request = pb.ListDataRequest(
                filter=filter or "", order_by=order_by or "", page_size=page_size, page_token=token
            )
            page = self._client.call(self._client._stub.ListData, request)
            for message in page.data:
                yield Data(self._client, message)
            token = page.next_page_token
            if not token:
                return

    def watch(
        self, filter: str | None = None, *, resume_token: str = ""
    ) -> Iterator[dict[str, Any]]:
        """Changes as they happen: dicts with type (created, updated, deleted), data_id, data
        (as Data.to_json), event_time and resume_token (pass it back to continue after it)."""
        request = pb.WatchDataRequest(filter=filter or "", resume_token=resume_token)
        stream = self._client.call(self._client._stub.WatchData, request)
        try:
            for event in stream:
                yield {
                    "type": _EVENT_TYPES.get(event.type, "unknown"),
                    "data_id": event.data_id,
                    "data": Data(self._client, event.data).to_json(),
                    "event_time": md.format_datetime(
                        event.event_time.ToDatetime().replace(tzinfo=UTC)
                    ),
                    "resume_token": event.resume_token,
                }
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def extract_metadata(self, path: PathLike) -> tuple[md.MetadataDict, dict[str, str]]:
        """What fill_metadata would fill for this file, and which extractor found each value."""
        path = Path(path)

        def requests() -> Iterator[pb.ExtractMetadataRequest]:
            yield pb.ExtractMetadataRequest(header=pb.ExtractMetadataHeader(filename=path.name))
            for chunk in _chunks(path, 0, None):
                yield pb.ExtractMetadataRequest(chunk=chunk)

        response = self._client.call(self._client._stub.ExtractMetadata, requests())
        values, _ = md.from_proto(response.metadata)
        return values, dict(response.metadata_sources)


class Data:
    """One stored item. Metadata fields are attributes too: `data.latitude`, `data.acquired_at`
    (None when absent)."""

    def __init__(self, client: Client, message: pb.Data) -> None:
        self._client = client
        self._load(message)

    def _load(self, message: pb.Data) -> None:
        self._message = message
        self.id = message.id
        self.filename = message.filename
        self.size = message.size
        self.sha256 = message.sha256
        self.content_type = message.content_type
        self.tags = list(message.tags)
        self.etag = message.etag
        self.created_at = message.created_at.ToDatetime().replace(tzinfo=UTC)
        self.updated_at = message.updated_at.ToDatetime().replace(tzinfo=UTC)
        self.metadata, _ = md.from_proto(message.metadata)
        self.metadata_sources = dict(message.metadata_sources)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not ordinary attributes: the metadata fields.
        if name in md.FIELDS:
            return self.__dict__.get("metadata", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<Data {self.id} {self.filename!r} {self.size} bytes>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Data) and other._message == self._message

    def __hash__(self) -> int:
        return hash(self.id)

    def refresh(self) -> Data:
        response = self._client.call(self._client._stub.GetData, pb.GetDataRequest(id=self.id))
        self._load(response.data)
        return self

    def update_metadata(
        self,
        values: MetadataInput | None = None,
        /,
        *,
        clear: Iterable[str] = (),
        if_unchanged: bool = False,
        **fields: Any,
    ) -> Data:
        """Set the given fields and clear those in `clear`; others stay as they are.

        With if_unchanged=True the update applies only if nobody changed the item since this
        object was read (ConflictError otherwise).
        """
        to_set = md.normalize({**(values or {}), **fields})
        to_clear = list(clear)
        unknown = [name for name in to_clear if name not in md.FIELDS]
        if unknown:
            raise ValueError(f"unknown fields {unknown}; valid fields: {', '.join(md.FIELDS)}")
        request = pb.UpdateMetadataRequest(
            id=self.id,
            metadata=md.to_proto(to_set),
            update_mask=FieldMask(paths=[*to_set, *to_clear]),
            etag=self.etag if if_unchanged else "",
        )
        response = self._client.call(self._client._stub.UpdateMetadata, request)
        self._load(response.data)
        return self

    def delete(self) -> None:
        self._client.call(self._client._stub.DeleteData, pb.DeleteDataRequest(id=self.id))

    def download(self, path: PathLike) -> Path:
        """Write the content to `path` (a directory: under the filename), verified against the
        size and SHA-256 the server announced, via a temporary file renamed into place."""
        target = Path(path)
        if target.is_dir():
            target = target / Path(self.filename).name
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        digest, size = hashlib.sha256(), 0
        expected: pb.Data | None = None
        try:
            with partial.open("wb") as handle:
                messages = self._client.call(
                    self._client._stub.DownloadData, pb.DownloadDataRequest(id=self.id)
                )
                try:
                    for message in messages:
                        if message.HasField("data"):
                            expected = message.data
                            continue
                        digest.update(message.chunk)
                        size += len(message.chunk)
                        handle.write(message.chunk)
                except grpc.RpcError as error:
                    raise from_rpc_error(error) from None
            if expected is None or size != expected.size or digest.hexdigest() != expected.sha256:
                raise IntegrityError(
                    f"download of {self.id} does not match what the server announced "
                    f"({size} bytes, sha256 {digest.hexdigest()})"
                )
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "filename": self.filename,
            "size": self.size,
            "sha256": self.sha256,
            "content_type": self.content_type,
            "tags": self.tags,
            "created_at": md.format_datetime(self.created_at),
            "updated_at": md.format_datetime(self.updated_at),
            "etag": self.etag,
            "metadata": md.to_jsonable(self.metadata),
            "metadata_sources": self.metadata_sources,
        }


_EVENT_TYPES = {
    pb.EVENT_TYPE_CREATED: "created",
    pb.EVENT_TYPE_UPDATED: "updated",
    pb.EVENT_TYPE_DELETED: "deleted",
}


def _chunks(path: Path, offset: int, progress: Progress | None) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(CHUNK_SIZE):
            yield chunk
            if progress is not None:
                progress(len(chunk))


def _upload_requests(
    path: Path, header: pb.UploadDataHeader, progress: Progress | None
) -> Iterator[pb.UploadDataRequest]:
    yield pb.UploadDataRequest(header=header)
    for chunk in _chunks(path, 0, progress):
        yield pb.UploadDataRequest(chunk=chunk)


def _write_requests(
    path: Path, upload_id: str, offset: int, progress: Progress | None
) -> Iterator[pb.WriteUploadRequest]:
    first = True
    position = offset
    for chunk in _chunks(path, offset, progress):
        yield pb.WriteUploadRequest(
            upload_id=upload_id if first else "", write_offset=position, data=chunk
        )
        first = False
        position += len(chunk)
    yield pb.WriteUploadRequest(
        upload_id=upload_id if first else "", write_offset=position, finish_write=True
    )
