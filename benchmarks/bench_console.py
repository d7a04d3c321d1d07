"""The console's first page, and what previews cost beside ingest.

1. First page of the web console on 100,000 items against 100 items (the baseline): what a
   browser fetches to show it (the HTML, its script, style and outline modules, the first
   ListData page of 100, newest first, and the 100 thumbnails, six at a time as a browser does),
   p50 over fresh clients (no HTTP cache), with the server's CPU time per page load. The first
   load of each, which makes the 100 previews, is reported beside it.
2. Previews as a share of ingest: the server's CPU time per camera JPEG to store it (UploadData
   with fill_metadata) and to make its 256 and 1024 px previews (the first GetThumbnail of each),
   from /proc for the server's processes (its decoder processes, which make the previews,
   included). Previews are made on request, never during the upload: the ingest figure is the
   same with or without them.

    python -m benchmarks console                            # 100,000 items
    METALAKE_BENCH_SCALE=0.1 python -m benchmarks console   # 10,000 items, a quick look
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shutil
import signal
import statistics
import struct
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import sqlalchemy
from PIL import Image

from benchmarks.bench_small_files import cpu_seconds  # the server and its decoder processes
from metalake.server.blobstore import LocalBlobStore
from metalake.server.catalog import SqlCatalog
from metalake.server.schema import data_table
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.serverprocess import ServerProcess

SCALE = float(os.environ.get("METALAKE_BENCH_SCALE", "1"))
ITEMS = max(1000, round(100_000 * SCALE))
BASELINE_ITEMS = 100
DISTINCT_BLOBS = 100  # the first page shows 100 different pictures
RUNS = 9
CAMERA_FILES = 24
CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "jpg"
_CONSOLE = re.compile(r"web console on (http://[\d.]+:\d+)/")


def camera_jpeg(seed: int, size: tuple[int, int] = (2000, 1500)) -> bytes:
    """A photo-like JPEG (smooth gradients, some grain) of a few megapixels."""
    rng = random.Random(seed)
    small = Image.frombytes("RGB", (40, 30), rng.randbytes(40 * 30 * 3))
    image = small.resize(size, Image.Resampling.BICUBIC)
    grain = Image.effect_noise(size, 12).convert("RGB")
    image = Image.blend(image, grain, 0.15)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def distinct(content: bytes, index: int) -> bytes:
    """The same JPEG with a comment segment: still valid, its own SHA-256."""
    comment = f"metalake bench {index}".encode()
    return content[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + content[2:]


def populate(data_dir: Path, count: int) -> None:
    """`count` items straight into a fresh embedded catalog, over DISTINCT_BLOBS real blobs."""
    catalog = SqlCatalog.open(f"sqlite:///{data_dir / 'catalog.sqlite3'}", migrate=True)
    store = LocalBlobStore(data_dir)
    base = camera_jpeg(1, (1600, 1200))
    blobs = []
    for index in range(DISTINCT_BLOBS):
        content = distinct(base, index)
        key = hashlib.sha256(content).hexdigest()
        path = store.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        blobs.append((key, len(content)))
    start = int(time.time() * 1e6) - count * 1000
    rows = []
    for i in range(count):
        key, size = blobs[i % DISTINCT_BLOBS]
        rows.append(
            {
                "id": str(uuid.uuid4()),
                "org": "default",
                "filename": f"IMG_{i:07d}.jpg",
                "size": size,
                "sha256": key,
                "content_type": "image/jpeg",
                "blob_key": key,
                "created_at": start + i * 1000,
                "updated_at": start + i * 1000,
                "metadata_sources": "{}",
                "revision": 1,
                "manufacturer": ("Canon", "NIKON", "SONY")[i % 3],
            }
        )
    columns = [c.name for c in data_table.columns]
    with catalog.engine.begin() as connection:
        full = [{c: row.get(c) for c in columns} for row in rows]
        for first in range(0, len(full), 50_000):
            connection.execute(data_table.insert(), full[first : first + 50_000])
        connection.execute(sqlalchemy.text("ANALYZE"))
    catalog.engine.dispose()


def start_server(data_dir: Path, log: Path) -> tuple[ServerProcess, str]:
    server = ServerProcess(data_dir, log, METALAKE_HTTP_LISTEN="127.0.0.1:0").start()
    found = _CONSOLE.search(log.read_text())
    assert found, "the server did not say where its console is"
    return server, found.group(1)


def first_page(base: str) -> float:
    """Seconds to fetch what the console's first screen needs, as a fresh browser would."""
    started = time.perf_counter()
    with httpx.Client(base_url=base, timeout=60) as client:
        for path in ("/", "/console/app.js", "/console/style.css", "/console/world.js"):
            client.get(path).raise_for_status()
        page = client.get(
            "/v1/data", params={"order_by": "created_at desc", "page_size": 100}
        ).json()
        urls = [f"/v1/data/{item['id']}/thumbnail?size=256" for item in page["data"]]
        with ThreadPoolExecutor(6) as pool:  # a browser's connections per host
            for response in pool.map(client.get, urls):
                response.raise_for_status()
    return time.perf_counter() - started


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
CHROMIUM_ARGS += ["--disable-background-networking", "--disable-component-update"]
CHROMIUM_ARGS += ["--disable-sync", "--disable-dev-shm-usage"]


