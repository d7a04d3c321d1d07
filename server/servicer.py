"""DatalakeService: translates between protobuf and the datalake, and does nothing else."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from metalake import metadata as md
from metalake.server.auth import current_caller
from metalake.server.catalog import DataRecord
from metalake.server.datalake import Datalake
from metalake.server.errors import (
    ConflictError,
    DatalakeError,
    DataLossError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    ResourceExhaustedError,
    UnavailableError,
    invalid_field,
)
from metalake.server.importing import HEADER_BYTES, BucketAccessError
from metalake.server.ingest import UploadHeader
from metalake.server.multiplex import FileChunk, FileEnd, FileStart, StreamEvent, upload_stream
from metalake.server.observability import (
    BYTES_RECEIVED,
    BYTES_SENT,
    REQUEST_ID_KEY,
    current_request_id,
)
from metalake.server.resumable import UploadWrite
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Handler = Callable[[Any, _Request, Context], Awaitable[_Response]]


_CODES = {
    InvalidArgumentError: code_pb2.INVALID_ARGUMENT,
    NotFoundError: code_pb2.NOT_FOUND,
    ConflictError: code_pb2.ABORTED,
    DataLossError: code_pb2.DATA_LOSS,
    OutOfRangeError: code_pb2.OUT_OF_RANGE,
    ResourceExhaustedError: code_pb2.RESOURCE_EXHAUSTED,
    UnavailableError: code_pb2.UNAVAILABLE,
    BucketAccessError: code_pb2.FAILED_PRECONDITION,
}


def _status_of(error: DatalakeError) -> grpc.Status:
    code = _CODES.get(type(error), code_pb2.INTERNAL)
    status = status_pb2.Status(code=code, message=str(error))
    if isinstance(error, InvalidArgumentError | DataLossError) and error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        status.details.append(detail)
    if isinstance(error, ResourceExhaustedError) and error.retry_after is not None:
        # RetryInfo marks the limit as temporary: clients retry after the delay.
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromTimedelta(timedelta(seconds=error.retry_after))
        detail = any_pb2.Any()
        detail.Pack(retry)
        status.details.append(detail)
    return rpc_status.to_status(status)


async def _abort(context: Context, status: grpc.Status) -> None:
    # Aborting replaces the trailing metadata: keep the request id in it.
    status = _Status(
        status.code,
        status.details,
        (*status.trailing_metadata, (REQUEST_ID_KEY, current_request_id())),
    )
    # grpc-stubs lags grpcio here: aio contexts have had abort_with_status since 1.33.
    await context.abort_with_status(status)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _unexpected_status() -> grpc.Status:
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see the server log")
    )


def _translating_errors(handler: _Handler[_Request, _Response]) -> _Handler[_Request, _Response]:
    """Map domain errors to gRPC statuses; log anything unexpected without leaking it."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: _Request, context: Context) -> _Response:
        try:
            return await handler(self, request, context)
        except DatalakeError as error:
            status = _status_of(error)
        except Exception:
            log.exception("%s failed", handler.__name__)
            status = _unexpected_status()
        await _abort(context, status)
        raise AssertionError("abort_with_status returns only by raising")

    return wrapper


