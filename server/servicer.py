"""DatalakeService: translates between protobuf and the datalake, and does nothing else."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import grpc
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2

from metalake import metadata as md
from metalake.server import thumbnails
from metalake.server.auth import current_caller
from metalake.server.calls import abort, status
from metalake.server.catalog import DataRecord, EventType
from metalake.server.datalake import DatalakeCore, Download
from metalake.server.datasets import Datasets, DatasetVersion, DiffEntry
from metalake.server.errors import (
    ContentMismatch,
    EtagMismatch,
    InvalidRequest,
    LimitReached,
    NotFound,
    OffsetOutOfRange,
    Refusal,
    Unavailable,
    invalid_field,
)
from metalake.server.faults import backend_fault
from metalake.server.importing import HEADER_BYTES, BucketAccessError
from metalake.server.ingest import UploadHeader
from metalake.server.multiplex import FileChunk, FileEnd, FileStart, StreamEvent, upload_stream
from metalake.server.observability import BYTES_RECEIVED, BYTES_SENT
from metalake.server.similarity import Similarity
from metalake.server.staging import UploadWrite
from metalake.server.webhooks import Delivery, Webhook, Webhooks
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Handler = Callable[[Any, _Request, Context], Awaitable[_Response]]
_StreamHandler = Callable[[Any, _Request, Context], AsyncIterator[_Response]]


_CODES = {
    InvalidRequest: code_pb2.INVALID_ARGUMENT,
    NotFound: code_pb2.NOT_FOUND,
    EtagMismatch: code_pb2.ABORTED,
    ContentMismatch: code_pb2.DATA_LOSS,
    OffsetOutOfRange: code_pb2.OUT_OF_RANGE,
    LimitReached: code_pb2.RESOURCE_EXHAUSTED,
    Unavailable: code_pb2.UNAVAILABLE,
    BucketAccessError: code_pb2.FAILED_PRECONDITION,
}


def code_of(error: Refusal) -> int:
    """The google.rpc.Code of a domain error (the HTTP face maps the same codes)."""
    code: int = _CODES.get(type(error), code_pb2.INTERNAL)
    return code


def _status_of(error: Refusal) -> grpc.Status:
    code = code_of(error)
    violations = error.violations if isinstance(error, InvalidRequest | ContentMismatch) else []
    # RetryInfo marks a refusal as temporary: clients retry after the delay.
    retry_after = error.retry_after if isinstance(error, LimitReached | Unavailable) else None
    return status(code, str(error), violations=violations, retry_after=retry_after)


def _unexpected_status() -> grpc.Status:
    return status(grpc.StatusCode.INTERNAL, "internal error; see the server log")


def _domain_error(error: Exception, method: str) -> Refusal | None:
    """The domain error to answer with: `error` itself, or the backend fault it stands for."""
    if isinstance(error, Refusal):
        return error
    fault = backend_fault(error)
    if fault is not None:
        # The driver's own words (hosts, SQL) are for the operator, not the client.
        log.warning("%s: %s (%s: %s)", method, fault, type(error).__name__, error)
    return fault


def _answer(error: Exception, method: str) -> grpc.Status:
    """The status a failed call ends with; anything unexpected is logged, not leaked."""
    domain = _domain_error(error, method)
    if domain is not None:
        return _status_of(domain)
    log.error("%s failed", method, exc_info=error)
    return _unexpected_status()


def _translating_errors(handler: _Handler[_Request, _Response]) -> _Handler[_Request, _Response]:
    """Map domain errors and backend faults to gRPC statuses (unary responses)."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: _Request, context: Context) -> _Response:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise  # the call was already ended with its status
        except Exception as error:
            answer = _answer(error, handler.__name__)
        await abort(context, answer)

    return wrapper


