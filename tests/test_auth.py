"""Tokens, organizations and roles: nobody sees another organization's data."""

from __future__ import annotations

import asyncio
import datetime
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.field_mask_pb2 import FieldMask

from metalake.server.app import StartupError, start
from metalake.server.auth import Role, Tokens
from metalake.server.config import Settings
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, serving
from tests.test_service import requests

Stub = pb_grpc.DatalakeServiceStub


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ServerHandle]:
    settings = replace(
        Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0"), auth_cache_seconds=0
    )
    with serving(settings) as handle:
        yield handle


def create_token(handle: ServerHandle, org: str, role: Role) -> str:
    tokens: Tokens = handle.running.tokens
    created = asyncio.run_coroutine_threadsafe(tokens.create(org, role), handle.loop).result(30)
    return created.secret


def revoke_token(handle: ServerHandle, secret: str) -> None:
    async def revoke() -> None:
        tokens: Tokens = handle.running.tokens
        for token in await tokens.list():
            caller = await tokens.check(secret)
            if caller is not None and caller.token_id == token.id:
                await tokens.revoke(token.id)

    asyncio.run_coroutine_threadsafe(revoke(), handle.loop).result(30)


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Call:
    name: str
    role: Role  # the least role it needs
    run: Callable[[Stub, str, tuple[tuple[str, str]]], object]


CALLS = [
    Call("GetData", Role.READ, lambda s, i, m: s.GetData(pb.GetDataRequest(id=i), metadata=m)),
    Call(
        "DownloadData",
        Role.READ,
        lambda s, i, m: list(s.DownloadData(pb.DownloadDataRequest(id=i), metadata=m)),
    ),
    Call(
        "UpdateMetadata",
        Role.WRITE,
        lambda s, i, m: s.UpdateMetadata(
            pb.UpdateMetadataRequest(
                id=i, metadata=pb.Metadata(weather="sun"), update_mask=FieldMask(paths=["weather"])
            ),
            metadata=m,
        ),
    ),
    Call(
        "DeleteData",
        Role.WRITE,
        lambda s, i, m: s.DeleteData(pb.DeleteDataRequest(id=i), metadata=m),
    ),
]


