"""ListData at scale: p50/p95 of common filters on 1,000,000 items, SQLite and PostgreSQL.

Each query asks the catalog for one page of 100, as ListData does. The baseline is a full scan
of the same table (a filter on `weather`, which no index covers), measured in the same run.
Deep paging follows next_page_token 50 pages in, to show keyset pages stay as fast as the first.
Labels: every item has `rig` (one of 10 values), 30% a `site` (one of 200), 1% `review`; the
label filters run over the data_labels table and its (key, value, data_id) index.

    METALAKE_BENCH_SCALE=0.1 python -m benchmarks search     # 100,000 items, for a quick look
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy

from metalake.server.catalog import SqlCatalog
from metalake.server.schema import data_table
from metalake.server.schema_versions import engine_url

ORG = "bench"
POSTGRES_URL = os.environ.get(
    "METALAKE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
MAKERS = ["Canon", "NIKON", "SONY", "FUJIFILM", "Apple", "DJI", "Parrot", "Olympus"] + [
    f"Maker{i}" for i in range(12)
]
TAGS = [f"tag{i}" for i in range(50)]
RIGS = [chr(ord("A") + i) for i in range(10)]
SITES = [f"S{i:03d}" for i in range(200)]
Rows = list[dict[str, object]]
SCALE_COUNT = int(1_000_000 * float(os.environ.get("METALAKE_BENCH_SCALE", "1")))
EPOCH_2023 = int(datetime(2023, 1, 1, tzinfo=UTC).timestamp() * 1e6)
TWO_YEARS = int(2 * 365 * 24 * 3600 * 1e6)


def rows(count: int, seed: int = 7) -> tuple[Rows, Rows, Rows]:
    rng = random.Random(seed)
    items: Rows = []
    tags: Rows = []
    labels: Rows = []
    start = int(time.time() * 1e6) - count * 1000
    for i in range(count):
        item_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        items.append(
            {
                "id": item_id,
                "org": ORG,
                "filename": f"IMG_{i:07d}.jpg",
                "size": rng.randint(50_000, 5_000_000),
                "sha256": f"{i:064x}",
                "content_type": "image/jpeg",
                "blob_key": f"{i:064x}",
                "created_at": start + i * 1000,
                "updated_at": start + i * 1000,
                "metadata_sources": "{}",
                "revision": 1,
                "request_id": None,
                "latitude": rng.uniform(36.0, 60.0),
                "longitude": rng.uniform(-10.0, 30.0),
                "altitude": rng.uniform(0, 3000),
                "acquired_at": EPOCH_2023 + rng.randrange(TWO_YEARS),
                "acquired_at_offset": None,
                "manufacturer": rng.choice(MAKERS),
                "reference": f"REF-{rng.randrange(1000):04d}",
                "custom_id": f"C{i:08d}",
                "weather": rng.choice(["sun", "rain", "fog", "snow"]),
            }
        )
        for tag in rng.sample(TAGS, rng.choice([1, 2])):
            tags.append({"data_id": item_id, "tag": tag, "org": ORG})
        owner = {"data_id": item_id, "org": ORG, "created_at": start + i * 1000}
        labels.append({**owner, "key": "rig", "value": rng.choice(RIGS)})
        if rng.random() < 0.3:
            labels.append({**owner, "key": "site", "value": rng.choice(SITES)})
        if rng.random() < 0.01:
            labels.append({**owner, "key": "review", "value": "needed"})
    return items, tags, labels


def load(url: str, items: Rows, tags: Rows, labels: Rows) -> None:
    engine = sqlalchemy.create_engine(engine_url(url))
    columns = [c.name for c in data_table.columns]
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            raw = connection.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cursor:  # COPY: the bulk path PostgreSQL is built for
                with cursor.copy(f"COPY data ({', '.join(columns)}) FROM STDIN") as copy:
                    for item in items:
                        copy.write_row([item.get(c) for c in columns])
                with cursor.copy("COPY data_tags (data_id, tag, org) FROM STDIN") as copy:
                    for tag in tags:
                        copy.write_row([tag["data_id"], tag["tag"], tag["org"]])
                names = ("data_id", "key", "value", "org", "created_at")
                with cursor.copy(f"COPY data_labels ({', '.join(names)}) FROM STDIN") as copy:
                    for label in labels:
                        copy.write_row([label[n] for n in names])
            connection.execute(
                sqlalchemy.text("ANALYZE data; ANALYZE data_tags; ANALYZE data_labels")
            )
        else:
            full = [{c: item.get(c) for c in columns} for item in items]
            for start in range(0, len(full), 50_000):
                connection.execute(data_table.insert(), full[start : start + 50_000])
            connection.execute(
                sqlalchemy.text(
                    "INSERT INTO data_tags (data_id, tag, org) VALUES (:data_id, :tag, :org)"
                ),
                tags,
            )
            connection.execute(
                sqlalchemy.text(
                    "INSERT INTO data_labels (data_id, key, value, org, created_at) "
                    "VALUES (:data_id, :key, :value, :org, :created_at)"
                ),
                labels,
            )
            connection.execute(sqlalchemy.text("ANALYZE"))
    engine.dispose()


QUERIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "time range (acquired_at, 1 week)": lambda r: (
        f'acquired_at >= "{_day(r)}T00:00:00Z" AND acquired_at < "{_day(r, 7)}T00:00:00Z"',
        "acquired_at",
    ),
    "bounding box (lat/lon)": lambda r: (
        _box(r),
        "",
    ),
    "manufacturer =": lambda r: (f'manufacturer = "{r.choice(MAKERS)}"', ""),
    "reference =": lambda r: (f'reference = "REF-{r.randrange(1000):04d}"', ""),
    "custom_id =": lambda r: (f'custom_id = "C{r.randrange(SCALE_COUNT):08d}"', ""),
    'tags:"x"': lambda r: (f'tags:"{r.choice(TAGS)}"', ""),
    "manufacturer AND time range": lambda r: (
        f'manufacturer = "{r.choice(MAKERS)}" AND acquired_at >= "{_day(r)}T00:00:00Z" '
        f'AND acquired_at < "{_day(r, 30)}T00:00:00Z"',
        "acquired_at",
    ),
    "bounding box AND tag": lambda r: (f'{_box(r)} AND tags:"{r.choice(TAGS)}"', ""),
    'labels.rig = "X" (10%)': lambda r: (f'labels.rig = "{r.choice(RIGS)}"', ""),
    'labels.site = "S…" (0.15%)': lambda r: (f'labels.site = "{r.choice(SITES)}"', ""),
    "labels.review:* (1%)": lambda r: ("labels.review:*", ""),
    "labels.rig AND time range": lambda r: (
        f'labels.rig = "{r.choice(RIGS)}" AND acquired_at >= "{_day(r)}T00:00:00Z" '
        f'AND acquired_at < "{_day(r, 30)}T00:00:00Z"',
        "acquired_at",
    ),
}


def _day(rng: random.Random, plus: int = 0) -> str:
    base = datetime.fromtimestamp(EPOCH_2023 / 1e6 + rng.randrange(700) * 86400, UTC)
    moment = datetime.fromtimestamp(base.timestamp() + plus * 86400, UTC)
    return moment.strftime("%Y-%m-%d")


def _box(rng: random.Random) -> str:
    lat, lon = rng.uniform(37, 58), rng.uniform(-8, 28)
    return (
        f"latitude >= {lat:.3f} AND latitude <= {lat + 0.5:.3f} AND "
        f"longitude >= {lon:.3f} AND longitude <= {lon + 0.5:.3f}"
    )


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.95) - 1]


# CPU ms per query of this process, by query: stable on a shared machine where wall times are
# not. On SQLite it is the whole query (the engine runs in this process); on PostgreSQL only
# the client's share.
CPU: dict[str, dict[str, float]] = {}


async def measure(
    catalog: SqlCatalog, runs: int = 30, engine: str = ""
) -> dict[str, tuple[float, float]]:
    rng = random.Random(11)
    results = {}
    for name, make in QUERIES.items():
        samples, cpu = [], []
        for _ in range(runs):
            text, order_by = make(rng)
            started, cpu_started = time.perf_counter(), time.process_time()
            await catalog.list_page(
                ORG, filter=text, order_by=order_by, page_size=100, page_token=""
            )
            samples.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - cpu_started) * 1000)
        results[name] = _percentiles(samples)
        CPU.setdefault(engine, {})[name] = statistics.median(cpu)
    # Deep into a result: page 50 of a broad query, reached through tokens.
    token, deep = "", []
    for page_number in range(50):
        started = time.perf_counter()
        page = await catalog.list_page(
            ORG, filter='manufacturer = "Canon"', order_by="", page_size=100, page_token=token
        )
        if page_number >= 45:
            deep.append((time.perf_counter() - started) * 1000)
        token = page.next_page_token
    results["page 46-50 via page_token"] = _percentiles(deep)
    # Baseline: a full scan of the same table (weather has no index).
    scans = []
    for _ in range(5):
        started = time.perf_counter()
        await catalog.list_page(
            ORG, filter='weather = "hail"', order_by="", page_size=100, page_token=""
        )
        scans.append((time.perf_counter() - started) * 1000)
    results["baseline: full scan"] = _percentiles(scans)
    return results


def _postgres_url() -> tuple[str, Callable[[], None]] | None:
    try:
        admin = sqlalchemy.create_engine(engine_url(POSTGRES_URL))
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    except sqlalchemy.exc.OperationalError:
        return None

    def drop() -> None:
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", drop


def main() -> None:
    count = SCALE_COUNT
    started = time.perf_counter()
    items, tags, labels = rows(count)
    print(
        f"{count:,} items, {len(tags):,} tags, {len(labels):,} labels generated in "
        f"{time.perf_counter() - started:.0f}s"
    )
    engines: list[tuple[str, str, Callable[[], None]]] = []
    scratch = tempfile.TemporaryDirectory()
    engines.append(("SQLite", f"sqlite:///{Path(scratch.name) / 'bench.sqlite3'}", lambda: None))
    postgres = _postgres_url()
    if postgres is not None:
        engines.append(("PostgreSQL", *postgres))
    else:
        print("(no PostgreSQL reachable: its column is missing)")
    table: dict[str, dict[str, tuple[float, float]]] = {}
    try:
        for name, url, _ in engines:
            catalog = SqlCatalog.open(url, migrate=True)
            started = time.perf_counter()
            load(url, items, tags, labels)
            print(f"{name}: loaded in {time.perf_counter() - started:.0f}s", flush=True)
            table[name] = asyncio.run(measure(catalog, engine=name))
            asyncio.run(catalog.close())
    finally:
        for _, _, drop in engines:
            drop()
        scratch.cleanup()
    names = [n for n, _, _ in engines]
    print()
    header = " | ".join(f"{n} p50 ms | {n} p95 ms | {n} scan/p50 | {n} CPU ms" for n in names)
    print(f"| query (page of 100, {count:,} items) | {header} |")
    print("|---|" + "---|" * (4 * len(names)))
    for query in table[names[0]]:
        cells = []
        for n in names:
            p50, p95 = table[n][query]
            scan = table[n]["baseline: full scan"][0]
            cpu = CPU.get(n, {}).get(query)
            cells += [
                f"{p50:.1f}",
                f"{p95:.1f}",
                f"{scan / p50:.0f}x",
                f"{cpu:.1f}" if cpu is not None else "",
            ]
        print(f"| {query} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
