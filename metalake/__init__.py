"""metalake: a datalake of files with typed metadata. The Python SDK.

from metalake import Client
datalake = Client("127.0.0.1:50051").get_datalake()
data = datalake.upload_data("photo.jpg", metadata={"reference": "7NGOMI"}, fill_metadata=True)
"""

from metalake.client import Client, Data, Datalake
from metalake.errors import (
    ConflictError,
    InvalidArgumentError,
    MetalakeError,
    NotFoundError,
    UploadError,
)
from metalake.metadata import FIELDS, InvalidMetadataError

__all__ = [
    "FIELDS",
    "Client",
    "ConflictError",
    "Data",
    "Datalake",
    "InvalidArgumentError",
    "InvalidMetadataError",
    "MetalakeError",
    "NotFoundError",
    "UploadError",
]
