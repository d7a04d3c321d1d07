"""Why the server refuses a call, independent of gRPC: the servicer and the HTTP face map each
refusal to a status (named in each docstring).

These are the server's side. The SDK's exceptions (`metalake.errors`, `InvalidArgumentError` and
so on) are what a client catches; the names differ on purpose so a reader knows which side a
`raise` is on.
"""

from __future__ import annotations

from collections.abc import Iterable

from metalake.metadata import FieldViolation


class Refusal(Exception):
    """Base of every refusal a client can act on."""


class InvalidRequest(Refusal):
    """INVALID_ARGUMENT: the request is at fault; `violations` name each field and what is
    wrong with it.

    `position`: for a filter, the 0-based offset of the problem in its text, when known.
    """

    def __init__(
        self,
        message: str,
        violations: Iterable[FieldViolation] = (),
        *,
        position: int | None = None,
    ) -> None:
        self.violations = list(violations)
        self.position = position
        super().__init__(message)


class NotFound(Refusal):
    """NOT_FOUND: no item (or upload, dataset, webhook) has this id."""

    def __init__(self, data_id: str, *, kind: str = "data") -> None:
        self.data_id = data_id
        super().__init__(f"{kind} {data_id!r} not found")


class LimitReached(Refusal):
    """RESOURCE_EXHAUSTED: a limit is reached; with `retry_after` a temporary one: retry after
    that many seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class Unavailable(Refusal):
    """UNAVAILABLE: this server cannot take the call now (it is shutting down, or a backend it
    needs is unreachable); with `retry_after`, retry after that many seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class OffsetOutOfRange(Refusal):
    """OUT_OF_RANGE: an offset past what the server has."""


class EtagMismatch(Refusal):
    """ABORTED: the item changed since the client read it (its etag differs)."""


class ContentMismatch(Refusal):
    """DATA_LOSS: the bytes received are not the bytes the client meant to send."""

    def __init__(self, message: str, violations: Iterable[FieldViolation] = ()) -> None:
        self.violations = list(violations)
        super().__init__(message)


def invalid_field(field: str, description: str, *, position: int | None = None) -> InvalidRequest:
    """The common case: one field is at fault."""
    return InvalidRequest(
        f"{field}: {description}", [FieldViolation(field, description)], position=position
    )
