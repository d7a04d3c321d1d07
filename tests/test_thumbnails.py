"""Previews: made on first request, upright, kept as blobs, counted, deleted with their item."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import boto3
import grpc
import pytest
from PIL import Image

from metalake import Client
from metalake.errors import NotFoundError as ClientNotFound
from metalake.server import thumbnails
from metalake.server.blobstore import discard_leftovers
from metalake.server.catalog import SqlCatalog, ThumbnailRecord
from metalake.server.config import Settings
from metalake.server.decoding import Decoders
from metalake.server.errors import NotFound
from metalake.server.imagehash import NotAnImageError, hash_image
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests import imagesamples
from tests.conftest import ServerHandle, serving, stored_blobs
from tests.test_service import upload, violations

Stub = pb_grpc.DatalakeServiceStub
CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
_T = TypeVar("_T")


def on_server(handle: ServerHandle, work: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run_coroutine_threadsafe(work, handle.loop).result(timeout=30)


def thumbnail(stub: Stub, data_id: str, size: int = 0) -> pb.GetThumbnailResponse:
    response: pb.GetThumbnailResponse = stub.GetThumbnail(
        pb.GetThumbnailRequest(id=data_id, size=size)
    )
    return response


def decoded(response: pb.GetThumbnailResponse) -> Image.Image:
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG"
    assert response.content_type == "image/jpeg"
    assert (image.width, image.height) == (response.width, response.height)
    assert response.sha256 == hashlib.sha256(response.content).hexdigest()
    return image.convert("RGB")


def assert_upright_landscape(image: Image.Image) -> None:
    """imagesamples.landscape(): red on the left, blue on the right, wider than high."""
    assert image.width > image.height
    left = image.getpixel((image.width // 8, image.height // 2))
    right = image.getpixel((image.width * 7 // 8, image.height // 2))
    assert isinstance(left, tuple)
    assert isinstance(right, tuple)
    assert (left[0] > 150, left[2] < 100) == (True, True), f"the left should be red: {left}"
    assert (right[0] < 100, right[2] > 150) == (True, True), f"the right should be blue: {right}"


# (orientation tag, how the camera stored the upright picture)
ORIENTATIONS = [
    (1, None),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
    (3, Image.Transpose.ROTATE_180),
    (4, Image.Transpose.FLIP_TOP_BOTTOM),
    (5, Image.Transpose.TRANSPOSE),
    (6, Image.Transpose.ROTATE_90),
    (7, Image.Transpose.TRANSVERSE),
    (8, Image.Transpose.ROTATE_270),
]


@pytest.mark.parametrize(("orientation", "stored_as"), ORIENTATIONS)
def test_previews_honour_exif_orientation(
    stub: Stub, orientation: int, stored_as: Image.Transpose | None
) -> None:
    upright = imagesamples.landscape(600, 400)
    stored = upright.transpose(stored_as) if stored_as is not None else upright
    data = upload(stub, imagesamples.jpeg_with_orientation(stored, orientation))
    small = decoded(thumbnail(stub, data.id, 256))
    assert (small.width, small.height) == (256, 171)
    assert_upright_landscape(small)


def test_sizes_are_the_long_side_and_small_images_are_not_enlarged(stub: Stub) -> None:
    big = upload(stub, imagesamples.encoded(imagesamples.landscape(2400, 1600), "JPEG"))
    assert (decoded(thumbnail(stub, big.id, 1024)).size) == (1024, 683)
    assert (decoded(thumbnail(stub, big.id, 256)).size) == (256, 171)
    assert (decoded(thumbnail(stub, big.id)).size) == (256, 171), "0 means 256"
    small = upload(stub, imagesamples.encoded(imagesamples.landscape(300, 200), "JPEG"))
    assert decoded(thumbnail(stub, small.id, 1024)).size == (300, 200)


def _transparent_png() -> bytes:
    image = Image.new("RGBA", (600, 400), (0, 0, 0, 0))
    image.paste((220, 20, 20, 255), (0, 0, 300, 400))
    image.paste((20, 20, 220, 255), (300, 0, 600, 400))
    return imagesamples.encoded(image, "PNG")


def _tiff_lzw() -> bytes:
    return imagesamples.encoded(imagesamples.landscape().convert("RGB"), "TIFF", compression="lzw")


FORMATS: dict[str, Callable[[], bytes]] = {
    "photo.png": lambda: imagesamples.encoded(imagesamples.landscape(), "PNG"),
    "alpha.png": _transparent_png,
    "photo.webp": lambda: imagesamples.encoded(imagesamples.landscape(), "WEBP"),
    "photo.tiff": _tiff_lzw,
    "photo.heic": lambda: imagesamples.encoded(imagesamples.landscape(), "HEIF"),
    "photo.avif": lambda: imagesamples.encoded(imagesamples.landscape(), "AVIF"),
    "photo.gif": lambda: imagesamples.encoded(imagesamples.landscape(), "GIF"),
    "photo.bmp": lambda: imagesamples.encoded(imagesamples.landscape(), "BMP"),
    "photo.jp2": lambda: imagesamples.encoded(imagesamples.landscape().convert("RGB"), "JPEG2000"),
    "photo.ppm": lambda: imagesamples.encoded(imagesamples.landscape().convert("RGB"), "PPM"),
    # The camera stored its preview turned left, and says so: the preview comes out upright.
    "IMG_0001.DNG": lambda: imagesamples.dng(
        imagesamples.encoded(imagesamples.landscape().transpose(Image.Transpose.ROTATE_90), "JPEG"),
        (400, 600),
        flip=6,
    ),
}


@pytest.mark.parametrize("filename", sorted(FORMATS))
def test_every_image_format_gets_an_upright_preview(stub: Stub, filename: str) -> None:
    data = upload(stub, FORMATS[filename](), filename=filename)
    assert_upright_landscape(decoded(thumbnail(stub, data.id, 256)))


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the shared corpus is not beside the repository")
@pytest.mark.parametrize(
    ("path", "size"),
    [
        ("heic/mobile/iphone_13_pro_max.HEIC", (192, 256)),
        ("jpg/orientation/portrait_6.jpg", (192, 256)),
        ("jpg/orientation/landscape_8.jpg", (256, 192)),
    ],
)
def test_real_camera_files_get_previews(stub: Stub, path: str, size: tuple[int, int]) -> None:
    file = CORPUS / path
    data = upload(stub, file.read_bytes(), filename=file.name)
    assert decoded(thumbnail(stub, data.id, 256)).size == size


@pytest.mark.parametrize(
    ("content", "filename"),
    [
        (b"just some notes\n", "notes.txt"),
        (b"\xff\xd8\xff\xe0" + b"\x00not really a jpeg" * 100, "broken.jpg"),
        (b"II*\x00" + b"\x00" * 200, "broken.nef"),
    ],
)
def test_a_file_without_a_preview_uploads_and_has_none(
    stub: Stub, running_server: ServerHandle, content: bytes, filename: str
) -> None:
    data = upload(stub, content, filename=filename)
    for _ in range(2):  # the second answer comes from the catalog's record of the first
        with pytest.raises(grpc.RpcError) as caught:
            thumbnail(stub, data.id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "preview" in (caught.value.details() or "")
    # The item itself is intact.
    assert stub.GetData(pb.GetDataRequest(id=data.id)).data.sha256 == data.sha256


def test_bad_sizes_and_unknown_items(stub: Stub) -> None:
    data = upload(stub, imagesamples.encoded(imagesamples.landscape(), "JPEG"))
    with pytest.raises(grpc.RpcError) as caught:
        thumbnail(stub, data.id, 512)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "size" in violations(caught.value)
    with pytest.raises(grpc.RpcError) as caught:
        thumbnail(stub, "no-such-item")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def blob_files(data_dir: Path) -> set[str]:
    return set(stored_blobs(data_dir))


def used_bytes(handle: ServerHandle) -> int:
    catalog = handle.running.datalake.catalog
    return on_server(handle, catalog.organization("default")).used_bytes


def test_previews_are_kept_counted_shared_and_deleted_with_their_item(
    stub: Stub, running_server: ServerHandle
) -> None:
    content = imagesamples.encoded(imagesamples.landscape(1600, 1200), "JPEG")
    first = upload(stub, content, filename="a.jpg")
    second = upload(stub, content, filename="b.jpg")  # identical content: one blob
    assert used_bytes(running_server) == 2 * len(content)
    assert blob_files(running_server.data_dir) == {first.sha256}

    preview = thumbnail(stub, first.id, 1024)
    assert blob_files(running_server.data_dir) == {first.sha256, preview.sha256}
    assert used_bytes(running_server) == 2 * len(content) + len(preview.content)
    assert thumbnail(stub, first.id, 1024).content == preview.content  # kept, not remade
    assert thumbnail(stub, second.id, 1024).sha256 == preview.sha256  # shared blob...
    assert used_bytes(running_server) == 2 * (len(content) + len(preview.content))  # ...counted

    stub.DeleteData(pb.DeleteDataRequest(id=first.id))
    assert blob_files(running_server.data_dir) == {first.sha256, preview.sha256}
    assert thumbnail(stub, second.id, 1024).content == preview.content
    stub.DeleteData(pb.DeleteDataRequest(id=second.id))
    assert blob_files(running_server.data_dir) == set()
    assert used_bytes(running_server) == 0


def test_garbage_collection_keeps_previews(stub: Stub, running_server: ServerHandle) -> None:
    data = upload(stub, imagesamples.encoded(imagesamples.landscape(), "JPEG"))
    preview = thumbnail(stub, data.id)
    datalake = running_server.running.datalake
    garbage = on_server(running_server, datalake.collect_garbage(orphan_age=timedelta(0)))
    assert garbage.orphan_blobs == 0
    assert thumbnail(stub, data.id).content == preview.content


@pytest.fixture
def s3_server(tmp_path: Path, s3_url: str) -> Iterator[ServerHandle]:
    settings = Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0", blob_url=s3_url)
    with serving(settings) as handle:
        yield handle


def test_previews_live_in_the_bucket_too(
    s3_server: ServerHandle, s3_url: str, s3_endpoint: str
) -> None:
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)

    def keys() -> set[str]:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/blobs/")
        return {item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", [])}

    with grpc.insecure_channel(s3_server.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        data = upload(stub, imagesamples.encoded(imagesamples.landscape(), "PNG"), "a.png")
        preview = thumbnail(stub, data.id)
        assert_upright_landscape(decoded(preview))
        assert keys() == {data.sha256, preview.sha256}
        stub.DeleteData(pb.DeleteDataRequest(id=data.id))
        assert keys() == set()


def test_a_preview_scratch_file_is_named_after_its_process(
    s3_server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # From S3, the item's bytes are copied to tmp/ to be rendered. A server's worker processes
    # share tmp/: when one is replaced, only the files named after its pid are discarded.
    run = Decoders.run
    seen: list[str] = []

    async def running(
        self: Decoders, function: Callable[..., Any], /, *args: Any, **kw: Any
    ) -> Any:
        if function is thumbnails.render:  # handed to a decoder process: the file is ready
            path = args[0]
            seen.append(path.name)
            assert discard_leftovers(path.parent, owner=os.getpid() + 1) == 0  # a sibling's
            assert path.exists()
        return await run(self, function, *args, **kw)

    monkeypatch.setattr(Decoders, "run", running)
    with grpc.insecure_channel(s3_server.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        data = upload(stub, imagesamples.encoded(imagesamples.landscape(), "PNG"), "a.png")
        assert_upright_landscape(decoded(thumbnail(stub, data.id)))
    assert len(seen) == 1
    assert seen[0].startswith(f"{os.getpid()}-")
    assert not (s3_server.data_dir / "tmp" / seen[0]).exists()


async def test_a_preview_of_an_item_deleted_meanwhile_is_not_recorded(tmp_path: Path) -> None:
    catalog = SqlCatalog.open(f"sqlite:///{tmp_path / 'c.sqlite3'}", migrate=True)
    try:
        record = ThumbnailRecord(
            "gone", 256, "default", "0" * 64, "ab" * 32, 10, 1, 1, datetime.now(UTC)
        )
        with pytest.raises(NotFound):
            await catalog.add_thumbnail(record)
        assert not await catalog.blob_in_use("ab" * 32)
    finally:
        await catalog.close()


def test_the_sdk_fetches_previews(server_target: str, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(imagesamples.encoded(imagesamples.landscape(), "PNG"))
    with Client(server_target) as client:
        datalake = client.get_datalake()
        photo = datalake.upload_data(path)
        image = Image.open(io.BytesIO(photo.thumbnail(256)))
        assert image.size == (256, 171)
        assert datalake.get_thumbnail(photo.id, 1024) == photo.thumbnail(1024)
        with pytest.raises(ClientNotFound):
            datalake.get_thumbnail("missing")


def test_concurrent_first_requests_make_one_preview(
    stub: Stub, running_server: ServerHandle
) -> None:
    content = imagesamples.encoded(imagesamples.landscape(1200, 800), "JPEG")
    data = upload(stub, content)
    calls = [
        stub.GetThumbnail.future(pb.GetThumbnailRequest(id=data.id, size=1024)) for _ in range(8)
    ]
    answers = {call.result().sha256 for call in calls}
    assert len(answers) == 1
    assert blob_files(running_server.data_dir) == {data.sha256, *answers}
    preview_bytes = len(thumbnail(stub, data.id, 1024).content)
    assert used_bytes(running_server) == len(content) + preview_bytes


def _eps() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), "red").save(buffer, "EPS")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("filename", "content", "plugin"),
    [
        # Blizzard's texture format, decoded in Python: one of Pillow's crafted 284-byte tests
        # kept its decoder busy 1.2 s for a preview.
        (
            "texture.blp",
            lambda: imagesamples.encoded(imagesamples.landscape().convert("P"), "BLP"),
            "BLP",
        ),
        # Pillow renders EPS by running Ghostscript, where that is installed.
        ("figure.eps", _eps, "EPS"),
    ],
)
def test_formats_outside_the_decoded_ones_get_no_preview_and_no_decoder(
    stub: Stub,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    filename: str,
    content: Callable[[], bytes],
    plugin: str,
) -> None:
    data = content()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == plugin  # Pillow reads it...
    factory, accept = Image.OPEN[plugin]
    opened: list[str] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        opened.append(plugin)
        return factory(*args, **kwargs)

    monkeypatch.setitem(Image.OPEN, plugin, (counting, accept))
    path = tmp_path / filename
    path.write_bytes(data)
    assert thumbnails.render(path, 256, filename=filename) is None
    with pytest.raises(NotAnImageError):
        hash_image(io.BytesIO(data))
    assert opened == []  # its reader never saw the client's bytes
    # The server, whose decoder processes use the same list, though the client calls it an image.
    item = upload(stub, data, filename=filename, content_type="image/x-" + plugin.lower())
    with pytest.raises(grpc.RpcError) as caught:
        thumbnail(stub, item.id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
