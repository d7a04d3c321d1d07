"""The API of a metalake extractor plugin: everything a plugin imports from metalake.

A plugin implements one hook, marked with :data:`hookimpl`, and returns values of the metadata
fields' types::

    from metalake.plugin import ExtractedMetadata, Source, hookimpl

    @hookimpl
    def metalake_extract_metadata(
        source: Source, missing: frozenset[str]
    ) -> ExtractedMetadata | None:
        if "software" not in missing or not source.head.startswith(b"%PDF"):
            return None
        with source.open() as fp:
            return {"software": fp.readline(200).decode("latin-1").strip()}

This module needs only pluggy (``pip install 'metalake[plugin]'``): it imports neither gRPC,
protobuf nor the server, so a plugin imports fast and its unit tests run without a server
install. The registry that runs plugins (``metalake.extractors.registry``) is part of the server
(``pip install 'metalake[server]'``). See docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Final, Generic, Protocol, TypedDict, TypeVar

import pluggy

from metalake.metadata import (
    FIELDS,
    FLOAT_FIELDS,
    STRING_FIELDS,
    TIMESTAMP_FIELDS,
    MetadataValue,
    check_value,
)

__all__ = [
    "FIELDS",
    "FIELD_TYPES",
    "FLOAT_FIELDS",
    "PROJECT_NAME",
    "STRING_FIELDS",
    "TIMESTAMP_FIELDS",
    "Derived",
    "ExtractedMetadata",
    "MetadataValue",
    "Source",
    "check_value",
    "hookimpl",
    "hookspec",
    "metalake_extract_metadata",
]

PROJECT_NAME: Final = "metalake"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks the hook specifications below (for metalake itself, not for plugins)."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a plugin's implementation of a hook: ``@hookimpl``, ``@hookimpl(tryfirst=True)``,
``@hookimpl(trylast=True)``. The same object as ``pluggy.HookimplMarker("metalake")``."""

FIELD_TYPES: Final[Mapping[str, type]] = {
    field: float if field in FLOAT_FIELDS else datetime if field in TIMESTAMP_FIELDS else str
    for field in FIELDS
}
"""The Python type of each metadata field's value, in field order."""

T = TypeVar("T")


class Source(Protocol):
    """The file a hook reads; one per file, shared by every extractor run on it.

    A large file is a spooled copy on the server's disk; a small upload (up to 1 MiB) is held in
    memory, the bytes the server received, and has no path (:attr:`in_memory`). Read either the
    same way: open your own handle with :meth:`open` (or look at :attr:`head`) and read only
    what you need.
    """

    @property
    def in_memory(self) -> bool:
        """True when the file's bytes are held in memory and there is no file on disk:
        :attr:`path` raises, :meth:`open` returns a handle on those bytes."""

    @property
    def path(self) -> Path:
        """Where the file is, on the server's disk (a spooled copy: do not write to it).

        Raises ``FileNotFoundError`` for a file held in memory (:attr:`in_memory`): a hook that
        reads through :meth:`open` works for both, one that needs a path (to hand to a tool)
        must check :attr:`in_memory` first.
        """

    @property
    def filename(self) -> str | None:
        """The client's name of the file (``photo.jpg``), or None when it gave none."""

    @property
    def size(self) -> int:
        """The file's size in bytes."""

    @property
    def head(self) -> bytes:
        """The file's first bytes (64, or fewer in a shorter file): enough to sniff a format."""

    def open(self) -> BinaryIO:
        """A new binary handle on the file; the caller closes it (``with source.open() as fp``)."""

    def memo(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per file and key: extractors share one parse of this file."""


@dataclass(frozen=True)
class Derived(Generic[T]):
    """A value an extractor derived rather than read as such, and how.

    Return ``Derived(value, "how")`` in place of ``value`` and ``metadata_sources`` records
    ``"<extractor>+<how>"`` for the field (the built-ins write ``pillow+gps-clock`` for a capture
    time whose UTC offset comes from the GPS clock). ``how`` is a short lower-case word. (A hook
    returning one is annotated ``Mapping[str, object]``: ``ExtractedMetadata`` has plain values.)
    """

    value: T
    how: str


class ExtractedMetadata(TypedDict, total=False):
    """What a hook may return, typed per field (every key optional).

    Coordinates are signed decimal degrees (south and west negative), altitude in metres.
    ``acquired_at`` is aware when the file recorded a UTC offset, naive (a wall time) otherwise.
    """

    latitude: float
    longitude: float
    altitude: float
    acquired_at: datetime
    acquired_by: str
    weather: str
    resolution_x: float
    resolution_y: float
    resolution_unit: str
    compression: str
    manufacturer: str
    software: str
    color_space: str
    custom_id: str
    reference: str


@hookspec
def metalake_extract_metadata(
    source: Source, missing: frozenset[str]
) -> Mapping[str, object] | None:
    """Read metadata values from one file.

    **When it is called.** Once per file and per extractor, in registry order (built-ins first:
    ``pillow``, ``exifread``, ``gps``, ``xmp``; then installed plugins), from a worker thread,
    while at least one field the caller asked for is still missing. Each call goes through
    pluggy with every wrapper (``wrapper=True`` or ``hookwrapper=True``) around it. An
    implementation may be called concurrently for different files, so it must not keep per-file
    state outside ``source``.

    :param source: the file, on disk or, for a small upload, in memory (:class:`Source`). Open
        it with ``source.open()`` (a new binary handle each call) and read only what you need;
        ``source.head`` holds its first bytes, ``source.filename`` the client's file name (may
        be ``None``), and
        ``source.memo(key, compute)`` shares a parse between extractors for this one file.
    :param missing: the fields still unfilled when this extractor runs. Producing others is
        harmless (they are ignored) but wasted work.

    **What it returns.** A mapping from metadata field name (:data:`FIELDS`) to a value of the
    field's type (:data:`FIELD_TYPES`, :class:`ExtractedMetadata`): ``float`` for latitude,
    longitude, altitude, resolution_x and resolution_y; ``datetime`` for acquired_at (aware when
    the file recorded a UTC offset, naive otherwise); ``str`` for the rest. A value may be
    wrapped in :class:`Derived` to say how it was derived. Return ``None`` or ``{}`` when the
    file has nothing for you.

    **How results merge.** For each missing field, the first extractor in order whose value passes
    :func:`check_value` wins, and ``metadata_sources`` records its name (``name+how`` for a
    :class:`Derived` value). An invalid value is dropped silently and the next extractor may
    fill the field. Unknown field names are ignored. An implementation that raises, or runs past
    the per-file time limit (``METALAKE_EXTRACT_TIMEOUT``), is logged with the file name and
    skipped; the other extractors' values still count. Use ``@hookimpl(tryfirst=True)`` /
    ``trylast=True`` to run before / after every extractor without that mark.
    """
