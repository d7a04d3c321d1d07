"""The S3 blob store's two clients (obstore for small blobs' conditional PUT, boto3 for the rest):
one configuration, and the same domain faults for the same failures.

Against moto's server over real HTTP, and, for the answers moto never gives (5xx, throttling,
access denied, a conditional write in conflict), against a small HTTP server that gives them,
so that both clients' real error handling is what the tests see.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from moto.server import ThreadedMotoServer
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import UnauthenticatedError

from metalake.server.errors import Unavailable
from metalake.server.faults import backend_fault
from metalake.server.s3blobstore import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    S3BlobStore,
    S3ConfigurationError,
)
from tests.conftest import S3_ENV
from tests.test_auth import _certificate, _pem

# What either client raises when a request fails.
FAILURES = (ObstoreError, BotoCoreError, ClientError)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored(store: S3BlobStore, key: str) -> bytes:
    body = store.client.get_object(Bucket=store.bucket, Key=store.blob_key(key))["Body"]
    return body.read()


async def test_a_conditional_put_of_stored_content_dedups(tmp_path: Path, s3_url: str) -> None:
    store = S3BlobStore.from_url(s3_url, local_dir=tmp_path)
    data = os.urandom(160 * 1024)
    await store.put(sha(data), data)
    first = store.client.head_object(Bucket=store.bucket, Key=store.blob_key(sha(data)))
    await store.put(sha(data), data)  # refused by If-None-Match: the content is there
    # A writer's blob smaller than a part takes the same conditional PUT.
    writer = await store.create_writer(spool=False)
    await writer.write(data)
    await writer.commit(sha(data))
    again = store.client.head_object(Bucket=store.bucket, Key=store.blob_key(sha(data)))
    assert again["LastModified"] == first["LastModified"]  # not written again
    assert stored(store, sha(data)) == data
    keys = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    assert [o["Key"] for o in keys] == [store.blob_key(sha(data))]


def test_both_clients_are_configured_alike(tmp_path: Path) -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ALLOW_HTTP": "true",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_MAX_ATTEMPTS": "3",
    }
    store = S3BlobStore.from_url("s3://acme-lake/metalake", local_dir=tmp_path, environ=env)
    config: dict[str, Any] = dict(store.objects.config)  # as strings, whatever the stubs say
    assert config["endpoint"] == store.client.meta.endpoint_url == "http://127.0.0.1:9000"
    assert config["region"] == store.client.meta.region_name == "eu-west-3"
    assert config["bucket"] == store.bucket
    assert config["virtual_hosted_style_request"] == "false"  # path-style, as boto3's
    assert config["conditional_put"] == "etag"
    assert config["skip_signature"] == "false"
    assert config["unsigned_payload"] == "false"  # plain HTTP: the signature covers the body
    options: dict[str, Any] = dict(store.objects.client_options or {})
    assert options["allow_http"] == "true"
    assert (CONNECT_TIMEOUT, READ_TIMEOUT) == (5, 60)
    assert (options["connect_timeout"], options["read_timeout"]) == ("5s", "1m")
    boto = vars(store.client.meta.config)  # botocore's stubs do not list its options
    assert (boto["connect_timeout"], boto["read_timeout"]) == (CONNECT_TIMEOUT, READ_TIMEOUT)
    # AWS_MAX_ATTEMPTS counts tries: botocore's in all, obstore's first try and its retries.
    assert boto["retries"]["total_max_attempts"] == 3
    assert (store.objects.retry_config or {})["max_retries"] == 2
    # boto3's credentials sign obstore's requests.
    provider: Any = store.objects.credential_provider
    credentials = provider()
    assert (credentials["access_key_id"], credentials["secret_access_key"]) == ("id", "secret")
    assert credentials["token"] == "token"

    aws = S3BlobStore.from_url("s3://acme-lake", local_dir=tmp_path, environ={**env, **NO_URL})
    assert dict(aws.objects.config).get("virtual_hosted_style_request") == "true"  # as boto3
    assert dict(aws.objects.client_options or {})["allow_http"] == "false"
    assert dict(aws.objects.config).get("unsigned_payload") == "true"  # TLS guards it, as boto3
    tls = S3BlobStore.from_url(
        "s3://acme-lake",
        local_dir=tmp_path,
        environ={**env, "AWS_ENDPOINT_URL": "https://minio.example:9000", "AWS_ALLOW_HTTP": ""},
    )
    assert dict(tls.objects.config).get("unsigned_payload") == "true"
    dotted = S3BlobStore.from_url("s3://acme.lake", local_dir=tmp_path, environ={**env, **NO_URL})
    assert dict(dotted.objects.config).get("virtual_hosted_style_request") == "false"


NO_URL = {"AWS_ENDPOINT_URL": "", "AWS_ALLOW_HTTP": ""}


# A bucket that stops answering.


async def test_a_stopped_bucket_is_unavailable_for_both_clients(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_REGION"],
        ).create_bucket(Bucket="stopping")
        env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "2"}
        store = S3BlobStore.from_url("s3://stopping/lake", local_dir=tmp_path, environ=env)
        await store.put(sha(b"before"), b"before")  # a pooled connection, alive
    finally:
        moto.stop()
    for failing in (store.put(sha(b"after"), b"after"), store.exists(sha(b"before"))):
        with pytest.raises(FAILURES) as failed:
            await failing
        assert isinstance(backend_fault(failed.value), Unavailable), repr(failed.value)
    writer = await store.create_writer(spool=False)
    await writer.write(b"after")
    with pytest.raises(FAILURES) as failed:
        await writer.commit(sha(b"after"))
    assert isinstance(backend_fault(failed.value), Unavailable), repr(failed.value)
    await writer.abort()


# Answers moto does not give, from a server that gives them.


class CannedS3:
    """An HTTP server that answers each request with the next of `answers` (the last one
    repeated), recording what it was asked."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, str]] = [(200, "")]
        self.requests: list[tuple[str, str | None]] = []
        # Each request's x-amz-content-sha256: the body's hash, or UNSIGNED-PAYLOAD.
        self.payload_hashes: list[str | None] = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's Expect: 100-continue

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                canned.requests.append((self.command, self.headers.get("If-None-Match")))
                canned.payload_hashes.append(self.headers.get("x-amz-content-sha256"))
                index = min(len(canned.requests), len(canned.answers)) - 1
                status, code = canned.answers[index]
                body = b""
                if code:
                    body = f"<Error><Code>{code}</Code><Message>canned</Message></Error>".encode()
                self.send_response(status)
                self.send_header("ETag", '"0123"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_PUT = do_HEAD = do_GET = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"

    def store(self, tmp_path: Path, attempts: int, **more: str) -> S3BlobStore:
        env = {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint, "AWS_MAX_ATTEMPTS": str(attempts)}
        return S3BlobStore.from_url("s3://canned/lake", local_dir=tmp_path, environ={**env, **more})

    def serve_tls(self, certificate: Path, key: Path) -> None:
        """Answer over TLS, at https://localhost:<port>, with this certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certificate, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.endpoint = f"https://localhost:{self.server.server_port}"


@pytest.fixture
def canned() -> Iterator[CannedS3]:
    server = CannedS3()
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (503, "SlowDown", True),
        (500, "InternalError", True),
        (429, "SlowDown", True),
        (400, "RequestTimeout", True),
        (403, "AccessDenied", False),
        (400, "InvalidArgument", False),
    ],
)
async def test_both_clients_fail_into_the_same_domain_fault(
    canned: CannedS3, tmp_path: Path, status: int, code: str, transient: bool
) -> None:
    store = canned.store(tmp_path, attempts=2)
    canned.answers = [(status, code)]
    with pytest.raises(ObstoreError) as by_obstore:
        await store.put(sha(b"x"), b"x")
    obstore_tries = len(canned.requests)
    canned.requests.clear()
    with pytest.raises(ClientError) as by_boto3:
        store.client.put_object(Bucket="canned", Key="lake/blobs/x", Body=b"x")
    faults = [backend_fault(by_obstore.value), backend_fault(by_boto3.value)]
    if transient:
        assert all(isinstance(fault, Unavailable) for fault in faults), faults
        assert all(fault.retry_after for fault in faults if fault is not None)
    else:
        assert faults == [None, None]  # an internal error, as before obstore
    if status >= 500:
        # Bounded by AWS_MAX_ATTEMPTS in both: a try and a retry.
        assert obstore_tries == len(canned.requests) == 2


async def test_an_unreachable_endpoint_is_unavailable_after_its_tries(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "2"}
    store = S3BlobStore.from_url("s3://away/lake", local_dir=tmp_path, environ=env)
    with pytest.raises(ObstoreError) as failed:
        await store.put(sha(b"x"), b"x")
    fault = backend_fault(failed.value)
    assert isinstance(fault, Unavailable), repr(failed.value)
    assert "after 1 retries" in str(failed.value)  # AWS_MAX_ATTEMPTS=2: tried twice


async def test_a_conditional_write_in_conflict_writes_unless_stored_meanwhile(
    canned: CannedS3, tmp_path: Path
) -> None:
    store = canned.store(tmp_path, attempts=1)
    # S3's 409: another conditional write of the key was in flight, and did not store it.
    canned.answers = [(409, "ConditionalRequestConflict"), (404, ""), (200, "")]
    await store.put(sha(b"x"), b"x")
    assert canned.requests == [("PUT", "*"), ("HEAD", None), ("PUT", None)]
    # Over plain HTTP, each PUT's signature covers its body.
    assert canned.payload_hashes[::2] == [hashlib.sha256(b"x").hexdigest()] * 2
    # The other write stored it meanwhile: nothing more to send.
    canned.requests.clear()
    canned.answers = [(409, "ConditionalRequestConflict"), (200, "")]
    await store.put(sha(b"x"), b"x")
    assert canned.requests == [("PUT", "*"), ("HEAD", None)]


async def test_without_credentials_both_clients_fail_alike(
    canned: CannedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    env = {"AWS_ENDPOINT_URL": canned.endpoint, "AWS_ALLOW_HTTP": "true"}
    store = S3BlobStore.from_url("s3://canned/lake", local_dir=tmp_path, environ=env)
    with pytest.raises(UnauthenticatedError) as by_obstore:
        await store.put(sha(b"x"), b"x")
    with pytest.raises(NoCredentialsError) as by_boto3:
        store.client.put_object(Bucket="canned", Key="lake/blobs/x", Body=b"x")
    assert canned.requests == []  # nothing sent unsigned
    assert backend_fault(by_obstore.value) is None
    assert backend_fault(by_boto3.value) is None
    assert "Unable to locate credentials" in str(by_obstore.value)


async def test_both_clients_trust_the_private_ca_of_aws_ca_bundle(tmp_path: Path) -> None:
    ca = _certificate("private CA", None)
    certificate, key = _pem(*_certificate("localhost", ca))
    (tmp_path / "server.pem").write_bytes(certificate)
    (tmp_path / "server.key").write_bytes(key)
    (tmp_path / "ca.pem").write_bytes(_pem(*ca)[0])
    canned = CannedS3()
    canned.serve_tls(tmp_path / "server.pem", tmp_path / "server.key")
    thread = threading.Thread(target=canned.server.serve_forever, daemon=True)
    thread.start()
    try:
        trusting = canned.store(tmp_path, 1, AWS_CA_BUNDLE=str(tmp_path / "ca.pem"))
        await trusting.put(sha(b"x"), b"x")
        trusting.client.put_object(Bucket="canned", Key="lake/blobs/x", Body=b"x")
        assert canned.requests == [("PUT", "*"), ("PUT", None)]
        # Over TLS, obstore's PUT leaves the body out of its signature: TLS guards it.
        assert canned.payload_hashes[0] == "UNSIGNED-PAYLOAD"
        # Without it, neither trusts the endpoint, and nothing reaches it.
        canned.requests.clear()
        unknown = canned.store(tmp_path, 1)
        with pytest.raises(ObstoreError, match="InvalidCertificate"):
            await unknown.put(sha(b"x"), b"x")
        with pytest.raises(BotoCoreError, match="CERTIFICATE_VERIFY_FAILED"):
            unknown.client.put_object(Bucket="canned", Key="lake/blobs/x", Body=b"x")
        assert canned.requests == []
    finally:
        canned.server.shutdown()
        canned.server.server_close()
    with pytest.raises(S3ConfigurationError, match="AWS_CA_BUNDLE"):
        canned.store(tmp_path, 1, AWS_CA_BUNDLE=str(tmp_path / "missing.pem"))