def test_every_rpc_against_every_organization_role_and_item(secured: ServerHandle) -> None:
    orgs = ["acme", "globex"]
    tokens = {(o, r): create_token(secured, o, r) for o in orgs for r in Role}
    with grpc.insecure_channel(secured.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        for (org, role), (call, owner) in itertools.product(tokens, itertools.product(CALLS, orgs)):
            owner_token = tokens[(owner, Role.WRITE)]
            item = stub.UploadData(requests(b"pixels", "a.jpg"), metadata=auth(owner_token)).data
            case = f"{call.name} by {org}/{role.name} on an item of {owner}"
            token = tokens[(org, role)]
            if role < call.role:
                with pytest.raises(grpc.RpcError) as caught:
                    call.run(stub, item.id, auth(token))
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, case
            elif org != owner:
                # Another organization's item does not exist, whatever the role.
                with pytest.raises(grpc.RpcError) as caught:
                    call.run(stub, item.id, auth(token))
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND, case
            else:
                call.run(stub, item.id, auth(token))
            deleted = call.name == "DeleteData" and org == owner and role >= call.role
            listed = stub.ListData(pb.ListDataRequest(page_size=1000), metadata=auth(token)).data
            assert (item.id in {d.id for d in listed}) == (org == owner and not deleted), case

        # Uploads need write, and land in the uploader's organization.
        with pytest.raises(grpc.RpcError) as caught:
            stub.UploadData(requests(b"x", "r.jpg"), metadata=auth(tokens[("acme", Role.READ)]))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_missing_unknown_and_revoked_tokens_are_refused_alike(secured: ServerHandle) -> None:
    good = create_token(secured, "acme", Role.WRITE)
    revoked = create_token(secured, "acme", Role.WRITE)
    revoke_token(secured, revoked)
    with grpc.insecure_channel(secured.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        answers = []
        for metadata in [(), auth("mlk_not-a-token"), auth(revoked), (("authorization", good),)]:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListData(pb.ListDataRequest(), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answers.append(caught.value.details())
        assert len(set(answers)) == 1  # nothing tells a revoked token from an unknown one
        assert stub.ListData(pb.ListDataRequest(), metadata=auth(good)).data == []


def test_without_tokens_calls_act_for_the_default_organization(
    secured: ServerHandle,
) -> None:
    with grpc.insecure_channel(secured.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        item = stub.UploadData(requests(b"x", "a.jpg")).data
        token = create_token(secured, "default", Role.READ)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetData(pb.GetDataRequest(id=item.id))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.GetData(pb.GetDataRequest(id=item.id), metadata=auth(token)).data == item


def test_no_tokens_means_loopback_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", listen="0.0.0.0:0")
    with pytest.raises(StartupError, match="insecure-no-auth"):
        asyncio.run(start(settings))

    async def start_and_stop() -> None:
        running = await start(replace(settings, insecure_no_auth=True))
        await running.stop(grace=0)

    asyncio.run(start_and_stop())


def _certificate(
    name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    ca = _certificate("metalake test CA", None)
    server_cert, server_key = _pem(*_certificate("localhost", ca))
    client_cert, client_key = _pem(*_certificate("drone-7", ca))
    ca_pem = _pem(*ca)[0]
    for name, content in {
        "server.pem": server_cert,
        "server.key": server_key,
        "ca.pem": ca_pem,
    }.items():
        (tmp_path / name).write_bytes(content)
    settings = replace(
        Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0"),
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.pem",
    )
    with serving(settings) as handle:
        target = handle.target.replace("127.0.0.1", "localhost")
        with_cert = grpc.ssl_channel_credentials(ca_pem, client_key, client_cert)
        with grpc.secure_channel(target, with_cert) as channel:
            stub = pb_grpc.DatalakeServiceStub(channel)
            assert stub.ListData(pb.ListDataRequest(), timeout=10).data == []
        without_cert = grpc.ssl_channel_credentials(ca_pem)
        with grpc.secure_channel(target, without_cert) as channel:
            stub = pb_grpc.DatalakeServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListData(pb.ListDataRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(handle.target) as channel:
            stub = pb_grpc.DatalakeServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.ListData(pb.ListDataRequest(), timeout=5)


def test_uploads_streams_and_watches_stay_within_the_organization(secured: ServerHandle) -> None:
    acme, globex = (
        create_token(secured, "acme", Role.WRITE),
        create_token(secured, "globex", Role.WRITE),
    )
    with grpc.insecure_channel(secured.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        watch = stub.WatchData(pb.WatchDataRequest(), metadata=auth(globex), timeout=3)
        started = stub.StartUpload(
            pb.StartUploadRequest(header=pb.UploadDataHeader(filename="a"), upload_id="shared-id"),
            metadata=auth(acme),
        )
        # The same upload id in another organization is another upload, not acme's.
        with pytest.raises(grpc.RpcError) as caught:
            stub.QueryUpload(
                pb.QueryUploadRequest(upload_id=started.upload_id), metadata=auth(globex)
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        answers = list(
            stub.UploadDataStream(
                iter(
                    [
                        pb.UploadDataStreamRequest(header=pb.UploadDataHeader(filename="s")),
                        pb.UploadDataStreamRequest(chunk=b"x"),
                        pb.UploadDataStreamRequest(finish=True),
                    ]
                ),
                metadata=auth(acme),
            )
        )
        [streamed] = [a.data for a in answers]
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetData(pb.GetDataRequest(id=streamed.id), metadata=auth(globex))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # globex's watcher saw none of acme's changes before its deadline.
        seen: list[pb.WatchDataResponse] = []
        with pytest.raises(grpc.RpcError) as caught:
            seen.extend(watch)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert seen == []
