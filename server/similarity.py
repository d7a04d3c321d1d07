"""Near-duplicate images: a 64-bit difference hash (dHash) per image, and Hamming queries
answered from an index.

The hash. Each image is decoded at reduced size (JPEG's DCT scaling via `draft`, so a 12 MP photo
costs a few milliseconds), turned as its EXIF orientation says, reduced to 9x8 grey pixels, and
each bit says whether a pixel is brighter than its left neighbour. Resizing, recompression and a
small change of brightness move a few bits at most; a 5% crop moves a handful. A horizontally
flipped photo is the same photo for a training set, so each image also gets the hash of its
mirror image: a query matches an item when either of its hashes is close to the item's hash.
Pillow is already a server dependency; the ~20 lines here avoid imagehash's numpy, scipy and
PyWavelets for the one hash we need.

The index (multi-index hashing). The hash is split into three bands of 21, 21 and 22 bits,
each an indexed column. If two hashes differ in at most d bits, one band differs in at most
r = d // 3 bits (pigeonhole: three bands with r + 1 differing bits each make more than d). A query
enumerates, for each band, every value within r bits of its own band (for the default d = 8,
r = 2: 1 + 21 + 210 values), looks them up in the band's index, and checks each candidate's
full distance: the answer is exact. Why three bands and not four of 16 bits: at d = 8 four bands
need r = 2 as well, with as many probes, but a 16-bit value matches one item in 65,536 where a
21-bit one matches one in 2 million: at a million items 8,000 candidates to check against 300.

Hashing runs in a background job, never on an upload's path: it follows the change log for new
images and, at start-up, fills whatever has no hash yet.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import ARRAY, Integer, and_, any_, bindparam, func, or_, select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from metalake.server import importing
from metalake.server.blobstore import BlobStore, LocalBlobStore, owner_prefix
from metalake.server.catalog import DataRecord, EventType, SqlCatalog, _row_to_record
from metalake.server.decoding import DecoderCrashed, Decoders
from metalake.server.errors import InvalidRequest, invalid_field
from metalake.server.faults import backend_fault
from metalake.server.filtering import FilterError, compile_filter
from metalake.server.imagehash import (
    ImageHash,
    ImageSource,
    NotAnImageError,
    hash_or_error,
    hash_or_none,
)
from metalake.server.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from metalake.server.schema import data_table, data_tags_table, events_table, image_hashes_table

log = logging.getLogger(__name__)

DEFAULT_MAX_DISTANCE = 8
# From 12 bits on, dHashes of unrelated photos start to match (see `make bench`), and a query
# would probe thousands of values per band (r = 4).
MAX_DISTANCE = 11
BAND_WIDTHS = (21, 21, 22)
BANDS = len(BAND_WIDTHS)
_BATCH = 64
_HASHER_LOCK = 0x6D6C6B68  # "mlkh": one server hashes at a time on PostgreSQL
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Similar:
    record: DataRecord
    distance: int
    mirrored: bool  # closest through the query's mirror image


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def bands(value: int) -> list[int]:
    """The bands of a hash, most significant first."""
    found, shift = [], 64
    for width in BAND_WIDTHS:
        shift -= width
        found.append((value >> shift) & ((1 << width) - 1))
    return found


@cache
def _flips(radius: int, width: int) -> tuple[int, ...]:
    """Every `width`-bit mask with at most `radius` bits set."""
    masks = [0]
    for bits in range(1, radius + 1):
        for positions in itertools.combinations(range(width), bits):
            masks.append(sum(1 << p for p in positions))
    return tuple(masks)


def band_probes(value: int, max_distance: int) -> list[list[int]]:
    """For each band, the values a hash within `max_distance` must match in some band."""
    radius = max_distance // BANDS
    return [
        sorted({band ^ mask for mask in _flips(radius, width)})
        for band, width in zip(bands(value), BAND_WIDTHS, strict=True)
    ]


def _signed(value: int) -> int:
    """Stored as a signed 64-bit integer (BIGINT)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _unsigned(value: int) -> int:
    return value & _MASK64