def _translating_stream_errors(
    handler: _StreamHandler[_Request, _Response],
) -> _StreamHandler[_Request, _Response]:
    """The same for methods answering a stream: the stream ends with the status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: _Request, context: Context) -> AsyncIterator[_Response]:
        try:
            async for response in handler(self, request, context):
                yield response
            return
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            answer = _answer(error, handler.__name__)
        await abort(context, answer)

    return wrapper


class DatalakeServicer(pb_grpc.DatalakeServiceServicer):
    def __init__(
        self,
        datalake: DatalakeCore,
        datasets: Datasets,
        similarity: Similarity,
        webhooks: Webhooks,
    ) -> None:
        self._datalake = datalake
        self._ingest = datalake.ingest
        self._datasets = datasets
        self._similarity = similarity
        self._webhooks = webhooks

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
        record = await self._ingest.upload(_org(), header, _chunks(request_iterator))
        response = pb.UploadDataResponse()
        fill_data(response.data, record)
        return response

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
        response = pb.ListDataResponse(next_page_token=page.next_page_token)
        _fill_list(response.data, page.records)
        return response

    @_translating_errors
    async def UpdateMetadata(
        self, request: pb.UpdateMetadataRequest, context: Context
    ) -> pb.UpdateMetadataResponse:
        values, violations = md.from_proto(request.metadata)
        if violations:
            raise InvalidRequest("metadata is invalid", violations)
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

    @_translating_stream_errors
    async def DownloadData(
        self, request: pb.DownloadDataRequest, context: Context
    ) -> AsyncIterator[pb.DownloadDataResponse]:
        download = await self._datalake.download(_org(), request.id, offset=request.read_offset)
        yield pb.DownloadDataResponse(data=data_to_proto(download.record))
        try:
            async for chunk in download.chunks:
                BYTES_SENT.inc(len(chunk))
                yield pb.DownloadDataResponse(chunk=chunk)
        except FileNotFoundError:
            log.error("blob %s of %s is missing", download.record.blob_key, download.record.id)
            await abort(context, _unexpected_status())

    @_translating_errors
    async def ExtractMetadata(
        self,
        request_iterator: AsyncIterator[pb.ExtractMetadataRequest],
        context: Context,
    ) -> pb.ExtractMetadataResponse:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise invalid_field("header", "the first message of the stream must carry the header")
        filled = await self._ingest.extract(first.header.filename, _chunks(request_iterator))
        return pb.ExtractMetadataResponse(
            metadata=md.to_proto(filled.metadata), metadata_sources=filled.sources
        )

    @_translating_errors
    async def StartUpload(
        self, request: pb.StartUploadRequest, context: Context
    ) -> pb.StartUploadResponse:
        header = _upload_header(request.header)
        upload = await self._ingest.start_upload(_org(), header, request.upload_id)
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
        committed, record = await self._ingest.write_upload(
            _org(), first.upload_id, _writes(first, request_iterator)
        )
        return pb.WriteUploadResponse(
            committed_size=committed, data=data_to_proto(record) if record else None
        )

    @_translating_errors
    async def QueryUpload(
        self, request: pb.QueryUploadRequest, context: Context
    ) -> pb.QueryUploadResponse:
        upload, record = await self._ingest.query_upload(_org(), request.upload_id)
        return pb.QueryUploadResponse(
            committed_size=upload.committed_size,
            complete=record is not None,
            data=data_to_proto(record) if record else None,
            expire_time=_timestamp(upload.expires_at),
        )

    @_translating_stream_errors
    async def UploadDataStream(
        self, request_iterator: AsyncIterator[pb.UploadDataStreamRequest], context: Context
    ) -> AsyncIterator[pb.UploadDataStreamResponse]:
        org = _org()

        async def upload(header: UploadHeader, chunks: AsyncIterator[bytes]) -> DataRecord:
            # A backend fault fails this file only (a FileError), like any refusal.
            try:
                return await self._ingest.upload(org, header, chunks)
            except Exception as error:
                domain = _domain_error(error, "UploadDataStream")
                if domain is None or domain is error:
                    raise
                raise domain from error

        outcomes = upload_stream(upload, _stream_events(request_iterator), window=STREAM_WINDOW)
        index = 0
        async for outcome in outcomes:
            if isinstance(outcome, Refusal):
                yield pb.UploadDataStreamResponse(file_index=index, error=_file_error(outcome))
            else:
                response = pb.UploadDataStreamResponse(file_index=index)
                fill_data(response.data, outcome)
                yield response
            index += 1

    @_translating_stream_errors
    async def WatchData(
        self, request: pb.WatchDataRequest, context: Context
    ) -> AsyncIterator[pb.WatchDataResponse]:
        events = self._datalake.watch(
            _org(), filter=request.filter, resume_token=request.resume_token
        )
        async for event, token in events:
            yield pb.WatchDataResponse(
                type=int(event.type),  # type: ignore[arg-type]
                data_id=event.record.id,
                data=data_to_proto(event.record),
                resume_token=token,
                event_time=_timestamp(event.time),
            )

    # Dataset snapshots.

    @_translating_errors
    async def CreateDataset(
        self, request: pb.CreateDatasetRequest, context: Context
    ) -> pb.CreateDatasetResponse:
        created = await self._datasets.create(
            _org(), request.name, request.filter, request.description
        )
        return pb.CreateDatasetResponse(dataset=_dataset_to_proto(created))

    @_translating_errors
    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        found, token = await self._datasets.versions(
            _org(), name=request.name, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListDatasetsResponse(
            datasets=[_dataset_to_proto(d) for d in found], next_page_token=token
        )

    @_translating_errors
    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: Context
    ) -> pb.GetDatasetResponse:
        found = await self._datasets.get(_org(), request.name, request.version)
        return pb.GetDatasetResponse(dataset=_dataset_to_proto(found))

    @_translating_errors
    async def ListDatasetItems(
        self, request: pb.ListDatasetItemsRequest, context: Context
    ) -> pb.ListDatasetItemsResponse:
        dataset, records, token = await self._datasets.items(
            _org(),
            request.name,
            request.version,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        response = pb.ListDatasetItemsResponse(next_page_token=token, version=dataset.version)
        _fill_list(response.data, records)
        return response

    @_translating_errors
    async def DiffDatasets(
        self, request: pb.DiffDatasetsRequest, context: Context
    ) -> pb.DiffDatasetsResponse:
        entries, token = await self._datasets.diff(
            _org(),
            request.name,
            request.from_version,
            request.to_version,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.DiffDatasetsResponse(
            entries=[_diff_to_proto(e) for e in entries], next_page_token=token
        )

    @_translating_stream_errors
    async def DownloadDatasetItem(
        self, request: pb.DownloadDatasetItemRequest, context: Context
    ) -> AsyncIterator[pb.DownloadDatasetItemResponse]:
        download = await self._datasets.download(
            _org(), request.name, request.version, request.data_id, offset=request.read_offset
        )
        async for message in _stream_download(download, context):
            yield pb.DownloadDatasetItemResponse(**message)

    @_translating_errors
    async def FindSimilar(
        self, request: pb.FindSimilarRequest, context: Context
    ) -> pb.FindSimilarResponse:
        found, token = await self._similarity.find(
            _org(),
            data_id=request.id,
            image=request.image,
            max_distance=request.max_distance if request.HasField("max_distance") else None,
            filter=request.filter,
            include_mirrored=not request.exclude_mirrored,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.FindSimilarResponse(
            results=[
                pb.SimilarData(
                    data=data_to_proto(s.record), distance=s.distance, mirrored=s.mirrored
                )
                for s in found
            ],
            next_page_token=token,
        )

    # Webhooks.

    @_translating_errors
    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, context: Context
    ) -> pb.CreateWebhookResponse:
        types = []
        for value in request.event_types:
            try:
                types.append(EventType(value))
            except ValueError:
                raise invalid_field("event_types", f"{value} is not an event type") from None
        created = await self._webhooks.create(_org(), request.url, types, request.filter)
        return pb.CreateWebhookResponse(
            webhook=_webhook_to_proto(created.webhook), secret=created.secret
        )

    @_translating_errors
    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, context: Context
    ) -> pb.ListWebhooksResponse:
        found = await self._webhooks.registered(_org())
        return pb.ListWebhooksResponse(webhooks=[_webhook_to_proto(w) for w in found])

    @_translating_errors
    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, context: Context
    ) -> pb.DeleteWebhookResponse:
        await self._webhooks.delete(_org(), request.id)
        return pb.DeleteWebhookResponse()

    @_translating_errors
    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Context
    ) -> pb.ListWebhookDeliveriesResponse:
        found, token = await self._webhooks.deliveries(
            _org(), request.webhook_id, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListWebhookDeliveriesResponse(
            deliveries=[_delivery_to_proto(d) for d in found], next_page_token=token
        )

    @_translating_errors
    async def TestWebhook(
        self, request: pb.TestWebhookRequest, context: Context
    ) -> pb.TestWebhookResponse:
        delivery = await self._webhooks.test(_org(), request.id)
        return pb.TestWebhookResponse(delivery=_delivery_to_proto(delivery))

    @_translating_errors
    async def GetThumbnail(
        self, request: pb.GetThumbnailRequest, context: Context
    ) -> pb.GetThumbnailResponse:
        preview = await self._datalake.thumbnail(
            _org(), request.id, request.size or thumbnails.DEFAULT_SIZE
        )
        content = b"".join([chunk async for chunk in preview.chunks])
        BYTES_SENT.inc(len(content))
        return pb.GetThumbnailResponse(
            content=content,
            content_type=thumbnails.CONTENT_TYPE,
            width=preview.record.width,
            height=preview.record.height,
            sha256=preview.record.blob_key or "",
        )

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


def _webhook_to_proto(webhook: Webhook) -> pb.Webhook:
    return pb.Webhook(
        id=webhook.id,
        url=webhook.url,
        event_types=[int(e) for e in webhook.events],  # type: ignore[misc]
        filter=webhook.filter,
        created_at=_timestamp(webhook.created_at),
    )


_DELIVERY_STATUSES = {
    "pending": pb.DELIVERY_STATUS_PENDING,
    "delivered": pb.DELIVERY_STATUS_DELIVERED,
    "failed": pb.DELIVERY_STATUS_FAILED,
}


def _delivery_to_proto(delivery: Delivery) -> pb.WebhookDelivery:
    message = pb.WebhookDelivery(
        id=delivery.id,
        webhook_id=delivery.webhook_id,
        event_type=delivery.event_type,
        data_id=delivery.data_id,
        status=_DELIVERY_STATUSES[delivery.status],
        attempts=delivery.attempts,
        created_at=_timestamp(delivery.created_at),
        error=delivery.error,
    )
    if delivery.next_attempt_at is not None:
        message.next_attempt_at.CopyFrom(_timestamp(delivery.next_attempt_at))
    if delivery.last_attempt_at is not None:
        message.last_attempt_at.CopyFrom(_timestamp(delivery.last_attempt_at))
    if delivery.response_status is not None:
        message.response_status = delivery.response_status
    return message


async def _stream_download(download: Download, context: Context) -> AsyncIterator[dict[str, Any]]:
    """The fields of a download's messages: the item first, then its chunks."""
    yield {"data": data_to_proto(download.record)}
    try:
        async for chunk in download.chunks:
            BYTES_SENT.inc(len(chunk))
            yield {"chunk": chunk}
    except FileNotFoundError:
        log.error("blob %s of %s is missing", download.record.blob_key, download.record.id)
        await abort(context, _unexpected_status())


