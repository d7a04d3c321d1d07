"""One client process of the load test: a few threads, each uploading files through the SDK."""

from __future__ import annotations

import hashlib
import threading
from multiprocessing.synchronize import Barrier
from pathlib import Path

from metalake import Client


def run(
    target: str,
    directory: str,
    process: int,
    threads: int,
    per_thread: int,
    start: Barrier,
    results: list[tuple[str, str, str]],
) -> None:
    """Upload `threads` x `per_thread` files; append (path, sha256 sent, id stored) to results."""
    files = sorted(Path(directory).glob(f"p{process:02d}-*"))
    start.wait(120)  # every process streams at the same time
    found: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def worker(number: int) -> None:
        datalake = Client(target).get_datalake()
        for path in files[number * per_thread : (number + 1) * per_thread]:
            data = datalake.upload_data(path, metadata={"custom_id": path.name})
            with lock:
                found.append((path.name, hashlib.sha256(path.read_bytes()).hexdigest(), data.id))

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    results.extend(found)
