"""The file an extractor reads, and the per-file state extractors may share."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")

HEAD_SIZE = 64


class Source:
    """One file, as handed to every extractor for one extraction: on disk, or already in memory
    (a small upload, whose bytes the server holds anyway).

    The file is never loaded whole: extractors open their own handle and seek to what they need.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        filename: str | None = None,
        *,
        data: bytes | None = None,
    ) -> None:
        """The file at `path`, or with `data` the file's bytes (then `path` may be None)."""
        self._path = Path(path) if path is not None else None
        self.filename = filename
        self._data = data
        if data is not None:
            self.size = len(data)
            self.head: bytes = data[:HEAD_SIZE]
        elif self._path is None:
            raise TypeError("a Source needs a path or its data")
        else:
            self.size = self._path.stat().st_size
            with self._path.open("rb") as fp:
                self.head = fp.read(HEAD_SIZE)
        self._memo: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def in_memory(self) -> bool:
        """True when the file's bytes are held in memory and there is no file on disk."""
        return self._data is not None

    @property
    def path(self) -> Path:
        """The file on disk; raises FileNotFoundError for a file held in memory only."""
        if self._path is None:
            raise FileNotFoundError(f"{self.filename or 'this file'} is in memory: use open()")
        return self._path

    def open(self) -> BinaryIO:
        """A new binary handle on the file; each caller closes its own."""
        if self._data is not None:
            return io.BytesIO(self._data)  # shares the bytes: nothing is copied
        return self.path.open("rb")

    def memo(self, key: str, compute: Callable[[], T]) -> T:
        """`compute()` once per file and key, so that extractors share one parse.

        The lock is not held while computing: an extractor abandoned on timeout may still be
        inside `compute`, and the next one must not wait on it.
        """
        # A value once stored is never replaced: reading it needs no lock (a dict lookup is
        # atomic), the common case once the first extractor has parsed the file.
        if key in self._memo:
            return self._memo[key]  # type: ignore[return-value]
        value = compute()
        with self._lock:
            self._memo.setdefault(key, value)
            return self._memo[key]  # type: ignore[return-value]

    def __repr__(self) -> str:
        where = str(self._path) if self._path is not None else "<memory>"
        return f"Source({where!r}, filename={self.filename!r}, size={self.size})"
