"""Extraction: the client's metadata, completed by the extractor registry from the file's bytes."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from metalake.metadata import FIELDS, MetadataDict
from metalake.server.observability import record_extraction

log = logging.getLogger(__name__)


class Extraction(Protocol):
    """What an extractor registry returns for one file."""

    @property
    def values(self) -> MetadataDict:
        """Valid values (`metadata.check_value`), for fields the caller said were missing."""

    @property
    def sources(self) -> Mapping[str, str]: ...

    @property
    def errors(self) -> list[tuple[str, str]]: ...

    @property
    def timings(self) -> Mapping[str, float]: ...


class MetadataExtractor(Protocol):
    """The extractor registry, as the pipeline sees it (see extractors.registry)."""

    async def extract_async(
        self,
        content: bytes | Path,
        *,
        filename: str,
        missing: Collection[str],
        time_limit: float | None = None,
    ) -> Extraction:
        """Raises TimeoutError once `time_limit` seconds are spent."""


@dataclass(frozen=True)
class Filled:
    metadata: MetadataDict
    sources: dict[str, str]


async def fill_metadata(
    extractor: MetadataExtractor | None,
    content: Path | bytes,
    *,
    filename: str,
    given: MetadataDict,
    time_limit: float,
) -> Filled:
    """The client's values, completed by the extractors for the fields it did not give.

    The client's values always win. Extraction runs in the registry's worker thread, on the
    spooled file or on the bytes of a small file already in memory (`content`); an extractor
    failure or a timeout only means fewer fields are filled, never a failed upload.
    """
    metadata: MetadataDict = dict(given)
    sources = dict.fromkeys(given, "client")
    missing = [name for name in FIELDS if name not in given]
    if extractor is None or not missing:
        return Filled(metadata, sources)
    try:
        found = await extractor.extract_async(
            content, filename=filename, missing=missing, time_limit=time_limit
        )
    except TimeoutError:
        log.warning("metadata extraction timed out after %.1fs for %r", time_limit, filename)
        return Filled(metadata, sources)
    except Exception:
        log.exception("metadata extraction failed for %r", filename)
        return Filled(metadata, sources)
    record_extraction(found.sources, found.errors, found.timings)
    # Valid values for missing fields only, checked by the registry as it merged them: checking
    # them again here cost as much as the merge itself.
    metadata.update(found.values)
    for name in found.values:
        sources[name] = found.sources.get(name, "unknown")
    return Filled(metadata, sources)
