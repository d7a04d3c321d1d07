"""Blobs in S3-compatible object storage (AWS S3, MinIO, Ceph, GCS's S3 API).

Layout under `s3://bucket/prefix`: `blobs/<sha256>` for committed blobs, `tmp/<uuid>` for
uploads in flight. Bytes go to S3 as a multipart upload while the client is still sending, one
part buffered at a time; the content hash, and so the final key, is known only at the end, so
commit completes the upload under its temporary key and copies it (inside S3) to its final key,
unless identical content is already there. A failed upload aborts its multipart upload.

Configured the way AWS tools are: AWS_ENDPOINT_URL, AWS_REGION (or AWS_DEFAULT_REGION),
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; a plain-HTTP endpoint only with AWS_ALLOW_HTTP=true.

Two clients share those settings, built side by side in `from_url`: obstore (Apache Arrow's
Rust object_store) sends the one-step conditional PUT of each small blob, the per-file hot path,
for about a third of botocore's CPU per request; boto3 does the rest (multipart uploads and
copies, ranged reads that resume, listings, clean-up), whose cost per request is small beside
the bytes or the rarity of the call. Both go to the same endpoint with the same credentials
(obstore's are boto3's, through its credential chain), timeouts and tries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import boto3
import obstore
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from obstore.auth.boto3 import Boto3CredentialProvider
from obstore.exceptions import AlreadyExistsError
from obstore.store import S3Store

from metalake.server.blobstore import (
    create_spool_file,
    discard_leftovers,
    owner_prefix,
    spool_name,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, GetObjectOutputTypeDef
    from obstore.store import ClientConfig, RetryConfig, S3Config, S3Credential

# S3 parts are at least 5 MiB (but the last); 8 MiB keeps a part's upload well above per-request
# overheads while bounding what one upload buffers.
DEFAULT_PART_SIZE = 8 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024
# Commit copies each blob inside S3 to its final key. One CopyObject request is fine up to a
# few hundred MiB; above that boto3's managed copy splits it into parallel UploadPartCopy
# requests (mandatory above 5 GiB, the CopyObject limit).
DEFAULT_COPY_PART_SIZE = 256 * 1024 * 1024
# Each upload holds a connection while a part travels; botocore's default pool (10) would make
# concurrent uploads open and discard connections.
MAX_POOL_CONNECTIONS = 64
# Tries of each S3 request (AWS_MAX_ATTEMPTS overrides), and seconds to connect, and to wait
# for each read of an answer (botocore's default), in both clients.
DEFAULT_MAX_ATTEMPTS = 5
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
# object_store also bounds a whole request (connecting to the end of the answer; its default
# is 30 s) and the time a request may spend in retries (its default, 3 minutes, would hold an
# upload that long on an endpoint answering 5xx).
REQUEST_TIMEOUT = 60.0
RETRY_TIMEOUT = 30.0
# How long obstore keeps credentials it took from boto3's chain before asking again: below the
# 10 minutes of validity botocore keeps at least when it refreshes temporary ones.
CREDENTIALS_TTL = timedelta(minutes=5)
# How many times one download asks again for the rest after its connection to S3 broke.
_READ_RESUMPTIONS = 3
_BROKEN_STREAM = (ResponseStreamingError, ReadTimeoutError, IncompleteReadError)
# A spool-directory file naming a multipart upload this process began and has not finished.
_MULTIPART_MARKER = ".multipart"

log = logging.getLogger(__name__)


class S3ConfigurationError(ValueError):
    """The S3 URL or environment is not usable; the message says what to change."""


class S3BlobStore:
    """The BlobStore protocol on an S3 bucket; spool files (for the extractors) on local disk."""

    def __init__(
        self,
        client: S3Client,
        objects: S3Store,
        bucket: str,
        prefix: str,
        *,
        local_dir: Path | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        copy_part_size: int = DEFAULT_COPY_PART_SIZE,
    ) -> None:
        """`client` and `objects` (obstore's store on `bucket`, no prefix of its own) must
        reach the same bucket with the same credentials: `from_url` builds both."""
        if part_size < MIN_PART_SIZE or copy_part_size < MIN_PART_SIZE:
            raise S3ConfigurationError(f"part sizes must be at least {MIN_PART_SIZE} bytes")
        self.client = client
        self.objects = objects
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self.copy_part_size = copy_part_size
        # Local disk (the server's data directory) still holds the spool, for the extractors,
        # and the markers of multipart uploads in flight.
        if local_dir is None:
            local_dir = Path(tempfile.gettempdir()) / "metalake-s3"
        self._spool = local_dir / "tmp"
        self._spool.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        local_dir: Path | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        environ: Mapping[str, str] | None = None,
    ) -> S3BlobStore:
        """A store on `s3://bucket/prefix`, configured from the AWS_* environment.

        Credentials not in the environment come from boto3's usual chain (profile, instance
        role, ...). Raises S3ConfigurationError for a URL or endpoint it will not use.
        """
        env = os.environ if environ is None else environ
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise S3ConfigurationError(f"{url!r} is not an s3://bucket/prefix URL")
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if endpoint is not None:
            scheme = urlparse(endpoint).scheme
            if scheme not in ("http", "https"):
                raise S3ConfigurationError(
                    f"the S3 endpoint {endpoint!r} must start with https:// (or http://)"
                )
            if scheme == "http" and env.get("AWS_ALLOW_HTTP", "").lower() != "true":
                raise S3ConfigurationError(
                    f"the S3 endpoint {endpoint} is plain HTTP: credentials and data would "
                    "travel unencrypted. Use https, or set AWS_ALLOW_HTTP=true if you mean it."
                )
        # One session: its credentials (from the environment, or boto3's chain) sign both
        # clients' requests.
        session = boto3.session.Session(
            region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=env.get("AWS_SESSION_TOKEN"),
        )
        # A private CA (a self-hosted MinIO's, say) for both: boto3 would read the variable from
        # the process environment by itself, obstore takes the certificates.
        ca_bundle = env.get("AWS_CA_BUNDLE") or None
        client = session.client(
            "s3", endpoint_url=endpoint, config=_client_config(endpoint, env), verify=ca_bundle
        )
        objects = _object_store(
            parsed.netloc, endpoint, session, _max_attempts(env), _certificates(ca_bundle)
        )
        return cls(
            client, objects, parsed.netloc, parsed.path, local_dir=local_dir, part_size=part_size
        )

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def blob_key(self, key: str) -> str:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"invalid blob key {key!r}")
        return self._key("blobs", key)

    async def create_writer(self, *, spool: bool = True) -> S3BlobWriter:
        spool_file = None
        if spool:
            spool_file = await create_spool_file(self._spool / spool_name())
        return S3BlobWriter(self, self._key("tmp", uuid.uuid4().hex), spool_file)

    async def put(self, key: str, data: bytes) -> None:
        """One conditional PUT, straight to the final key: If-None-Match refuses it when the
        content is there already, so no HEAD first. A server that ignores the condition
        overwrites identical bytes, which changes nothing a reader sees. obstore's runtime (Rust
        threads) sends it and completes the awaited future: no worker thread hop per blob."""
        object_key = self.blob_key(key)
        try:
            await obstore.put_async(
                self.objects, object_key, data, mode="create", use_multipart=False
            )
        except AlreadyExistsError:
            # 412: identical content is stored already; 409: another conditional write of this
            # key is in flight, which may yet fail. obstore raises the same error for both (the
            # status is only in its message), so both take a HEAD: wait for no one, and write
            # it unless it is there by now. A deduplicated blob costs that HEAD more than with
            # boto3, which told them apart.
            if not await self._object_exists(object_key):
                await obstore.put_async(self.objects, object_key, data, use_multipart=False)

    def put_deferred(self, key: str, data: bytes) -> Callable[[], None] | None:
        return None  # one PUT per object, concurrent: nothing to gain in another's thread

    def _put_blocking(self, object_key: str, data: bytes) -> None:
        """`put`'s conditional PUT, for a caller already in a worker thread."""
        try:
            obstore.put(self.objects, object_key, data, mode="create", use_multipart=False)
        except AlreadyExistsError:
            if not self._exists(object_key):
                obstore.put(self.objects, object_key, data, use_multipart=False)

    async def _object_exists(self, object_key: str) -> bool:
        try:
            await obstore.head_async(self.objects, object_key)
        except FileNotFoundError:
            return False
        return True

    async def read(self, key: str, *, offset: int = 0, chunk_size: int) -> AsyncIterator[bytes]:
        """Stream with a ranged GetObject, `chunk_size` bytes in memory at a time.

        A download can last as long as its client is slow; if the connection to S3 breaks
        meanwhile, the rest is asked for again from where it broke (blobs are immutable, and
        IfMatch makes sure of it).
        """
        object_key = self.blob_key(key)
        position, etag, resumed = offset, "", 0
        while True:
            try:
                response = await asyncio.to_thread(self._get, object_key, position, etag)
            except ClientError as error:
                if _status(error) == 416:  # at (or past) the end: nothing left to send
                    return
                if _missing(error):
                    raise FileNotFoundError(key) from error
                raise
            etag = response["ETag"]
            body = response["Body"]
            try:
                while chunk := await asyncio.to_thread(body.read, chunk_size):
                    position += len(chunk)
                    yield chunk
                return
            except _BROKEN_STREAM:
                resumed += 1
                if resumed > _READ_RESUMPTIONS:
                    raise
            finally:
                body.close()

    def _get(self, object_key: str, position: int, etag: str) -> GetObjectOutputTypeDef:
        if etag:
            return self.client.get_object(
                Bucket=self.bucket, Key=object_key, Range=f"bytes={position}-", IfMatch=etag
            )
        return self.client.get_object(
            Bucket=self.bucket, Key=object_key, Range=f"bytes={position}-"
        )

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(
            self.client.delete_object, Bucket=self.bucket, Key=self.blob_key(key)
        )

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._exists, self.blob_key(key))

    def _exists(self, object_key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=object_key)
        except ClientError as error:
            if _missing(error):
                return False
            raise
        return True

    def blob_keys(self) -> list[tuple[str, datetime]]:
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key("blobs") + "/"):
            for item in page.get("Contents", []):
                keys.append((item["Key"].rsplit("/", 1)[-1], item["LastModified"]))
        return keys

    def discard_abandoned(self, older_than: datetime) -> int:
        """Blocking: remove what uploads begun before `older_than` left in the bucket (a crashed
        or killed server's); returns how many multipart uploads and objects it removed.

        For `metalake gc`: aborts multipart uploads under `tmp/` (streamed uploads) and
        `blobs/` (resumable uploads sent at commit), and deletes `tmp/` objects (a commit
        interrupted between completing its upload and deleting it). `older_than` must be
        timezone-aware; pass well over the longest upload, e.g. now minus the upload TTL.
        """
        discarded = 0
        uploads = self.client.get_paginator("list_multipart_uploads")
        for area in ("tmp", "blobs"):
            for page in uploads.paginate(Bucket=self.bucket, Prefix=self._key(area) + "/"):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < older_than:
                        with _suppress_missing():
                            self.client.abort_multipart_upload(
                                Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                            )
                        self._forget_markers(upload["Key"])  # if it was ours
                        discarded += 1
        objects = self.client.get_paginator("list_objects_v2")
        for listing in objects.paginate(Bucket=self.bucket, Prefix=self._key("tmp") + "/"):
            for item in listing.get("Contents", []):
                if item["LastModified"] < older_than:
                    self.client.delete_object(Bucket=self.bucket, Key=item["Key"])
                    discarded += 1
        return discarded

    def discard_spooled(self, *, owner: int | None = None) -> int:
        """Blocking, at start-up: remove this server's spool files, and abort the multipart
        uploads its previous process had begun (each left a marker in the spool directory), so
        that a crash does not leave them billed until garbage collection's TTL sweep. With
        `owner`, only those of the process with that pid (a dead worker of a running server).

        With the bucket unreachable their markers stay, for the next start (and the sweep)."""
        aborted, kept = 0, set()
        prefix = "" if owner is None else owner_prefix(owner)
        markers = sorted(self._spool.glob(f"{prefix}*{_MULTIPART_MARKER}"))
        for index, marker in enumerate(markers):
            try:
                self._abort_marked(marker)
                aborted += 1
            except ValueError:
                marker.unlink(missing_ok=True)  # torn by the crash: the TTL sweep covers it
            except Exception as error:
                kept = {m.name for m in markers[index:]}
                log.warning(
                    "could not abort %d multipart upload(s) of a previous run (%s: %s); "
                    "keeping them for the next start and garbage collection",
                    len(kept),
                    type(error).__name__,
                    error,
                )
                break
        return aborted + discard_leftovers(self._spool, keep=kept, owner=owner)

    def _abort_marked(self, marker: Path) -> None:
        try:
            record = json.loads(marker.read_text())
            key, upload_id = record["key"], record["upload_id"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"unreadable marker {marker.name}") from error
        with _suppress_missing():
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        # Completed but not yet copied and deleted when the process died: the object goes too.
        with _suppress_missing():
            self.client.delete_object(Bucket=self.bucket, Key=key)
        marker.unlink(missing_ok=True)

    def _new_marker(self, temporary_key: str) -> Path:
        """Where this process remembers the multipart upload of `temporary_key`: named after
        its pid, like its spool files, so that a dead worker's are told from its siblings'."""
        name = f"{owner_prefix(os.getpid())}{_key_name(temporary_key)}{_MULTIPART_MARKER}"
        return self._spool / name

    def _forget_markers(self, temporary_key: str) -> None:
        """Remove the marker of `temporary_key`'s multipart upload, whichever process wrote it
        (older versions named markers without a pid)."""
        for marker in self._spool.glob(f"*{_key_name(temporary_key)}{_MULTIPART_MARKER}"):
            marker.unlink(missing_ok=True)

    async def store_file(self, path: Path, key: str) -> None:
        """Upload the file; it stays where it is, for the caller to remove."""
        await asyncio.to_thread(self._store_file, path, key)

    def _store_file(self, path: Path, key: str) -> None:
        object_key = self.blob_key(key)
        if self._exists(object_key):
            return
        # Managed upload: multipart above one part, parts in parallel, and it aborts its own
        # multipart upload if it fails (a crash is left to discard_abandoned).
        self.client.upload_file(
            str(path),
            self.bucket,
            object_key,
            Config=TransferConfig(
                multipart_threshold=self.part_size, multipart_chunksize=self.part_size
            ),
        )

    def copy_object(self, source_key: str, target_key: str) -> None:
        """Blocking: copy inside S3; one CopyObject up to a copy part, parallel parts above."""
        size = self.copy_part_size
        self.client.copy(
            {"Bucket": self.bucket, "Key": source_key},
            self.bucket,
            target_key,
            Config=TransferConfig(multipart_threshold=size, multipart_chunksize=size),
        )


