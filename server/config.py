"""Server settings, declared once: defaults, overridden by METALAKE_* environment variables, then
by flags.

Each field of `Settings` carries its whole declaration (`declare(...)`): default, environment
variable, meaning, bounds and `metalake serve` flag; its type is the field's annotation, and one
loader (`Settings.from_env`) parses every variable by that type. Variables that other modules read
themselves (the extractor registry's, the log format, the clients', boto3's) are listed here too
(`ELSEWHERE`, `S3_VARIABLES`), so that the tables of docs/operations.md, generated from this module
(`make settings-table`), and the tests that compare code, docs and declaration cover every one.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal

from metalake.extractors.registry import (
    ALLOW_ENV,
    BLOCK_ENV,
    DEFAULT_TIMEOUT,
    TIMEOUT_ENV,
    parse_timeout,
)

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = Path("metalake-data")
# gRPC refuses messages over 4 MiB by default; a DownloadData chunk leaves room for its framing.
MAX_DOWNLOAD_CHUNK_SIZE = 4 * 1024 * 1024 - 64 * 1024

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class SettingError(ValueError):
    """A variable or flag has a value the server cannot use: the message names each one and says
    what it expects."""


@dataclass(frozen=True)
class Variable:
    """One environment variable as the docs show it."""

    name: str
    doc: str
    default: str
    """The default, as the docs table says it."""
    flag: str | None = None
    """`metalake serve`'s flag for it, if any (it wins over the variable)."""
    read_by: str | None = None
    """The module that reads it, when that is not `Settings.from_env`."""
    table: Literal["server", "client"] = "server"
    check: Callable[[str], object] | None = None
    """The reader's own parser: `Settings.from_env` runs it so that `metalake serve` refuses a
    bad value at start-up, before anything is opened."""


@dataclass(frozen=True)
class _Declared:
    """A Settings field's declaration, kept in the field's metadata."""

    env: str
    doc: str
    flag: str | None
    shown: str | None
    minimum: float | None
    above: float | None
    maximum: float | None
    can_be_off: bool


_DECLARED = "metalake.setting"


def declare(
    env: str,
    doc: str,
    *,
    flag: str | None = None,
    shown: str | None = None,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    can_be_off: bool = False,
) -> dict[str, _Declared]:
    """A Settings field's metadata: its variable `env`, what it means (`doc`, the docs' first
    column), its flag, its default as the docs say it (`shown`, when the value does not say it
    well), the bounds of numbers (`minimum` <= value, `above` < value, value <= `maximum`), and
    whether `off` (or 0, false, no) unsets it."""
    return {_DECLARED: _Declared(env, doc, flag, shown, minimum, above, maximum, can_be_off)}


def _show(value: object) -> str:
    if value is None:
        raise TypeError("a setting without a default value needs `shown`: what None means")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return f"`{value}`"


