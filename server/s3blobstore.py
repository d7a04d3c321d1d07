"""Blobs in S3-compatible object storage (AWS S3, MinIO, Ceph, GCS's S3 API).

Layout under `s3://bucket/prefix`: `blobs/<sha256>` for committed blobs, `tmp/<uuid>` for
uploads in flight. Bytes go to S3 as a multipart upload while the client is still sending, one
part buffered at a time; the content hash, and so the final key, is known only at the end, so
commit completes the upload under its temporary key and copies it (inside S3) to its final key,
unless identical content is already there. A failed upload aborts its multipart upload.

Configured the way AWS tools are: AWS_ENDPOINT_URL, AWS_REGION (or AWS_DEFAULT_REGION),
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; a plain-HTTP endpoint only with AWS_ALLOW_HTTP=true.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from server.blobstore import UPLOAD_ID, create_spool_file, hash_file

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

# S3 parts are at least 5 MiB (but the last); 8 MiB keeps a part's upload well above per-request
# overheads while bounding what one upload buffers.
DEFAULT_PART_SIZE = 8 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024


class S3ConfigurationError(ValueError):
    """The S3 URL or environment is not usable; the message says what to change."""


class S3BlobStore:
    """The BlobStore protocol on an S3 bucket. Resumable uploads stage on local disk."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str,
        *,
        staging_dir: Path,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise S3ConfigurationError(f"part size must be at least {MIN_PART_SIZE} bytes")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self._spool = staging_dir / "tmp"
        self._uploads = staging_dir / "uploads"
        for directory in (self._spool, self._uploads):
            directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_url(
        cls, url: str, *, staging_dir: Path, environ: Mapping[str, str] | None = None
    ) -> S3BlobStore:
        env = os.environ if environ is None else environ
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise S3ConfigurationError(f"{url!r} is not an s3://bucket/prefix URL")
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint and endpoint.startswith("http://") and env.get("AWS_ALLOW_HTTP") != "true":
            raise S3ConfigurationError(
                f"the S3 endpoint {endpoint} is plain HTTP: credentials and data would travel "
                "unencrypted. Use https, or set AWS_ALLOW_HTTP=true if you mean it."
            )
        client = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                # Path-style addressing works on every S3-compatible server, not only AWS.
                s3={"addressing_style": "path" if endpoint else "auto"},
            ),
        )
        return cls(client, parsed.netloc, parsed.path, staging_dir=staging_dir)

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def blob_key(self, key: str) -> str:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"invalid blob key {key!r}")
        return self._key("blobs", key)

    async def create_writer(self, *, spool: bool = True) -> S3BlobWriter:
        spool_file = None
        if spool:
            spool_file = await create_spool_file(self._spool / f"{uuid.uuid4().hex}.part")
        return S3BlobWriter(self, self._key("tmp", uuid.uuid4().hex), spool_file)

    async def read(self, key: str, *, offset: int = 0, chunk_size: int) -> AsyncIterator[bytes]:
        try:
            response = await asyncio.to_thread(
                self.client.get_object,
                Bucket=self.bucket,
                Key=self.blob_key(key),
                Range=f"bytes={offset}-",
            )
        except ClientError as error:
            if _missing(error) or _status(error) == 416:
                if _status(error) == 416:  # offset == size: nothing left to send
                    return
                raise FileNotFoundError(key) from error
            raise
        body = response["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, chunk_size):
                yield chunk
        finally:
            body.close()

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
        """Abort multipart uploads under tmp/ begun before `older_than` (a crashed server's)."""
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key("tmp") + "/"):
            for upload in page.get("Uploads", []):
                if upload["Initiated"] < older_than:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        return aborted

    def discard_spooled(self) -> int:
        count = 0
        for leftover in self._spool.iterdir():
            leftover.unlink(missing_ok=True)
            count += 1
        return count

    # Resumable uploads stage on this server's disk, then go to S3 when finished.

    def staging_path(self, upload_id: str) -> Path:
        if not UPLOAD_ID.match(upload_id):
            raise ValueError(f"invalid upload id {upload_id!r}")
        return self._uploads / upload_id

    async def adopt_staged(self, upload_id: str) -> S3StagedWriter:
        path = self.staging_path(upload_id)
        digest, size = await asyncio.to_thread(hash_file, path)
        return S3StagedWriter(self, path, digest.hexdigest(), size)

    async def discard_staged(self, upload_id: str) -> None:
        await asyncio.to_thread(self.staging_path(upload_id).unlink, True)

    def staged_upload_ids(self) -> list[str]:
        return [p.name for p in self._uploads.iterdir()]

    def store_file(self, path: Path, key: str) -> None:
        """Blocking: put a local file under a blob key, unless identical content is there."""
        object_key = self.blob_key(key)
        if self._exists(object_key):
            return
        self.client.upload_file(
            str(path),
            self.bucket,
            object_key,
            Config=TransferConfig(multipart_chunksize=self.part_size),
        )