class S3BlobWriter:
    """Streams one blob to S3 as a multipart upload, hashing it; spools locally if asked.

    Holds at most one part in memory (plus, while a full part is sent, the copy handed to
    boto3). Every S3 call runs in a worker thread under `_lock`, so an abort that arrives while
    a write is still in its thread (the upload being cancelled) waits for it, then cleans up
    what it started: no multipart upload can be created behind the abort's back.
    """

    def __init__(self, store: S3BlobStore, temporary_key: str, spool: IO[bytes] | None) -> None:
        self._store = store
        self._temporary_key = temporary_key
        self._spool = spool
        self._spool_path = Path(spool.name) if spool is not None else None
        self._hash = hashlib.sha256()
        self._size = 0
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._temporary_object = False  # a completed upload not yet deleted
        self._lock = threading.Lock()
        self._done = False  # committed or aborted: nothing more may reach S3
        self._marker: Path | None = None  # while a multipart upload or its object may be left

    @property
    def size(self) -> int:
        return self._size

    @property
    def buffered(self) -> int:
        """Bytes held in memory for the next part: always less than a part between writes."""
        return len(self._buffer)

    @property
    def spool_path(self) -> Path | None:
        return self._spool_path

    def sha256(self) -> str:
        return self._hash.hexdigest()

    async def write(self, chunk: bytes) -> None:
        await asyncio.to_thread(self._write, chunk)

    def _write(self, chunk: bytes) -> None:
        with self._lock:
            self._check_open()
            self._hash.update(chunk)
            if self._spool is not None:
                self._spool.write(chunk)
            self._size += len(chunk)
            # Fill the buffer only up to a part, so a chunk larger than a part never sits
            # whole in it; memoryview slices copy nothing.
            view = memoryview(chunk)
            part_size = self._store.part_size
            while view:
                room = part_size - len(self._buffer)
                self._buffer += view[:room]
                view = view[room:]
                if len(self._buffer) == part_size:
                    self._upload_part(bytes(self._buffer))
                    self._buffer = bytearray()

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("this blob writer was already committed or aborted")

    def _upload_part(self, data: bytes) -> None:
        client, bucket = self._store.client, self._store.bucket
        if self._upload_id is None:
            created = client.create_multipart_upload(Bucket=bucket, Key=self._temporary_key)
            self._upload_id = created["UploadId"]
            # Remembered on local disk until aborted or completed: if this process dies, the
            # next one aborts it at start-up (S3 keeps unfinished uploads, and bills them).
            self._marker = self._store._new_marker(self._temporary_key)
            self._marker.write_text(
                json.dumps({"key": self._temporary_key, "upload_id": self._upload_id})
            )
        number = len(self._parts) + 1
        uploaded = client.upload_part(
            Bucket=bucket,
            Key=self._temporary_key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
        )
        self._parts.append({"PartNumber": number, "ETag": uploaded["ETag"]})

    async def flush(self) -> None:
        if self._spool is not None:
            await asyncio.to_thread(self._flush_spool)

    def _flush_spool(self) -> None:
        with self._lock:
            if self._spool is not None:
                self._spool.flush()

    async def commit(self, key: str) -> None:
        await asyncio.to_thread(self._commit, key)

    def _commit(self, key: str) -> None:
        with self._lock:
            self._check_open()
            store, client, bucket = self._store, self._store.client, self._store.bucket
            final = store.blob_key(key)
            if self._upload_id is None:
                # Smaller than a part: one conditional PUT, straight to its final key (atomic in
                # S3), as `put` sends.
                store._put_blocking(final, bytes(self._buffer))
            elif store._exists(final):
                # Identical content is stored already: drop this copy without completing it.
                self._abort_upload()
            else:
                if self._buffer:
                    self._upload_part(bytes(self._buffer))
                client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self._temporary_key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
                self._upload_id = None  # completed: an object to delete, no upload to abort
                self._temporary_object = True
                store.copy_object(self._temporary_key, final)
                self._delete_temporary_object()
            self._buffer = bytearray()
            self._done = True
            self._close_spool()
            self._forget_marker()

    async def abort(self) -> None:
        if self._done:
            return
        # Shielded: abort runs while the upload is being cancelled, and must still reach S3
        # (the thread runs to the end even if this await is cancelled again).
        await asyncio.shield(asyncio.to_thread(self._abort))

    def _abort(self) -> None:
        # The lock waits for a write or commit still running in its thread.
        with self._lock:
            if self._done:
                return
            self._done = True
            self._buffer = bytearray()
            self._close_spool()
            self._abort_upload()
            self._delete_temporary_object()
            self._forget_marker()

    def _forget_marker(self) -> None:
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)
            self._marker = None

    def _abort_upload(self) -> None:
        if self._upload_id is not None:
            with _suppress_missing():
                self._store.client.abort_multipart_upload(
                    Bucket=self._store.bucket, Key=self._temporary_key, UploadId=self._upload_id
                )
            self._upload_id = None

    def _delete_temporary_object(self) -> None:
        if self._temporary_object:
            self._store.client.delete_object(Bucket=self._store.bucket, Key=self._temporary_key)
            self._temporary_object = False

    def _close_spool(self) -> None:
        if self._spool is not None:
            # Closing flushes, which fails again after a spool write failed for want of space.
            with contextlib.suppress(OSError):
                self._spool.close()
            self._spool = None
        if self._spool_path is not None:
            self._spool_path.unlink(missing_ok=True)