@dataclass(frozen=True)
class Settings:
    """Everything a server needs to start; servers keep no other state of their own."""

    data_dir: Path = field(
        default=DEFAULT_DATA_DIR,
        metadata=declare(
            "METALAKE_DATA_DIR",
            "data directory (embedded catalog, local blobs, spool)",
            flag="--data-dir",
            shown="`./metalake-data`",
        ),
    )
    listen: str = field(
        default=DEFAULT_LISTEN,
        metadata=declare("METALAKE_LISTEN", "listen address", flag="--listen"),
    )
    # Processes under a supervisor, sharing the listen port (SO_REUSEPORT); 1: this process.
    workers: int = field(
        default=1,
        metadata=declare(
            "METALAKE_WORKERS",
            "server processes sharing the port (see [Worker processes](#worker-processes))",
            flag="--workers",
            minimum=1,
        ),
    )
    # None: the embedded SQLite catalog in data_dir, created and migrated without asking.
    catalog_url: str | None = field(
        default=None,
        metadata=declare(
            "METALAKE_CATALOG_URL",
            "catalog",
            flag="--catalog-url",
            shown="SQLite in the data directory",
        ),
    )
    # None: blobs as files under data_dir. s3://bucket/prefix: S3-compatible object storage.
    blob_url: str | None = field(
        default=None,
        metadata=declare(
            "METALAKE_BLOB_URL",
            "blob storage (`s3://bucket/prefix`: see [S3 object storage](#s3-object-storage))",
            shown="files under the data directory",
        ),
    )
    # Off: a file per small blob, as before packs (see LocalBlobStore); both are read either way.
    blob_packs: bool = field(
        default=True,
        metadata=declare(
            "METALAKE_BLOB_PACKS",
            "local blobs: small ones appended to pack files (off: a file per blob)",
        ),
    )
    migrate: bool = field(
        default=False,
        metadata=declare(
            "METALAKE_MIGRATE",
            "migrate the catalog at start-up",
            flag="--migrate",
            shown="only the embedded default",
        ),
    )
    insecure_no_auth: bool = field(
        default=False,
        metadata=declare(
            "METALAKE_INSECURE_NO_AUTH",
            "serve beyond loopback without tokens (anyone may call)",
            flag="--insecure-no-auth",
            shown="refused",
        ),
    )
    # With a client CA, clients must present a certificate it signed (mutual TLS).
    tls_cert: Path | None = field(
        default=None,
        metadata=declare("METALAKE_TLS_CERT", "TLS certificate chain (PEM)", shown="plaintext"),
    )
    tls_key: Path | None = field(
        default=None, metadata=declare("METALAKE_TLS_KEY", "TLS key (PEM)", shown="plaintext")
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata=declare(
            "METALAKE_TLS_CLIENT_CA", "client CA for mutual TLS", shown="no client certificates"
        ),
    )
    http_listen: str | None = field(
        default=None,
        metadata=declare(
            "METALAKE_HTTP_LISTEN",
            "HTTP face and web console address (`off` or empty: off)",
            shown="off; `make run`: `127.0.0.1:8080`",
            can_be_off=True,
        ),
    )
    console_tile_url: str | None = field(
        default=None,
        metadata=declare(
            "METALAKE_CONSOLE_TILE_URL",
            "map tile URL template for the console (`{z}/{x}/{y}`)",
            shown="none: the bundled outline",
        ),
    )
    metrics_listen: str | None = field(
        default=None,
        metadata=declare(
            "METALAKE_METRICS_LISTEN", "Prometheus metrics address (`/metrics`)", shown="off"
        ),
    )
    # Beyond, RESOURCE_EXHAUSTED with a retry delay.
    max_concurrent_uploads: int = field(
        default=256,
        metadata=declare(
            "METALAKE_MAX_CONCURRENT_UPLOADS", "uploads running at once, per server", minimum=1
        ),
    )
    max_file_size: int | None = field(
        default=None,
        metadata=declare(
            "METALAKE_MAX_FILE_SIZE",
            "largest file, bytes (all organizations)",
            shown="none",
            minimum=0,
        ),
    )
    org_storage_quota: int | None = field(
        default=None,
        metadata=declare(
            "METALAKE_ORG_STORAGE_QUOTA",
            "default storage quota per organization, bytes (one organization's: "
            "`metalake org limits`)",
            shown="none",
            minimum=0,
        ),
    )
    # Defaults for every organization without limits of its own (`metalake org limits`).
    org_max_file_size: int | None = field(
        default=None,
        metadata=declare(
            "METALAKE_ORG_MAX_FILE_SIZE",
            "default largest file per organization, bytes (one organization's: "
            "`metalake org limits`)",
            shown="none",
            minimum=0,
        ),
    )
    upload_ttl: float = field(
        default=24 * 3600.0,
        metadata=declare(
            "METALAKE_UPLOAD_TTL",
            "unfinished resumable uploads (and their bytes) expire after, s",
            minimum=0,
        ),
    )
    event_retention: float = field(
        default=7 * 24 * 3600.0,
        metadata=declare(
            "METALAKE_EVENT_RETENTION",
            "WatchData events kept (a watch can resume from them), s",
            minimum=0,
        ),
    )
    # Younger ones may be an upload between its blob commit and its catalog commit.
    orphan_age: float = field(
        default=3600.0,
        metadata=declare(
            "METALAKE_ORPHAN_AGE",
            "blobs without an item are deleted once older than, s (one run: `metalake gc "
            "--orphan-age`)",
            minimum=0,
        ),
    )
    gc_interval: float = field(
        default=600.0,
        metadata=declare(
            "METALAKE_GC_INTERVAL", "reclaim expired uploads and orphaned blobs every, s", above=0
        ),
    )
    health_interval: float = field(
        default=5.0,
        metadata=declare(
            "METALAKE_HEALTH_INTERVAL",
            "health checks that the catalog answers every, s (NOT_SERVING while it does not)",
            above=0,
        ),
    )
    # Also how long "do tokens exist at all" is reused.
    auth_cache_seconds: float = field(
        default=5.0,
        metadata=declare(
            "METALAKE_AUTH_CACHE_SECONDS",
            "a token check is reused before asking the catalog again for, s",
            minimum=0,
        ),
    )
    # Big enough to amortise per-message cost, far below the 4 MiB default message limit.
    download_chunk_size: int = field(
        default=256 * 1024,
        metadata=declare(
            "METALAKE_DOWNLOAD_CHUNK_SIZE",
            "bytes per DownloadData message (at most 4 MiB less 64 KiB)",
            minimum=1024,
            maximum=MAX_DOWNLOAD_CHUNK_SIZE,
        ),
    )
    shutdown_grace: float = field(
        default=10.0,
        metadata=declare(
            "METALAKE_SHUTDOWN_GRACE", "a stopping server waits for in-flight calls, s", minimum=0
        ),
    )
    webhook_timeout: float = field(
        default=10.0,
        metadata=declare("METALAKE_WEBHOOK_TIMEOUT", "webhook POST timeout, s", above=0),
    )
    webhook_retry_base: float = field(
        default=5.0,
        metadata=declare(
            "METALAKE_WEBHOOK_RETRY_BASE",
            "webhook first retry after, s (doubling, at most 1 h)",
            above=0,
        ),
    )
    webhook_retry_for: float = field(
        default=24 * 3600.0,
        metadata=declare("METALAKE_WEBHOOK_RETRY_FOR", "webhook retries stop after, s", minimum=0),
    )
    webhook_interval: float = field(
        default=1.0,
        metadata=declare(
            "METALAKE_WEBHOOK_INTERVAL", "webhook delivery poll when idle, s", above=0
        ),
    )
    # A background job, milliseconds per image.
    hash_images: bool = field(
        default=True,
        metadata=declare(
            "METALAKE_HASH_IMAGES", "hash new images for FindSimilar in the background"
        ),
    )
    # A backstop behind the registry's per-extractor limit (METALAKE_EXTRACT_TIMEOUT).
    fill_timeout: float = field(
        default=10.0,
        metadata=declare(
            "METALAKE_FILL_TIMEOUT", "time limit for all of fill_metadata on one file, s", above=0
        ),
    )

    @classmethod
    def from_env(
        cls,
        *,
        data_dir: Path | str | None = None,
        listen: str | None = None,
        catalog_url: str | None = None,
        migrate: bool | None = None,
        insecure_no_auth: bool | None = None,
        workers: int | None = None,
    ) -> Settings:
        """Settings from the environment, with explicit arguments (CLI flags) taking precedence.

        Raises SettingError naming every variable or flag whose value is unusable.
        """
        given: dict[str, Any] = {
            "data_dir": None if data_dir is None else Path(data_dir),
            "listen": listen,
            "catalog_url": catalog_url,
            "migrate": migrate,
            # Its flag only turns it on: False is "not given".
            "insecure_no_auth": insecure_no_auth or None,
            "workers": workers,
        }
        explicit = {name: value for name, value in given.items() if value is not None}
        values, problems = _read(os.environ, skip=set(explicit))
        for name, value in explicit.items():
            declared = _declaration(name)
            problem = _out_of_bounds(value, declared, whole=isinstance(value, int))
            if problem:
                flag = declared.flag or name
                problems.append(f"{flag} must be {problem}, got {value!r}")
        for variable in ELSEWHERE:
            raw = os.environ.get(variable.name)
            if variable.check is not None and raw is not None:
                try:
                    variable.check(raw)
                except ValueError as error:
                    problems.append(str(error))
        if problems:
            raise SettingError("; ".join(problems))
        return replace(cls(), **values, **explicit)

    def catalog(self) -> tuple[str, bool]:
        """The catalog URL, and whether to migrate it at start-up."""
        if self.catalog_url is None:
            # The embedded default needs no set-up: its schema follows the server's.
            return f"sqlite:///{self.data_dir / 'catalog.sqlite3'}", True
        return self.catalog_url, self.migrate