class S3BlobWriter:
    """Streams one blob to S3 as a multipart upload, hashing it; spools locally if asked."""

    def __init__(self, store: S3BlobStore, temporary_key: str, spool: IO[bytes] | None) -> None:
        self._store = store
        self._temporary_key = temporary_key
        self._spool = spool
        self._hash = hashlib.sha256()
        self._size = 0
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._done = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def buffered(self) -> int:
        """Bytes held in memory: never more than one part plus one chunk."""
        return len(self._buffer)

    @property
    def spool_path(self) -> Path | None:
        return Path(self._spool.name) if self._spool is not None else None

    def sha256(self) -> str:
        return self._hash.hexdigest()

    async def write(self, chunk: bytes) -> None:
        await asyncio.to_thread(self._write, chunk)

    def _write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        if self._spool is not None:
            self._spool.write(chunk)
        self._size += len(chunk)
        self._buffer += chunk
        while len(self._buffer) >= self._store.part_size:
            part = bytes(self._buffer[: self._store.part_size])
            del self._buffer[: self._store.part_size]
            self._upload_part(part)

    def _upload_part(self, data: bytes) -> None:
        client, bucket = self._store.client, self._store.bucket
        if self._upload_id is None:
            created = client.create_multipart_upload(Bucket=bucket, Key=self._temporary_key)
            self._upload_id = created["UploadId"]
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
            await asyncio.to_thread(self._spool.flush)

    async def commit(self, key: str) -> None:
        await asyncio.to_thread(self._commit, key)

    def _commit(self, key: str) -> None:
        store, client, bucket = self._store, self._store.client, self._store.bucket
        final = store.blob_key(key)
        if self._upload_id is None:
            # Smaller than a part: one PUT, straight to its final key.
            if not store._exists(final):
                client.put_object(Bucket=bucket, Key=final, Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._upload_part(bytes(self._buffer))
                self._buffer.clear()
            client.complete_multipart_upload(
                Bucket=bucket,
                Key=self._temporary_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
            self._upload_id = None  # completed: nothing to abort any more
            try:
                if not store._exists(final):
                    # Server-side copy; multipart above 5 GiB, managed by boto3.
                    client.copy(
                        {"Bucket": bucket, "Key": self._temporary_key},
                        bucket,
                        final,
                        Config=TransferConfig(multipart_chunksize=store.part_size),
                    )
            finally:
                client.delete_object(Bucket=bucket, Key=self._temporary_key)
        self._done = True
        self._close_spool()

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._close_spool()
        # Shielded: abort runs while the upload is being cancelled, and must still reach S3.
        await asyncio.shield(asyncio.to_thread(self._abort))

    def _abort(self) -> None:
        client, bucket = self._store.client, self._store.bucket
        if self._upload_id is not None:
            client.abort_multipart_upload(
                Bucket=bucket, Key=self._temporary_key, UploadId=self._upload_id
            )
        client.delete_object(Bucket=bucket, Key=self._temporary_key)

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            Path(self._spool.name).unlink(missing_ok=True)
            self._spool = None


class S3StagedWriter:
    """A finished resumable upload, staged on local disk, on its way to S3 at commit."""

    def __init__(self, store: S3BlobStore, path: Path, sha256: str, size: int) -> None:
        self._store = store
        self._path = path
        self._sha256 = sha256
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @property
    def spool_path(self) -> Path:
        return self._path

    def sha256(self) -> str:
        return self._sha256

    async def write(self, chunk: bytes) -> None:
        raise RuntimeError("a staged upload is already complete")

    async def flush(self) -> None:
        """Nothing buffered: the staged file is complete."""

    async def commit(self, key: str) -> None:
        await asyncio.to_thread(self._store.store_file, self._path, key)
        await asyncio.to_thread(self._path.unlink, True)

    async def abort(self) -> None:
        """Keep the staged bytes: the client may still finish the upload."""


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _missing(error: ClientError) -> bool:
    code = error.response.get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound") or _status(error) == 404
