"""metalake's metadata extractors: a pluggy registry of plugins that read metadata from files.

Plugin authors need only `hookimpl` (or ``pluggy.HookimplMarker("metalake")``) and, for typing,
`Source`. See docs/plugins.md.
"""

from metalake.extractors.hookspecs import Derived, hookimpl, hookspec
from metalake.extractors.source import Source

__all__ = ["Derived", "Source", "hookimpl", "hookspec"]
