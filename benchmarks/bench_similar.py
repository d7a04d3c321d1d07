"""Near-duplicate search: hash quality on real photos, hashing cost, and FindSimilar's index at
1,000,000 items on SQLite and PostgreSQL.

Quality: every decodable photo of the corpus (../shared/corpus or $METALAKE_CORPUS) is a distinct
original, except files that are the same picture already (the EXIF orientation set keeps one;
iphone_hdr_YES is iphone_hdr_NO's scene); each gets five variants (half size, JPEG quality 60,
5% cropped, brightness +10% and -10%, mirrored). A pair is positive when a variant is compared
with its own original, negative with any other original. Precision and recall are over pairs,
at the default distance, with mirror images matching (the server's default).

Cost: CPU per hash, on the corpus and on a 12 MP JPEG, against the 0.3 ms an upload may spend.

Index: 1,000,000 synthetic hashes; each query is an existing hash with 0-6 bits flipped (plus a
second probe, as a mirror hash adds), at distance 8. The baseline is the scan the index avoids
(every hash of the organization read and compared), measured in the same run.

    METALAKE_BENCH_SCALE=0.1 python -m benchmarks similar     # 100,000 items, for a quick look
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy
from PIL import Image, ImageEnhance, ImageOps

from metalake.server.catalog import SqlCatalog
from metalake.server.imagehash import NotAnImageError, hash_image
from metalake.server.schema import image_hashes_table
from metalake.server.schema_versions import engine_url
from metalake.server.similarity import (
    DEFAULT_MAX_DISTANCE,
    Similarity,
    hamming,
)

ORG = "bench"
POSTGRES_URL = os.environ.get(
    "METALAKE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
CORPUS = Path(
    os.environ.get("METALAKE_CORPUS", Path(__file__).resolve().parents[1].parent / "shared/corpus")
)
COUNT = int(1_000_000 * float(os.environ.get("METALAKE_BENCH_SCALE", "1")))
QUERIES = 200
_SUFFIXES = {".jpg", ".jpeg", ".tif", ".tiff", ".heic", ".heif", ".png"}
# Not distinct photos: broken files, and pictures the corpus already holds.
_APPLICATION = f"metalake_bench_{uuid.uuid4().hex[:8]}"
_TICKS = os.sysconf("SC_CLK_TCK")
_SKIP = ("/invalid/", "corrupted", "/orientation/", "iphone_hdr_YES")


def _encode(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _variants(image: Image.Image) -> dict[str, bytes]:
    w, h = image.size
    dx, dy = round(w * 0.025), round(h * 0.025)
    return {
        "resized 50%": _encode(image.resize((max(9, w // 2), max(8, h // 2)))),
        "quality 60": _encode(image, 60),
        "cropped 5%": _encode(image.crop((dx, dy, w - dx, h - dy))),
        "brightness +10%": _encode(ImageEnhance.Brightness(image).enhance(1.1)),
        "brightness -10%": _encode(ImageEnhance.Brightness(image).enhance(0.9)),
        "mirrored": _encode(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    }


def _originals() -> list[tuple[str, Image.Image]]:
    import pillow_heif

    pillow_heif.register_heif_opener()
    found = []
    for path in sorted(CORPUS.rglob("*")):
        if path.suffix.lower() not in _SUFFIXES or any(s in str(path) for s in _SKIP):
            continue
        try:
            with Image.open(path) as opened:
                found.append((str(path.relative_to(CORPUS)), ImageOps.exif_transpose(opened)))
                found[-1][1].load()
        except Exception:
            continue
    landscape = CORPUS / "jpg/orientation/landscape_1.jpg"
    if landscape.exists():
        found.append(("jpg/orientation/landscape_1.jpg", Image.open(landscape)))
    return found


def quality() -> None:
    originals = _originals()
    if len(originals) < 10:
        print(f"no corpus at {CORPUS}: quality skipped (set METALAKE_CORPUS)")
        return
    hashes = [hash_image(io.BytesIO(_encode(image))) for _, image in originals]
    variants = [
        (index, kind, hash_image(io.BytesIO(content)))
        for index, (_, image) in enumerate(originals)
        for kind, content in _variants(image).items()
    ]

    def distance(a: int, original: int) -> int:
        return min(hamming(hashes[original].value, a), hamming(hashes[original].mirror, a))

    d = DEFAULT_MAX_DISTANCE
    print(f"{len(originals)} distinct photos, {len(variants)} variants; distance <= {d}\n")
    print("| variant | pairs | recall | worst distance |")
    print("|---|---:|---:|---:|")
    true_positives = 0
    for kind in dict.fromkeys(k for _, k, _ in variants):
        found = [distance(h.value, i) for i, k, h in variants if k == kind]
        hits = sum(x <= d for x in found)
        true_positives += hits
        print(f"| {kind} | {len(found)} | {hits / len(found):.3f} | {max(found)} |")
    negatives = [
        distance(h.value, other)
        for index, _, h in variants
        for other in range(len(originals))
        if other != index
    ]
    negatives += [
        distance(hashes[a].value, b) for a, b in itertools.permutations(range(len(originals)), 2)
    ]
    false_positives = sum(x <= d for x in negatives)
    recall = true_positives / len(variants)
    precision = true_positives / (true_positives + false_positives)
    print(f"| **all** | {len(variants)} | **{recall:.3f}** | |")
    print(
        f"\nprecision {precision:.3f} ({false_positives} of {len(negatives)} negative pairs "
        f"within {d}), recall {recall:.3f}; aim >= 0.95 each"
    )
    for limit in (4, 6, 10, 12):
        tp = sum(distance(h.value, i) <= limit for i, _, h in variants)
        fp = sum(x <= limit for x in negatives)
        shares = f"precision {tp / (tp + fp):.3f}, recall {tp / len(variants):.3f}"
        print(f"  at distance {limit:>2}: {shares}")


def cost() -> None:
    samples = [p for p in sorted(CORPUS.rglob("*.jpg")) if "/invalid/" not in str(p)]
    big = Path(tempfile.mkdtemp()) / "12mp.jpg"
    rng = random.Random(3)
    image = Image.new("RGB", (400, 300))
    image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(400 * 300)])
    image.resize((4000, 3000), Image.Resampling.BICUBIC).save(big, "JPEG", quality=90)

    def cpu_ms(paths: list[Path], rounds: int) -> float:
        started = time.process_time()
        done = 0
        for _ in range(rounds):
            for path in paths:
                with contextlib.suppress(NotAnImageError):
                    hash_image(path)
                done += 1
        return (time.process_time() - started) * 1000 / done

    print("\n| hashed | CPU ms per image |")
    print("|---|---:|")
    if samples:
        print(f"| corpus JPEGs ({len(samples)}, mostly small) | {cpu_ms(samples, 3):.2f} |")
    print(f"| a 12 MP JPEG ({big.stat().st_size // 1024} KiB) | {cpu_ms([big], 5):.2f} |")
    print("\nabove 0.3 ms per file: hashes are computed by a background job, off the upload path")
    big.unlink()


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # PostgreSQL on another machine: its CPU is not ours to see
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _fill(url: str, count: int) -> None:
    """`count` items with random hashes, generated inside the database."""
    engine = sqlalchemy.create_engine(engine_url(url))
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as connection:
        if postgres:
            numbers = "generate_series(1, :count) AS n(i)"
            text_of = "lpad(i::text, {}, '0')"
            random64 = (
                "((floor(random() * 4294967296)::bigint << 32)"
                " | floor(random() * 4294967296)::bigint)"
            )
            prefix = ""
        else:
            prefix = (
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count) "
            )
            numbers = "n"
            text_of = "printf('%0{}d', i)"
            random64 = "random()"
        connection.execute(
            sqlalchemy.text(
                prefix
                + "INSERT INTO data (id, org, filename, size, sha256, content_type, blob_key, "
                "created_at, updated_at, metadata_sources, revision) "
                f"SELECT {text_of.format(36)}, '{ORG}', 'x.jpg', 1, {text_of.format(64)}, "
                f"'image/jpeg', {text_of.format(64)}, i, i, '{{}}', 1 FROM {numbers}"
            ),
            {"count": count},
        )
        # MATERIALIZED: each row's random hash is drawn once, not once per use of h.
        connection.execute(
            sqlalchemy.text(
                f"WITH generated AS MATERIALIZED (SELECT id, org, {random64} AS h FROM data) "
                "INSERT INTO image_hashes (data_id, org, dhash, mirror, band0, band1, band2)"
                " SELECT id, org, h, h, (h >> 43) & 2097151, (h >> 22) & 2097151, h & 4194303"
                " FROM generated"
            )
        )
        connection.execute(sqlalchemy.text("ANALYZE"))
    if postgres:
        # What autovacuum does soon after a load: the visibility map lets the covering band
        # indexes answer without visiting the table.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(sqlalchemy.text("VACUUM ANALYZE image_hashes"))
    engine.dispose()


def index(name: str, url: str) -> None:
    started = time.perf_counter()
    catalog = SqlCatalog.open(url, migrate=True)
    _fill(url, COUNT)
    loaded = time.perf_counter() - started
    similarity = Similarity(catalog, blobs=None, spool_dir=Path(tempfile.gettempdir()))  # type: ignore[arg-type]
    rng = random.Random(11)
    with catalog.engine.connect() as connection:
        stored = [
            v & (2**64 - 1)
            for v in connection.execute(
                sqlalchemy.select(image_hashes_table.c.dhash).limit(QUERIES * 20)
            ).scalars()
        ]
    queries = []
    for value in rng.sample(stored, QUERIES):
        for bit in rng.sample(range(64), rng.randrange(7)):
            value ^= 1 << bit
        queries.append([value, rng.getrandbits(64)])

    def backends_cpu() -> float:
        """CPU seconds of this catalog's PostgreSQL backends (0 on SQLite: it is in-process)."""
        if catalog.engine.dialect.name != "postgresql":
            return 0.0
        with catalog.engine.connect() as connection:
            pids = connection.execute(
                sqlalchemy.text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": _APPLICATION},
            ).scalars()
            return sum(_proc_cpu(pid) for pid in pids)

    def measure(
        run: Callable[[list[int]], int], subset: list[list[int]]
    ) -> tuple[list[float], float, int]:
        times, found = [], 0
        cpu = time.process_time() + backends_cpu()
        for probes in subset:
            begin = time.perf_counter()
            found += run(probes)
            times.append((time.perf_counter() - begin) * 1000)
        used = time.process_time() + backends_cpu() - cpu
        return times, used * 1000 / len(subset), found

    def indexed(probes: list[int]) -> int:
        return len(similarity._matches(ORG, probes, DEFAULT_MAX_DISTANCE, None, exclude=""))

    def scan(probes: list[int]) -> int:
        with catalog.engine.connect() as connection:
            rows = connection.execute(
                sqlalchemy.select(image_hashes_table.c.dhash).where(image_hashes_table.c.org == ORG)
            ).scalars()
            return sum(
                min(hamming(p, v & (2**64 - 1)) for p in probes) <= DEFAULT_MAX_DISTANCE
                for v in rows
            )

    times, cpu, found = measure(indexed, queries)
    base_times, _, _ = measure(scan, queries[:3])
    p50, p95 = statistics.median(times), statistics.quantiles(times, n=20)[18]
    base = statistics.median(base_times)
    print(
        f"| {name} | {COUNT:,} | {p50:.1f} | {p95:.1f} | {cpu:.1f} | {found / len(queries):.1f} "
        f"| {base:.0f} | {base / p50:.0f}x | {loaded:.0f} s |"
    )
    catalog.engine.dispose()


def main() -> None:
    quality()
    cost()
    print(
        f"\nFindSimilar's index, distance {DEFAULT_MAX_DISTANCE}, two probe hashes per query, "
        f"{QUERIES} queries (aim: p50 <= 50 ms at 1M). CPU per query: this process's (SQLite "
        "runs in it) plus, on PostgreSQL, its backends' (from /proc). Shared 2-core machine.\n"
    )
    print(
        "| catalog | items | p50 ms | p95 ms | CPU ms/query | results/query | scan ms (baseline) "
        "| speed-up | load |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        index("SQLite", f"sqlite:///{Path(scratch) / 'similar.sqlite3'}")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(engine_url(POSTGRES_URL))
    try:
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    except sqlalchemy.exc.OperationalError as error:
        print(f"| PostgreSQL | unreachable: {error.orig} |")
        return
    try:
        index(
            "PostgreSQL",
            f"{POSTGRES_URL}?options=-csearch_path%3D{schema}&application_name={_APPLICATION}",
        )
    finally:
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
