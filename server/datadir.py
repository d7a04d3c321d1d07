"""Which live processes use a data directory: a lock file each server process holds shared.

What a crashed process left in the data directory (spool files, scratch directories, markers of
S3 multipart uploads) can be discarded at start-up only if no other live process is using the
directory: several server processes may share one (workers of one server, or a `metalake serve`
restarted while the old one drains). The kernel releases a dead process's lock, so "I could
lock it exclusively" means "nobody else is alive here".
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".metalake-serving"


class DataDirectoryLock:
    """Held (shared) for the life of a server process; see `alone`.

    `shared`: take it shared at once, without asking whether this process is alone (a worker
    of a supervisor, which holds it already and did the cleaning up)."""

    def __init__(self, data_dir: Path, *, shared: bool = False) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        if shared:
            self.alone = False
        else:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.alone = False  # another live process uses this directory
            else:
                self.alone = True  # nobody else: leftovers are a dead process's
        # Exclusive while the caller cleans up (others starting meanwhile wait here), then
        # shared with every other process using the directory.
        self._downgraded = not self.alone
        if not self.alone:
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def share(self) -> None:
        """Done cleaning up: let other processes use the directory too."""
        if not self._downgraded and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            self._downgraded = True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None

    def __enter__(self) -> DataDirectoryLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
