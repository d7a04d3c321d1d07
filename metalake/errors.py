"""The SDK's errors: one hierarchy, each keeping the gRPC code, the server's message and, for
invalid arguments, the fields at fault."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:
    from metalake.client import Data


class MetalakeError(Exception):
    """Anything the service refused or could not do."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        violations: list[tuple[str, str]] | None = None,
        retry_after: timedelta | None = None,
    ) -> None:
        self.code = code
        self.violations = violations or []
        self.retry_after = retry_after
        detail = "; ".join(f"{field}: {why}" for field, why in self.violations)
        super().__init__(f"{message} ({detail})" if detail and detail not in message else message)


class InvalidArgumentError(MetalakeError, ValueError):
    """The request was wrong; `violations` lists (field, what is wrong)."""


class NotFoundError(MetalakeError, LookupError):
    """No such item (or it belongs to another organization)."""


class ConflictError(MetalakeError):
    """The item changed since it was read (stale etag)."""


class AuthenticationError(MetalakeError):
    """No valid token (METALAKE_TOKEN or token=...)."""


class PermissionDeniedError(MetalakeError):
    """The token's role does not allow this call."""


class ResourceExhaustedError(MetalakeError):
    """A limit: quota, file size, or (temporarily, with retry_after) server load."""


class UnavailableError(MetalakeError):
    """The server cannot be reached or is shutting down; retrying may succeed."""


class DataLossError(MetalakeError):
    """The bytes that arrived are not the bytes sent (checksum mismatch)."""


class IntegrityError(MetalakeError):
    """A download did not match the size or SHA-256 the server announced."""


class UploadError(MetalakeError):
    """Some files of a batch failed; the others were stored.

    `results` is in input order: a Data for each stored file, the exception for each failed one.
    `failed` lists (path, exception) for the failed files, in input order.
    """

    def __init__(self, results: Sequence[Data | Exception], paths: Sequence[Path]) -> None:
        self.results: list[Data | Exception] = list(results)
        self.failed: list[tuple[Path, Exception]] = [
            (p, r) for p, r in zip(paths, results, strict=True) if isinstance(r, Exception)
        ]
        lines = "\n".join(f"  {path}: {error}" for path, error in self.failed)
        super().__init__(f"{len(self.failed)} of {len(results)} files failed:\n{lines}")


_BY_CODE: dict[grpc.StatusCode, type[MetalakeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}


def from_rpc_error(error: grpc.RpcError) -> MetalakeError:
    """The SDK error for a failed call, with the google.rpc details it carried."""
    code: grpc.StatusCode | None = error.code() if hasattr(error, "code") else None
    message = (error.details() if hasattr(error, "details") else None) or str(error)
    violations: list[tuple[str, str]] = []
    retry_after = None
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        status = None
    for detail in status.details if status is not None else []:
        bad_request = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(bad_request):
            violations += [(v.field, v.description) for v in bad_request.field_violations]
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToTimedelta()
    kind = _BY_CODE.get(code, MetalakeError) if code is not None else MetalakeError
    return kind(message, code=code, violations=violations, retry_after=retry_after)


def is_retryable(error: MetalakeError) -> bool:
    """Worth trying again unchanged: the server was away, or asked us to come back."""
    if isinstance(error, UnavailableError):
        return True
    if isinstance(error, ResourceExhaustedError):
        return error.retry_after is not None
    return error.code == grpc.StatusCode.DEADLINE_EXCEEDED