class DatalakeServicer(pb_grpc.DatalakeServiceServicer):
    def __init__(self, datalake: Datalake) -> None:
        self._datalake = datalake

    @_translating_errors
    async def UploadData(
        self,
        request_iterator: AsyncIterator[pb.UploadDataRequest],
        context: Context,
    ) -> pb.UploadDataResponse:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise invalid_field("header", "the first message of the stream must carry the header")
        header = _upload_header(first.header)
        record = await self._datalake.upload(_org(), header, _chunks(request_iterator))
        return pb.UploadDataResponse(data=data_to_proto(record))

    @_translating_errors
    async def GetData(self, request: pb.GetDataRequest, context: Context) -> pb.GetDataResponse:
        return pb.GetDataResponse(data=data_to_proto(await self._datalake.get(_org(), request.id)))

    @_translating_errors
    async def ListData(self, request: pb.ListDataRequest, context: Context) -> pb.ListDataResponse:
        page = await self._datalake.list(
            _org(),
            filter=request.filter,
            order_by=request.order_by,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListDataResponse(
            data=[data_to_proto(r) for r in page.records], next_page_token=page.next_page_token
        )

    @_translating_errors
    async def UpdateMetadata(
        self, request: pb.UpdateMetadataRequest, context: Context
    ) -> pb.UpdateMetadataResponse:
        values, violations = md.from_proto(request.metadata)
        if violations:
            raise InvalidArgumentError("metadata is invalid", violations)
        record = await self._datalake.update_metadata(
            _org(),
            request.id,
            values,
            list(request.update_mask.paths),
            etag=request.etag,
            labels=dict(request.labels),
        )
        return pb.UpdateMetadataResponse(data=data_to_proto(record))

    @_translating_errors
    async def DeleteData(
        self, request: pb.DeleteDataRequest, context: Context
    ) -> pb.DeleteDataResponse:
        await self._datalake.delete(_org(), request.id, etag=request.etag)
        return pb.DeleteDataResponse()

    async def DownloadData(
        self, request: pb.DownloadDataRequest, context: Context
    ) -> AsyncIterator[pb.DownloadDataResponse]:
        try:
            download = await self._datalake.download(_org(), request.id, offset=request.read_offset)
        except DatalakeError as error:
            await _abort(context, _status_of(error))
            return
        yield pb.DownloadDataResponse(data=data_to_proto(download.record))
        try:
            async for chunk in download.chunks:
                BYTES_SENT.inc(len(chunk))
                yield pb.DownloadDataResponse(chunk=chunk)
        except FileNotFoundError:
            log.error("blob %s of %s is missing", download.record.blob_key, download.record.id)
            await _abort(context, _unexpected_status())

    @_translating_errors
    async def ExtractMetadata(
        self,
        request_iterator: AsyncIterator[pb.ExtractMetadataRequest],
        context: Context,
    ) -> pb.ExtractMetadataResponse:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise invalid_field("header", "the first message of the stream must carry the header")
        filled = await self._datalake.extract(first.header.filename, _chunks(request_iterator))
        return pb.ExtractMetadataResponse(
            metadata=md.to_proto(filled.metadata), metadata_sources=filled.sources
        )

    @_translating_errors
    async def StartUpload(
        self, request: pb.StartUploadRequest, context: Context
    ) -> pb.StartUploadResponse:
        header = _upload_header(request.header)
        upload = await self._datalake.start_upload(_org(), header, request.upload_id)
        return pb.StartUploadResponse(
            upload_id=upload.id,
            committed_size=upload.committed_size,
            expire_time=_timestamp(upload.expires_at),
        )

    @_translating_errors
    async def WriteUpload(
        self, request_iterator: AsyncIterator[pb.WriteUploadRequest], context: Context
    ) -> pb.WriteUploadResponse:
        first = await anext(request_iterator, None)
        if first is None or not first.upload_id:
            raise invalid_field("upload_id", "the first message must name the upload")
        committed, record = await self._datalake.write_upload(
            _org(), first.upload_id, _writes(first, request_iterator)
        )
        return pb.WriteUploadResponse(
            committed_size=committed, data=data_to_proto(record) if record else None
        )

    @_translating_errors
    async def QueryUpload(
        self, request: pb.QueryUploadRequest, context: Context
    ) -> pb.QueryUploadResponse:
        upload, record = await self._datalake.query_upload(_org(), request.upload_id)
        return pb.QueryUploadResponse(
            committed_size=upload.committed_size,
            complete=record is not None,
            data=data_to_proto(record) if record else None,
            expire_time=_timestamp(upload.expires_at),
        )

    async def UploadDataStream(
        self, request_iterator: AsyncIterator[pb.UploadDataStreamRequest], context: Context
    ) -> AsyncIterator[pb.UploadDataStreamResponse]:
        org = _org()
        outcomes = upload_stream(
            functools.partial(self._datalake.upload, org),
            _stream_events(request_iterator),
            window=STREAM_WINDOW,
        )
        index = 0
        try:
            async for outcome in outcomes:
                if isinstance(outcome, DatalakeError):
                    yield pb.UploadDataStreamResponse(file_index=index, error=_file_error(outcome))
                else:
                    yield pb.UploadDataStreamResponse(file_index=index, data=data_to_proto(outcome))
                index += 1
        except DatalakeError as error:
            await _abort(context, _status_of(error))

    async def WatchData(
        self, request: pb.WatchDataRequest, context: Context
    ) -> AsyncIterator[pb.WatchDataResponse]:
        events = self._datalake.watch(
            _org(), filter=request.filter, resume_token=request.resume_token
        )
        try:
            async for event, token in events:
                yield pb.WatchDataResponse(
                    type=int(event.type),  # type: ignore[arg-type]
                    data_id=event.record.id,
                    data=data_to_proto(event.record),
                    resume_token=token,
                    event_time=_timestamp(event.time),
                )
        except DatalakeError as error:
            await _abort(context, _status_of(error))

    @_translating_errors
    async def ImportObjects(
        self, request: pb.ImportObjectsRequest, context: Context
    ) -> pb.ImportObjectsResponse:
        report = await self._datalake.import_objects(
            _org(),
            request.source,
            extensions=list(request.extensions),
            fill_metadata=request.fill_metadata,
        )
        return pb.ImportObjectsResponse(
            listed=report.listed,
            added=report.added,
            updated=report.updated,
            unchanged=report.unchanged,
            vanished=report.vanished,
            bytes_read=report.bytes_read,
            header_bytes_limit=HEADER_BYTES,
            failures=[pb.FieldViolation(field=f, description=d) for f, d in report.failures],
        )


# Files of one UploadDataStream in flight at once: enough to overlap receiving with committing.
STREAM_WINDOW = 32


async def _stream_events(
    request_iterator: AsyncIterator[pb.UploadDataStreamRequest],
) -> AsyncIterator[StreamEvent]:
    async for message in request_iterator:
        kind = message.WhichOneof("content")
        if kind == "header":
            try:
                yield FileStart(_upload_header(message.header))
            except DatalakeError as error:
                yield FileStart(error)
        elif kind == "chunk":
            BYTES_RECEIVED.inc(len(message.chunk))
            yield FileChunk(message.chunk)
        elif kind == "finish":
            yield FileEnd()


def _file_error(error: DatalakeError) -> pb.FileError:
    status = _status_of(error)
    violations = getattr(error, "violations", [])
    return pb.FileError(
        code=status.code.value[0],
        message=str(error),
        field_violations=[
            pb.FieldViolation(field=v.field, description=v.description) for v in violations
        ],
    )


def _org() -> str:
    """The calling organization, as the auth interceptor established it."""
    return current_caller().org


async def _writes(
    first: pb.WriteUploadRequest, rest: AsyncIterator[pb.WriteUploadRequest]
) -> AsyncIterator[UploadWrite]:
    BYTES_RECEIVED.inc(len(first.data))
    yield UploadWrite(first.write_offset, first.data, first.finish_write)
    async for message in rest:
        BYTES_RECEIVED.inc(len(message.data))
        if message.upload_id and message.upload_id != first.upload_id:
            raise invalid_field("upload_id", "must not change within a stream")
        yield UploadWrite(message.write_offset, message.data, message.finish_write)


def _timestamp(value: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp


async def _chunks(
    request_iterator: AsyncIterator[pb.UploadDataRequest]
    | AsyncIterator[pb.ExtractMetadataRequest],
) -> AsyncIterator[bytes]:
    async for message in request_iterator:
        if message.HasField("header"):
            raise invalid_field("header", "sent twice: only the first message carries it")
        BYTES_RECEIVED.inc(len(message.chunk))
        yield message.chunk


def _upload_header(message: pb.UploadDataHeader) -> UploadHeader:
    values, violations = md.from_proto(message.metadata)
    header = UploadHeader(
        filename=message.filename,
        metadata=values,
        fill_metadata=message.fill_metadata,
        tags=tuple(message.tags),
        content_type=message.content_type,
        request_id=message.request_id,
        expected_sha256=message.expected_sha256,
        labels=dict(message.labels),
    )
    if violations:
        violations = [md.FieldViolation("header." + v.field, v.description) for v in violations]
        # Report the header's other problems in the same answer.
        violations += [v for v in header.violations() if not v.field.startswith("header.metadata")]
        raise InvalidArgumentError("the upload header is invalid", violations)
    return header


def data_to_proto(record: DataRecord) -> pb.Data:
    return pb.Data(
        id=record.id,
        filename=record.filename,
        size=record.size,
        sha256=record.sha256,
        content_type=record.content_type,
        metadata=md.to_proto(record.metadata),
        metadata_sources=record.metadata_sources,
        tags=record.tags,
        created_at=_timestamp(record.created_at),
        updated_at=_timestamp(record.updated_at),
        etag=record.etag,
        labels=record.labels,
    )
