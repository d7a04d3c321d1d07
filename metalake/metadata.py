"""The metadata model shared by the SDK, the server and the extractors.

A metadata mapping holds at most the fields in `FIELDS`, each with one Python type:

- the floats in `FLOAT_FIELDS`;
- `acquired_at`, a `datetime`: aware when the device recorded a UTC offset (the offset is kept),
  naive when it did not (a wall time, compared as if it were UTC);
- the strings in `STRING_FIELDS`.

An absent key means "not known". `validate` is the one set of rules every value passes before it
is stored, whoever produced it: a client, an extractor or an update.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only to_proto/from_proto need protobuf, and import it when called: the model itself (and
    # metalake.plugin, built on it) imports no protobuf and no gRPC.
    from google.protobuf.duration_pb2 import Duration
    from google.protobuf.timestamp_pb2 import Timestamp

    from metalake.v1 import datalake_pb2 as pb

FIELDS: tuple[str, ...] = (
    "latitude",
    "longitude",
    "altitude",
    "acquired_at",
    "acquired_by",
    "weather",
    "resolution_x",
    "resolution_y",
    "resolution_unit",
    "compression",
    "manufacturer",
    "software",
    "color_space",
    "custom_id",
    "reference",
)
FLOAT_FIELDS: frozenset[str] = frozenset(
    {"latitude", "longitude", "altitude", "resolution_x", "resolution_y"}
)
TIMESTAMP_FIELDS: frozenset[str] = frozenset({"acquired_at"})
STRING_FIELDS: frozenset[str] = frozenset(FIELDS) - FLOAT_FIELDS - TIMESTAMP_FIELDS

MAX_STRING_LENGTH = 1024
# protobuf Timestamp's range, which every stored instant must fit.
_MIN_INSTANT = datetime(1, 1, 1, tzinfo=UTC)
_MAX_INSTANT = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

MetadataValue = float | str | datetime
MetadataDict = dict[str, MetadataValue]


@dataclass(frozen=True)
class FieldViolation:
    """One field at fault and why, as carried by google.rpc.BadRequest."""

    field: str
    description: str


class InvalidMetadataError(ValueError):
    """Raised with every violation found, not only the first."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


def check_string(value: str, *, max_length: int = MAX_STRING_LENGTH) -> str | None:
    """Return why a text value cannot be stored, or None when it can."""
    if len(value) > max_length:
        return f"must be at most {max_length} characters, got {len(value)}"
    if "\x00" in value:
        return "must not contain NUL characters"
    return None


# C0 controls and DEL: what a filename or a label value must not contain.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f]")


def has_control_characters(text: str) -> bool:
    """Whether `text` holds a control character (C0 or DEL). A regular expression, not a loop
    over the characters: every upload's filename is checked, ten times faster for 40 of them."""
    return _CONTROL_CHARACTERS.search(text) is not None


_DAY = timedelta(hours=24)


def check_value(field: str, value: object) -> str | None:
    """Return why `value` is not a valid `field`, or None when it is."""
    if field in FLOAT_FIELDS:
        if type(value) is float:  # the common case, without building a union type per call
            number = value
        elif isinstance(value, bool) or not isinstance(value, float | int):
            return f"must be a number, got {type(value).__name__}"
        else:
            number = float(value)
        if not math.isfinite(number):
            return f"must be a finite number, got {number}"
        if field == "latitude" and not -90.0 <= number <= 90.0:
            return f"must be within [-90, 90], got {number}"
        if field == "longitude" and not -180.0 <= number <= 180.0:
            return f"must be within [-180, 180], got {number}"
        if field in ("resolution_x", "resolution_y") and number <= 0:
            return f"must be greater than 0, got {number}"
        return None
    if field in TIMESTAMP_FIELDS:
        if not isinstance(value, datetime):
            return f"must be a datetime, got {type(value).__name__}"
        offset = value.utcoffset()
        if offset is None:
            return None
        if offset.microseconds or abs(offset) >= _DAY:
            return f"UTC offset must be whole seconds within ±24h, got {offset}"
        try:
            instant = value.astimezone(UTC)
        except OverflowError:
            return "must be between years 1 and 9999 in UTC"
        if not _MIN_INSTANT <= instant <= _MAX_INSTANT:
            return "must be between years 1 and 9999 in UTC"
        return None
    if field in STRING_FIELDS:
        if not isinstance(value, str):
            return f"must be a string, got {type(value).__name__}"
        return check_string(value)
    return f"is not a metadata field; valid fields are: {', '.join(FIELDS)}"


def validate(values: Mapping[str, object], *, prefix: str = "metadata.") -> list[FieldViolation]:
    """Every violation in `values`, with field paths as the client names them."""
    violations = []
    for field, value in values.items():
        problem = check_value(field, value)
        if problem is not None:
            violations.append(FieldViolation(prefix + field, problem))
    return violations


def normalize(values: Mapping[str, Any]) -> MetadataDict:
    """Turn a user's metadata mapping into a valid `MetadataDict`, or raise.

    Accepts ints for floats and RFC 3339 / ISO 8601 strings for acquired_at; `None` values are
    dropped (not given). Unknown keys are rejected with the list of valid ones.
    """
    out: MetadataDict = {}
    for field, raw in values.items():
        if raw is None:
            continue
        value = raw
        if field in FLOAT_FIELDS and isinstance(raw, int) and not isinstance(raw, bool):
            value = float(raw)
        elif field in TIMESTAMP_FIELDS and isinstance(raw, str):
            try:
                value = parse_datetime(raw)
            except ValueError as error:
                raise InvalidMetadataError([FieldViolation(field, str(error))]) from None
        out[field] = value
    violations = validate(out, prefix="")
    if violations:
        raise InvalidMetadataError(violations)
    return out


