"""The ListData filter language, run for real on every catalog engine."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.catalog import DataRecord, SqlCatalog
from server.errors import InvalidArgumentError
from server.filtering import FilterError, OrderKey, compile_filter, parse_order_by
from tests.test_catalog import ORG, record

PARIS = timezone(timedelta(hours=2))

ITEMS: dict[str, dict[str, object]] = {
    "toulouse": {
        "metadata": {
            "latitude": 43.6,
            "longitude": 1.44,
            "manufacturer": "Canon",
            "acquired_at": datetime(2024, 5, 1, 10, 0, tzinfo=PARIS),  # 08:00Z
        },
        "tags": ("field", "day-1"),
        "filename": "IMG_0001.JPG",
        "size": 1000,
    },
    "equator": {
        "metadata": {"latitude": 0.0, "longitude": 0.0, "manufacturer": "NIKON"},
        "tags": ("field",),
        "filename": "equator.jpg",
        "size": 2000,
    },
    "paris": {
        "metadata": {
            "latitude": 48.85,
            "longitude": 2.35,
            "acquired_at": datetime(2024, 5, 1, 9, 0),  # no offset: compared as 09:00Z
            "software": "GIMP 2.4.5",
        },
        "filename": "paris_100%.tif",
        "content_type": "image/tiff",
        "size": 5_000_000,
    },
    "bare": {"metadata": {}, "filename": "notes.txt", "content_type": "text/plain", "size": 3},
}


@pytest.fixture
async def stocked(catalog: SqlCatalog) -> tuple[SqlCatalog, dict[str, str]]:
    ids = {}
    for name, fields in ITEMS.items():
        item: DataRecord = record(**fields)
        await catalog.add(item)
        ids[item.id] = name
    return catalog, ids


async def matching(stocked: tuple[SqlCatalog, dict[str, str]], text: str) -> set[str]:
    catalog, names = stocked
    page = await catalog.list_page(ORG, filter=text, order_by="", page_size=100, page_token="")
    return {names[r.id] for r in page.records}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {"toulouse", "equator", "paris", "bare"}),
        # A bounding box; latitude 0 is a value, not an absence.
        (
            "latitude >= 43.5 AND latitude <= 43.7 AND longitude >= 1.3 AND longitude <= 1.5",
            {"toulouse"},
        ),
        ("latitude = 0", {"equator"}),
        ("latitude < 10", {"equator"}),
        ("latitude >= -90", {"toulouse", "equator", "paris"}),
        # Times compare as instants; an offset-less time as if UTC.
        ('acquired_at >= "2024-05-01T08:30:00Z"', {"paris"}),
        ('acquired_at < "2024-05-01T10:30:00+02:00"', {"toulouse"}),
        ('acquired_at >= "2024-05-01T00:00:00"', {"toulouse", "paris"}),
        # Strings, wildcards (with % and _ taken literally), membership, presence.
        ('manufacturer = "Canon"', {"toulouse"}),
        ("manufacturer = Canon", {"toulouse"}),
        ('manufacturer != "Canon"', {"equator"}),
        ('filename = "*.jpg"', {"equator"}),
        ('filename = "*100%*"', {"paris"}),
        ('filename = "IMG_*"', {"toulouse"}),
        ('filename != "*.jpg"', {"toulouse", "paris", "bare"}),
        ('tags:"field"', {"toulouse", "equator"}),
        ("tags:day-1", {"toulouse"}),
        ("tags:*", {"toulouse", "equator"}),
        ("software:*", {"paris"}),
        ("NOT software:*", {"toulouse", "equator", "bare"}),
        ('content_type = "image/tiff" OR size < 10', {"paris", "bare"}),
        ("size > 1500", {"equator", "paris"}),
        # NOT matches exactly what its operand does not, absent fields included.
        ('NOT manufacturer = "Canon"', {"equator", "paris", "bare"}),
        ("-latitude > 1", {"equator", "bare"}),
        # AIP-160 precedence: OR binds tighter than AND; juxtaposition is AND.
        ('tags:"field" AND manufacturer = "NIKON" OR latitude > 40', {"toulouse", "equator"}),
        ('(tags:"field" AND manufacturer = "NIKON") OR latitude > 48', {"equator", "paris"}),
        ('tags:"field" latitude > 1', {"toulouse"}),
        ('created_at > "2000-01-01T00:00:00Z"', {"toulouse", "equator", "paris", "bare"}),
    ],
)
async def test_filters_select_exactly_the_matching_items(
    stocked: tuple[SqlCatalog, dict[str, str]], text: str, expected: set[str]
) -> None:
    assert await matching(stocked, text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("colour = 'red'", "unknown field 'colour'"),
        ("colour = 'red'", "valid fields: acquired_at"),
        ("latitude >>= 3", "column 11"),
        ("latitude = 'north'", "latitude is a number"),
        ("acquired_at > 2024", "RFC 3339"),
        ('acquired_at > "yesterday"', "RFC 3339"),
        ("(latitude > 1", "')'"),
        ("tags = 'x'", 'tags:"x"'),
        ("manufacturer:Canon", "presence"),
        ("size > 1.5", "whole number"),
        ("NOT " * 40 + "latitude > 1", "deeper than"),
        ("x" * 5000, "at most 4096"),
    ],
)
def test_bad_filters_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(text)
    assert says in str(caught.value)


async def test_a_bad_filter_is_an_invalid_argument_of_the_catalog(
    catalog: SqlCatalog,
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await catalog.list_page(ORG, filter="nope = 1", order_by="", page_size=1, page_token="")
    assert caught.value.violations[0].field == "filter"


def test_order_by_follows_aip_132() -> None:
    assert parse_order_by("") == []
    assert parse_order_by("created_at desc, filename") == [
        OrderKey("created_at", True),
        OrderKey("filename", False),
    ]
    for bad in ("colour", "created_at up", "filename, filename", "size,,"):
        with pytest.raises(FilterError):
            parse_order_by(bad)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.text(
        alphabet=st.sampled_from(list("latitude<=>!:*()\"' ANDORNOT-tags0123456789.\\_x")),
        max_size=60,
    )
)
def test_garbage_filters_raise_only_filter_errors(text: str) -> None:
    with contextlib.suppress(FilterError):
        compile_filter(text)


def test_timestamps_without_offset_are_utc() -> None:
    condition = compile_filter('acquired_at = "2024-05-01T00:00:00"')
    with_offset = compile_filter('acquired_at = "2024-05-01T00:00:00Z"')
    assert condition is not None
    assert with_offset is not None
    compiled = condition.compile(compile_kwargs={"literal_binds": True})
    assert str(compiled) == str(with_offset.compile(compile_kwargs={"literal_binds": True}))
    assert str(int(datetime(2024, 5, 1, tzinfo=UTC).timestamp() * 1_000_000)) in str(compiled)
