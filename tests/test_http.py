"""The HTTP face over real sockets: the same data, tokens and errors as gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import grpc
import httpx
import pytest

from metalake.server.app import StartupError, start
from metalake.server.auth import Role
from metalake.server.config import Settings
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests import imagesamples
from tests.conftest import ServerHandle, serving
from tests.tcpproxy import TcpProxy
from tests.test_auth import _certificate, _pem
from tests.test_outages import _catalog_settings
from tests.test_service import requests, upload
from tests.test_thumbnails import on_server


@dataclass
class Web:
    handle: ServerHandle
    http: httpx.Client
    stub: pb_grpc.DatalakeServiceStub
    base: str


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    settings = Settings(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        auth_cache_seconds=0,  # tokens created by a test count at once
    )
    with (
        serving(settings) as handle,
        grpc.insecure_channel(handle.target) as channel,
    ):
        assert handle.running.http is not None
        base = f"http://127.0.0.1:{handle.running.http.port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            yield Web(handle, client, pb_grpc.DatalakeServiceStub(channel), base)


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, object] = body["error"]
    assert error["code"] == response.status_code
    return error


def violations_of(response: httpx.Response) -> list[dict[str, object]]:
    details = error_of(response).get("details")
    assert isinstance(details, list)
    found: list[dict[str, object]] = details[0]["fieldViolations"]
    return found


def test_list_pages_filters_and_items_as_json(web: Web) -> None:
    stored = [
        upload(web.stub, f"file {i}".encode(), filename=f"f{i}.txt", tags=["a"] if i else [])
        for i in range(3)
    ]
    first = web.http.get("/v1/data", params={"page_size": 2})
    assert first.status_code == 200
    page = first.json()
    assert [d["id"] for d in page["data"]] == [d.id for d in stored[:2]]
    assert page["data"][0]["filename"] == "f0.txt"
    second = web.http.get(
        "/v1/data", params={"page_size": 2, "page_token": page["next_page_token"]}
    ).json()
    assert [d["id"] for d in second["data"]] == [stored[2].id]
    assert second["next_page_token"] == ""
    tagged = web.http.get("/v1/data", params={"filter": 'tags:"a"'}).json()
    assert [d["id"] for d in tagged["data"]] == [d.id for d in stored[1:]]
    one = web.http.get(f"/v1/data/{stored[1].id}")
    assert one.json()["sha256"] == stored[1].sha256
    assert one.json()["tags"] == ["a"]
    assert one.headers["etag"] == stored[1].etag


def test_facets_list_distinct_values_without_counting(web: Web) -> None:
    for maker in ("Nikon", "Canon", "Nikon"):
        upload(web.stub, maker.encode(), filename="x.txt", metadata={"manufacturer": maker})
    response = web.http.get("/v1/facets/manufacturer")
    assert response.json() == {"values": ["Canon", "Nikon"]}
    assert web.http.get("/v1/facets/manufacturer", params={"limit": 1}).json() == {
        "values": ["Canon"]
    }
    unknown = web.http.get("/v1/facets/weather")
    assert unknown.status_code == 400
    assert violations_of(unknown)[0]["field"] == "field"


def test_facets_of_tags_and_labels_stay_in_the_callers_organization(web: Web) -> None:
    tokens = web.handle.running.tokens
    ours = on_server(web.handle, tokens.create("default", Role.WRITE)).secret
    theirs = on_server(web.handle, tokens.create("other", Role.WRITE)).secret

    def put(token: str, name: str, tags: list[str], labels: dict[str, str]) -> None:
        web.stub.UploadData(
            requests(name.encode(), filename=name, tags=tags, labels=labels),
            metadata=(("authorization", f"Bearer {token}"),),
        )

    put(ours, "a.txt", ["sunny", "rig"], {"rig": "r2", "site": "north"})
    put(ours, "b.txt", ["sunny"], {"rig": "r1"})
    put(ours, "c.txt", [], {"rig": "r2"})
    # The other organization's tags sort before, between and after ours.
    put(theirs, "d.txt", ["alpha", "secret", "zulu"], {"rig": "r9", "owner": "them"})

    def facet(token: str, field: str, **params: int) -> httpx.Response:
        return web.http.get(
            f"/v1/facets/{field}", params=params, headers={"Authorization": f"Bearer {token}"}
        )

    assert facet(ours, "tags").json() == {"values": ["rig", "sunny"]}
    assert facet(ours, "tags", limit=1).json() == {"values": ["rig"]}
    assert facet(ours, "labels").json() == {"values": ["rig", "site"]}
    assert facet(ours, "labels.rig").json() == {"values": ["r1", "r2"]}
    assert facet(ours, "labels.owner").json() == {"values": []}
    assert facet(theirs, "tags").json() == {"values": ["alpha", "secret", "zulu"]}
    assert facet(theirs, "labels").json() == {"values": ["owner", "rig"]}
    assert facet(theirs, "labels.rig").json() == {"values": ["r9"]}

    bad = facet(ours, "labels.no-dash")
    assert bad.status_code == 400
    assert error_of(bad)["status"] == "INVALID_ARGUMENT"
    assert violations_of(bad)[0]["field"] == "field"
    assert "label key" in str(violations_of(bad)[0]["description"])
    assert facet(ours, "labels.").status_code == 400
    assert violations_of(facet(ours, "tags", limit=0))[0]["field"] == "limit"
    assert web.http.get("/v1/facets/tags").status_code == 401


def test_a_bad_filter_says_where_as_grpc_does(web: Web) -> None:
    text = "manufacturer = Canon AND latitud > 4"
    response = web.http.get("/v1/data", params={"filter": text})
    assert response.status_code == 400
    assert error_of(response)["status"] == "INVALID_ARGUMENT"
    (violation,) = violations_of(response)
    assert violation["field"] == "filter"
    assert violation["position"] == text.index("latitud")
    with pytest.raises(grpc.RpcError) as caught:
        list(web.stub.ListData(pb.ListDataRequest(filter=text)).data)
    assert str(violation["description"]) in (caught.value.details() or "")
    unfinished = "size >"
    response = web.http.get("/v1/data", params={"filter": unfinished})
    assert violations_of(response)[0]["position"] == len(unfinished)


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/data/nope", 404, "NOT_FOUND"),
        ("/v1/data/nope/content", 404, "NOT_FOUND"),
        ("/v1/data/nope/thumbnail", 404, "NOT_FOUND"),
        ("/v1/data?page_size=ten", 400, "INVALID_ARGUMENT"),
        ("/v1/data?page_size=-1", 400, "INVALID_ARGUMENT"),
        ("/v1/data?page_token=garbage", 400, "INVALID_ARGUMENT"),
        ("/v1/data?order_by=colour", 400, "INVALID_ARGUMENT"),
    ],
)
def test_errors_map_grpc_codes_to_statuses(web: Web, path: str, status: int, code: str) -> None:
    response = web.http.get(path)
    assert response.status_code == status
    assert error_of(response)["status"] == code
    assert response.headers["x-request-id"]


def test_content_ranges_and_etags(web: Web) -> None:
    content = bytes(range(256)) * 40
    data = upload(web.stub, content, filename="blob.bin")
    url = f"/v1/data/{data.id}/content"
    whole = web.http.get(url)
    assert whole.status_code == 200
    assert whole.content == content
    assert whole.headers["content-length"] == str(len(content))
    assert whole.headers["accept-ranges"] == "bytes"
    etag = whole.headers["etag"]
    assert etag == f'"{hashlib.sha256(content).hexdigest()}"'

    cached = web.http.get(url, headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    assert web.http.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    part = web.http.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(content)}"
    tail = web.http.get(url, headers={"Range": "bytes=-5"})
    assert (tail.status_code, tail.content) == (206, content[-5:])
    rest = web.http.get(url, headers={"Range": f"bytes={len(content) - 3}-"})
    assert (rest.status_code, rest.content) == (206, content[-3:])
    beyond = web.http.get(url, headers={"Range": f"bytes={len(content)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(content)}"
    stale = web.http.get(url, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert (stale.status_code, stale.content) == (200, content)
    fresh = web.http.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert (fresh.status_code, fresh.content) == (206, content[:10])


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ('photo"; filename=evil.exe', 'photo"; filename=evil.exe'),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\system.ini", "system.ini"),
        ("été à Paris.jpg", "été à Paris.jpg"),
        ("%0d%0aSet-Cookie: a=b.jpg", "%0d%0aSet-Cookie: a=b.jpg"),
        ("<img src=x onerror=alert(1)>.jpg", "<img src=x onerror=alert(1)>.jpg"),
        ("..", "download"),
        ("\u202egnp.exe", "gnp.exe"),  # no right-to-left override to disguise the extension
    ],
)
def test_content_disposition_cannot_be_injected(web: Web, filename: str, expected: str) -> None:
    data = upload(web.stub, b"bytes", filename=filename)
    response = web.http.get(f"/v1/data/{data.id}/content")
    assert response.status_code == 200
    dispositions = response.headers.get_list("content-disposition")
    assert len(dispositions) == 1
    assert "set-cookie" not in response.headers
    header = dispositions[0]
    # Exactly the three parts we wrote, whatever the name holds.
    kind, fallback, encoded = header.split("; ")
    assert kind == "attachment"
    assert fallback.startswith('filename="')
    assert fallback.endswith('"')
    assert '"' not in fallback[len('filename="') : -1]
    assert encoded.startswith("filename*=UTF-8''")
    assert unquote(encoded.removeprefix("filename*=UTF-8''")) == expected
    for part in (fallback, encoded):
        assert "/" not in part
        assert "\\" not in part
    assert response.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_a_client_chosen_content_type_is_never_a_header_or_a_page(web: Web) -> None:
    page = upload(
        web.stub, b"<script>alert(1)</script>", filename="a.html", content_type="text/html"
    )
    response = web.http.get(f"/v1/data/{page.id}/content")
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-disposition"].startswith("attachment;")
    assert "sandbox" in response.headers["content-security-policy"]


def test_thumbnails_over_http(web: Web) -> None:
    photo = upload(web.stub, imagesamples.encoded(imagesamples.landscape(1600, 1200), "JPEG"))
    response = web.http.get(f"/v1/data/{photo.id}/thumbnail", params={"size": 1024})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert "max-age" in response.headers["cache-control"]
    grpc_preview = web.stub.GetThumbnail(pb.GetThumbnailRequest(id=photo.id, size=1024))
    assert response.content == grpc_preview.content
    again = web.http.get(
        f"/v1/data/{photo.id}/thumbnail",
        params={"size": 1024},
        headers={"If-None-Match": response.headers["etag"]},
    )
    assert again.status_code == 304
    default = web.http.get(f"/v1/data/{photo.id}/thumbnail")
    assert default.content == web.stub.GetThumbnail(pb.GetThumbnailRequest(id=photo.id)).content
    bad = web.http.get(f"/v1/data/{photo.id}/thumbnail", params={"size": 300})
    assert bad.status_code == 400
    assert violations_of(bad)[0]["field"] == "size"
    text = upload(web.stub, b"plain text", filename="notes.txt")
    none = web.http.get(f"/v1/data/{text.id}/thumbnail")
    assert none.status_code == 404
    assert "preview" in str(error_of(none)["message"])


def test_edit_with_the_etag(web: Web) -> None:
    data = upload(web.stub, b"x", filename="x.bin")
    url = f"/v1/data/{data.id}"
    body = {"metadata": {"weather": "rain"}, "update_mask": ["weather"], "etag": data.etag}
    changed = web.http.patch(url, json=body)
    assert changed.status_code == 200
    assert changed.json()["metadata"]["weather"] == "rain"
    assert changed.json()["metadata_sources"]["weather"] == "client"
    assert web.stub.GetData(pb.GetDataRequest(id=data.id)).data.metadata.weather == "rain"
    stale = web.http.patch(url, json=body)  # the etag it sends is the old one
    assert stale.status_code == 409
    assert error_of(stale)["status"] == "ABORTED"
    invalid = web.http.patch(url, json={"metadata": {"latitude": 91}, "update_mask": "latitude"})
    assert invalid.status_code == 400
    assert violations_of(invalid)[0]["field"] == "metadata.latitude"
    cleared = web.http.patch(
        url, json={"update_mask": ["weather"]}, headers={"If-Match": changed.json()["etag"]}
    )
    assert "weather" not in cleared.json()["metadata"]
    assert web.http.patch(url, content=b"{not json").status_code == 400


def test_tokens_organizations_and_roles(web: Web) -> None:
    data = upload(web.stub, b"before tokens", filename="a.txt")
    tokens = web.handle.running.tokens
    reader = on_server(web.handle, tokens.create("default", Role.READ)).secret
    writer = on_server(web.handle, tokens.create("default", Role.WRITE)).secret
    stranger = on_server(web.handle, tokens.create("other", Role.ADMIN)).secret
    url = f"/v1/data/{data.id}"

    refused = web.http.get(url)
    assert refused.status_code == 401
    assert error_of(refused)["status"] == "UNAUTHENTICATED"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert web.http.get(url, headers={"Authorization": "Bearer mlk_wrong"}).status_code == 401
    assert web.http.get(f"{url}/content").status_code == 401
    assert web.http.get("/v1/watch").status_code == 401

    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    assert web.http.get(url, headers=auth(reader)).status_code == 200
    assert web.http.get(f"{url}/content", headers=auth(reader)).content == b"before tokens"
    edit = {"metadata": {"weather": "fog"}}
    denied = web.http.patch(url, json=edit, headers=auth(reader))
    assert (denied.status_code, error_of(denied)["status"]) == (403, "PERMISSION_DENIED")
    assert web.http.patch(url, json=edit, headers=auth(writer)).status_code == 200
    hidden = web.http.get(url, headers=auth(stranger))
    assert (hidden.status_code, error_of(hidden)["status"]) == (404, "NOT_FOUND")
    assert web.http.get("/v1/data", headers=auth(stranger)).json()["data"] == []
    # What the console needs before it has a token, and health, stay open.
    assert web.http.get("/v1/config").json()["auth_required"] is True
    assert web.http.get("/healthz").json() == {"status": "SERVING"}
    assert web.http.get("/").status_code == 200


def test_new_items_arrive_as_server_sent_events(web: Web) -> None:
    events: queue.Queue[tuple[str, str, dict[str, object]]] = queue.Queue()

    def listen() -> None:
        with httpx.stream("GET", f"{web.base}/v1/watch", timeout=30) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            for line in response.iter_lines():
                if line == "" and "data" in fields:
                    events.put((fields["event"], fields["id"], json.loads(fields["data"])))
                    return
                if line and not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
                elif line == ": watching":
                    events.put(("connected", "", {}))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert events.get(timeout=30)[0] == "connected"
    data = upload(web.stub, b"live", filename="live.txt")
    kind, token, item = events.get(timeout=30)
    assert (kind, item["id"], item["filename"]) == ("created", data.id, "live.txt")
    # The event id is a WatchData resume token: gRPC clients may resume from it.
    assert token
    listener.join(timeout=10)
    bad = web.http.get("/v1/watch", params={"filter": "size >"})
    assert bad.status_code == 400
    assert violations_of(bad)[0]["position"] == len("size >")


def test_pages_carry_a_strict_content_security_policy(web: Web) -> None:
    page = web.http.get("/")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "default-src 'none'" in policy
    assert "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"


def test_the_http_port_can_be_shared_by_several_servers(web: Web, tmp_path: Path) -> None:
    assert web.handle.running.http is not None
    port = web.handle.running.http.port
    settings = Settings(
        data_dir=tmp_path / "second", listen="127.0.0.1:0", http_listen=f"127.0.0.1:{port}"
    )
    with serving(settings) as second:
        assert second.running.http is not None
        assert second.running.http.port == port
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_http_is_off_unless_asked_for(
    running_server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert running_server.running.http is None
    monkeypatch.delenv("METALAKE_HTTP_LISTEN", raising=False)
    assert Settings.from_env().http_listen is None
    monkeypatch.setenv("METALAKE_HTTP_LISTEN", "127.0.0.1:8080")
    assert Settings.from_env().http_listen == "127.0.0.1:8080"
    for off in ("", "off", "0"):
        monkeypatch.setenv("METALAKE_HTTP_LISTEN", off)
        assert Settings.from_env().http_listen is None


def test_the_http_listener_is_refused_off_loopback_without_tokens(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", http_listen="0.0.0.0:0")
    with pytest.raises(StartupError, match=r"refusing to serve 0\.0\.0\.0:0 without"):
        asyncio.run(start(settings))


def test_a_tile_server_is_named_to_the_console_and_allowed_by_the_policy(tmp_path: Path) -> None:
    tiles = "https://{s}.tiles.example.org/{z}/{x}/{y}.png"
    settings = Settings(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        console_tile_url=tiles,
    )
    with serving(settings) as handle:
        assert handle.running.http is not None
        base = f"http://127.0.0.1:{handle.running.http.port}"
        assert httpx.get(f"{base}/v1/config").json()["tile_url"] == tiles
        policy = httpx.get(base).headers["content-security-policy"]
        assert "img-src 'self' blob: data: https://*.tiles.example.org;" in policy
        assert "connect-src 'self';" in policy


def test_the_http_face_speaks_tls_with_the_servers_certificate(tmp_path: Path) -> None:
    ca = _certificate("metalake test CA", None)
    server_cert, server_key = _pem(*_certificate("localhost", ca))
    client_cert, client_key = _pem(*_certificate("drone-7", ca))
    files = {
        "server.pem": server_cert,
        "server.key": server_key,
        "ca.pem": _pem(*ca)[0],
        "client.pem": client_cert,
        "client.key": client_key,
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    settings = Settings(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.pem",
    )
    with serving(settings) as handle:
        assert handle.running.http is not None
        url = f"https://localhost:{handle.running.http.port}/healthz"
        trusted = ssl.create_default_context(cafile=tmp_path / "ca.pem")
        trusted.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
        assert httpx.get(url, verify=trusted).json() == {"status": "SERVING"}
        no_certificate = ssl.create_default_context(cafile=tmp_path / "ca.pem")
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=no_certificate)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https", "http"))


@pytest.fixture
def proxied_catalog(postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """PostgreSQL behind a proxy the test can cut, as in test_outages."""
    parts = urlsplit(postgres_url)
    assert parts.hostname is not None
    with TcpProxy(parts.hostname, parts.port or 5432) as proxy:
        yield proxy, postgres_url.replace(parts.netloc, f"{parts.username}@{proxy.address}", 1)


def test_a_catalog_outage_is_503_with_retry_after(
    tmp_path: Path, proxied_catalog: tuple[TcpProxy, str]
) -> None:
    proxy, url = proxied_catalog
    settings = replace(_catalog_settings(tmp_path / "data", url), http_listen="127.0.0.1:0")
    with serving(settings) as handle, grpc.insecure_channel(handle.target) as channel:
        assert handle.running.http is not None
        base = f"http://127.0.0.1:{handle.running.http.port}"
        data = upload(pb_grpc.DatalakeServiceStub(channel), b"kept", filename="kept.txt")
        proxy.cut()
        try:
            for path in ("/v1/data", f"/v1/data/{data.id}", f"/v1/data/{data.id}/content"):
                response = httpx.get(base + path, timeout=60)
                assert response.status_code == 503, path
                assert error_of(response)["status"] == "UNAVAILABLE"
                assert int(response.headers["retry-after"]) >= 1
        finally:
            proxy.restore()
        assert httpx.get(f"{base}/v1/data/{data.id}/content", timeout=60).content == b"kept"
