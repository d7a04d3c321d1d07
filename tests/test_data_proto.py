"""The item as the API shows it (servicer.data_to_proto, fill_data): every field of
metalake.v1.Data from a record that has them all, and an item with nothing optional still has
its metadata message and its times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from metalake import metadata as md
from metalake.server.catalog import DataRecord
from metalake.server.servicer import _fill_list, data_to_proto
from metalake.v1 import datalake_pb2 as pb

_CREATED = datetime(2026, 12, 7, 10, 30, 1, 250_000, tzinfo=UTC)


def _record(**fields: object) -> DataRecord:
    base: dict[str, object] = {
        "id": "0193a7b2-1234-7abc-8def-0123456789ab",
        "org": "acme",
        "filename": "IMG_0001.jpg",
        "size": 163_840,
        "sha256": "ab" * 32,
        "content_type": "image/jpeg",
        "blob_key": "ab" * 32,
        "created_at": _CREATED,
        "updated_at": _CREATED + timedelta(seconds=5),
    }
    base.update(fields)
    return DataRecord(**base)  # type: ignore[arg-type]


_METADATA = md.normalize(
    {
        "acquired_at": datetime(2021, 6, 1, 12, 34, 56, tzinfo=timezone(timedelta(hours=2))),
        "manufacturer": "Metalake Optics",
        "latitude": -33.8568,
        "resolution_x": 300.0,
    }
)
_FULL = _record(
    metadata=_METADATA,
    metadata_sources={"acquired_at": "pillow", "manufacturer": "client"},
    tags=("field", "2026"),
    revision=3,
    labels={"rig": "7"},
)


def test_every_field_of_data_comes_from_a_record_that_has_them_all() -> None:
    message = data_to_proto(_FULL)
    for field in pb.Data.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:  # lists and maps
            assert len(value) > 0, field.name
        elif field.message_type is not None:
            assert message.HasField(field.name), field.name  # type: ignore[arg-type]
        else:
            assert value != field.default_value, field.name
    assert (message.id, message.filename, message.size) == (
        "0193a7b2-1234-7abc-8def-0123456789ab",
        "IMG_0001.jpg",
        163_840,
    )
    assert (message.sha256, message.content_type, message.etag) == ("ab" * 32, "image/jpeg", '"3"')
    assert md.from_proto(message.metadata) == (_METADATA, [])
    assert dict(message.metadata_sources) == _FULL.metadata_sources
    assert list(message.tags) == ["field", "2026"]
    assert dict(message.labels) == {"rig": "7"}
    assert message.created_at.ToDatetime(tzinfo=UTC) == _CREATED
    assert message.updated_at.ToDatetime(tzinfo=UTC) == _CREATED + timedelta(seconds=5)


def test_an_item_with_nothing_optional_still_has_its_metadata_and_times() -> None:
    for created in (_CREATED, datetime(1970, 1, 1, tzinfo=UTC)):  # the epoch is all zeros
        message = data_to_proto(_record(created_at=created, updated_at=created))
        assert message.HasField("metadata")
        assert message.metadata == pb.Metadata()
        assert message.HasField("created_at")
        assert message.HasField("updated_at")
        assert message.created_at.ToDatetime(tzinfo=UTC) == created
        assert len(message.tags) == len(message.labels) == len(message.metadata_sources) == 0


def test_items_written_into_a_response_are_the_items_data_to_proto_makes() -> None:
    """As ListData fills its page: each item written into the list's own new element, where an
    item with nothing optional must still get its metadata message and its times."""
    records = [_FULL, _record(id="second", tags=("x",)), _record(id="bare")]
    response = pb.ListDataResponse(next_page_token="next")
    _fill_list(response.data, records)
    assert list(response.data) == [data_to_proto(record) for record in records]
    assert response.data[2].HasField("metadata")
    assert response.data[2].HasField("created_at")
    assert response.next_page_token == "next"