class Similarity:
    """Hashes, the band index and the queries, over the shared catalog and blob store."""

    def __init__(
        self,
        catalog: SqlCatalog,
        blobs: BlobStore,
        *,
        spool_dir: Path,
        decoders: Decoders | None = None,
    ) -> None:
        """`decoders`: where images are decoded (the server's decoder processes); without,
        in a thread of this process."""
        self._catalog = catalog
        self._engine = catalog.engine
        self._blobs = blobs
        self._spool_dir = spool_dir
        self._decoders = decoders
        self._after_seq: int | None = None

    # Filling hashes.

    async def hash_pending(self) -> int:
        """Hash the images that have no hash yet; returns how many were hashed.

        The first call (and any call after the change log was pruned past this server's place
        in it) walks every item; later calls follow the log's created events.
        """
        if self._engine.dialect.name == "postgresql":
            return await self._as_the_only_hasher(self._hash_pending)
        return await self._hash_pending()

    async def _as_the_only_hasher(self, work: Any) -> int:
        connection = await asyncio.to_thread(self._engine.connect)
        try:
            locked = await asyncio.to_thread(
                lambda: connection.execute(
                    text("SELECT pg_try_advisory_lock(:key)"), {"key": _HASHER_LOCK}
                ).scalar()
            )
            if not locked:
                return 0  # another server is hashing; it will see these images too
            try:
                hashed: int = await work()
                return hashed
            finally:
                await asyncio.shield(
                    asyncio.to_thread(
                        lambda: connection.execute(
                            text("SELECT pg_advisory_unlock(:key)"), {"key": _HASHER_LOCK}
                        )
                    )
                )
        finally:
            await asyncio.shield(asyncio.to_thread(connection.close))

    async def _hash_pending(self) -> int:
        hashed = 0
        pruned = await self._catalog.pruned_through()
        if self._after_seq is None or self._after_seq < pruned:
            start = await self._catalog.last_event_seq()
            after_id = ""
            while True:
                batch = await self._catalog.run(functools.partial(self._unhashed_after, after_id))
                hashed += await self._hash_all(batch)
                if len(batch) < _BATCH:
                    break
                after_id = batch[-1][0]
            self._after_seq = start
        while True:
            seq, batch = await self._catalog.run(lambda: self._created_after(self._after_seq or 0))
            hashed += await self._hash_all(batch)
            if seq is None:
                return hashed
            self._after_seq = seq

    def _unhashed_after(self, after_id: str) -> list[tuple[str, str, str]]:
        data, hashes = data_table.c, image_hashes_table.c
        statement = (
            select(data.id, data.org, data.blob_key)
            .outerjoin(image_hashes_table, hashes.data_id == data.id)
            .where(hashes.data_id.is_(None), data.content_type.like("image/%"), data.id > after_id)
            .order_by(data.id)
            .limit(_BATCH)
        )
        with self._engine.connect() as connection:
            return [(row.id, row.org, row.blob_key) for row in connection.execute(statement)]

    def _created_after(self, seq: int) -> tuple[int | None, list[tuple[str, str, str]]]:
        """The images created after `seq` (up to a batch of events) that are not hashed yet,
        and the last seq examined (None: no event after `seq`)."""
        events = events_table.c
        with self._engine.connect() as connection:
            rows = list(
                connection.execute(
                    select(events.seq, events.id, events.org, events.blob_key, events.content_type)
                    .where(events.seq > seq, events.event_type == int(EventType.CREATED))
                    .order_by(events.seq)
                    .limit(_BATCH)
                )
            )
            if not rows:
                return None, []
            ids = [row.id for row in rows if row.content_type.startswith("image/")]
            pending = set(ids)
            if ids:
                pending -= set(
                    connection.execute(
                        select(image_hashes_table.c.data_id).where(
                            image_hashes_table.c.data_id.in_(ids)
                        )
                    ).scalars()
                )
                pending &= set(
                    connection.execute(select(data_table.c.id).where(data_table.c.id.in_(ids)))
                    .scalars()
                    .all()
                )
        return rows[-1].seq, [(r.id, r.org, r.blob_key) for r in rows if r.id in pending]

    async def _hash_all(self, items: Iterable[tuple[str, str, str]]) -> int:
        """Hash a batch one image at a time, then store the batch in one transaction (one
        commit, not one per image, beside the uploads' commits)."""
        found: list[tuple[str, str, ImageHash | None]] = []
        for data_id, org, blob_key in items:
            try:
                found.append((data_id, org, await self._hash_blob(blob_key)))
            except FileNotFoundError:
                continue  # deleted meanwhile
        if found:
            await self._catalog.run(functools.partial(self._store_many, found), write=True)
        return sum(image is not None for _, _, image in found)

    async def _hash_blob(self, blob_key: str) -> ImageHash | None:
        """The hash of a stored blob, None when it is not a decodable image. A local blob is
        decoded where it lies (a packed one, small, from memory); another store's is streamed
        to a temporary file first, never held in memory. An item registered in place
        (ImportObjects) is not hashed: that would read its whole object from the customer's
        bucket, where an import reads at most a header."""
        if importing.is_reference(blob_key):
            return None
        if isinstance(self._blobs, LocalBlobStore):
            local = await asyncio.to_thread(self._blobs.local_path, blob_key)
            if local is not None:
                return await self._decoded(hash_or_none, local)
            # Packed: a small blob, decoded from memory (no scratch file per image).
            content = b"".join(
                [chunk async for chunk in self._blobs.read(blob_key, chunk_size=1024 * 1024)]
            )
            return await self._decoded(hash_or_none, content)
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        # Named after this process, like spool files: a supervisor removes a dead worker's.
        prefix = owner_prefix(os.getpid())
        with tempfile.TemporaryDirectory(dir=self._spool_dir, prefix=prefix) as scratch:
            path = Path(scratch) / "image"
            with path.open("wb") as handle:
                async for chunk in self._blobs.read(blob_key, chunk_size=1024 * 1024):
                    await asyncio.to_thread(handle.write, chunk)
            return await self._decoded(hash_or_none, path)

    async def _decoded(
        self, hasher: Callable[[ImageSource], ImageHash | None], image: ImageSource
    ) -> ImageHash | None:
        """`hasher(image)` where images are decoded; None, as for any file that is no image,
        when it crashed its decoder process."""
        if self._decoders is None:
            return await asyncio.to_thread(hasher, image)
        try:
            return await self._decoders.run(hasher, image)
        except DecoderCrashed:
            return None

    def _store(self, data_id: str, org: str, found: ImageHash | None) -> None:
        self._store_many([(data_id, org, found)])

    def _store_many(self, hashed: list[tuple[str, str, ImageHash | None]]) -> None:
        """Store hashes (None: not an image) of the items that still exist."""
        dialect_insert = (
            postgresql_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        )
        with self._engine.begin() as connection:
            existing = set(
                connection.execute(
                    select(data_table.c.id).where(data_table.c.id.in_([h[0] for h in hashed]))
                ).scalars()
            )
            for data_id, org, found in hashed:
                if data_id not in existing:
                    continue
                values: dict[str, Any] = {"data_id": data_id, "org": org}
                if found is not None:
                    values |= {"dhash": _signed(found.value), "mirror": _signed(found.mirror)}
                    values |= {f"band{i}": band for i, band in enumerate(bands(found.value))}
                connection.execute(
                    dialect_insert(image_hashes_table)
                    .values(**values)
                    .on_conflict_do_nothing(index_elements=["data_id"])
                )

    # Queries.

    async def find(
        self,
        org: str,
        *,
        data_id: str = "",
        image: bytes = b"",
        max_distance: int | None,
        filter: str,
        include_mirrored: bool,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Similar], str]:
        """Items of `org` within `max_distance` of an item or of an image, closest first."""
        distance = DEFAULT_MAX_DISTANCE if max_distance is None else max_distance
        violations = []
        if not 0 <= distance <= MAX_DISTANCE:
            violations.append(invalid_field("max_distance", f"must be within [0, {MAX_DISTANCE}]"))
        if page_size < 0:
            violations.append(invalid_field("page_size", "must not be negative"))
        if bool(data_id) == bool(image):
            violations.append(invalid_field("query", "give exactly one of id and image"))
        if violations:
            raise InvalidRequest(
                "the similarity query is invalid", [v for e in violations for v in e.violations]
            )
        try:
            where = compile_filter(filter)
        except FilterError as error:
            raise invalid_field("filter", str(error)) from None
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if data_id:
            query = await self._hash_of_item(org, data_id)
            subject = f"id:{data_id}"
        else:
            try:
                hashed = await self._decoded(hash_or_error, image)
            except NotAnImageError as error:
                raise invalid_field(
                    "image", f"is not an image metalake can read: {error}"
                ) from None
            if hashed is None:  # it crashed the decoder
                raise invalid_field("image", "is not an image metalake can read")
            query = hashed
            subject = "image:" + hashlib.sha256(image).hexdigest()
        scope = json.dumps([subject, distance, filter, include_mirrored])
        after = _decode_token(page_token, scope)
        probes = [query.value, query.mirror] if include_mirrored else [query.value]

        def work() -> list[Similar]:
            return self._matches(org, probes, distance, where, exclude=data_id)

        found = await self._catalog.run(work)
        if after is not None:
            found = [s for s in found if (s.distance, s.record.id) > (after[0], after[1])]
        token = ""
        if len(found) > size:
            found = found[:size]
            last = found[-1]
            token = _encode_token(scope, [last.distance, last.record.id])
        return found, token

    async def _hash_of_item(self, org: str, data_id: str) -> ImageHash:
        """The item's stored hash, computed now if the background job has not got to it."""
        columns = image_hashes_table.c
        statement = select(columns.dhash, columns.mirror).where(
            columns.data_id == data_id, columns.org == org
        )

        def stored() -> Any:
            with self._engine.connect() as connection:
                return connection.execute(statement).first()

        row = await self._catalog.run(stored)
        if row is None:
            record = await self._catalog.get(org, data_id)  # NOT_FOUND across organizations
            computed = None
            if record.content_type.startswith("image/"):
                with suppress(FileNotFoundError):
                    computed = await self._hash_blob(record.blob_key)
            await self._catalog.run(lambda: self._store(data_id, org, computed), write=True)
            if computed is None:
                raise invalid_field("id", f"{data_id} is not an image metalake can read")
            return computed
        if row.dhash is None:
            raise invalid_field("id", f"{data_id} is not an image metalake can read")
        return ImageHash(_unsigned(row.dhash), _unsigned(row.mirror))

    def _matches(
        self, org: str, probes: list[int], distance: int, where: Any, *, exclude: str
    ) -> list[Similar]:
        columns = image_hashes_table.c
        band_columns = [columns[f"band{i}"] for i in range(BANDS)]
        per_band: list[set[int]] = [set() for _ in range(BANDS)]
        for probe in probes:
            for values, wanted in zip(per_band, band_probes(probe, distance), strict=True):
                values.update(wanted)
        alternatives = []
        for column, values in zip(band_columns, per_band, strict=True):
            if self._engine.dialect.name == "postgresql":
                # One array parameter per band, not hundreds of scalars to parse and plan.
                wanted_values = bindparam(None, sorted(values), type_=ARRAY(Integer))
                alternatives.append(column == any_(wanted_values))
            else:
                alternatives.append(column.in_(sorted(values)))
        candidates = select(columns.data_id, columns.dhash).where(
            columns.org == org, or_(*alternatives)
        )
        with self._engine.connect() as connection:
            close: dict[str, tuple[int, bool]] = {}
            for candidate_id, stored in connection.execute(candidates):
                if candidate_id == exclude:
                    continue
                value = _unsigned(stored)
                direct = hamming(probes[0], value)
                mirrored = min((hamming(p, value) for p in probes[1:]), default=65)
                best = min(direct, mirrored)
                if best <= distance:
                    close[candidate_id] = (best, mirrored < direct)
            if not close:
                return []
            conditions = [data_table.c.org == org, data_table.c.id.in_(list(close))]
            if where is not None:
                conditions.append(where)
            rows = list(connection.execute(select(data_table).where(and_(*conditions))).mappings())
            records = _with_tags(connection, rows)
        found = [Similar(r, *close[r.id]) for r in records]
        found.sort(key=lambda s: (s.distance, s.record.id))
        return found

    async def count(self) -> int:
        """Hashes stored (images, and items found not to be images)."""
        statement = select(func.count()).select_from(image_hashes_table)

        def work() -> int:
            with self._engine.connect() as connection:
                return int(connection.execute(statement).scalar() or 0)

        return await self._catalog.run(work)