def _key_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _client_config(endpoint: str | None, env: Mapping[str, str]) -> Config:
    """botocore settings for AWS itself, or for another S3-compatible server at `endpoint`."""
    # botocore retries what fails transiently (AWS_MAX_ATTEMPTS tries in all: its own
    # `max_attempts` would count retries); past them the client is told UNAVAILABLE and retries
    # the call. Connecting gets CONNECT_TIMEOUT seconds: botocore's 60 would hold an upload a
    # minute per try on an endpoint that went away.
    retries: Any = {"total_max_attempts": _max_attempts(env), "mode": "standard"}
    if endpoint is None:
        return Config(
            retries=retries,
            max_pool_connections=MAX_POOL_CONNECTIONS,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        )
    return Config(
        retries=retries,
        max_pool_connections=MAX_POOL_CONNECTIONS,
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        # Path-style addressing works on every S3-compatible server, not only AWS.
        s3={"addressing_style": "path"},
        # botocore >= 1.36 sends CRC checksums (and trailers) by default, which MinIO, Ceph, GCS
        # and others reject or mis-sign; send them only when an operation requires them, unless
        # the operator chose otherwise with AWS tools' own variables.
        request_checksum_calculation=_checksum_setting(env, "AWS_REQUEST_CHECKSUM_CALCULATION"),
        response_checksum_validation=_checksum_setting(env, "AWS_RESPONSE_CHECKSUM_VALIDATION"),
    )