def _declaration(name: str) -> _Declared:
    declared: _Declared = Settings.__dataclass_fields__[name].metadata[_DECLARED]
    return declared


def _read(env: Mapping[str, str], *, skip: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The Settings fields the environment sets (an empty variable counts as unset), and what
    is wrong with the others."""
    types = typing.get_type_hints(Settings)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for settings_field in fields(Settings):
        declared: _Declared = settings_field.metadata[_DECLARED]
        raw = env.get(declared.env, "").strip()
        if settings_field.name in skip or not raw:
            continue
        try:
            values[settings_field.name] = _parse(raw, types[settings_field.name], declared)
        except ValueError as error:
            problems.append(f"{declared.env} must be {error}, got {raw!r}")
    return values, problems


def _parse(raw: str, annotation: object, declared: _Declared) -> object:
    """`raw` as a value of the field's type; ValueError says what was expected instead."""
    kind = _base_type(annotation)
    if declared.can_be_off and raw.lower() in FALSE_WORDS:
        return None
    if kind is bool:
        if raw.lower() in TRUE_WORDS:
            return True
        if raw.lower() in FALSE_WORDS:
            return False
        raise ValueError(f"true or false ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})")
    if kind is int or kind is float:
        try:
            value: int | float = int(raw) if kind is int else float(raw)
        except ValueError:
            value = math.nan
        problem = _out_of_bounds(value, declared, whole=kind is int)
        if problem:
            raise ValueError(problem)
        return value
    if kind is Path:
        return Path(raw)
    if kind is str:
        return raw
    raise TypeError(f"no parser for settings of type {annotation!r}")


def _base_type(annotation: object) -> object:
    """`int` for `int` and `int | None`."""
    if isinstance(annotation, UnionType):
        others = [arg for arg in typing.get_args(annotation) if arg is not NoneType]
        if len(others) == 1:
            return others[0]
    return annotation


def _out_of_bounds(value: object, declared: _Declared, *, whole: bool) -> str | None:
    """What a number must be, if `value` is not that; None when it is fine (or no number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    bounds = []
    if declared.minimum is not None:
        bounds.append(f">= {_number(declared.minimum)}")
    if declared.above is not None:
        bounds.append(f"> {_number(declared.above)}")
    if declared.maximum is not None:
        bounds.append(f"<= {_number(declared.maximum)}")
    wanted = "a whole number" if whole else "a number"
    wanted = " ".join([wanted, " and ".join(bounds)]) if bounds else wanted
    fine = (
        math.isfinite(value)
        and (declared.minimum is None or value >= declared.minimum)
        and (declared.above is None or value > declared.above)
        and (declared.maximum is None or value <= declared.maximum)
    )
    return None if fine else wanted


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# Read by other modules (which must not import the server, or need them before settings exist),
# declared here so that docs and checks cover them.
ELSEWHERE: tuple[Variable, ...] = (
    Variable(
        TIMEOUT_ENV,
        "time limit per extractor per file, s (0: none)",
        _show(DEFAULT_TIMEOUT),
        read_by="metalake.extractors.registry",
        check=parse_timeout,
    ),
    Variable(
        ALLOW_ENV,
        "extractors to load (allow-list, comma-separated; set but empty: none)",
        "all installed",
        read_by="metalake.extractors.registry",
    ),
    Variable(
        BLOCK_ENV,
        "extractors not to load (block-list, comma-separated)",
        "none",
        read_by="metalake.extractors.registry",
    ),
    Variable(
        "METALAKE_LOG_FORMAT",
        "log format, `json` or `text`",
        "text on a terminal, JSON otherwise",
        read_by="metalake.server.observability",
    ),
    Variable(
        "METALAKE_LOG_LEVEL",
        "lowest level logged: `debug`, `info`, `warning` or `error`",
        "info",
        read_by="metalake.server.observability",
    ),
    Variable(
        "METALAKE_TARGET",
        "server address",
        f"`{DEFAULT_LISTEN}`",
        read_by="metalake.client",
        table="client",
    ),
    Variable(
        "METALAKE_TOKEN",
        "API token",
        "none: no token sent",
        read_by="metalake.client",
        table="client",
    ),
    Variable(
        "METALAKE_NO_PROGRESS",
        "any value: no progress bars",
        "bars on a terminal",
        read_by="metalake.cli",
        table="client",
    ),
)

# AWS tools' own variables, read the way they read them, for both S3 clients (boto3 and obstore,
# server/s3blobstore.py; boto3 in server/importing.py): documented in the S3 section of
# docs/operations.md, which a test compares with this list and with the code.
S3_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ALLOW_HTTP",
    "AWS_CA_BUNDLE",
    "AWS_MAX_ATTEMPTS",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


def variables() -> Iterator[Variable]:
    """Every METALAKE_* variable: Settings' in field order, then those read elsewhere."""
    for settings_field in fields(Settings):
        declared: _Declared = settings_field.metadata[_DECLARED]
        shown = declared.shown if declared.shown is not None else _show(settings_field.default)
        yield Variable(declared.env, declared.doc, shown, flag=declared.flag)
    yield from ELSEWHERE


TABLE_START = "<!-- settings: generated from server/config.py by `make settings-table` -->"
TABLE_END = "<!-- end of the generated settings -->"


def settings_tables() -> str:
    """The tables of docs/operations.md's Settings section, between its markers."""
    server = ["| setting | environment | flag | default |", "|---|---|---|---|"]
    client = ["| client setting | environment | default |", "|---|---|---|"]
    for variable in variables():
        if variable.table == "server":
            flag = f"`{variable.flag}`" if variable.flag else ""
            server.append(f"| {variable.doc} | `{variable.name}` | {flag} | {variable.default} |")
        else:
            client.append(f"| {variable.doc} | `{variable.name}` | {variable.default} |")
    return "\n".join([TABLE_START, *server, "", *client, TABLE_END])