def in_chromium(base: str) -> float | None:
    """p50 seconds for Chromium to open the console and decode its first 100 thumbnails (a
    window tall enough to show them all), fresh profile each time; None without Chromium."""
    if not Path(CHROMIUM).exists():
        return None
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for _ in range(RUNS):
                context = browser.new_context(viewport={"width": 1280, "height": 8000})
                page = context.new_page()
                started = time.perf_counter()
                page.goto(base + "/")
                cards = page.locator("#grid .card img")
                deadline = time.monotonic() + 120
                while cards.count() < 100 and time.monotonic() < deadline:
                    page.wait_for_timeout(10)
                # The first page's 100 (later pages may follow as the sentinel shows).
                cards.evaluate_all(
                    "images => Promise.all(images.slice(0, 100).map(image => image.decode()))"
                )
                times.append(time.perf_counter() - started)
                context.close()
        finally:
            browser.close()
    return statistics.median(times)


def page_figures(scratch: Path, count: int) -> tuple[float, float, float, float | None]:
    """(first load with previews made, p50 of later loads, server CPU ms per later load, p50 of
    loads in Chromium)."""
    data_dir = scratch / f"items-{count}"
    data_dir.mkdir()
    populate(data_dir, count)
    server, base = start_server(data_dir, scratch / f"items-{count}.log")
    try:
        assert server.process is not None
        cold = first_page(base)
        times, cpu = [], []
        for _ in range(RUNS):
            before = cpu_seconds(server.process.pid)
            times.append(first_page(base))
            cpu.append(cpu_seconds(server.process.pid) - before)
        browser = in_chromium(base)
        return cold, statistics.median(times), statistics.median(cpu) * 1000, browser
    finally:
        server.signal(signal.SIGTERM)
        server.wait()


def camera_files() -> list[bytes]:
    """Real camera JPEGs of the corpus (1 MB and more) when it is there, else generated ones."""
    real = (
        [
            p.read_bytes()
            for p in sorted(CORPUS.rglob("*.jpg"))
            if p.stat().st_size > 1_000_000 and "corrupted" not in p.name
        ]
        if CORPUS.is_dir()
        else []
    )
    bases = real or [camera_jpeg(seed, (4000, 3000)) for seed in range(4)]
    return [distinct(bases[i % len(bases)], i) for i in range(CAMERA_FILES)]


def preview_share(scratch: Path) -> tuple[float, float, float, float, int]:
    """(ingest CPU ms/file, 256 px ms/file, 1024 px ms/file, mean file size, file count)."""
    files = camera_files()
    server, _ = start_server(scratch / "previews", scratch / "previews.log")
    try:
        assert server.process is not None
        pid = server.process.pid
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.DatalakeServiceStub(channel)
            before = cpu_seconds(pid)
            ids = []
            for index, content in enumerate(files):
                header = pb.UploadDataHeader(filename=f"camera_{index}.jpg", fill_metadata=True)
                chunks = [content[i : i + 1024 * 1024] for i in range(0, len(content), 1024**2)]
                requests = [pb.UploadDataRequest(header=header)]
                requests += [pb.UploadDataRequest(chunk=c) for c in chunks]
                ids.append(stub.UploadData(iter(requests)).data.id)
            ingest = (cpu_seconds(pid) - before) / len(files)
            costs = []
            for size in (256, 1024):
                before = cpu_seconds(pid)
                for data_id in ids:
                    stub.GetThumbnail(pb.GetThumbnailRequest(id=data_id, size=size))
                costs.append((cpu_seconds(pid) - before) / len(files))
        mean_size = sum(map(len, files)) / len(files)
        return ingest * 1000, costs[0] * 1000, costs[1] * 1000, mean_size, len(files)
    finally:
        server.signal(signal.SIGTERM)
        server.wait()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="metalake-bench-console-") as scratch_name:
        scratch = Path(scratch_name)
        big = page_figures(scratch, ITEMS)
        small = page_figures(scratch, BASELINE_ITEMS)
        print(
            f"| first console page: HTML + 100 thumbnails | {ITEMS:,} items | "
            f"{BASELINE_ITEMS} items (baseline) | ratio |\n|---|---:|---:|---:|\n"
            f"| p50 of {RUNS} fresh loads, ms | {big[1] * 1000:.0f} | {small[1] * 1000:.0f} | "
            f"{big[1] / small[1]:.2f} |\n"
            f"| server CPU per load, ms | {big[2]:.0f} | {small[2]:.0f} | "
            f"{big[2] / small[2]:.2f} |\n"
            f"| first load, making the 100 previews, ms | {big[0] * 1000:.0f} | "
            f"{small[0] * 1000:.0f} | {big[0] / small[0]:.2f} |",
            flush=True,
        )
        if big[3] is not None and small[3] is not None:
            print(
                f"| in Chromium: console open, 100 thumbnails decoded, p50 ms | "
                f"{big[3] * 1000:.0f} | {small[3] * 1000:.0f} | {big[3] / small[3]:.2f} |",
                flush=True,
            )
        else:
            print("(no Chromium here: the in-browser row is skipped)", flush=True)
        ingest, small_preview, large_preview, mean_size, count = preview_share(scratch)
        print(
            f"\n| server CPU per camera JPEG ({count} files, {mean_size / 1e6:.1f} MB mean) "
            f"| ms | share of ingest |\n|---|---:|---:|\n"
            f"| ingest (UploadData with fill_metadata) | {ingest:.1f} | 1.00 |\n"
            f"| 256 px preview, first request | {small_preview:.1f} | "
            f"{small_preview / ingest:.2f} |\n"
            f"| 1024 px preview, first request | {large_preview:.1f} | "
            f"{large_preview / ingest:.2f} |\n"
            f"| both previews | {small_preview + large_preview:.1f} | "
            f"{(small_preview + large_preview) / ingest:.2f} |",
            flush=True,
        )
        print(
            "\nPreviews are made on their first request, off the upload's path: the ingest row "
            "is what an upload costs with or without them.",
            flush=True,
        )