def _object_store(
    bucket: str,
    endpoint: str | None,
    session: boto3.session.Session,
    attempts: int,
    certificates: bytes | None,
) -> S3Store:
    """obstore's client of `bucket`, configured as `_client_config` configures boto3's: the same
    endpoint and addressing, region, credentials (boto3's own, from `session`), timeouts and
    tries. Everything that changes what a request does is set here, not left to the AWS_*
    variables obstore would otherwise read from the process environment."""
    config: S3Config = {
        "region": session.region_name,
        # Path-style keys for other S3-compatible servers; on AWS, virtual-hosted ones, as
        # boto3 uses there (but for bucket names with dots, which TLS certificates do not cover).
        "virtual_hosted_style_request": endpoint is None and "." not in bucket,
        "conditional_put": "etag",  # If-None-Match: *, as S3 and the others understand it
        "skip_signature": False,
        # Over TLS, the body is left out of the signature ("UNSIGNED-PAYLOAD", which SigV4
        # allows S3 requests): TLS already guards it, and hashing it was a second SHA-256 of
        # every blob (0.46-0.54 -> 0.35-0.41 ms of CPU per 160 KiB PUT to moto). Over plain
        # HTTP, which the operator consented to, the signature still covers the body.
        "unsigned_payload": endpoint is None or endpoint.startswith("https://"),
        "request_payer": False,
        "s3_express": False,
    }
    if endpoint is not None:
        config["endpoint"] = endpoint
    client_options: ClientConfig = {
        "allow_http": endpoint is not None and endpoint.startswith("http://"),  # consented
        "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT),
        "read_timeout": timedelta(seconds=READ_TIMEOUT),
        "timeout": timedelta(seconds=REQUEST_TIMEOUT),
        "pool_max_idle_per_host": str(MAX_POOL_CONNECTIONS),
    }
    if certificates is not None:
        client_options["root_certificate"] = certificates
    # object_store retries 5xx answers, throttling, dropped and refused connections, as
    # botocore's standard mode does; AWS_MAX_ATTEMPTS counts tries, the first included.
    retries: RetryConfig = {
        "max_retries": attempts - 1,
        "retry_timeout": timedelta(seconds=RETRY_TIMEOUT),
    }
    return S3Store(
        bucket,
        config=config,
        client_options=client_options,
        retry_config=retries,
        credential_provider=_credentials(session),
    )


