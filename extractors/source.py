"""The file an extractor reads, and the per-file state extractors may share."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")

HEAD_SIZE = 64


class Source:
    """One file on disk, as handed to every extractor for one extraction.

    The file is never loaded whole: extractors open their own handle and seek to what they need.
    """

    def __init__(self, path: str | os.PathLike[str], filename: str | None = None) -> None:
        self.path = Path(path)
        self.filename = filename
        self.size = self.path.stat().st_size
        with self.path.open("rb") as fp:
            self.head: bytes = fp.read(HEAD_SIZE)
        self._memo: dict[str, object] = {}
        self._lock = threading.Lock()

    def open(self) -> BinaryIO:
        """A new binary handle on the file; each caller closes its own."""
        return self.path.open("rb")

    def memo(self, key: str, compute: Callable[[], T]) -> T:
        """`compute()` once per file and key, so that extractors share one parse.

        The lock is not held while computing: an extractor abandoned on timeout may still be
        inside `compute`, and the next one must not wait on it.
        """
        with self._lock:
            if key in self._memo:
                return self._memo[key]  # type: ignore[return-value]
        value = compute()
        with self._lock:
            self._memo.setdefault(key, value)
            return self._memo[key]  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"Source({str(self.path)!r}, filename={self.filename!r}, size={self.size})"
