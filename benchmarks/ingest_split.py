"""The ingest pipeline alone, in one process without gRPC: where a small file's CPU goes, by
thread, user and system. A profiling aid, not a benchmark (`make bench` does not run it).

    python -m benchmarks.ingest_split                 # 3,000 bench JPEGs, 16 uploads at once
    python -m benchmarks.ingest_split --fill          # with fill_metadata
    python -m benchmarks.ingest_split --files 1000

Builds the embedded default's datalake on a fresh data directory (as `metalake serve` does:
SQLite + local files, migrated), warms it up with 300 files, then runs `Ingest.upload` for each
file, 16 at once, each file's bytes as one chunk (as the SDK sends a small file). Reports, per
stored file: the event loop thread's CPU, the other threads' (the catalog's batches, the pack
writes), each split into user and system time, and the whole machine's busy time from
/proc/stat, which also counts kernel threads (writeback, I/O completion): work moved there
would show. Without gRPC in the way, these figures move far less between runs than the
server's, so they tell a change in the pipeline's own cost apart (docs/performance-log.md,
"Stop 27").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_small_files import jpegs
from metalake.server.app import build_datalake
from metalake.server.config import Settings
from metalake.server.ingest import UploadHeader

CONCURRENT = 16
ORG = "default"


@dataclass(frozen=True)
class Split:
    """CPU ms per stored file."""

    files: int
    files_per_second: float
    loop_user: float
    loop_system: float
    others_user: float
    others_system: float
    machine_busy: float

    @property
    def loop(self) -> float:
        return self.loop_user + self.loop_system

    @property
    def others(self) -> float:
        return self.others_user + self.others_system


def _machine_busy_seconds() -> float:
    """Seconds every CPU of the machine spent not idle (nor waiting for I/O) since boot."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks) - idle - iowait) / os.sysconf("SC_CLK_TCK")


async def measure(data_dir: Path, files: list[bytes], *, fill: bool, warm_up: int = 300) -> Split:
    """Upload `files` through a datalake on `data_dir` (after `warm_up` other files) and split
    its CPU."""
    datalake = build_datalake(Settings(data_dir=data_dir), migrate=True)
    try:
        ingest = datalake.ingest
        slots = asyncio.Semaphore(CONCURRENT)

        async def upload(index: int, data: bytes) -> None:
            async def chunks() -> AsyncIterator[bytes]:
                yield data

            header = UploadHeader(filename=f"{index}.jpg", fill_metadata=fill)
            async with slots:
                await ingest.upload(ORG, header, chunks())

        async def run(batch: list[bytes]) -> None:
            await asyncio.gather(*(upload(i, data) for i, data in enumerate(batch)))

        await run(jpegs(warm_up, f"warm-up {uuid.uuid4().hex}"))
        process, loop = resource.RUSAGE_SELF, resource.RUSAGE_THREAD
        before = resource.getrusage(process), resource.getrusage(loop), _machine_busy_seconds()
        started = time.perf_counter()
        await run(files)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(process), resource.getrusage(loop), _machine_busy_seconds()
    finally:
        await datalake.catalog.close()

    def ms(seconds: float) -> float:
        return seconds * 1000 / len(files)

    loop_user = after[1].ru_utime - before[1].ru_utime
    loop_system = after[1].ru_stime - before[1].ru_stime
    return Split(
        files=len(files),
        files_per_second=len(files) / elapsed,
        loop_user=ms(loop_user),
        loop_system=ms(loop_system),
        others_user=ms(after[0].ru_utime - before[0].ru_utime - loop_user),
        others_system=ms(after[0].ru_stime - before[0].ru_stime - loop_system),
        machine_busy=ms(after[2] - before[2]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest_split")
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--fill", action="store_true", help="ask for fill_metadata")
    options = parser.parse_args()
    files = jpegs(options.files, f"split {uuid.uuid4().hex}")
    with tempfile.TemporaryDirectory(prefix="metalake-ingest-") as scratch:
        split = asyncio.run(measure(Path(scratch), files, fill=options.fill))
    print(
        f"{split.files:,} files{', fill_metadata' if options.fill else ''}, "
        f"{split.files_per_second:,.0f} files/s; CPU ms per file:"
    )
    print("| threads | user | system | total |\n|---|---:|---:|---:|")
    print(f"| event loop | {split.loop_user:.3f} | {split.loop_system:.3f} | {split.loop:.3f} |")
    print(
        f"| the others | {split.others_user:.3f} | {split.others_system:.3f} | {split.others:.3f} |"
    )
    print(f"the machine's busy time: {split.machine_busy:.3f} ms per file")


if __name__ == "__main__":
    main()
