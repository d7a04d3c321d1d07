"""metalake: a datalake of files with typed metadata. The Python SDK.

from metalake import Client
datalake = Client("127.0.0.1:50051").get_datalake()
data = datalake.upload_data("photo.jpg", metadata={"reference": "7NGOMI"}, fill_metadata=True)

The names below are imported on first use, so that `import metalake.plugin` or `metalake --help`
does not load gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from metalake._version import __version__

if TYPE_CHECKING:
    from metalake.client import (
        Client,
        Data,
        Datalake,
        Dataset,
        DatasetChange,
        Similar,
        Webhook,
        WebhookDelivery,
    )
    from metalake.errors import (
        AuthenticationError,
        ConflictError,
        DataLossError,
        IntegrityError,
        InvalidArgumentError,
        MetalakeError,
        NotFoundError,
        PermissionDeniedError,
        ResourceExhaustedError,
        UnavailableError,
        UploadError,
    )
    from metalake.metadata import FIELDS, InvalidMetadataError

_LAZY = {
    "Client": "metalake.client",
    "Data": "metalake.client",
    "Datalake": "metalake.client",
    "Dataset": "metalake.client",
    "DatasetChange": "metalake.client",
    "Similar": "metalake.client",
    "Webhook": "metalake.client",
    "WebhookDelivery": "metalake.client",
    "AuthenticationError": "metalake.errors",
    "ConflictError": "metalake.errors",
    "DataLossError": "metalake.errors",
    "IntegrityError": "metalake.errors",
    "InvalidArgumentError": "metalake.errors",
    "MetalakeError": "metalake.errors",
    "NotFoundError": "metalake.errors",
    "PermissionDeniedError": "metalake.errors",
    "ResourceExhaustedError": "metalake.errors",
    "UnavailableError": "metalake.errors",
    "UploadError": "metalake.errors",
    "FIELDS": "metalake.metadata",
    "InvalidMetadataError": "metalake.metadata",
}

__all__ = [
    "FIELDS",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "Data",
    "DataLossError",
    "Datalake",
    "Dataset",
    "DatasetChange",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidMetadataError",
    "MetalakeError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Similar",
    "UnavailableError",
    "UploadError",
    "Webhook",
    "WebhookDelivery",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'metalake' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
