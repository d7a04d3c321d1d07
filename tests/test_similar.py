"""Near-duplicate search: the hash, the exactness of the band index, FindSimilar, the CLI."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from sqlalchemy import insert

from metalake import Client
from metalake.cli import EXIT_OK, EXIT_USAGE, main
from metalake.server.auth import Role
from metalake.server.catalog import DataRecord, SqlCatalog, _record_to_row
from metalake.server.config import Settings
from metalake.server.imagehash import hash_image
from metalake.server.schema import data_table, image_hashes_table
from metalake.server.similarity import (
    BANDS,
    Similarity,
    band_probes,
    bands,
    hamming,
)
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, serving
from tests.test_auth import auth, create_token
from tests.test_service import requests


def photo(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A photo-like picture: soft shapes of random colours, different for every seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        w, h = rng.randrange(20, size[0] // 2), rng.randrange(20, size[1] // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x - w, y - h, x + w, y + h), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(3))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def variants(image: Image.Image) -> dict[str, bytes]:
    w, h = image.size
    dx, dy = w // 40, h // 40
    return {
        "resized": jpeg(image.resize((w // 2, h // 2))),
        "quality60": jpeg(image, 60),
        "cropped": jpeg(image.crop((dx, dy, w - dx, h - dy))),
        "brighter": jpeg(ImageEnhance.Brightness(image).enhance(1.1)),
        "flipped": jpeg(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    }


def test_variants_stay_close_and_distinct_photos_far() -> None:
    original = hash_image(io.BytesIO(jpeg(photo(1))))
    for name, content in variants(photo(1)).items():
        variant = hash_image(io.BytesIO(content))
        closest = min(
            hamming(original.value, variant.value), hamming(original.mirror, variant.value)
        )
        assert closest <= 8, name
    flipped = hash_image(io.BytesIO(variants(photo(1))["flipped"]))
    assert hamming(original.mirror, flipped.value) < hamming(original.value, flipped.value)
    for seed in range(2, 12):
        other = hash_image(io.BytesIO(jpeg(photo(seed))))
        assert min(hamming(original.value, other.value), hamming(original.mirror, other.value)) > 8


@given(st.integers(0, 2**64 - 1), st.lists(st.integers(0, 63), max_size=12), st.integers(0, 11))
def test_every_hash_within_the_distance_shares_a_probed_band(
    value: int, flipped: list[int], distance: int
) -> None:
    other = value
    for bit in flipped:
        other ^= 1 << bit
    probes = band_probes(value, distance)
    shares = any(band in probes[i] for i, band in enumerate(bands(other)))
    if hamming(value, other) <= distance:
        assert shares


async def test_the_index_answers_exactly_what_a_scan_would(
    catalog: SqlCatalog, tmp_path: Path
) -> None:
    rng = random.Random(7)
    centre = rng.getrandbits(64)
    hashes: dict[str, int] = {}
    for i in range(600):
        # Half of them near the centre, at every distance up to 16; the rest anywhere.
        value = rng.getrandbits(64)
        if i % 2:
            value = centre
            for bit in rng.sample(range(64), i % 17):
                value ^= 1 << bit
        hashes[str(uuid.uuid4())] = value
    now = datetime.now(UTC)
    rows = [
        _record_to_row(
            DataRecord(data_id, "acme", "x.jpg", 1, "0" * 64, "image/jpeg", "k", now, now)
        )
        for data_id in hashes
    ]
    signed = {k: v - 2**64 if v >= 2**63 else v for k, v in hashes.items()}
    with catalog.engine.begin() as connection:
        connection.execute(insert(data_table), rows)
        connection.execute(
            insert(image_hashes_table),
            [
                {
                    "data_id": k,
                    "org": "acme",
                    "dhash": signed[k],
                    "mirror": signed[k],
                    **{f"band{i}": b for i, b in enumerate(bands(v))},
                }
                for k, v in hashes.items()
            ],
        )
    similarity = Similarity(catalog, blobs=None, spool_dir=tmp_path)  # type: ignore[arg-type]
    for distance in (0, 2, 3, 5, 6, 8, 9, 11):
        found = similarity._matches("acme", [centre], distance, None, exclude="")
        scan = sorted(
            (hamming(centre, v), k) for k, v in hashes.items() if hamming(centre, v) <= distance
        )
        assert [(s.distance, s.record.id) for s in found] == scan, distance
        assert len(scan) > 0
        assert not similarity._matches("globex", [centre], distance, None, exclude="")
    assert BANDS == 3


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ServerHandle]:
    settings = replace(
        Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0"), auth_cache_seconds=0
    )
    with serving(settings) as handle:
        yield handle


def hash_now(handle: ServerHandle) -> None:
    """Run the background hashing job's work at once (it also runs on its own)."""
    similarity = handle.running.similarity
    assert similarity is not None
    asyncio.run_coroutine_threadsafe(similarity.hash_pending(), handle.loop).result(60)


