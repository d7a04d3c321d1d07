"""Errors the datalake raises, independent of gRPC; the servicer maps each to a status."""

from __future__ import annotations

from collections.abc import Iterable

from metalake.metadata import FieldViolation


class DatalakeError(Exception):
    """Base of every error a client can act on."""


class InvalidArgumentError(DatalakeError):
    """The request is at fault; `violations` name each field and what is wrong with it."""

    def __init__(self, message: str, violations: Iterable[FieldViolation] = ()) -> None:
        self.violations = list(violations)
        super().__init__(message)


class NotFoundError(DatalakeError):
    """No item (or upload) has this id."""

    def __init__(self, data_id: str, *, kind: str = "data") -> None:
        self.data_id = data_id
        super().__init__(f"{kind} {data_id!r} not found")


class ResourceExhaustedError(DatalakeError):
    """A limit is reached; with `retry_after` a temporary one: retry after that many seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class UnavailableError(DatalakeError):
    """This server cannot take the call now (it is shutting down, or a backend it needs is
    unreachable); with `retry_after`, retry after that many seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class OutOfRangeError(DatalakeError):
    """An offset past what the server has."""


class ConflictError(DatalakeError):
    """The item changed since the client read it (its etag differs)."""


class DataLossError(DatalakeError):
    """The bytes received are not the bytes the client meant to send."""

    def __init__(self, message: str, violations: Iterable[FieldViolation] = ()) -> None:
        self.violations = list(violations)
        super().__init__(message)


def invalid_field(field: str, description: str) -> InvalidArgumentError:
    """The common case: one field is at fault."""
    return InvalidArgumentError(f"{field}: {description}", [FieldViolation(field, description)])
