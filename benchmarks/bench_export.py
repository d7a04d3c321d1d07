"""Exports stream: peak memory of writing N records does not grow with N.

The records are built from Data messages generated on the fly (as ListData pages deliver them),
so this measures the SDK's export path: record building and the CSV, JSON Lines and Parquet
writers. The baseline is the same export of a tenth of the items, in the same run; a flat
pipeline shows a peak ratio near 1 while the item ratio is 10.

    METALAKE_BENCH_SCALE=0.1 python -m benchmarks export     # 100,000 items at most
"""

from __future__ import annotations

import os
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from metalake import export
from metalake import metadata as md
from metalake.client import Data
from metalake.v1 import datalake_pb2 as pb

COUNT = int(1_000_000 * float(os.environ.get("METALAKE_BENCH_SCALE", "1")))


def records(count: int) -> Iterator[dict[str, Any]]:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    for i in range(count):
        message = pb.Data(
            id=f"{i:08d}-0000-4000-8000-000000000000",
            filename=f"IMG_{i:07d}.jpg",
            size=1_000_000 + i,
            sha256=f"{i:064x}",
            content_type="image/jpeg",
            metadata=md.to_proto({"latitude": 43.6, "acquired_at": when, "manufacturer": "Canon"}),
            tags=["field", f"t{i % 7}"],
            labels={"rig": "ABCDEFGHIJ"[i % 10]},
        )
        message.created_at.FromDatetime(datetime(2024, 5, 2, tzinfo=UTC))
        message.updated_at.FromDatetime(datetime(2024, 5, 2, tzinfo=UTC))
        yield export.record(Data(None, message))  # type: ignore[arg-type]  # no calls made


def measure(fmt: str, count: int, directory: Path) -> tuple[float, float]:
    """(peak traced MiB, CPU µs per item) of exporting `count` records."""
    tracemalloc.start()
    started = time.process_time()
    export.write(records(count), directory / f"out.{fmt}", fmt, provenance=False)
    cpu = time.process_time() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20, cpu / count * 1e6


def main() -> None:
    print(
        f"| format | items | peak MiB | baseline ({COUNT // 10:,} items) peak MiB | ratio | "
        "CPU µs/item |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for fmt in export.FORMATS:
            small, _ = measure(fmt, COUNT // 10, Path(scratch))
            peak, cpu = measure(fmt, COUNT, Path(scratch))
            print(
                f"| {fmt} | {COUNT:,} | {peak:.1f} | {small:.1f} | {peak / small:.2f}x | "
                f"{cpu:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
