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

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import os
import random
import threading
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Generic, NoReturn, TypeVar, cast, overload

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from metalake import bulk, export
from metalake import labels as label_rules
from metalake import metadata as md
from metalake.bulk import UploadFile
from metalake.errors import (
    IntegrityError,
    InvalidArgumentError,
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
# Called with the number of bytes just sent, from the upload threads: it must be thread-safe.
Progress = Callable[[int], None]
_T = TypeVar("_T")
_V = TypeVar("_V", float, str, datetime)


class Client:
    """A connection to a metalake server.

    `target` defaults to METALAKE_TARGET, then 127.0.0.1:50051; `token` to METALAKE_TOKEN.
    Pass `credentials` (grpc.ssl_channel_credentials(...)) for TLS. `max_workers` bounds how
    many files upload at once. Use it as a context manager, or call close(), to close the channel.
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

    def start(
        self, method: grpc.StreamUnaryMultiCallable[Any, _T], requests: Iterator[Any]
    ) -> grpc.CallFuture[_T]:
        """Start a client-streaming RPC without waiting, so that it can be cancelled."""
        return method.future(requests, metadata=self._metadata)

    def with_retries(
        self, attempt: Callable[[], _T], *, stopped: threading.Event | None = None
    ) -> _T:
        """Retry what is safe to retry, with exponential backoff and jitter; give up at once
        when `stopped` is set (the batch was interrupted)."""
        for number in range(1, MAX_ATTEMPTS + 1):
            try:
                return attempt()
            except MetalakeError as error:
                if number == MAX_ATTEMPTS or not is_retryable(error):
                    raise
                if (stopped or threading.Event()).wait(_retry_delay(number, error)):
                    raise
        raise AssertionError("unreachable")


def _retry_delay(attempt: int, error: MetalakeError) -> float:
    """Seconds to wait after the `attempt`-th failure: exponential backoff with jitter, and at
    least the delay the server asked for (RetryInfo)."""
    delay = min(30.0, 0.25 * 2.0**attempt) * random.uniform(0.5, 1.0)
    if error.retry_after is not None:
        delay = max(delay, error.retry_after.total_seconds())
    return delay


class _Batch:
    """The streams in flight for one upload call, so that an interruption (Ctrl-C, or a caller
    that stops iterating) ends them at once: a file is not sent to its end, and a file not yet
    started is not started."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._calls: set[grpc.CallFuture[Any]] = set()

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()
            calls = list(self._calls)
        for call in calls:
            _cancel(call)

    def result(self, call: grpc.CallFuture[_T]) -> _T:
        with self._lock:
            if self.stopped.is_set():
                _cancel(call)
            self._calls.add(call)
        try:
            return call.result()
        except grpc.FutureCancelledError:
            raise MetalakeError(
                "the upload was cancelled", code=grpc.StatusCode.CANCELLED
            ) from None
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        except BaseException:
            # Interrupted while waiting in this thread: without this the stream would go on in
            # gRPC's own thread and the file would be stored after all.
            _cancel(call)
            raise
        finally:
            with self._lock:
                self._calls.discard(call)


class _FileProgress:
    """Reports each byte of one file to the caller's Progress once, even when a retry or a
    resumed upload sends some of them again.

    gRPC pulls the request iterator (which reports) from a thread of its own, and may resume it
    for the last time only after the server has answered; `finish` reports what is left when the
    result arrives, so that progress is complete before the caller sees the file done. The lock
    keeps the two threads from reporting the same bytes twice.
    """

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._reported: int | None = None
        self._lock = threading.Lock()

    def __call__(self, start: int, end: int) -> None:
        if self._progress is None:
            return
        with self._lock:
            if self._reported is None:
                # Bytes before the first offset were sent by an earlier run, not by this one.
                self._reported = start
            if end <= self._reported:
                return
            sent, self._reported = end - self._reported, end
        self._progress(sent)

    def finish(self, size: int) -> None:
        """The file is stored: every byte up to `size` has been sent."""
        self(self._reported or 0, size)


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
        labels: Mapping[str, str] | None = None,
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
        labels: Mapping[str, str] | None = None,
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
        labels: Mapping[str, str] | None = None,
        progress: Progress | None = None,
        raise_on_error: bool = True,
        rerun_safe: bool = False,
    ) -> Data | list[Data] | list[Data | Exception]:
        """Upload one file (returns its Data) or several (returns a list in the same order).

        `metadata` is one mapping for every file or a list with one per file; both are checked
        before anything is sent. Files upload in parallel; a failed file does not stop the
        others. If any failed, UploadError is raised once all are done, with every file's
        result; with raise_on_error=False the list holds the exception in the failed file's
        place instead. `progress` is called with each number of bytes sent, from the upload
        threads.

        With rerun_safe=True, running the same upload again (same files, unchanged on disk, same
        metadata) after an interruption finishes it instead of storing anything twice: files
        already stored return their item, a big file resumes where it stopped.
        """
        if isinstance(filepaths, str | os.PathLike):
            if metadata is not None and not isinstance(metadata, Mapping):
                raise ValueError("one file takes one metadata mapping, not a list")
            values = md.normalize(metadata or {})
            checked_labels = _checked_labels(labels)
            path = Path(filepaths)
            batch = _Batch()
            try:
                return self._upload_one(
                    batch,
                    UploadFile(path, path.name, values, tuple(tags), checked_labels),
                    fill_metadata,
                    progress,
                    rerun_safe,
                )
            except BaseException:
                batch.stop()
                raise
        paths = [Path(p) for p in filepaths]
        results = [
            result
            for _, result in self.iter_upload(
                paths,
                metadata,
                fill_metadata=fill_metadata,
                tags=tags,
                labels=labels,
                progress=progress,
                rerun_safe=rerun_safe,
            )
        ]
        if raise_on_error and any(isinstance(r, Exception) for r in results):
            raise UploadError(results, paths)
        return results

    def iter_upload(
        self,
        filepaths: Sequence[PathLike],
        metadata: MetadataInput | Sequence[MetadataInput] | None = None,
        *,
        fill_metadata: bool = False,
        tags: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        progress: Progress | None = None,
        rerun_safe: bool = False,
    ) -> Generator[tuple[Path, Data | Exception], None, None]:
        """Upload files in parallel like upload_data, yielding `(path, Data or exception)` in
        input order as soon as each file and those before it are done.

        The arguments are checked now, before anything is sent. Stopping the iteration early
        (or Ctrl-C) cancels the files still in flight and skips those not started.
        """
        paths = [Path(p) for p in filepaths]
        per_file = _per_file_metadata(paths, metadata)
        checked_labels = _checked_labels(labels)
        files = [
            UploadFile(path, path.name, values, tuple(tags), checked_labels)
            for path, values in zip(paths, per_file, strict=True)
        ]
        return (
            (file.path, result)
            for file, result in self.iter_upload_files(
                files, fill_metadata=fill_metadata, progress=progress, rerun_safe=rerun_safe
            )
        )

    def upload_folder(
        self,
        paths: PathLike | Sequence[PathLike] = (),
        metadata: MetadataInput | None = None,
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        tags: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        manifest: PathLike | None = None,
        fill_metadata: bool = False,
        progress: Progress | None = None,
    ) -> list[FileResult]:
        """Upload every file of one folder (or of several folders and files), recursively.

        Hidden files and folders are skipped; `include`/`exclude` are glob patterns (see
        metalake.bulk). Each file is stored under its path relative to its folder. Files upload
        in parallel; the result has one FileResult per file, in walking order, whether it was
        stored, already stored by an earlier run, or failed. A rerun after an interruption
        sends only what is missing and never stores a file twice: each file's request id is
        derived from its absolute path, size, modification time and header (see rerun_safe).

        `manifest` (a .csv or .jsonl file) gives files their own metadata and tags; every row is
        checked before anything is sent (bulk.ManifestError names the file, line and column of
        each problem). Without `paths`, the manifest's files are uploaded.
        """
        given = [Path(paths)] if isinstance(paths, str | os.PathLike) else [Path(p) for p in paths]
        if not given and manifest is None:
            raise ValueError("give folders or files to upload, or a manifest")
        files = bulk.plan_upload(
            given,
            include=include,
            exclude=exclude,
            metadata=md.normalize(metadata or {}),
            tags=list(tags),
            labels=_checked_labels(labels),
            manifest=Path(manifest) if manifest is not None else None,
        ).files
        started = datetime.now(UTC)
        return [
            FileResult.of(file, result, started)
            for file, result in self.iter_upload_files(
                files, fill_metadata=fill_metadata, progress=progress, rerun_safe=True
            )
        ]

    def iter_upload_files(
        self,
        files: Sequence[UploadFile],
        *,
        fill_metadata: bool = False,
        progress: Progress | None = None,
        rerun_safe: bool = False,
    ) -> Generator[tuple[UploadFile, Data | Exception], None, None]:
        """Like iter_upload, for files that each carry their own name, metadata and tags."""
        batch = _Batch()
        workers = max(1, min(self._client._max_workers, len(files)))
        pool = concurrent.futures.ThreadPoolExecutor(workers, "metalake-upload")
        try:
            futures = [
                pool.submit(self._upload_one, batch, file, fill_metadata, progress, rerun_safe)
                for file in files
            ]
            for file, future in zip(files, futures, strict=True):
                try:
                    result: Data | Exception = future.result()
                except Exception as error:  # reported per file, in its place
                    result = error
                yield file, result
        except BaseException:  # Ctrl-C, or the caller stopped iterating (GeneratorExit)
            batch.stop()
            raise
        finally:
            # Not `with pool`: its exit would wait for every queued file, even after Ctrl-C.
            pool.shutdown(wait=True, cancel_futures=True)

    def _upload_one(
        self,
        batch: _Batch,
        file: UploadFile,
        fill_metadata: bool,
        progress: Progress | None,
        rerun_safe: bool = False,
    ) -> Data:
        path = file.path
        stat = path.stat()  # a missing file fails here, before anything is sent
        header = pb.UploadDataHeader(
            filename=file.filename,
            metadata=md.to_proto(file.metadata),
            fill_metadata=fill_metadata,
            tags=file.tags,
            labels=file.labels,
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
        report = _FileProgress(progress)
        if stat.st_size > RESUMABLE_THRESHOLD:
            upload_id = header.request_id if rerun_safe else uuid.uuid4().hex
            data = self._upload_resumable(batch, path, header, upload_id, report)
        else:

            def attempt() -> Data:
                call = self._client.start(
                    self._client._stub.UploadData, _upload_requests(path, header, report)
                )
                return Data(self._client, batch.result(call).data)

            data = self._client.with_retries(attempt, stopped=batch.stopped)
        report.finish(data.size)
        return data

    def _upload_resumable(
        self,
        batch: _Batch,
        path: Path,
        header: pb.UploadDataHeader,
        upload_id: str,
        report: _FileProgress,
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
            call = self._client.start(
                stub.WriteUpload, _write_requests(path, upload_id, committed, report)
            )
            return Data(self._client, batch.result(call).data)

        self._client.with_retries(start, stopped=batch.stopped)
        return self._client.with_retries(attempt, stopped=batch.stopped)

    def get_data(self, data_id: str) -> Data:
        return Data(self._client, _get(self._client, data_id))

    def delete_data(self, data_id: str) -> None:
        """Delete one item by id (NotFoundError if there is none)."""
        self._client.call(self._client._stub.DeleteData, pb.DeleteDataRequest(id=data_id))

    @overload
    def download_data(self, data_id: str, path: PathLike) -> Path: ...

    @overload
    def download_data(
        self,
        *,
        filter: str,
        target: PathLike,
        max_workers: int | None = None,
        progress: Progress | None = None,
    ) -> list[DownloadResult]: ...

    def download_data(
        self,
        data_id: str | None = None,
        path: PathLike | None = None,
        *,
        filter: str | None = None,
        target: PathLike | None = None,
        max_workers: int | None = None,
        progress: Progress | None = None,
    ) -> Path | list[DownloadResult]:
        """One item by id into `path` (like Data.download; returns the path written), or every
        item matching `filter` into the folder `target` (returns one DownloadResult per item).

        A bulk download runs `max_workers` items at once (default: the client's). Each file is
        verified against its size and SHA-256 before it is moved into place; a rerun skips the
        files already complete and resumes the partial ones (kept in `target/.metalake-partial`).
        Names are made safe and collisions resolved as metalake.bulk.local_path and Placement
        describe: nothing is ever written outside `target`. A failed item does not stop the
        others; check each result's `error`.
        """
        if filter is not None:
            if data_id is not None or path is not None or target is None:
                raise ValueError("a bulk download takes filter= and target=, not an id or path")
            return list(
                self.iter_download(filter, target, max_workers=max_workers, progress=progress)
            )
        if data_id is None or path is None:
            raise ValueError("give an id and a path, or filter= and target=")
        return _download(self._client, data_id, Path(path))

    def get_thumbnail(self, data_id: str, size: int = 256) -> bytes:
        """A JPEG preview of the item, `size` (256 or 1024) px on its long side, upright.
        NotFoundError when the item does not exist or its content has no preview."""
        request = pb.GetThumbnailRequest(id=data_id, size=size)
        response = self._client.call(self._client._stub.GetThumbnail, request)
        return response.content

    def iter_download(
        self,
        filter: str,
        target: PathLike,
        *,
        max_workers: int | None = None,
        progress: Progress | None = None,
    ) -> Generator[DownloadResult, None, None]:
        """download_data(filter=..., target=...), yielding each item's result in listing order
        as soon as it and those before it are done. Lists page by page while downloading: at
        most a few items per worker are held at once."""
        root = Path(target)
        root.mkdir(parents=True, exist_ok=True)
        workers = max(1, max_workers or self._client._max_workers)
        placement = bulk.Placement()
        stopped = threading.Event()
        pool = concurrent.futures.ThreadPoolExecutor(workers, "metalake-download")
        window: collections.deque[concurrent.futures.Future[DownloadResult]] = collections.deque()
        try:
            for data in self.list_data(filter, page_size=1000):
                relative = placement.place(data.filename, data.id)
                window.append(
                    pool.submit(
                        _download_into, self._client, data, root, relative, progress, stopped
                    )
                )
                while len(window) > 2 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        except BaseException:
            stopped.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            with contextlib.suppress(OSError):
                (root / bulk.PARTIAL_DIR).rmdir()  # only when no partial file is left

    def list_data(
        self, filter: str | None = None, *, order_by: str | None = None, page_size: int = 100
    ) -> Iterator[Data]:
        """Every item matching `filter` (AIP-160), fetched page by page as you iterate."""
        token = ""
        while True:
            request = pb.ListDataRequest(
                filter=filter or "", order_by=order_by or "", page_size=page_size, page_token=token
            )
            page = self._client.with_retries(
                functools.partial(self._client.call, self._client._stub.ListData, request)
            )
            for message in page.data:
                yield Data(self._client, message)
            token = page.next_page_token
            if not token:
                return

    def export_records(
        self, filter: str | None = None, *, provenance: bool = False
    ) -> Iterator[dict[str, Any]]:
        """One record per item matching `filter`, fetched page by page as you iterate: id,
        filename, size, sha256, content_type, created_at, updated_at, every metadata field
        (None when absent; acquired_at keeps its offset), acquired_at_utc_offset (seconds, or
        None), tags, labels and, with provenance=True, metadata_sources."""
        for data in self.list_data(filter, page_size=1000):
            yield export.record(data, provenance=provenance)

    def export(
        self,
        path: PathLike,
        filter: str | None = None,
        *,
        format: str | None = None,
        provenance: bool = False,
    ) -> int:
        """Write export_records(filter) to `path` as csv, jsonl or parquet (by default from
        its suffix), streaming; returns how many items were written. Parquet needs the
        `export` extra (pyarrow). The file appears only once complete."""
        target = Path(path)
        chosen = export.format_of(target, format)
        return export.write(
            self.export_records(filter, provenance=provenance),
            target,
            chosen,
            provenance=provenance,
        )

    def import_objects(
        self, source: str, *, extensions: Sequence[str] = (), fill_metadata: bool = False
    ) -> dict[str, Any]:
        """Register every object under `source` (s3://bucket/prefix) as an item referencing it
        in place (the server reads the bucket with its own credentials; admin role). Returns the
        counts: listed, added, updated, unchanged, vanished, bytes_read, header_bytes_limit, and
        failures ((object, why) pairs)."""
        request = pb.ImportObjectsRequest(
            source=source, extensions=list(extensions), fill_metadata=fill_metadata
        )
        response = self._client.call(self._client._stub.ImportObjects, request)
        return {
            "listed": response.listed,
            "added": response.added,
            "updated": response.updated,
            "unchanged": response.unchanged,
            "vanished": response.vanished,
            "bytes_read": response.bytes_read,
            "header_bytes_limit": response.header_bytes_limit,
            "failures": [(f.field, f.description) for f in response.failures],
        }

    def watch(
        self, filter: str | None = None, *, resume_token: str = ""
    ) -> Iterator[dict[str, Any]]:
        """Changes as they happen: dicts with type (created, updated, deleted), data_id, data
        (as Data.to_json), event_time and resume_token (pass it back to continue after it).

        Once it has a resume token (given, or from an event), a broken stream (the server or its
        catalog away) is reopened after it, with backoff: no event is missed or repeated."""
        token, failures = resume_token, 0
        while True:
            request = pb.WatchDataRequest(filter=filter or "", resume_token=token)
            try:
                stream = self._client.call(self._client._stub.WatchData, request)
                for event in stream:
                    failures, token = 0, event.resume_token
                    yield {
                        "type": _EVENT_TYPES.get(event.type, "unknown"),
                        "data_id": event.data_id,
                        "data": Data(self._client, event.data).to_json(),
                        "event_time": md.format_datetime(
                            event.event_time.ToDatetime().replace(tzinfo=UTC)
                        ),
                        "resume_token": event.resume_token,
                    }
                return
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
            except MetalakeError as error:
                failure = error
            failures += 1
            # Without a token, reopening would watch from a new "now" and could miss events.
            if not token or failures >= MAX_ATTEMPTS or not is_retryable(failure):
                raise failure from None
            threading.Event().wait(_retry_delay(failures, failure))

    def _read(self, method: Callable[..., _T], request: Any) -> _T:
        """A unary call that stores nothing, retried while the server or its backends are away."""
        return self._client.with_retries(functools.partial(self._client.call, method, request))

    # Dataset snapshots.

    def create_dataset(
        self, name: str, filter: str | None = None, *, description: str = ""
    ) -> Dataset:
        """Freeze the items matching `filter` (every item when None) as the next version of
        the dataset `name`; returns that version."""
        request = pb.CreateDatasetRequest(name=name, filter=filter or "", description=description)
        return Dataset(self._client.call(self._client._stub.CreateDataset, request).dataset)

    def list_datasets(self, name: str | None = None) -> Iterator[Dataset]:
        """Every dataset version (only those of `name` if given), by name, newest first."""
        token = ""
        while True:
            request = pb.ListDatasetsRequest(name=name or "", page_size=1000, page_token=token)
            page = self._read(self._client._stub.ListDatasets, request)
            yield from (Dataset(message) for message in page.datasets)
            token = page.next_page_token
            if not token:
                return

    def get_dataset(self, name: str, version: int = 0) -> Dataset:
        """One version of a dataset; the latest when `version` is 0."""
        request = pb.GetDatasetRequest(name=name, version=version)
        return Dataset(self._read(self._client._stub.GetDataset, request).dataset)

    def dataset_items(
        self, name: str, version: int = 0, *, page_size: int = 1000
    ) -> Iterator[Data]:
        """The items of a version as they were frozen, in id order, page by page."""
        token = ""
        while True:
            request = pb.ListDatasetItemsRequest(
                name=name, version=version, page_size=page_size, page_token=token
            )
            page = self._read(self._client._stub.ListDatasetItems, request)
            # Later pages must come from the version the first page resolved "latest" to.
            version = page.version
            yield from (Data(self._client, message) for message in page.data)
            token = page.next_page_token
            if not token:
                return

    def diff_datasets(
        self, name: str, from_version: int, to_version: int = 0
    ) -> Iterator[DatasetChange]:
        """What changed between two versions: added, removed and changed items, in id order."""
        token = ""
        while True:
            request = pb.DiffDatasetsRequest(
                name=name,
                from_version=from_version,
                to_version=to_version,
                page_size=1000,
                page_token=token,
            )
            page = self._read(self._client._stub.DiffDatasets, request)
            for entry in page.entries:
                yield DatasetChange(
                    _CHANGES.get(entry.change, "unknown"),
                    entry.data_id,
                    Data(self._client, entry.before) if entry.HasField("before") else None,
                    Data(self._client, entry.after) if entry.HasField("after") else None,
                )
            token = page.next_page_token
            if not token:
                return

    def dataset_manifest(self, name: str, version: int = 0) -> bytes:
        """A version's manifest: JSON Lines, UTF-8, keys sorted. The first line describes the
        version, then one line per item (as Data.to_json) in id order. A version never changes,
        so neither do these bytes: keep them beside a model to say what it was trained on."""
        dataset = self.get_dataset(name, version)
        lines = [_canonical_json({"format": MANIFEST_FORMAT, **dataset.to_json()})]
        lines += [
            _canonical_json(data.to_json()) for data in self.dataset_items(name, dataset.version)
        ]
        return "".join(line + "\n" for line in lines).encode()

    def download_dataset(
        self, name: str, directory: PathLike, version: int = 0
    ) -> list[tuple[Data, Path]]:
        """Download every item of a version into `directory`, each as `<id>_<filename>`,
        verified like Data.download, in parallel; files already there with the right SHA-256
        are kept (a rerun finishes an interrupted download). Writes `manifest.jsonl` beside
        them. Returns each item with its path, in id order."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        dataset = self.get_dataset(name, version)
        items = list(self.dataset_items(name, dataset.version))
        stub = self._client._stub

        def fetch(data: Data) -> tuple[Data, Path]:
            path = target / f"{data.id}_{_local_name(data._message)}"
            if path.is_file() and _file_sha256(path, path.stat().st_size)[0] == data.sha256:
                return data, path

            def opening(offset: int) -> Iterable[Any]:
                request = pb.DownloadDatasetItemRequest(
                    name=name, version=dataset.version, data_id=data.id, read_offset=offset
                )
                return self._client.call(stub.DownloadDatasetItem, request)

            return data, _download(self._client, data.id, path, opening)

        workers = max(1, min(self._client._max_workers, len(items)))
        with concurrent.futures.ThreadPoolExecutor(workers, "metalake-download") as pool:
            written = list(pool.map(fetch, items))
        manifest = self.dataset_manifest(name, dataset.version)
        (target / "manifest.jsonl").write_bytes(manifest)
        return written

    # Near-duplicates.

    def find_similar(
        self,
        data_id: str | None = None,
        *,
        image: PathLike | bytes | None = None,
        max_distance: int | None = None,
        filter: str | None = None,
        include_mirrored: bool = True,
        page_size: int = 100,
    ) -> Iterator[Similar]:
        """Images that look like the item `data_id`, or like `image` (a path or bytes, at most
        4 MiB): within `max_distance` bits of its perceptual hash (the server's default, 8,
        when None), closest first; mirror images match unless include_mirrored=False."""
        if (data_id is None) == (image is None):
            raise ValueError("give exactly one of data_id and image")
        request = pb.FindSimilarRequest(
            filter=filter or "", page_size=page_size, exclude_mirrored=not include_mirrored
        )
        if data_id is not None:
            request.id = data_id
        else:
            assert image is not None
            request.image = image if isinstance(image, bytes) else Path(image).read_bytes()
        if max_distance is not None:
            request.max_distance = max_distance
        while True:
            page = self._read(self._client._stub.FindSimilar, request)
            for result in page.results:
                yield Similar(Data(self._client, result.data), result.distance, result.mirrored)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def find_duplicates(
        self, filter: str | None = None, *, max_distance: int | None = None
    ) -> list[list[Data]]:
        """Groups of near-duplicate images among the items matching `filter`: each group is
        every item linked to another of the group by a distance within `max_distance`, in id
        order; groups by their first id. One FindSimilar call per image."""
        images = (
            f'({filter}) AND content_type = "image/*"' if filter else 'content_type = "image/*"'
        )
        items = {data.id: data for data in self.list_data(images, page_size=1000)}
        parent = {data_id: data_id for data_id in items}

        def root(data_id: str) -> str:
            while parent[data_id] != data_id:
                parent[data_id] = parent[parent[data_id]]
                data_id = parent[data_id]
            return data_id

        for data_id in items:
            try:
                similar = list(self.find_similar(data_id, max_distance=max_distance, filter=filter))
            except InvalidArgumentError:
                continue  # not an image the server can read
            for other in similar:
                if other.data.id in parent:
                    parent[root(other.data.id)] = root(data_id)
        groups: dict[str, list[Data]] = {}
        for data_id in sorted(items):
            groups.setdefault(root(data_id), []).append(items[data_id])
        return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0].id)

    # Webhooks (admin tokens).

    def add_webhook(
        self,
        url: str,
        events: Iterable[str] = ("created", "updated", "deleted"),
        *,
        filter: str | None = None,
    ) -> Webhook:
        """Register an endpoint for the organization's changes; the returned Webhook's `secret`
        (whsec_...) is shown this once: receivers verify signatures with it."""
        names = list(events)
        unknown = [name for name in names if name not in _EVENT_NUMBERS]
        if unknown or not names:
            raise ValueError(
                f"events must be some of {', '.join(_EVENT_NUMBERS)}; got {', '.join(names)}"
            )
        request = pb.CreateWebhookRequest(
            url=url, event_types=[_EVENT_NUMBERS[n] for n in names], filter=filter or ""
        )
        response = self._client.call(self._client._stub.CreateWebhook, request)
        return Webhook(response.webhook, secret=response.secret)

    def list_webhooks(self) -> list[Webhook]:
        response = self._read(self._client._stub.ListWebhooks, pb.ListWebhooksRequest())
        return [Webhook(message) for message in response.webhooks]

    def delete_webhook(self, webhook_id: str) -> None:
        self._client.call(self._client._stub.DeleteWebhook, pb.DeleteWebhookRequest(id=webhook_id))

    def webhook_deliveries(self, webhook_id: str) -> Iterator[WebhookDelivery]:
        """A webhook's delivery log, newest first, page by page."""
        token = ""
        while True:
            request = pb.ListWebhookDeliveriesRequest(
                webhook_id=webhook_id, page_size=100, page_token=token
            )
            page = self._read(self._client._stub.ListWebhookDeliveries, request)
            yield from (WebhookDelivery(message) for message in page.deliveries)
            token = page.next_page_token
            if not token:
                return

    def test_webhook(self, webhook_id: str) -> WebhookDelivery:
        """Send a test event now; the delivery after its first attempt."""
        response = self._client.call(
            self._client._stub.TestWebhook, pb.TestWebhookRequest(id=webhook_id)
        )
        return WebhookDelivery(response.delivery)

    def extract_metadata(self, path: PathLike) -> tuple[md.MetadataDict, dict[str, str]]:
        """What fill_metadata would fill for this file, and which extractor found each value."""
        path = Path(path)

        def requests() -> Iterator[pb.ExtractMetadataRequest]:
            yield pb.ExtractMetadataRequest(header=pb.ExtractMetadataHeader(filename=path.name))
            for chunk in _chunks(path, 0, None):
                yield pb.ExtractMetadataRequest(chunk=chunk)

        # Nothing is stored: a retry after the server or its backends were away is safe.
        response = self._client.with_retries(
            lambda: self._client.call(self._client._stub.ExtractMetadata, requests())
        )
        values, _ = md.from_proto(response.metadata)
        return values, dict(response.metadata_sources)


def _checked_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """The labels as a dict, or InvalidMetadataError (before anything is sent)."""
    given = dict(labels or {})
    violations = label_rules.validate(given)
    if violations:
        raise md.InvalidMetadataError(violations)
    return given


def _per_file_metadata(
    paths: list[Path], metadata: MetadataInput | Sequence[MetadataInput] | None
) -> list[md.MetadataDict]:
    """One checked metadata dict per path, or a ValueError naming the mapping at fault."""
    if metadata is None or isinstance(metadata, Mapping):
        return [md.normalize(metadata or {})] * len(paths)
    if len(metadata) != len(paths):
        raise ValueError(
            f"{len(paths)} files but {len(metadata)} metadata mappings: give one mapping "
            "for all files or exactly one per file"
        )
    checked = []
    for index, values in enumerate(metadata):
        try:
            checked.append(md.normalize(values))
        except md.InvalidMetadataError as error:
            # Say which mapping of the list is wrong: its index and its file.
            where = f"metadata[{index}] ({paths[index].name})."
            raise md.InvalidMetadataError(
                [md.FieldViolation(where + v.field, v.description) for v in error.violations]
            ) from None
    return checked


@dataclass(frozen=True)
class FileResult:
    """What became of one file of a folder upload: `data` when it is stored (by this run, or by
    an earlier one when `already_stored`), else `error`."""

    path: Path
    filename: str
    data: Data | None
    error: Exception | None
    already_stored: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def of(cls, file: UploadFile, result: Data | Exception, started: datetime) -> FileResult:
        if isinstance(result, Exception):
            return cls(file.path, file.filename, None, result)
        # A rerun gets back the item an earlier run stored: it was created before this run.
        return cls(file.path, file.filename, result, None, result.created_at < started)


class _Field(Generic[_V]):
    """A metadata field read as an attribute of Data: its value, or None when absent."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> _Field[_V]: ...

    @overload
    def __get__(self, instance: Data, owner: type) -> _V | None: ...

    def __get__(self, instance: Data | None, owner: type) -> _Field[_V] | _V | None:
        if instance is None:
            return self
        return cast("_V | None", instance.metadata.get(self.name))

    def __set__(self, instance: Data, value: object) -> NoReturn:
        # Assigning would change only this object, not the datalake: say what does.
        raise AttributeError(f"{self.name} is read-only; use data.update_metadata({self.name}=...)")


class Data:
    """One stored item. Metadata fields are attributes too: `data.latitude`, `data.acquired_at`
    (None when absent)."""

    latitude = _Field[float]()
    longitude = _Field[float]()
    altitude = _Field[float]()
    acquired_at = _Field[datetime]()  # aware when the offset is known, naive when it is not
    acquired_by = _Field[str]()
    weather = _Field[str]()
    resolution_x = _Field[float]()
    resolution_y = _Field[float]()
    resolution_unit = _Field[str]()
    compression = _Field[str]()
    manufacturer = _Field[str]()
    software = _Field[str]()
    color_space = _Field[str]()
    custom_id = _Field[str]()
    reference = _Field[str]()

    def __init__(self, client: Client, message: pb.Data) -> None:
        self._client = client
        self._load(message)

    def _load(self, message: pb.Data) -> None:
        self._message = message
        self.id: str = message.id
        self.filename: str = message.filename
        self.size: int = message.size
        self.sha256: str = message.sha256
        self.content_type: str = message.content_type
        self.tags: list[str] = list(message.tags)
        self.etag: str = message.etag
        self.created_at: datetime = message.created_at.ToDatetime().replace(tzinfo=UTC)
        self.updated_at: datetime = message.updated_at.ToDatetime().replace(tzinfo=UTC)
        self.metadata: md.MetadataDict = md.from_proto(message.metadata)[0]
        self.metadata_sources: dict[str, str] = dict(message.metadata_sources)
        self.labels: dict[str, str] = dict(sorted(message.labels.items()))

    def __repr__(self) -> str:
        return f"<Data {self.id} {self.filename!r} {self.size} bytes>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Data) and other._message == self._message

    def __hash__(self) -> int:
        return hash(self.id)

    def refresh(self) -> Data:
        self._load(_get(self._client, self.id))
        return self

    def update_metadata(
        self,
        values: MetadataInput | None = None,
        /,
        *,
        clear: Iterable[str] = (),
        if_unchanged: bool = False,
        labels: Mapping[str, str | None] | None = None,
        replace_labels: bool = False,
        **fields: Any,
    ) -> Data:
        """Set the given fields and clear those in `clear` (or given as None); others stay as
        they are. Only the fields named travel, in the request's field mask.

        `labels` sets labels (a None value removes that label), the others stay; with
        replace_labels=True the item's labels become exactly `labels`.

        With if_unchanged=True the update applies only if nobody changed the item since this
        object was read (ConflictError otherwise).
        """
        given = {**(values or {}), **fields}
        to_set = md.normalize(given)  # drops the None values, rejects unknown names
        to_clear = list(dict.fromkeys([*clear, *(k for k, v in given.items() if v is None)]))
        unknown = [name for name in to_clear if name not in md.FIELDS]
        if unknown:
            raise md.InvalidMetadataError(
                [md.FieldViolation(name, md.check_value(name, None) or "") for name in unknown]
            )
        both = sorted(set(to_set) & set(to_clear))
        if both:
            raise ValueError(f"{', '.join(both)}: both set and cleared")
        label_values = {k: v for k, v in (labels or {}).items() if v is not None}
        _checked_labels(label_values)
        removed = [k for k, v in (labels or {}).items() if v is None]
        problems = [
            md.FieldViolation(f"labels.{k}", why)
            for k in removed
            if (why := label_rules.check_key(k)) is not None
        ]
        if problems:
            raise md.InvalidMetadataError(problems)
        label_paths = ["labels"] if replace_labels else [f"labels.{k}" for k in labels or {}]
        request = pb.UpdateMetadataRequest(
            id=self.id,
            metadata=md.to_proto(to_set),
            update_mask=FieldMask(paths=[*to_set, *to_clear, *label_paths]),
            etag=self.etag if if_unchanged else "",
            labels=label_values,
        )
        response = self._client.call(self._client._stub.UpdateMetadata, request)
        self._load(response.data)
        return self

    def delete(self) -> None:
        self._client.call(self._client._stub.DeleteData, pb.DeleteDataRequest(id=self.id))

    def thumbnail(self, size: int = 256) -> bytes:
        """A JPEG preview, `size` (256 or 1024) px on its long side; see Datalake.get_thumbnail."""
        return Datalake(self._client).get_thumbnail(self.id, size)

    def download(self, path: PathLike) -> Path:
        """Write the content to `path` (a directory: under the filename), verified against the
        size and SHA-256 the server announced, via a temporary file renamed into place.
        Returns the path written; IntegrityError (and nothing written) on a mismatch."""
        return _download(self._client, self.id, Path(path))

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
            "labels": self.labels,
        }


@dataclass(frozen=True)
class Similar:
    """An image close to a query: its Data, the Hamming distance between the perceptual
    hashes, and whether it is closest to the query's mirror image (a flipped copy)."""

    data: Data
    distance: int
    mirrored: bool

    def to_json(self) -> dict[str, Any]:
        return {"distance": self.distance, "mirrored": self.mirrored, **self.data.to_json()}


class Webhook:
    """An HTTP endpoint receiving the organization's changes. `secret` is set only on the
    object add_webhook returns."""

    def __init__(self, message: pb.Webhook, *, secret: str = "") -> None:
        self.id: str = message.id
        self.url: str = message.url
        self.events: list[str] = [_EVENT_TYPES.get(e, "unknown") for e in message.event_types]
        self.filter: str = message.filter
        self.created_at: datetime = message.created_at.ToDatetime().replace(tzinfo=UTC)
        self.secret: str = secret

    def __repr__(self) -> str:
        return f"<Webhook {self.id} {self.url} {','.join(self.events)}>"

    def to_json(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": self.id,
            "url": self.url,
            "events": self.events,
            "filter": self.filter,
            "created_at": md.format_datetime(self.created_at),
        }
        if self.secret:
            payload["secret"] = self.secret
        return payload


class WebhookDelivery:
    """One event for one webhook: `status` is pending, delivered or failed."""

    def __init__(self, message: pb.WebhookDelivery) -> None:
        def when(field: str) -> datetime | None:
            if not message.HasField(field):  # type: ignore[arg-type]
                return None
            value: datetime = getattr(message, field).ToDatetime().replace(tzinfo=UTC)
            return value

        self.id: str = message.id
        self.webhook_id: str = message.webhook_id
        self.event_type: str = message.event_type
        self.data_id: str = message.data_id
        self.status: str = _DELIVERY_STATUSES.get(message.status, "unknown")
        self.attempts: int = message.attempts
        self.created_at: datetime | None = when("created_at")
        self.next_attempt_at: datetime | None = when("next_attempt_at")
        self.last_attempt_at: datetime | None = when("last_attempt_at")
        self.response_status: int | None = (
            message.response_status if message.HasField("response_status") else None
        )
        self.error: str = message.error

    def __repr__(self) -> str:
        return f"<WebhookDelivery {self.id} {self.event_type} {self.status}>"

    def to_json(self) -> dict[str, Any]:
        def text(value: datetime | None) -> str | None:
            return md.format_datetime(value) if value is not None else None

        return {
            "id": self.id,
            "webhook_id": self.webhook_id,
            "event_type": self.event_type,
            "data_id": self.data_id,
            "status": self.status,
            "attempts": self.attempts,
            "created_at": text(self.created_at),
            "next_attempt_at": text(self.next_attempt_at),
            "last_attempt_at": text(self.last_attempt_at),
            "response_status": self.response_status,
            "error": self.error,
        }


_DELIVERY_STATUSES = {
    pb.DELIVERY_STATUS_PENDING: "pending",
    pb.DELIVERY_STATUS_DELIVERED: "delivered",
    pb.DELIVERY_STATUS_FAILED: "failed",
}


MANIFEST_FORMAT = "metalake-dataset-manifest/1"


@dataclass(frozen=True)
class Dataset:
    """One immutable version of a named dataset."""

    name: str
    version: int
    filter: str
    description: str
    created_at: datetime
    item_count: int
    total_size: int

    def __init__(self, message: pb.DatasetVersion) -> None:
        values = {
            "name": message.name,
            "version": message.version,
            "filter": message.filter,
            "description": message.description,
            "created_at": message.created_at.ToDatetime().replace(tzinfo=UTC),
            "item_count": message.item_count,
            "total_size": message.total_size,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "filter": self.filter,
            "description": self.description,
            "created_at": md.format_datetime(self.created_at),
            "item_count": self.item_count,
            "total_size": self.total_size,
        }


@dataclass(frozen=True)
class DatasetChange:
    """One item that differs between two versions: `change` is added, removed or changed."""

    change: str
    data_id: str
    before: Data | None
    after: Data | None

    def to_json(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "data_id": self.data_id,
            "before": self.before.to_json() if self.before else None,
            "after": self.after.to_json() if self.after else None,
        }


_CHANGES = {
    pb.DATASET_CHANGE_ADDED: "added",
    pb.DATASET_CHANGE_REMOVED: "removed",
    pb.DATASET_CHANGE_CHANGED: "changed",
}


def _canonical_json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


_EVENT_TYPES = {
    pb.EVENT_TYPE_CREATED: "created",
    pb.EVENT_TYPE_UPDATED: "updated",
    pb.EVENT_TYPE_DELETED: "deleted",
}
_EVENT_NUMBERS = {name: number for number, name in _EVENT_TYPES.items()}


@dataclass(frozen=True)
class DownloadResult:
    """One item of a bulk download: `status` is "downloaded", "complete" (a rerun found it
    already there, verified) or "failed" (then `error`); `resumed_from` is the byte offset a
    partial file was resumed from."""

    data: Data
    path: Path
    status: str
    error: Exception | None = None
    resumed_from: int = 0


def _download_into(
    client: Client,
    data: Data,
    root: Path,
    relative: PurePosixPath,
    progress: Progress | None,
    stopped: threading.Event,
) -> DownloadResult:
    destination = root.joinpath(*relative.parts)
    try:
        return _fetch(client, data, root, destination, progress or _no_progress, stopped)
    except Exception as error:
        return DownloadResult(data, destination, "failed", error)


def _no_progress(_: int) -> None:
    return None


def _fetch(
    client: Client,
    data: Data,
    root: Path,
    destination: Path,
    progress: Progress,
    stopped: threading.Event,
) -> DownloadResult:
    # A link planted in the target must not carry the file, or even a folder, elsewhere.
    folder = root
    for part in destination.relative_to(root).parts[:-1]:
        folder = folder / part
        if folder.is_symlink():
            raise IntegrityError(
                f"{destination} would be written outside {root} (a link is in the way)"
            )
        folder.mkdir(exist_ok=True)
    if destination.is_symlink() or destination.exists():
        if (
            destination.is_file()
            and not destination.is_symlink()
            and destination.stat().st_size == data.size
            and (not data.sha256 or _file_sha256(destination, data.size)[0] == data.sha256)
        ):
            progress(data.size)
            return DownloadResult(data, destination, "complete")
        raise FileExistsError(f"{destination} exists with other content: not overwritten")
    partials = root / bulk.PARTIAL_DIR
    partials.mkdir(exist_ok=True)
    partial = partials / (hashlib.sha256(data.id.encode()).hexdigest()[:32] + ".part")
    state = {"resumed_from": -1}

    def attempt() -> None:
        _resume(client, data, partial, progress, state)

    client.with_retries(attempt, stopped=stopped)
    partial.replace(destination)
    return DownloadResult(data, destination, "downloaded", resumed_from=state["resumed_from"])


def _resume(
    client: Client, data: Data, partial: Path, progress: Progress, state: dict[str, int]
) -> None:
    """Continue `partial` from its size to the end, then verify it whole; a resumed file that
    does not verify is downloaded once more from the start."""
    for from_start in (False, True):
        offset = partial.stat().st_size if partial.exists() else 0
        if from_start or offset > data.size:
            partial.unlink(missing_ok=True)
            offset = 0
        _, digest = _file_sha256(partial, offset) if offset else ("", hashlib.sha256())
        if state["resumed_from"] < 0:
            state["resumed_from"] = offset
            progress(offset)
        request = pb.DownloadDataRequest(id=data.id, read_offset=offset)
        stream = client.call(client._stub.DownloadData, request)
        size = offset
        try:
            messages = iter(stream)
            first = next(messages, None)
            if first is None or not first.HasField("data"):
                raise IntegrityError(f"the download of {data.id} did not start with the item")
            if (first.data.size, first.data.sha256) != (data.size, data.sha256):
                raise IntegrityError(f"{data.id} changed while it was being downloaded")
            with partial.open("ab") as handle:
                for message in messages:
                    handle.write(message.chunk)
                    digest.update(message.chunk)
                    size += len(message.chunk)
                    progress(len(message.chunk))
                handle.flush()
                os.fsync(handle.fileno())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            _cancel(stream)
        if size == data.size and digest.hexdigest() == (data.sha256 or digest.hexdigest()):
            return
        if offset == 0:
            partial.unlink(missing_ok=True)
            raise IntegrityError(
                f"the download of {data.id} does not match what the server announced: got "
                f"{size} bytes with sha256 {digest.hexdigest()}, expected {data.size} bytes "
                f"with sha256 {data.sha256}"
            )
        # The bytes kept from an earlier run were not the item's: start over, once.


def _file_sha256(path: Path, length: int) -> tuple[str, hashlib._Hash]:
    """The SHA-256 of the first `length` bytes of a file, and the hash object to go on with."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        remaining = length
        while remaining and (block := handle.read(min(CHUNK_SIZE, remaining))):
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest(), digest


def _get(client: Client, data_id: str) -> pb.Data:
    """GetData, retried while the server or its backends are away (reads are safe to retry)."""
    request = pb.GetDataRequest(id=data_id)
    return client.with_retries(lambda: client.call(client._stub.GetData, request).data)


def _download(
    client: Client,
    data_id: str,
    target: Path,
    opening: Callable[[int], Iterable[Any]] | None = None,
) -> Path:
    """DownloadData (or the stream `opening` starts from a byte offset: DownloadDatasetItem)
    into `target` through a temporary file beside it, checked against the Data of the stream's
    first message before it is renamed into place. A stream that breaks (UNAVAILABLE: the
    server or its bucket away) is resumed from the bytes kept."""
    download = _Download(client, data_id, target, opening)
    try:
        client.with_retries(download.attempt)
        return download.finish()
    finally:
        download.discard()


class _Download:
    """One download's state across the attempts that resume it."""

    def __init__(
        self,
        client: Client,
        data_id: str,
        target: Path,
        opening: Callable[[int], Iterable[Any]] | None = None,
    ) -> None:
        self._client = client
        self._data_id = data_id
        self._opening = opening
        self.target = target
        self._expected: pb.Data | None = None
        self._partial: Path | None = None
        self._handle: BinaryIO | None = None
        self._digest = hashlib.sha256()
        self._size = 0

    def attempt(self) -> None:
        client = self._client
        stream: Any
        if self._opening is not None:
            stream = self._opening(self._size)
        else:
            request = pb.DownloadDataRequest(id=self._data_id, read_offset=self._size)
            stream = client.call(client._stub.DownloadData, request)
        try:
            messages = iter(stream)
            first = next(messages, None)
            if first is None or not first.HasField("data"):
                raise IntegrityError(f"the download of {self._data_id} did not start with the item")
            handle = self._open(first.data)
            for message in messages:
                self._digest.update(message.chunk)
                self._size += len(message.chunk)
                handle.write(message.chunk)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            _cancel(stream)  # a no-op when complete; frees the stream when we stopped early

    def _open(self, announced: pb.Data) -> BinaryIO:
        if self._expected is None:
            self._expected = announced
            if self.target.is_dir():
                self.target = self.target / _local_name(announced)
            name = f".{self.target.name}.{uuid.uuid4().hex[:8]}.part"
            self._partial = self.target.with_name(name)
            self._handle = self._partial.open("wb")
        elif (announced.size, announced.sha256) != (self._expected.size, self._expected.sha256):
            raise IntegrityError(
                f"the content of {self._data_id} changed while it was downloaded: download again"
            )
        assert self._handle is not None
        return self._handle

    def finish(self) -> Path:
        assert self._expected is not None
        assert self._handle is not None
        assert self._partial is not None
        self._handle.close()
        expected, digest = self._expected, self._digest.hexdigest()
        # An empty sha256: an object registered in place, never read whole by the server.
        if self._size != expected.size or digest != (expected.sha256 or digest):
            raise IntegrityError(
                f"the download of {self._data_id} does not match what the server announced: "
                f"got {self._size} bytes with sha256 {digest}, expected "
                f"{expected.size} bytes with sha256 {expected.sha256}"
            )
        self._partial.replace(self.target)
        return self.target

    def discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)


def _cancel(call: grpc.RpcContext) -> None:
    # grpc-stubs leaves RpcContext.cancel untyped; CallFuture and stream iterators inherit it.
    call.cancel()  # type: ignore[no-untyped-call]


def _local_name(data: pb.Data) -> str:
    # The filename is a label from whoever uploaded it: keep only its last part, and never
    # let it name the directory itself or its parent.
    name = Path(data.filename.replace("\\", "/")).name
    return name if name not in ("", ".", "..") else data.id


def _chunks(path: Path, offset: int, report: Callable[[int, int], None] | None) -> Iterator[bytes]:
    """The file from `offset`, read as it is sent; `report(start, end)` after each chunk."""
    with path.open("rb") as handle:
        handle.seek(offset)
        position = offset
        if report is not None:
            report(offset, offset)  # where this run starts: bytes before it are not its own
        while chunk := handle.read(CHUNK_SIZE):
            yield chunk
            if report is not None:
                report(position, position + len(chunk))
            position += len(chunk)


def _upload_requests(
    path: Path, header: pb.UploadDataHeader, report: Callable[[int, int], None] | None
) -> Iterator[pb.UploadDataRequest]:
    yield pb.UploadDataRequest(header=header)
    for chunk in _chunks(path, 0, report):
        yield pb.UploadDataRequest(chunk=chunk)


def _write_requests(
    path: Path, upload_id: str, offset: int, report: Callable[[int, int], None] | None
) -> Iterator[pb.WriteUploadRequest]:
    first = True
    position = offset
    for chunk in _chunks(path, offset, report):
        yield pb.WriteUploadRequest(
            upload_id=upload_id if first else "", write_offset=position, data=chunk
        )
        first = False
        position += len(chunk)
    yield pb.WriteUploadRequest(
        upload_id=upload_id if first else "", write_offset=position, finish_write=True
    )
