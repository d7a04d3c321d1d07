"""Hostile input at a real server: every request gets a clean answer and the server keeps serving.

Hypothesis generates wrong types, huge counts, broken UTF-8, absurd numbers and deeply nested
filters; each call must end in success or a deliberate status, never UNKNOWN (an unhandled
exception) and never a hang.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc

Stub = pb_grpc.DatalakeServiceStub
CLEAN = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
}
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,  # large inputs are the point of these tests
    ],
)

texts = st.one_of(
    st.text(max_size=50),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1000, max_size=3000),
    st.sampled_from(["", " ", "../../etc/passwd", "/dev/zero", "$(reboot)", "a\x00b", "\u202e"]),
)
# Tags come in lists: mostly short, some far too long, without making every example huge.
tag_texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "x" * 1025, "y" * 5000, "../tags", "a\x00b", "\ud7ff" * 300]),
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 4294967295.0, -1e308, 1e308, math.nan]),
)


def answered(call: object, allowed: frozenset[grpc.StatusCode] = frozenset()) -> None:
    """Run a call; it may fail, but only with a deliberate status."""
    failure: grpc.RpcError | None = None
    try:
        result = call() if callable(call) else call
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as error:
        failure = error
    if failure is not None:
        assert failure.code() in CLEAN | allowed, f"{failure.code()}: {failure.details()}"


@FUZZ
@given(
    filename=texts,
    tags=st.lists(tag_texts, max_size=150),
    latitude=numbers,
    resolution=numbers,
    reference=texts,
    content_type=texts,
    request_id=texts,
    expected=st.one_of(st.just(""), st.text(max_size=80)),
    chunks=st.lists(st.binary(max_size=3000), max_size=5),
    second_header=st.booleans(),
)
def test_hostile_uploads_are_refused_cleanly(
    stub: Stub,
    filename: str,
    tags: list[str],
    latitude: float,
    resolution: float,
    reference: str,
    content_type: str,
    request_id: str,
    expected: str,
    chunks: list[bytes],
    second_header: bool,
) -> None:
    header = pb.UploadDataHeader(
        filename=filename,
        tags=tags,
        content_type=content_type,
        request_id=request_id,
        expected_sha256=expected,
        metadata=pb.Metadata(latitude=latitude, resolution_x=resolution, reference=reference),
    )
    messages = [pb.UploadDataRequest(header=header)]
    messages += [pb.UploadDataRequest(chunk=c) for c in chunks]
    if second_header:
        messages.append(pb.UploadDataRequest(header=header))
    answered(lambda: stub.UploadData(iter(messages), timeout=30))


@FUZZ
@given(
    filter=st.one_of(
        st.text(max_size=200),
        st.integers(1, 5000).map(lambda n: "(" * n + "latitude > 1" + ")" * n),
        st.integers(1, 500).map(lambda n: "NOT " * n + "latitude > 1"),
        st.integers(1, 2000).map(lambda n: " OR ".join(["latitude > 1"] * n)),
    ),
    order_by=st.text(max_size=60),
    page_size=st.integers(-(2**31), 2**31 - 1),
    page_token=st.text(max_size=200),
)
def test_hostile_listings_are_refused_cleanly(
    stub: Stub, filter: str, order_by: str, page_size: int, page_token: str
) -> None:
    request = pb.ListDataRequest(
        filter=filter, order_by=order_by, page_size=page_size, page_token=page_token
    )
    answered(lambda: stub.ListData(request, timeout=30))
    # A valid watch streams until its deadline: that is the one status it may end with.
    answered(
        lambda: stub.WatchData(pb.WatchDataRequest(filter=filter), timeout=0.2),
        frozenset({grpc.StatusCode.DEADLINE_EXCEEDED}),
    )


@FUZZ
@given(data_id=texts, offset=st.integers(-(2**63), 2**63 - 1), paths=st.lists(texts, max_size=40))
def test_hostile_ids_and_masks_are_refused_cleanly(
    stub: Stub, data_id: str, offset: int, paths: list[str]
) -> None:
    answered(lambda: stub.GetData(pb.GetDataRequest(id=data_id), timeout=30))
    answered(lambda: stub.DeleteData(pb.DeleteDataRequest(id=data_id), timeout=30))
    answered(
        lambda: stub.DownloadData(
            pb.DownloadDataRequest(id=data_id, read_offset=offset), timeout=30
        )
    )
    answered(lambda: stub.QueryUpload(pb.QueryUploadRequest(upload_id=data_id), timeout=30))
    request = pb.UpdateMetadataRequest(id=data_id)
    request.update_mask.paths.extend(paths)
    answered(lambda: stub.UpdateMetadata(request, timeout=30))


@FUZZ
@given(payload=st.binary(max_size=2000))
def test_undecodable_bytes_and_broken_utf8_are_refused(
    channel: grpc.Channel, stub: Stub, payload: bytes
) -> None:
    raw = channel.unary_unary(
        "/metalake.v1.DatalakeService/GetData",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    # Field 1 (id) as a string that is not UTF-8, then arbitrary bytes.
    for message in (b"\x0a\x02\xff\xfe", payload):
        answered(lambda m=message: raw(m, timeout=30))
    assert stub.ListData(pb.ListDataRequest(page_size=1), timeout=30) is not None


@pytest.fixture(autouse=True)
def still_serving(stub: Stub) -> Iterator[None]:
    yield
    # After all of it, an ordinary upload still works.
    header = pb.UploadDataHeader(filename="after.jpg")
    data = stub.UploadData(
        iter([pb.UploadDataRequest(header=header), pb.UploadDataRequest(chunk=b"ok")]), timeout=30
    ).data
    assert data.size == 2
