"""The catalog contract, run against every implementation: SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy
from alembic import command as alembic_command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext

from metalake.server.catalog import DataRecord, SqlCatalog, ThumbnailRecord, new_item_id
from metalake.server.errors import InvalidRequest, NotFound
from metalake.server.schema import metadata_obj
from metalake.server.schema_versions import SchemaError, engine_url

_clock = datetime(2024, 1, 1, tzinfo=UTC)
ORG = "acme"


def record(**changes: object) -> DataRecord:
    global _clock
    _clock += timedelta(seconds=1)
    fields: dict[str, object] = {
        "id": str(uuid.uuid4()),
        "org": ORG,
        "filename": "a.jpg",
        "size": 3,
        "sha256": "ab" * 32,
        "content_type": "image/jpeg",
        "blob_key": "ab" * 32,
        "created_at": _clock,
        "updated_at": _clock,
    }
    fields.update(changes)
    return DataRecord(**fields)  # type: ignore[arg-type]


async def test_a_record_round_trips_with_every_field(catalog: SqlCatalog) -> None:
    stored = record(
        metadata={
            "latitude": -12.5,
            "longitude": 0.0,
            "altitude": -3.25,
            "acquired_at": datetime(2021, 4, 11, 15, 47, 53, tzinfo=timezone(timedelta(hours=-5))),
            "acquired_by": "USER-178",
            "weather": "rain",
            "resolution_x": 72.0,
            "resolution_y": 300.5,
            "resolution_unit": "inches",
            "compression": "JPEG (old-style)",
            "manufacturer": "Canon",
            "software": "GIMP 2.4.5",
            "color_space": "sRGB",
            "custom_id": "c-1",
            "reference": "7NGOMI",
        },
        metadata_sources={"latitude": "client", "manufacturer": "pillow"},
        tags=("a", "b"),
    )
    await catalog.add(stored)
    assert await catalog.get(ORG, stored.id) == stored


async def test_naive_and_aware_times_stay_distinct(catalog: SqlCatalog) -> None:
    naive = record(metadata={"acquired_at": datetime(2021, 4, 11, 15, 47, 53)})
    utc = record(metadata={"acquired_at": datetime(2021, 4, 11, 15, 47, 53, tzinfo=UTC)})
    for item in (naive, utc):
        await catalog.add(item)
        back = (await catalog.get(ORG, item.id)).metadata["acquired_at"]
        assert isinstance(back, datetime)
        assert back.utcoffset() == item.metadata["acquired_at"].utcoffset()  # type: ignore[union-attr]


async def test_unknown_ids_are_not_found(catalog: SqlCatalog) -> None:
    with pytest.raises(NotFound):
        await catalog.get(ORG, "missing")
    with pytest.raises(NotFound):
        await catalog.delete(ORG, "missing")
    with pytest.raises(NotFound):
        await catalog.update_metadata(ORG, "missing", {"weather": "x"}, [], datetime.now(UTC))


async def test_update_sets_and_clears_and_records_the_client(catalog: SqlCatalog) -> None:
    item = record(
        metadata={"weather": "rain", "manufacturer": "Canon"},
        metadata_sources={"weather": "client", "manufacturer": "pillow"},
    )
    await catalog.add(item)
    later = item.updated_at + timedelta(minutes=1)
    updated = await catalog.update_metadata(
        ORG, item.id, {"latitude": 1.5}, ["manufacturer"], later
    )
    assert updated.metadata == {"weather": "rain", "latitude": 1.5}
    assert updated.metadata_sources == {"weather": "client", "latitude": "client"}
    assert updated.updated_at == later
    assert await catalog.get(ORG, item.id) == updated


async def test_concurrent_updates_of_different_fields_lose_nothing(catalog: SqlCatalog) -> None:
    item = record()
    await catalog.add(item)
    now = datetime.now(UTC)
    await asyncio.gather(
        *(
            catalog.update_metadata(ORG, item.id, {field: f"v{i}"}, [], now)
            for i, field in enumerate(["weather", "reference", "custom_id", "software"] * 5)
        )
    )
    assert set((await catalog.get(ORG, item.id)).metadata) == {
        "weather",
        "reference",
        "custom_id",
        "software",
    }


async def test_another_organization_sees_nothing(catalog: SqlCatalog) -> None:
    item = record(request_id="r-1")
    await catalog.add(item)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: catalog.get("other", item.id),
        lambda: catalog.delete("other", item.id),
        lambda: catalog.update_metadata("other", item.id, {"weather": "x"}, [], _clock),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            await call()
    page = await catalog.list_page("other", filter="", order_by="", page_size=10, page_token="")
    assert page.records == []
    assert await catalog.find_request("other", "r-1") is None
    assert await catalog.find_request(ORG, "r-1") == item
    # The same request id in another organization is another request.
    await catalog.add(record(org="other", request_id="r-1"))


async def test_delete_and_blob_references(catalog: SqlCatalog) -> None:
    first = record(blob_key="cd" * 32, tags=("x",))
    second = record(blob_key="cd" * 32)
    await catalog.add(first)
    await catalog.add(second)
    assert await catalog.delete(ORG, first.id) == first
    assert await catalog.blob_in_use("cd" * 32)
    await catalog.delete(ORG, second.id)
    assert not await catalog.blob_in_use("cd" * 32)


async def test_pages_walk_everything_once_in_order(catalog: SqlCatalog) -> None:
    items = [
        record(metadata={"latitude": float(i % 3)} if i % 4 else {}, filename=f"{i:02d}")
        for i in range(11)
    ]
    for item in items:
        await catalog.add(item)
    for order_by, key in [
        ("", lambda r: (r.created_at, r.id)),
        ("filename desc", lambda r: r.filename),
    ]:
        seen: list[str] = []
        token = ""
        while True:
            page = await catalog.list_page(
                ORG, filter="", order_by=order_by, page_size=4, page_token=token
            )
            seen += [r.id for r in page.records]
            token = page.next_page_token
            if not token:
                break
        expected = sorted(items, key=key, reverse="desc" in order_by)
        assert seen == [r.id for r in expected], order_by


async def test_paging_over_a_nullable_field_puts_absent_values_last(catalog: SqlCatalog) -> None:
    items = [
        record(metadata={"latitude": float(v)} if v is not None else {})
        for v in [3, None, 1, None, 2, 1]
    ]
    for item in items:
        await catalog.add(item)
    for descending in (False, True):
        seen: list[DataRecord] = []
        token = ""
        while True:
            page = await catalog.list_page(
                ORG,
                filter="",
                order_by="latitude desc" if descending else "latitude",
                page_size=2,
                page_token=token,
            )
            seen += page.records
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == len(items)
        assert {r.id for r in seen} == {r.id for r in items}
        present = [r.metadata["latitude"] for r in seen if "latitude" in r.metadata]
        assert present == sorted(present, reverse=descending)
        assert all("latitude" not in r.metadata for r in seen[len(present) :])


async def test_bad_page_tokens_are_invalid_arguments(catalog: SqlCatalog) -> None:
    with pytest.raises(InvalidRequest):
        await catalog.list_page(ORG, filter="", order_by="", page_size=1, page_token="%%%")


async def test_the_migrations_build_exactly_the_declared_schema(catalog_url: str) -> None:
    catalog = SqlCatalog.open(catalog_url, migrate=True)
    await catalog.close()
    engine = sqlalchemy.create_engine(engine_url(catalog_url))
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata_obj)
    engine.dispose()
    assert differences == []


async def test_the_tag_facets_migration_gives_existing_tags_their_items_org(
    catalog_url: str,
) -> None:
    engine = sqlalchemy.create_engine(engine_url(catalog_url))
    with engine.begin() as connection:
        config = AlembicConfig()
        config.set_main_option("script_location", "metalake.server:migrations")
        config.attributes["connection"] = connection
        alembic_command.upgrade(config, "0007_dataset_labels")
        for number, org in enumerate(["acme", "other"]):
            connection.execute(
                sqlalchemy.text(
                    "INSERT INTO data (id, org, filename, size, sha256, content_type, blob_key,"
                    " created_at, updated_at, metadata_sources, revision)"
                    " VALUES (:id, :org, 'a', 1, 'x', 't', 'k', :n, :n, '{}', 1)"
                ),
                {"id": f"item-{org}", "org": org, "n": number},
            )
            connection.execute(
                sqlalchemy.text("INSERT INTO data_tags (data_id, tag) VALUES (:id, :tag)"),
                [{"id": f"item-{org}", "tag": f"{org}-tag"}, {"id": f"item-{org}", "tag": "both"}],
            )
    engine.dispose()
    catalog = SqlCatalog.open(catalog_url, migrate=True)
    try:
        assert await catalog.distinct_values("acme", "tags", 30) == ["acme-tag", "both"]
        assert await catalog.distinct_values("other", "tags", 30) == ["both", "other-tag"]
    finally:
        await catalog.close()


def test_an_empty_catalog_is_not_migrated_unless_asked(catalog_url: str) -> None:
    with pytest.raises(SchemaError, match="metalake migrate"):
        SqlCatalog.open(catalog_url)


async def test_a_schema_from_a_newer_server_is_refused(catalog_url: str) -> None:
    catalog = SqlCatalog.open(catalog_url, migrate=True)
    await catalog.close()
    engine = sqlalchemy.create_engine(engine_url(catalog_url))
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    for migrate in (False, True):
        with pytest.raises(SchemaError, match="newer metalake"):
            SqlCatalog.open(catalog_url, migrate=migrate)


async def test_previews_are_recorded_counted_shared_and_go_with_their_item(
    catalog: SqlCatalog,
) -> None:
    item = record(size=1000, sha256="12" * 32, blob_key="12" * 32)
    twin = record(size=1000, sha256="12" * 32, blob_key="12" * 32)
    await catalog.add(item)
    await catalog.add(twin)
    preview = ThumbnailRecord(item.id, 256, ORG, item.sha256, "34" * 32, 70, 256, 171, _clock)
    assert await catalog.add_thumbnail(preview) == preview
    # The first one recorded wins; a second try counts nothing more.
    other = ThumbnailRecord(item.id, 256, ORG, item.sha256, "56" * 32, 90, 256, 171, _clock)
    assert await catalog.add_thumbnail(other) == preview
    assert (await catalog.organization(ORG)).used_bytes == 2000 + 70
    assert await catalog.thumbnail(ORG, item.id, 256) == preview
    assert await catalog.thumbnail("other-org", item.id, 256) is None
    assert await catalog.thumbnail(ORG, item.id, 1024) is None
    assert await catalog.shared_thumbnail(item.sha256, 256) == preview
    assert await catalog.blob_in_use("34" * 32)
    nothing = ThumbnailRecord(item.id, 1024, ORG, item.sha256, None, 0, 0, 0, _clock)
    await catalog.add_thumbnail(nothing)
    assert await catalog.thumbnail_keys(ORG, item.id) == ["34" * 32]

    await catalog.delete(ORG, item.id)
    assert (await catalog.organization(ORG)).used_bytes == 1000
    assert await catalog.thumbnail(ORG, item.id, 256) is None
    assert not await catalog.blob_in_use("34" * 32)
    assert await catalog.thumbnail_keys(ORG, item.id) == []
    with pytest.raises(NotFound):
        await catalog.add_thumbnail(preview)  # its item is gone
    assert (await catalog.organization(ORG)).used_bytes == 1000


async def test_distinct_values_walk_the_index_in_order(catalog: SqlCatalog) -> None:
    for maker in ["Sony", "Canon", "Nikon", "Canon", None, "Apple"]:
        await catalog.add(record(metadata={"manufacturer": maker} if maker else {}))
    await catalog.add(record(org="other", metadata={"manufacturer": "Leica"}))
    assert await catalog.distinct_values(ORG, "manufacturer", 30) == [
        "Apple",
        "Canon",
        "Nikon",
        "Sony",
    ]
    assert await catalog.distinct_values(ORG, "manufacturer", 2) == ["Apple", "Canon"]
    assert await catalog.distinct_values("nobody", "manufacturer", 30) == []
    with pytest.raises(ValueError, match="index"):
        await catalog.distinct_values(ORG, "weather", 30)


async def test_distinct_tags_and_labels_never_cross_organizations(catalog: SqlCatalog) -> None:
    await catalog.add(record(tags=("sunny", "rig"), labels={"rig": "r2", "site": "north"}))
    await catalog.add(record(tags=("sunny",), labels={"rig": "r1"}))
    # Another organization's tags sort before, between and after ours, and share one.
    await catalog.add(
        record(org="other", tags=("alpha", "secret", "sunny", "zulu"), labels={"rig": "r9"})
    )
    assert await catalog.distinct_values(ORG, "tags", 30) == ["rig", "sunny"]
    assert await catalog.distinct_values(ORG, "tags", 1) == ["rig"]
    theirs = ["alpha", "secret", "sunny", "zulu"]
    assert await catalog.distinct_values("other", "tags", 30) == theirs
    assert await catalog.distinct_values("nobody", "tags", 30) == []
    assert await catalog.distinct_values(ORG, "labels", 30) == ["rig", "site"]
    assert await catalog.distinct_values(ORG, "labels.rig", 30) == ["r1", "r2"]
    assert await catalog.distinct_values(ORG, "labels.rig", 1) == ["r1"]
    assert await catalog.distinct_values("other", "labels.rig", 30) == ["r9"]
    assert await catalog.distinct_values(ORG, "labels.site", 30) == ["north"]
    assert await catalog.distinct_values(ORG, "labels.none", 30) == []


def test_new_item_ids_are_uuids_in_creation_order() -> None:
    """Ids made one after another sort in that order (UUIDv7), so new items extend the catalog's
    indexes at their end rather than touching a random page per item."""
    ids = [new_item_id() for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {uuid.UUID(i).version for i in ids} == {7}