def test_find_similar_by_id_and_by_bytes_within_the_organization(secured: ServerHandle) -> None:
    writer = auth(create_token(secured, "acme", Role.WRITE))
    reader = auth(create_token(secured, "acme", Role.READ))
    globex = auth(create_token(secured, "globex", Role.WRITE))
    with grpc.insecure_channel(secured.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)

        def store(content: bytes, name: str, metadata: object = writer) -> str:
            return stub.UploadData(requests(content, name), metadata=metadata).data.id  # type: ignore[arg-type]

        original = store(jpeg(photo(1)), "original.jpg")
        copies = {
            name: store(content, f"{name}.jpg") for name, content in variants(photo(1)).items()
        }
        distinct = [store(jpeg(photo(seed)), f"other{seed}.jpg") for seed in range(2, 8)]
        text = store(b"just text", "notes.txt")
        theirs = store(jpeg(photo(1)), "theirs.jpg", globex)
        hash_now(secured)

        answer = stub.FindSimilar(pb.FindSimilarRequest(id=original), metadata=reader)
        found = {r.data.id: r for r in answer.results}
        assert set(found) == set(copies.values())  # not itself, not the distinct, not globex's
        assert found[copies["flipped"]].mirrored
        assert not found[copies["quality60"]].mirrored
        distances = [r.distance for r in answer.results]
        assert distances == sorted(distances)

        plain = stub.FindSimilar(
            pb.FindSimilarRequest(id=original, exclude_mirrored=True), metadata=reader
        )
        assert copies["flipped"] not in {r.data.id for r in plain.results}

        by_bytes = stub.FindSimilar(
            pb.FindSimilarRequest(image=jpeg(photo(1), 75), max_distance=0), metadata=reader
        )
        assert original in {r.data.id for r in by_bytes.results}
        assert theirs not in {r.data.id for r in by_bytes.results}

        narrowed = stub.FindSimilar(
            pb.FindSimilarRequest(id=original, filter='filename = "crop*"'), metadata=reader
        )
        assert [r.data.id for r in narrowed.results] == [copies["cropped"]]

        paged, token = [], ""
        while True:
            page = stub.FindSimilar(
                pb.FindSimilarRequest(id=original, page_size=2, page_token=token),
                metadata=reader,
            )
            paged += [r.data.id for r in page.results]
            token = page.next_page_token
            if not token:
                break
        assert paged == [r.data.id for r in answer.results]

        # Another organization's item does not exist; a non-image is a bad query.
        with pytest.raises(grpc.RpcError) as caught:
            stub.FindSimilar(pb.FindSimilarRequest(id=theirs), metadata=reader)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        for bad in (
            pb.FindSimilarRequest(id=text),
            pb.FindSimilarRequest(image=b"not an image"),
            pb.FindSimilarRequest(id=original, max_distance=12),
            pb.FindSimilarRequest(),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.FindSimilar(bad, metadata=reader)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # A deleted item is no longer found.
        stub.DeleteData(pb.DeleteDataRequest(id=copies["resized"]), metadata=writer)
        again = stub.FindSimilar(pb.FindSimilarRequest(id=original), metadata=reader)
        assert copies["resized"] not in {r.data.id for r in again.results}
        assert distinct


def test_new_images_are_hashed_in_the_background(running_server: ServerHandle) -> None:
    similarity = running_server.running.similarity
    assert similarity is not None
    target = running_server.target
    with Client(target) as client, grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        first = stub.UploadData(requests(jpeg(photo(3)), "a.jpg")).data.id
        second = stub.UploadData(requests(jpeg(photo(3), 60), "b.jpg")).data.id
        # No query has asked for anything yet: only the background job can hash these.
        stored, deadline = 0, time.monotonic() + 60
        while stored < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            stored = asyncio.run_coroutine_threadsafe(
                similarity.count(), running_server.loop
            ).result(30)
        assert stored == 2
        found = list(client.get_datalake().find_similar(first))
        assert [s.data.id for s in found] == [second]


def test_similar_and_dedup_commands(
    running_server: ServerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server_target = running_server.target
    t = ("--target", server_target)
    with grpc.insecure_channel(server_target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        a = stub.UploadData(requests(jpeg(photo(5)), "a.jpg", {"reference": "x"})).data.id
        b = stub.UploadData(requests(jpeg(photo(5), 60), "b.jpg", {"reference": "x"})).data.id
        c = stub.UploadData(requests(jpeg(photo(5), 70), "c.jpg", {"reference": "y"})).data.id
        stub.UploadData(requests(jpeg(photo(6)), "d.jpg", {"reference": "x"}))
    hash_now(running_server)
    assert main(["similar", a, "--max-distance", "8", "--json", *t]) == EXIT_OK
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["id"] for line in lines} == {b, c}
    image = tmp_path / "query.jpg"
    image.write_bytes(jpeg(photo(5), 80))
    assert main(["similar", "--image", str(image), "-q", *t]) == EXIT_OK
    assert set(capsys.readouterr().out.split()) == {a, b, c}
    assert main(["similar", *t]) == EXIT_USAGE
    capsys.readouterr()

    assert main(["dedup", "--filter", 'reference = "x"', "--json", *t]) == EXIT_OK
    (group,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(item["id"] for item in group["items"]) == sorted([a, b])
    assert main(["dedup", *t]) == EXIT_OK
    out = capsys.readouterr().out
    assert "group 1: 3 items" in out


def test_background_hashing_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env().hash_images
    monkeypatch.setenv("METALAKE_HASH_IMAGES", "false")
    assert not Settings.from_env().hash_images


async def test_a_catalog_outage_is_one_warning_a_round_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """During an outage the background job retries every interval; its log must stay readable."""
    import sqlalchemy.exc

    from metalake.server.similarity import keep_hashing

    third_round = asyncio.Event()

    class CatalogAway:
        calls = 0

        async def hash_pending(self) -> int:
            CatalogAway.calls += 1
            if CatalogAway.calls == 3:
                third_round.set()
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError())

    job = asyncio.create_task(keep_hashing(CatalogAway(), 0.01))  # type: ignore[arg-type]
    await asyncio.wait_for(third_round.wait(), timeout=30)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    waits = [r for r in caplog.records if "waits for the backend" in r.getMessage()]
    assert len(waits) >= 2
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in waits)
    assert not any(r.exc_info for r in caplog.records if r.name.endswith("similarity"))
