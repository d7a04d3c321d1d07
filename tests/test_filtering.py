"""The ListData filter language, run for real on SQLite and PostgreSQL.

The catalog's own tables are created in a fresh SQLite file and in a uniquely named PostgreSQL
schema (dropped afterwards), a dozen items with varied metadata go in, and each filter must select
exactly the expected items, the same on both engines. SQLite gets no pragma: the filter's SQL
must mean the same on a bare connection.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, insert, select

from metalake.metadata import FIELDS
from metalake.server.catalog import SqlCatalog
from metalake.server.errors import InvalidRequest
from metalake.server.filtering import (
    EVENTS,
    MAX_DEPTH,
    MAX_FILTER_LENGTH,
    MAX_TERMS,
    ORDERABLE_FIELDS,
    FilterError,
    OrderKey,
    compile_filter,
    parse_order_by,
)
from metalake.server.schema import data_table, data_tags_table, metadata_obj
from metalake.server.schema_versions import engine_url
from tests.conftest import POSTGRES_URL, postgres_or_skip
from tests.test_catalog import ORG

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # stored as if UTC
    return (aware - _EPOCH) // timedelta(microseconds=1)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# name -> (columns of data, tags). Unset metadata is NULL; created_at counts up from 2024-01-01.
ITEMS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "toulouse": (
        {
            "latitude": 43.6,
            "longitude": 1.44,
            "altitude": 150.0,
            "acquired_at": _at("2024-05-01T10:00:00+02:00"),  # 08:00Z
            "manufacturer": "Canon",
            "filename": "IMG_0001.JPG",
            "size": 1000,
        },
        ("field", "day-1"),
    ),
    # Zero is a value, not an absence.
    "equator": (
        {
            "latitude": 0.0,
            "longitude": 0.0,
            "altitude": 0.0,
            "manufacturer": "NIKON",
            "filename": "equator.jpg",
            "size": 2000,
        },
        ("field",),
    ),
    "paris": (
        {
            "latitude": 48.85,
            "longitude": 2.35,
            "acquired_at": _at("2024-05-01T09:00:00"),  # no offset: compared as 09:00Z
            "software": "GIMP 2.4.5",
            "filename": "paris_100%.tif",
            "content_type": "image/tiff",
            "size": 5_000_000,
        },
        (),
    ),
    "bare": ({"filename": "notes.txt", "content_type": "text/plain", "size": 3}, ()),
    "south": (
        {
            "latitude": -33.9,
            "longitude": 18.4,
            "acquired_at": _at("2024-04-30T23:30:00-05:00"),  # 2024-05-01T04:30Z
            "manufacturer": "canon",
            "weather": "rain",
            "filename": "cape_town.jpg",
            "size": 4096,
        },
        ("day-1",),
    ),
    "fiji": (
        {
            "latitude": -17.7,
            "longitude": 179.9,
            "altitude": -3.5,
            "reference": "7NGOMI",
            "custom_id": "c-1",
            "filename": "fiji.JPG",
            "size": 700,
        },
        ("boat",),
    ),
    "newyork": (
        {
            "latitude": 40.7,
            "longitude": -74.0,
            "altitude": 10.0,
            "acquired_at": _at("2024-05-01T08:00:00-04:00"),  # 12:00Z
            "acquired_by": "USER-178",
            "manufacturer": "Apple",
            "software": "iOS 17.4",
            "color_space": "sRGB",
            "resolution_x": 72.0,
            "resolution_y": 72.0,
            "resolution_unit": "inches",
            "filename": "IMG_1234.HEIC",
            "content_type": "image/heic",
            "size": 3_000_000,
        },
        ("city", "day-1"),
    ),
    # LIKE's and GLOB's special characters, which a filter must take literally.
    "percent": (
        {
            "manufacturer": "A*B",
            "filename": "100%_done_[1].png",
            "content_type": "image/png",
            "size": 10,
        },
        (),
    ),
    "a_b": ({"filename": "a_b.png", "content_type": "image/png", "size": 11}, ()),
    "axb": ({"filename": "axb.png", "content_type": "image/png", "size": 12}, ()),
    "zurich": (
        {"weather": "ensoleillé", "reference": "Zürich-1", "filename": "été.jpg", "size": 13},
        ("café",),
    ),
    "everest": (
        {
            "latitude": 27.98,
            "longitude": 86.92,
            "altitude": 8848.86,
            "acquired_at": _at("2024-05-01T00:00:00+00:00"),
            "compression": "JPEG",
            "resolution_x": 300.0,
            "resolution_y": 300.5,
            "software": "",  # present, and empty
            "filename": "summit.jpeg",
            "size": 5000,
            "created_at": _at("2025-01-01T00:00:00+00:00"),
            "updated_at": _at("2025-06-01T00:00:00+00:00"),
        },
        (),
    ),
}
ALL = frozenset(ITEMS)
ITEM_FIELDS = frozenset({"filename", "size", "content_type", "created_at", "updated_at"})
WITH_LATITUDE = frozenset(n for n, (c, _) in ITEMS.items() if "latitude" in c)


def _row(index: int, name: str, columns: dict[str, Any]) -> dict[str, Any]:
    created = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=index)
    row: dict[str, Any] = {
        # Every column in every row (NULL unless set): one executemany takes them all.
        **dict.fromkeys(data_table.columns.keys()),
        "id": name,
        "org": ORG,
        "sha256": "ab" * 32,
        "content_type": "image/jpeg",
        "blob_key": "ab" * 32,
        "created_at": created,
        "updated_at": created,
        "metadata_sources": "{}",
        "revision": 1,
        **columns,
    }
    for time in ("created_at", "updated_at"):
        row[time] = _micros(row[time])
    if row["acquired_at"] is not None:
        moment: datetime = row["acquired_at"]
        offset = moment.utcoffset()
        row["acquired_at"] = _micros(moment)
        row["acquired_at_offset"] = None if offset is None else int(offset.total_seconds())
    return row


def _stock(engine: Engine) -> None:
    metadata_obj.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(data_table),
            [_row(i, name, columns) for i, (name, (columns, _)) in enumerate(ITEMS.items())],
        )
        connection.execute(
            insert(data_tags_table),
            [
                {"data_id": name, "tag": tag, "org": ORG}
                for name, (_, tags) in ITEMS.items()
                for tag in tags
            ],
        )


@pytest.fixture(scope="module")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path: Path = tmp_path_factory.mktemp("filtering") / "catalog.sqlite3"
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    _stock(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def postgres_engine() -> Iterator[Engine]:
    postgres_or_skip()
    schema = f"t_filtering_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(engine_url(POSTGRES_URL))
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    engine = sqlalchemy.create_engine(
        engine_url(f"{POSTGRES_URL}?options=-csearch_path%3D{schema}")
    )
    try:
        _stock(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Engine:
    fixture = "sqlite_engine" if request.param == "sqlite" else "postgres_engine"
    found: Engine = request.getfixturevalue(fixture)
    return found


def matching(engine: Engine, text: str) -> set[str]:
    condition = compile_filter(text)
    query = select(data_table.c.id)
    if condition is not None:
        query = query.where(condition)
    with engine.connect() as connection:
        return set(connection.scalars(query))


CASES: list[tuple[str, set[str] | frozenset[str]]] = [
    ("", ALL),
    ("  \n\t ", ALL),
    # Numbers: bounding boxes, signs, zero, exponents.
    (
        "latitude >= 43.5 AND latitude <= 43.7 AND longitude >= 1.3 AND longitude <= 1.5",
        {"toulouse"},
    ),
    (
        "metadata.latitude > 40 AND metadata.latitude < 50 AND longitude > -5 AND longitude < 10",
        {"toulouse", "paris"},
    ),
    ("latitude < 0", {"south", "fiji"}),
    ("latitude = 0", {"equator"}),
    ("latitude = -0.0", {"equator"}),
    ("latitude >= -0 AND latitude <= .0", {"equator"}),
    ("latitude != 0", WITH_LATITUDE - {"equator"}),
    ("altitude < 0", {"fiji"}),
    ("altitude <= 0", {"fiji", "equator"}),
    ("longitude > 179.8", {"fiji"}),
    ("longitude >= -180", WITH_LATITUDE),
    ("altitude > 8.8e3", {"everest"}),
    ("altitude >= 1.5E+2", {"toulouse", "everest"}),
    ("latitude < 1e999", WITH_LATITUDE),  # infinity, compared as such
    ("resolution_x = 72 AND resolution_y = 72", {"newyork"}),
    ("resolution_y > 300", {"everest"}),
    ("size > 4095", {"south", "paris", "newyork", "everest"}),
    ("size >= 4.096e3", {"south", "paris", "newyork", "everest"}),
    ("size = 3", {"bare"}),
    ("size < 1e40", ALL),  # beyond BIGINT: clamped, still true
    ("size > 99999999999999999999999", set()),
    ("size > -99999999999999999999999", ALL),
    # Absent fields: a comparison needs the field; NOT is the exact complement.
    ("NOT latitude = 0", ALL - {"equator"}),
    ("NOT latitude:*", ALL - WITH_LATITUDE),
    ("-latitude > 1", ALL - {"toulouse", "paris", "newyork", "everest"}),
    # Times are instants: offsets are honoured; a time without one is UTC.
    ('acquired_at >= "2024-05-01T08:00:00Z"', {"toulouse", "paris", "newyork"}),
    ('acquired_at >= "2024-05-01T10:00:00+02:00"', {"toulouse", "paris", "newyork"}),
    ('acquired_at < "2024-05-01T10:00:00+02:00"', {"south", "everest"}),
    ('acquired_at < "2024-05-01T00:00:00-05:00"', {"south", "everest"}),
    (
        'acquired_at >= "2024-05-01T00:00:00Z" AND acquired_at < "2024-05-02T00:00:00Z"',
        {"toulouse", "paris", "south", "newyork", "everest"},
    ),
    ('acquired_at = "2024-05-01T09:00:00"', {"paris"}),
    ("acquired_at = '2024-05-01T11:00:00+02:00'", {"paris"}),
    ('acquired_at = "2024-05-01T00:00:00.000000Z"', {"everest"}),
    ("acquired_at = 2024-05-01", {"everest"}),  # a bare date: midnight UTC
    ('NOT acquired_at < "2024-05-01T05:00:00Z"', ALL - {"south", "everest"}),
    ('created_at >= "2025-01-01T00:00:00Z"', {"everest"}),
    ('created_at < "2025-01-01T01:00:00+01:00"', ALL - {"everest"}),
    ('updated_at > "2025-05-31T23:59:59.999999Z"', {"everest"}),
    # Text: case-sensitive, quoted or bare, Unicode.
    ('manufacturer = "Canon"', {"toulouse"}),
    ("manufacturer = canon", {"south"}),
    ('manufacturer != "Canon"', {"equator", "south", "newyork", "percent"}),
    ('NOT manufacturer = "Canon"', ALL - {"toulouse"}),
    ("software = 'iOS 17.4'", {"newyork"}),
    ('software = "GIMP 2.4.5"', {"paris"}),
    ('software = ""', {"everest"}),
    ("software:*", {"paris", "newyork", "everest"}),
    ("NOT software:*", ALL - {"paris", "newyork", "everest"}),
    ("reference = 7NGOMI", {"fiji"}),
    ("custom_id = c-1", {"fiji"}),
    ("weather = ensoleillé", {"zurich"}),
    ('reference = "Zürich-1"', {"zurich"}),
    ('acquired_by = "USER-178" AND color_space = sRGB', {"newyork"}),
    ("resolution_unit = inches compression = JPEG", set()),
    ("compression = JPEG", {"everest"}),
    ('content_type = "image/jpeg"', {"toulouse", "equator", "south", "fiji", "zurich", "everest"}),
    # Code point order on every engine, whatever PostgreSQL's locale: upper case comes first.
    ('filename < "b"', {"a_b", "axb", "percent", "toulouse", "newyork"}),
    ('manufacturer >= "a"', {"south"}),
    # Wildcards: case-sensitive; %, _, [, ? and escaped stars are literal.
    ('manufacturer = "*anon"', {"toulouse", "south"}),
    ('manufacturer = "C*"', {"toulouse"}),
    ('manufacturer = "A*"', {"newyork", "percent"}),
    (r'manufacturer = "A\*B"', {"percent"}),
    (r'manufacturer = "A\**"', {"percent"}),
    ('filename = "*.jpg"', {"equator", "south", "zurich"}),
    ('filename = "*.JPG"', {"toulouse", "fiji"}),
    ('filename = "*.jp*g"', {"equator", "south", "zurich", "everest"}),
    ('filename = "IMG_*"', {"toulouse", "newyork"}),
    ('filename = "a_b*"', {"a_b"}),
    ('filename = "a?b*"', set()),
    ('filename = "100%*"', {"percent"}),
    ('filename = "*_100%.tif"', {"paris"}),
    ('filename = "*[1]*"', {"percent"}),
    ('filename = "100%_done_[1].png"', {"percent"}),
    ('filename = "été*"', {"zurich"}),
    ('filename != "*.jpg"', ALL - {"equator", "south", "zurich"}),
    ('software = "*"', {"paris", "newyork", "everest"}),
    (
        'content_type = "image/*" AND NOT content_type = "image/jpeg"',
        {"paris", "newyork", "percent", "a_b", "axb"},
    ),
    # Tags.
    ('tags:"field"', {"toulouse", "equator"}),
    ("tags:day-1", {"toulouse", "south", "newyork"}),
    ('tags:"day-*"', {"toulouse", "south", "newyork"}),
    ("tags:café", {"zurich"}),
    ('tags:"Field"', set()),
    ("tags:*", {"toulouse", "equator", "south", "fiji", "newyork", "zurich"}),
    ("NOT tags:*", {"paris", "bare", "percent", "a_b", "axb", "everest"}),
    ('NOT tags:"field"', ALL - {"toulouse", "equator"}),
    # AIP-160 precedence: OR binds tighter than AND and than juxtaposition.
    ('tags:"field" AND manufacturer = "NIKON" OR latitude > 40', {"toulouse", "equator"}),
    (
        '(tags:"field" AND manufacturer = "NIKON") OR latitude > 40',
        {"equator", "toulouse", "paris", "newyork"},
    ),
    ('latitude > 40 OR manufacturer = "NIKON" AND tags:"field"', {"toulouse", "equator"}),
    ('tags:"day-1" latitude > 0', {"toulouse", "newyork"}),
    ('tags:"day-1" latitude < 0 OR manufacturer = Apple', {"south", "newyork"}),
    ('NOT tags:"field" AND latitude > 0', {"paris", "newyork", "everest"}),
    ('NOT (tags:"field" OR latitude < 0)', ALL - {"toulouse", "equator", "south", "fiji"}),
    ('-tags:"field" -latitude:*', ALL - WITH_LATITUDE - {"toulouse", "equator"}),
    ("NOT NOT manufacturer = Canon", {"toulouse"}),
    ("((latitude > 0) AND ((longitude < 0)))", {"newyork"}),
    ("latitude > 0\n  AND\tlongitude < 0", {"newyork"}),
    ("latitude>0 AND longitude<-1", {"newyork"}),
    # Long but flat: 150 comparisons are one level, not 150.
    (
        " OR ".join(f"size = {n}" for n in (3, 10, 11, 12, 13, *range(20_000, 20_145))),
        {"bare", "percent", "a_b", "axb", "zurich"},
    ),
    ("NOT " * (MAX_DEPTH - 2) + "latitude = 0", {"equator"}),
    ("(" * 300 + "latitude = 0" + ")" * 300, {"equator"}),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_filters_select_exactly_the_matching_items(
    engine: Engine, text: str, expected: set[str]
) -> None:
    assert matching(engine, text) == set(expected)


@pytest.mark.parametrize(
    ("text", "says", "position"),
    [
        ("colour = 'red'", ["unknown field 'colour' at column 1", "valid fields: "], 0),
        ("latitude > 1 AND Latitude = 1", ["unknown field 'Latitude' at column 18"], 17),
        ("metadata.filename = x", ["unknown field 'metadata.filename'"], 0),
        ("latitude >>= 3", ["unexpected '>='", "column 11", "expected a value"], 10),
        ("latitude 5", ["unexpected '5' at column 10", "expected ':' or a comparison"], 9),
        ("latitude >", ["ends too early", "column 11", "expected a value"], 10),
        ("(latitude > 1", ["ends too early", "')'"], 13),
        ("latitude > 1)", ["unexpected ')' at column 13"], 12),
        ("AND latitude > 1", ["unexpected 'AND' at column 1", "a field name"], 0),
        ("latitude > 1 OR OR x = 1", ["unexpected 'OR' at column 17"], 16),
        ("latitude = 1 and longitude = 2", ["column 18", "write AND in capitals"], 17),
        ('manufacturer = "Canon', ["unexpected '\"Canon' at column 16"], 15),
        ("manufacturer = AND", ["unexpected 'AND' at column 16", "expected a value"], 15),
        ("filename = *.jpg", ["column 13"], 12),
        ("latitude > 1\nAND size ~ 3", ["line 2, column 10"], 22),
        ("latitude = 'north'", ['latitude is a number; "north" at column 12 is not'], 11),
        ('latitude = "43.6"', ["latitude is a number"], 11),
        ("latitude = north", ["latitude is a number; north at column 12"], 11),
        ("latitude = *", ["latitude is a number"], 11),
        ("acquired_at > 2024", ["acquired_at is a time", "RFC 3339"], 14),
        ('acquired_at > "yesterday"', ["'yesterday' at column 15", "RFC 3339"], 14),
        ("created_at > *", ["created_at is a time"], 13),
        ("manufacturer < *", ["compare it with a quoted string"], 0),
        ("tags = 'x'", ['tags:"x"'], 0),
        ("manufacturer:Canon", ["presence (manufacturer:*)"], 0),
        ("size > 1.5", ["whole number"], 7),
        ("manufacturer = 'a\x00b'", ["NUL character at column 18"], 17),
        ("NOT " * (MAX_DEPTH + 8) + "latitude > 1", [f"deeper than {MAX_DEPTH}"], None),
        (
            "(latitude > 1 OR (latitude > 2 AND " * 20 + "size = 1" + "))" * 20,
            [f"deeper than {MAX_DEPTH}"],
            None,
        ),
        (" ".join(["size = 1"] * (MAX_TERMS + 1)), [f"more than {MAX_TERMS} comparisons"], None),
        ("x" * (MAX_FILTER_LENGTH + 1), [f"at most {MAX_FILTER_LENGTH}"], None),
        (" " * (MAX_FILTER_LENGTH + 1), [f"at most {MAX_FILTER_LENGTH}"], None),
    ],
)
def test_bad_filters_say_what_is_wrong(text: str, says: list[str], position: int | None) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(text)
    for part in says:
        assert part in str(caught.value)
    assert caught.value.position == position


def test_an_unknown_field_lists_every_valid_one() -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter("colour = red")
    listed = str(caught.value).split("valid fields: ")[1].split(", ")
    assert set(listed) == {*FIELDS, *ITEM_FIELDS, "tags", "labels.KEY"}


def test_filters_run_over_the_change_log_too() -> None:
    condition = compile_filter('tags:"x" AND latitude > 1', EVENTS)
    assert condition is not None
    sql = str(condition.compile())
    assert "event_tags.seq = events.seq" in sql
    assert "events.latitude" in sql
    assert "data" not in sql.replace("data_", "")


async def test_a_bad_filter_is_an_invalid_argument_of_the_catalog(catalog: SqlCatalog) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await catalog.list_page(ORG, filter="nope = 1", order_by="", page_size=1, page_token="")
    assert caught.value.violations[0].field == "filter"
    assert "unknown field 'nope'" in caught.value.violations[0].description


def test_order_by_follows_aip_132() -> None:
    assert parse_order_by("") == []
    assert parse_order_by("   ") == []
    assert parse_order_by("created_at desc, filename") == [
        OrderKey("created_at", True),
        OrderKey("filename", False),
    ]
    assert parse_order_by(" metadata.latitude  desc ,size asc") == [
        OrderKey("latitude", True),
        OrderKey("size", False),
    ]
    assert frozenset(FIELDS) | ITEM_FIELDS == ORDERABLE_FIELDS


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("colour", "cannot order by 'colour'; valid fields: acquired_at"),
        ("created_at up", "must be `field`"),
        ("created_at desc asc", "must be `field`"),
        ("filename, filename desc", "names 'filename' twice"),
        ("size,,", "empty term"),
        (",", "empty term"),
        ("tags", "cannot order by 'tags'"),
    ],
)
def test_bad_order_by_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse_order_by(text)
    assert says in str(caught.value)


# Properties: whatever the input, FilterError or SQL that runs; NOT is the exact complement.

_GARBAGE = st.text(
    alphabet=st.sampled_from(list("latitude<=>!:*()\"' ANDORNOT-tags0123456789.\\_x%é\n")),
    max_size=60,
) | st.text(max_size=60)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_GARBAGE)
def test_garbage_filters_raise_only_filter_errors(sqlite_engine: Engine, text: str) -> None:
    with contextlib.suppress(FilterError):
        matching(sqlite_engine, text)


_LITERALS = st.one_of(
    st.floats(allow_nan=False).map(repr).filter(lambda s: "inf" not in s),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(
        [
            '"2024-05-01T08:00:00Z"',
            '"2024-05-01T10:00:00+02:00"',
            '"2024-05-01T09:00:00"',
            "canon",
            '"*"',
            '"*.jpg"',
            '"100%*"',
            '"a_b*"',
            r'"A\*B"',
            "''",
            "7NGOMI",
            "ensoleillé",
        ]
    ),
    st.text(max_size=8).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
)
_FIELD_NAMES = sorted(ORDERABLE_FIELDS)


@st.composite
def _filters(draw: st.DrawFn, depth: int = 0) -> str:
    """Well-formed filters, often wrongly typed: they must compile or raise FilterError."""
    if depth >= 3 or draw(st.booleans()):
        kind = draw(st.sampled_from(["compare", "presence", "tags"]))
        if kind == "presence":
            return f"{draw(st.sampled_from(_FIELD_NAMES))}:*"
        if kind == "tags":
            return f"tags:{draw(st.sampled_from(['field', 'day-1', '*', 'day-*', 'café']))}"
        field = draw(st.sampled_from(_FIELD_NAMES))
        op = draw(st.sampled_from(["=", "!=", "<", "<=", ">", ">="]))
        return f"{field} {op} {draw(_LITERALS)}"
    left, right = draw(_filters(depth + 1)), draw(_filters(depth + 1))
    shape = draw(st.sampled_from(["{} AND {}", "{} OR {}", "{} {}", "NOT ({})", "-({}) {}"]))
    return shape.format(left, right) if shape.count("{}") == 2 else shape.format(left)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_filters())
def test_not_selects_exactly_the_complement(engine: Engine, text: str) -> None:
    try:
        selected = matching(engine, text)
    except FilterError:
        return
    assert matching(engine, f"NOT ({text})") == ALL - selected
    assert matching(engine, f"({text}) OR NOT ({text})") == ALL
