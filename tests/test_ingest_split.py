"""benchmarks.ingest_split stores every file it is given and splits the CPU that took between the
event loop's thread and the others, per file."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from benchmarks.bench_small_files import jpegs
from benchmarks.ingest_split import measure
from metalake.server.catalog import SqlCatalog

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/stat")


async def test_every_file_is_stored_and_its_cpu_split_by_thread(tmp_path: Path) -> None:
    files = jpegs(40, uuid.uuid4().hex)
    split = await measure(tmp_path, files, fill=True, warm_up=5)
    assert split.files == 40
    assert split.files_per_second > 0
    assert split.loop > 0  # hashing and extraction run on the loop's thread
    assert split.others > 0  # the catalog's batches and the pack writes do not
    assert split.machine_busy > 0
    catalog = SqlCatalog.open(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    try:
        page = await catalog.list_page(
            "default", filter="", order_by="", page_size=100, page_token=""
        )
    finally:
        await catalog.close()
    assert len(page.records) == 45  # the warm-up's and the measured files
    assert all(record.metadata_sources for record in page.records)  # filled
