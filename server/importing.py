"""Buckets registered in place: S3 objects become items that reference them, bytes not copied.

A referenced item's blob key is `ref:s3:<etag>:<bucket>/<key>` and its request id
`import:s3://<bucket>/<key>`, so a rerun finds the item of each object, and sees from the ETag
whether the object changed. Its sha256 is empty: the server never read the whole object. Reads
(downloads, fill_metadata's ranged GET of the first bytes) use the server's own credentials,
from the AWS_* environment as the S3 blob store does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from metalake.server.errors import NotFound, Refusal, invalid_field
from metalake.server.s3blobstore import _client_config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REF_PREFIX = "ref:s3:"
REQUEST_PREFIX = "import:s3://"
# fill_metadata reads at most this much of each object: EXIF, XMP and the image header sit at
# the start of JPEG, TIFF, PNG and HEIF files.
HEADER_BYTES = 128 * 1024
VANISHED = {"import_state": "vanished"}


class BucketAccessError(Refusal):
    """The server may not read the bucket (credentials, IAM policy): FAILED_PRECONDITION."""


@dataclass
class ImportReport:
    listed: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    vanished: int = 0
    bytes_read: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    etag: str


def parse_source(source: str) -> tuple[str, str]:
    """(bucket, prefix) of an s3://bucket/prefix URL; INVALID_ARGUMENT otherwise."""
    parsed = urlparse(source)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise invalid_field("source", f"{source!r} is not an s3://bucket/prefix URL")
    return parsed.netloc, parsed.path.lstrip("/")


def reference(obj: ListedObject, bucket: str) -> str:
    return f"{REF_PREFIX}{obj.etag}:{bucket}/{obj.key}"


def is_reference(blob_key: str) -> bool:
    return blob_key.startswith(REF_PREFIX)


def parse_reference(blob_key: str) -> tuple[str, str, str]:
    """(etag, bucket, key) of a referenced item's blob key."""
    etag, _, location = blob_key.removeprefix(REF_PREFIX).partition(":")
    bucket, _, key = location.partition("/")
    return etag, bucket, key


def request_id(bucket: str, key: str) -> str:
    return f"{REQUEST_PREFIX}{bucket}/{key}"


def wanted(key: str, extensions: Sequence[str]) -> bool:
    if key.endswith("/"):
        return False  # a "folder" marker
    if not extensions:
        return True
    lowered = key.lower()
    return any(lowered.endswith("." + e.lower().lstrip(".")) for e in extensions)


class BucketReader:
    """Lists and reads customer buckets with the server's credentials; synchronous (run it in
    worker threads)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        self._client: S3Client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=env.get("AWS_SESSION_TOKEN"),
            config=_client_config(endpoint, env),
        )

    def pages(self, bucket: str, prefix: str) -> Iterator[list[ListedObject]]:
        """The objects under the prefix, a page (up to 1,000) at a time."""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                yield [
                    ListedObject(o["Key"], int(o["Size"]), str(o["ETag"]).strip('"'))
                    for o in page.get("Contents", [])
                ]
        except (ClientError, BotoCoreError) as error:
            raise _access_error(error, bucket, "list (s3:ListBucket)") from None

    def head(self, bucket: str, key: str, etag: str, limit: int) -> bytes:
        """The object's first `limit` bytes (one ranged GET), if it still has this ETag."""
        try:
            response = self._client.get_object(
                Bucket=bucket, Key=key, Range=f"bytes=0-{limit - 1}", IfMatch=etag
            )
            return response["Body"].read()
        except ClientError as error:
            raise _access_error(error, bucket, "read (s3:GetObject)") from None

    def stream(
        self, bucket: str, key: str, etag: str, offset: int, chunk_size: int
    ) -> Iterator[bytes]:
        """The object from `offset`, chunk by chunk; NOT_FOUND when it changed or vanished."""
        arguments: dict[str, Any] = {"Bucket": bucket, "Key": key, "IfMatch": etag}
        if offset:
            arguments["Range"] = f"bytes={offset}-"
        try:
            body = self._client.get_object(**arguments)["Body"]
        except ClientError as error:
            if _code(error) in ("PreconditionFailed", "NoSuchKey", "404", "412"):
                raise NotFound(
                    f"s3://{bucket}/{key}", kind="object (changed or vanished since imported)"
                ) from None
            raise _access_error(error, bucket, "read (s3:GetObject)") from None
        try:
            while chunk := body.read(chunk_size):
                yield chunk
        finally:
            body.close()


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _access_error(error: Exception, bucket: str, action: str) -> Refusal:
    if isinstance(error, ClientError) and _code(error) in ("NoSuchBucket",):
        return invalid_field("source", f"the bucket {bucket!r} does not exist")
    why = _code(error) if isinstance(error, ClientError) else type(error).__name__
    return BucketAccessError(
        f"the server cannot {action} in bucket {bucket!r}: {why} {error}. Grant the server's "
        "credentials s3:ListBucket and s3:GetObject on it (see docs/operations.md)"
    )


class LazyReader:
    """A BucketReader made on first use (with the environment of that moment), so that a
    server that never meets a referenced item never makes an S3 client."""

    def __init__(self) -> None:
        self._reader: BucketReader | None = None

    def __call__(self) -> BucketReader:
        if self._reader is None:
            self._reader = BucketReader()
        return self._reader


async def open_stream(
    reader: BucketReader, blob_key: str, offset: int, chunk_size: int
) -> AsyncIterator[bytes]:
    """The referenced object's bytes from `offset`. The first read happens here, so that an
    object that changed or vanished is NOT_FOUND before anything is sent."""
    etag, bucket, key = parse_reference(blob_key)
    stream = reader.stream(bucket, key, etag, offset, chunk_size)
    first = await asyncio.to_thread(next, stream, b"")
    return _then(first, stream)


async def _then(first: bytes, rest: Iterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    while (chunk := await asyncio.to_thread(next, rest, b"")) != b"":
        yield chunk