def parse_datetime(text: str) -> datetime:
    """Parse `YYYY-MM-DDTHH:MM:SS[.ffffff][Z|±HH:MM]`; no suffix gives a naive datetime."""
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an RFC 3339 timestamp like 2024-05-01T12:00:00Z"
        ) from None


def format_datetime(value: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS[.ffffff]` then `Z` / `±HH:MM` when the offset is known."""
    text = value.replace(tzinfo=None).isoformat()
    offset = value.utcoffset()
    if offset is None:
        return text
    if offset == timedelta(0):
        return text + "Z"
    sign = "-" if offset < timedelta(0) else "+"
    seconds = int(abs(offset).total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    suffix = f"{sign}{hours:02d}:{minutes:02d}" + (f":{seconds:02d}" if seconds else "")
    return text + suffix


def to_jsonable(values: Mapping[str, MetadataValue]) -> dict[str, float | str]:
    """Metadata as JSON values, in field order, acquired_at formatted by `format_datetime`."""
    out: dict[str, float | str] = {}
    for field in FIELDS:
        if field in values:
            value = values[field]
            out[field] = format_datetime(value) if isinstance(value, datetime) else value
    return out


@functools.cache
def _messages() -> tuple[type[pb.Metadata], type[Timestamp], type[Duration]]:
    """metalake.v1's Metadata and protobuf's Timestamp and Duration, imported on first use."""
    from google.protobuf.duration_pb2 import Duration
    from google.protobuf.timestamp_pb2 import Timestamp

    from metalake.v1 import datalake_pb2

    return datalake_pb2.Metadata, Timestamp, Duration


def to_proto(values: Mapping[str, MetadataValue]) -> pb.Metadata:
    """Build the protobuf message; the values must already be valid."""
    Metadata, Timestamp, Duration = _messages()
    # One constructor call, not a setattr per field, and the instant without Timestamp's
    # FromDatetime, which is pure Python.
    others: dict[str, Any] = dict(values)
    moment = others.pop("acquired_at", None)
    if not isinstance(moment, datetime):
        return Metadata(**others)
    seconds, nanos = epoch_seconds(moment)  # a naive wall time travels as if it were UTC
    offset = moment.utcoffset()
    if offset is None:
        return Metadata(**others, acquired_at=Timestamp(seconds=seconds, nanos=nanos))
    return Metadata(
        **others,
        acquired_at=Timestamp(seconds=seconds, nanos=nanos),
        # A valid offset is whole seconds (check_value).
        acquired_at_utc_offset=Duration(seconds=offset.days * 86400 + offset.seconds),
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_seconds(moment: datetime) -> tuple[int, int]:
    """The instant as google.protobuf.Timestamp holds it, (seconds, nanos) since the Unix
    epoch; a naive time is taken as UTC, as Timestamp.FromDatetime takes it."""
    if moment.utcoffset() is None:
        moment = moment.replace(tzinfo=UTC)
    since = moment - _EPOCH
    return since.days * 86400 + since.seconds, since.microseconds * 1000


def from_proto(message: pb.Metadata) -> tuple[MetadataDict, list[FieldViolation]]:
    """Read a protobuf Metadata into a dict, with the violations of its values.

    Values are returned even when invalid so that every violation can be reported at once.
    """
    values, violations = read_proto(message)
    violations.extend(validate(values))
    return values, violations


def read_proto(message: pb.Metadata) -> tuple[MetadataDict, list[FieldViolation]]:
    """Read a protobuf Metadata into a dict, unchecked, with what could not be read as a value
    at all (and is not in the dict): `validate` the values for the rest."""
    values: MetadataDict = {}
    violations: list[FieldViolation] = []
    for descriptor, value in message.ListFields():
        if descriptor.name in FLOAT_FIELDS:
            # -0.0 + 0.0 is 0.0: SQL engines do not keep the sign of zero, so neither do we.
            values[descriptor.name] = value + 0.0
        elif descriptor.name in STRING_FIELDS:
            values[descriptor.name] = value
    has_offset = message.HasField("acquired_at_utc_offset")
    if message.HasField("acquired_at"):
        try:
            values["acquired_at"] = _datetime_from_proto(
                message.acquired_at, message.acquired_at_utc_offset if has_offset else None
            )
        except ValueError as error:
            violations.append(FieldViolation("metadata.acquired_at", str(error)))
    elif has_offset:
        violations.append(
            FieldViolation("metadata.acquired_at_utc_offset", "must not be set without acquired_at")
        )
    return values, violations


def _datetime_from_proto(timestamp: Timestamp, offset: Duration | None) -> datetime:
    try:
        wall = timestamp.ToDatetime()
    except (ValueError, OverflowError):
        raise ValueError("must be between years 1 and 9999") from None
    if offset is None:
        return wall
    if offset.nanos or abs(offset.seconds) >= 24 * 3600:
        raise ValueError("acquired_at_utc_offset must be whole seconds within ±24h")
    delta = timedelta(seconds=offset.seconds)
    try:
        return (wall + delta).replace(tzinfo=timezone(delta))
    except OverflowError:
        raise ValueError("must be between years 1 and 9999 in local time") from None
