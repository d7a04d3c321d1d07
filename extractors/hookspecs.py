"""The hooks a metalake extractor plugin implements, as the registry loads them.

They are defined, with their documentation, in :mod:`metalake.plugin` (the plugin API, which
imports neither gRPC nor the server); this module re-exports them so that the registry and the
built-in extractors use the very same markers as third-party plugins.
"""

from __future__ import annotations

from metalake.plugin import PROJECT_NAME, hookimpl, hookspec, metalake_extract_metadata

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec", "metalake_extract_metadata"]
