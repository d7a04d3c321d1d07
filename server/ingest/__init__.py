"""Bringing files in: the ingest pipeline and its parts.

- header.py: what the client says about a file (UploadHeader), and the one check it gets.
- receiving.py: receiving the bytes, in memory when small, else streamed into a blob writer (which
  hashes them) or a spool file; content-type sniffing.
- extract.py: filling metadata from the bytes with the extractor registry.
- gate.py: small files that arrive together go on together (SmallFileGate).
- pipeline.py: `Ingest`, which runs these steps for every RPC that brings bytes in, and commits
  (the map of which RPC takes which path is there). Import it from there: it depends on
  metalake.server.staging, which depends on this package.
"""

from metalake.server.ingest.extract import (
    Extraction,
    Filled,
    MetadataExtractor,
    fill_metadata,
)
from metalake.server.ingest.header import (
    MAX_FILENAME_LENGTH,
    UploadHeader,
    check_extraction_header,
    check_filename,
    check_header,
)
from metalake.server.ingest.receiving import (
    SMALL_FILE,
    WRITE_BATCH,
    Head,
    Sink,
    Spooled,
    SpoolFile,
    check_size,
    detect_content_type,
    gather_head,
    prepend,
    receive,
    sniff_content_type,
)

__all__ = [
    "MAX_FILENAME_LENGTH",
    "SMALL_FILE",
    "WRITE_BATCH",
    "Extraction",
    "Filled",
    "Head",
    "MetadataExtractor",
    "Sink",
    "SpoolFile",
    "Spooled",
    "UploadHeader",
    "check_extraction_header",
    "check_filename",
    "check_header",
    "check_size",
    "detect_content_type",
    "fill_metadata",
    "gather_head",
    "prepend",
    "receive",
    "sniff_content_type",
]
