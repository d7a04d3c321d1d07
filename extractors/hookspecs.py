"""The hooks a metalake extractor plugin implements.

A plugin is any module or object with functions marked by :data:`hookimpl`; it is found through
the ``metalake.extractors`` entry-point group (or registered directly, as the built-ins are).
Each hook below is documented in ``docs/plugins.md``; a test fails when one is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from metalake.extractors.source import Source

PROJECT_NAME = "metalake"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def metalake_extract_metadata(
    source: Source, missing: frozenset[str]
) -> Mapping[str, object] | None:
    """Read metadata values from one file.

    **When it is called.** Once per file and per extractor, in registry order (built-ins first:
    ``pillow``, ``exifread``, ``gps``; then installed plugins), from a worker thread, while at least
    one field the caller asked for is still missing. An implementation may be called concurrently
    for different files, so it must not keep per-file state outside ``source``.

    :param source: the file, on disk or (a small upload) in memory. Open it with
        ``source.open()`` (a new binary handle each call) and read only what you need;
        ``source.head`` holds its first bytes, ``source.filename`` the client's file name
        (may be ``None``), and
        ``source.memo(key, compute)`` shares a parse between extractors for this one file.
    :param missing: the fields still unfilled when this extractor runs. Producing others is
        harmless (they are ignored) but wasted work.

    **What it returns.** A mapping from metadata field name (``metalake.metadata.FIELDS``) to a
    value of the field's type: ``float`` for latitude, longitude, altitude, resolution_x and
    resolution_y; ``datetime`` for acquired_at (aware when the file recorded a UTC offset, naive
    otherwise); ``str`` for the rest. Return ``None`` or ``{}`` when the file has nothing for you.

    **How results merge.** For each missing field, the first extractor in order whose value passes
    ``metalake.metadata.check_value`` wins, and ``metadata_sources`` records its name. An invalid
    value is dropped silently and the next extractor may fill the field. Unknown field names are
    ignored. An implementation that raises, or runs past the per-file time limit
    (``METALAKE_EXTRACT_TIMEOUT``), is logged with the file name and skipped; the other
    extractors' values still count. Use ``@hookimpl(tryfirst=True)`` / ``trylast=True`` to run
    before / after every extractor without that mark.
    """