def _with_tags(connection: Any, rows: list[Any]) -> list[DataRecord]:
    tags: dict[str, list[str]] = {row["id"]: [] for row in rows}
    if rows:
        for data_id, tag in connection.execute(
            select(data_tags_table.c.data_id, data_tags_table.c.tag)
            .where(data_tags_table.c.data_id.in_(list(tags)))
            .order_by(data_tags_table.c.data_id, data_tags_table.c.tag)
        ):
            tags[data_id].append(tag)
    return [_row_to_record(row, tuple(tags[row["id"]])) for row in rows]


async def keep_hashing(similarity: Similarity, interval: float) -> None:
    """The background job: hash new images as they arrive, forever."""
    while True:
        try:
            hashed = await similarity.hash_pending()
            if hashed:
                log.info("hashed %d image(s) for near-duplicate search", hashed)
        except Exception as error:
            fault = backend_fault(error)
            if fault is None:
                log.exception("hashing images failed; retrying in %.0fs", interval)
            else:  # an outage is expected now and then: one line, not a traceback a second
                log.warning("hashing images waits for the backend (%s); retrying", fault)
        await asyncio.sleep(interval)


def _encode_token(scope: str, after: list[Any]) -> str:
    payload = json.dumps({"q": hashlib.sha256(scope.encode()).hexdigest()[:16], "after": after})
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_token(token: str, scope: str) -> list[Any] | None:
    if not token:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, issued_for = payload["after"], payload["q"]
        distance, data_id = int(after[0]), str(after[1])
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error):
        raise invalid_field("page_token", "is not a token this service issued") from None
    if issued_for != hashlib.sha256(scope.encode()).hexdigest()[:16]:
        raise invalid_field("page_token", "was issued for another query; start from page one")
    return [distance, data_id]
