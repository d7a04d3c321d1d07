"""metalake: a datalake of files with typed metadata. The Python SDK.

from metalake import Client
datalake = Client("127.0.0.1:50051").get_datalake()
data = datalake.upload_data("photo.jpg", metadata={"reference": "7NGOMI"}, fill_metadata=True)
"""

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
]
