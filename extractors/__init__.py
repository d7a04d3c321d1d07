"""metalake's metadata extractors: a pluggy registry of plugins that read metadata from files.

Plugin authors import from :mod:`metalake.plugin` (the hook markers, the `Source` protocol, the
field types and `Derived`); the names below are re-exported from it so that the built-ins use the
same markers. `Source` here is the concrete class the registry builds, which satisfies
`metalake.plugin.Source`. See docs/plugins.md.
"""

from metalake.extractors.source import Source
from metalake.plugin import FIELD_TYPES, FIELDS, Derived, ExtractedMetadata, hookimpl, hookspec

__all__ = [
    "FIELDS",
    "FIELD_TYPES",
    "Derived",
    "ExtractedMetadata",
    "Source",
    "hookimpl",
    "hookspec",
]