def _dataset_to_proto(dataset: DatasetVersion) -> pb.DatasetVersion:
    return pb.DatasetVersion(
        name=dataset.name,
        version=dataset.version,
        filter=dataset.filter,
        created_at=_timestamp(dataset.created_at),
        item_count=dataset.item_count,
        total_size=dataset.total_size,
        description=dataset.description,
    )


def _diff_to_proto(entry: DiffEntry) -> pb.DatasetDiffEntry:
    return pb.DatasetDiffEntry(
        change=entry.change,  # type: ignore[arg-type]
        data_id=entry.data_id,
        before=data_to_proto(entry.before) if entry.before else None,
        after=data_to_proto(entry.after) if entry.after else None,
    )


# Files of one UploadDataStream in flight at once: enough to overlap receiving with committing.
STREAM_WINDOW = 32


async def _stream_events(
    request_iterator: AsyncIterator[pb.UploadDataStreamRequest],
) -> AsyncIterator[StreamEvent]:
    async for message in request_iterator:
        kind = message.WhichOneof("content")
        if kind == "header":
            yield FileStart(_upload_header(message.header))
        elif kind == "chunk":
            chunk = message.chunk  # each read of a bytes field copies it
            BYTES_RECEIVED.inc(len(chunk))
            yield FileChunk(chunk)
        elif kind == "finish":
            yield FileEnd()