def _certificates(ca_bundle: str | None) -> bytes | None:
    """The PEM certificates of AWS_CA_BUNDLE, read once at start-up."""
    if ca_bundle is None:
        return None
    try:
        return Path(ca_bundle).read_bytes()
    except OSError as error:
        raise S3ConfigurationError(
            f"AWS_CA_BUNDLE names {ca_bundle}, which cannot be read: {error.strerror}"
        ) from error


def _credentials(session: boto3.session.Session) -> Callable[[], S3Credential]:
    """boto3's credentials for obstore's requests: the same chain (environment, profile,
    instance or pod role), refreshed by botocore. Without any, each request fails as boto3's
    would, unauthenticated (an internal error, logged with boto3's reason)."""
    if session.get_credentials() is None:

        def missing() -> S3Credential:
            raise NoCredentialsError()

        return missing
    return Boto3CredentialProvider(session, ttl=CREDENTIALS_TTL)


def _max_attempts(env: Mapping[str, str]) -> int:
    value = env.get("AWS_MAX_ATTEMPTS", "")
    if not value:
        return DEFAULT_MAX_ATTEMPTS
    if not value.isdigit() or int(value) < 1:
        raise S3ConfigurationError(f"AWS_MAX_ATTEMPTS must be a whole number >= 1, not {value!r}")
    return int(value)


def _checksum_setting(
    env: Mapping[str, str], name: str
) -> Literal["when_supported", "when_required"]:
    value = env.get(name, "when_required").lower()
    if value == "when_supported":
        return "when_supported"
    if value == "when_required":
        return "when_required"
    raise S3ConfigurationError(f"{name} must be when_supported or when_required, not {value!r}")


@contextmanager
def _suppress_missing() -> Iterator[None]:
    """Ignore S3's not-found errors: what is gone needs no cleaning up."""
    try:
        yield
    except ClientError as error:
        if not _missing(error):
            raise


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _missing(error: ClientError) -> bool:
    code = error.response.get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchUpload") or _status(error) == 404