def _file_error(error: Refusal) -> pb.FileError:
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
    # Timestamp.FromDatetime is pure Python and cost ~7 us, twice per answered item.
    seconds, nanos = md.epoch_seconds(value)
    return Timestamp(seconds=seconds, nanos=nanos)


def _set_time(target: Timestamp, value: datetime) -> None:
    """`_timestamp` written in place, where a message already holds the field."""
    target.seconds, target.nanos = md.epoch_seconds(value)
    target.SetInParent()  # present even at the epoch itself


async def _chunks(
    request_iterator: AsyncIterator[pb.UploadDataRequest]
    | AsyncIterator[pb.ExtractMetadataRequest],
) -> AsyncIterator[bytes]:
    async for message in request_iterator:
        if message.HasField("header"):
            raise invalid_field("header", "sent twice: only the first message carries it")
        chunk = message.chunk  # each read of a bytes field copies it
        BYTES_RECEIVED.inc(len(chunk))
        yield chunk


def _upload_header(message: pb.UploadDataHeader) -> UploadHeader:
    """The header as the client sent it: the ingest pipeline checks it (check_header)."""
    values, unreadable = md.read_proto(message.metadata)
    return UploadHeader(
        filename=message.filename,
        metadata=values,
        fill_metadata=message.fill_metadata,
        tags=tuple(message.tags),
        content_type=message.content_type,
        request_id=message.request_id,
        expected_sha256=message.expected_sha256,
        labels=dict(message.labels),
        unreadable=tuple(md.FieldViolation("header." + v.field, v.description) for v in unreadable),
    )


def data_to_proto(record: DataRecord) -> pb.Data:
    """The item as the API shows it."""
    message = pb.Data()
    fill_data(message, record)
    return message


def fill_data(message: pb.Data, record: DataRecord) -> None:
    """Write the item into an empty pb.Data where a response holds it (`response.data`, or a
    list's `data.add()`): a message passed to a response's constructor is copied in.

    Field by field, leaving empty lists and maps alone: each one given to pb.Data's constructor,
    even empty, cost more than all its scalar fields together. A page of 1,000 items took 33 ms
    to build that way."""
    message.id = record.id
    message.filename = record.filename
    message.size = record.size
    message.sha256 = record.sha256
    message.content_type = record.content_type
    message.etag = record.etag
    if record.metadata:
        message.metadata.CopyFrom(md.to_proto(record.metadata))
    else:
        message.metadata.SetInParent()
    if record.metadata_sources:
        message.metadata_sources.update(record.metadata_sources)
    if record.tags:
        message.tags.extend(record.tags)
    if record.labels:
        message.labels.update(record.labels)
    _set_time(message.created_at, record.created_at)
    _set_time(message.updated_at, record.updated_at)


def _fill_list(
    field: RepeatedCompositeFieldContainer[pb.Data], records: Iterable[DataRecord]
) -> None:
    """A response's repeated pb.Data field, filled in place (see fill_data)."""
    for record in records:
        fill_data(field.add(), record)
