"""Server settings: defaults, overridden by METALAKE_* environment variables, then by flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = Path("metalake-data")


@dataclass(frozen=True)
class Settings:
    """Everything a server needs to start; servers keep no other state of their own."""

    data_dir: Path = DEFAULT_DATA_DIR
    listen: str = DEFAULT_LISTEN
    # None: the embedded SQLite catalog in data_dir, created and migrated without asking.
    catalog_url: str | None = None
    # None: blobs as files under data_dir. s3://bucket/prefix: S3-compatible object storage.
    blob_url: str | None = None
    # Bring an older or empty catalog schema up to date at start-up.
    migrate: bool = False
    # Bytes per DownloadData chunk: big enough to amortise per-message cost, far below the
    # 4 MiB default message limit.
    download_chunk_size: int = 256 * 1024
    # Seconds a stopping server waits for in-flight calls.
    shutdown_grace: float = 10.0
    # An unfinished resumable upload and its bytes are discarded this long after it started.
    upload_ttl: float = 24 * 3600.0
    # How often a server reclaims expired uploads and orphaned blobs.
    gc_interval: float = 600.0
    # How often health checks that the catalog answers (NOT_SERVING while it does not).
    health_interval: float = 5.0
    # Uploads one server runs at once; beyond, RESOURCE_EXHAUSTED with a retry delay.
    max_concurrent_uploads: int = 256
    # Largest file accepted, in bytes; None: no limit.
    max_file_size: int | None = None
    # Defaults for every organization without limits of its own (`metalake org limits`).
    org_max_file_size: int | None = None
    org_storage_quota: int | None = None
    # WatchData can resume from events this recent (seconds); older ones are discarded.
    event_retention: float = 7 * 24 * 3600.0
    # Blobs no item refers to are reclaimed once this old (seconds): younger ones may be an
    # upload between its blob commit and its catalog commit.
    orphan_age: float = 3600.0
    # Serve a non-loopback address although no API token exists (anyone may call).
    insecure_no_auth: bool = False
    # host:port for Prometheus metrics (/metrics); None: no metrics endpoint.
    metrics_listen: str | None = None
    # Seconds a token check (and "do tokens exist at all") is reused before asking the catalog.
    auth_cache_seconds: float = 5.0
    # TLS: a PEM certificate chain and key; with a client CA, clients must present a
    # certificate it signed (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Server processes sharing the listen port (SO_REUSEPORT) under a supervisor; 1: the
    # server is this one process. See DEFAULT_WORKERS.
    workers: int = 1
    # Whole-file limit on fill_metadata work, a backstop behind the registry's per-extractor
    # limit (METALAKE_EXTRACT_TIMEOUT).
    extract_timeout: float = 10.0
    # Webhooks: seconds per POST, before the first retry (doubling after), of retrying after
    # the event, and between looks for new events when idle.
    webhook_timeout: float = 10.0
    webhook_retry_base: float = 5.0
    webhook_retry_for: float = 24 * 3600.0
    webhook_interval: float = 1.0
    # Hash new images for near-duplicate search (a background job, milliseconds per image).
    hash_images: bool = True

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
        """Settings from the environment, with explicit arguments (CLI flags) taking precedence."""
        settings = cls()
        env = os.environ
        if "METALAKE_DATA_DIR" in env:
            settings = replace(settings, data_dir=Path(env["METALAKE_DATA_DIR"]))
        if "METALAKE_LISTEN" in env:
            settings = replace(settings, listen=env["METALAKE_LISTEN"])
        if env.get("METALAKE_CATALOG_URL"):
            settings = replace(settings, catalog_url=env["METALAKE_CATALOG_URL"])
        if env.get("METALAKE_BLOB_URL"):
            settings = replace(settings, blob_url=env["METALAKE_BLOB_URL"])
        if env.get("METALAKE_MIGRATE", "").lower() in ("1", "true", "yes"):
            settings = replace(settings, migrate=True)
        if "METALAKE_MAX_CONCURRENT_UPLOADS" in env:
            settings = replace(
                settings, max_concurrent_uploads=int(env["METALAKE_MAX_CONCURRENT_UPLOADS"])
            )
        if env.get("METALAKE_MAX_FILE_SIZE"):
            settings = replace(settings, max_file_size=int(env["METALAKE_MAX_FILE_SIZE"]))
        if env.get("METALAKE_ORG_MAX_FILE_SIZE"):
            settings = replace(settings, org_max_file_size=int(env["METALAKE_ORG_MAX_FILE_SIZE"]))
        if env.get("METALAKE_ORG_STORAGE_QUOTA"):
            settings = replace(settings, org_storage_quota=int(env["METALAKE_ORG_STORAGE_QUOTA"]))
        if "METALAKE_EVENT_RETENTION" in env:
            settings = replace(settings, event_retention=float(env["METALAKE_EVENT_RETENTION"]))
        if "METALAKE_ORPHAN_AGE" in env:
            settings = replace(settings, orphan_age=float(env["METALAKE_ORPHAN_AGE"]))
        if env.get("METALAKE_METRICS_LISTEN"):
            settings = replace(settings, metrics_listen=env["METALAKE_METRICS_LISTEN"])
        if env.get("METALAKE_INSECURE_NO_AUTH", "").lower() in ("1", "true", "yes"):
            settings = replace(settings, insecure_no_auth=True)
        if env.get("METALAKE_TLS_CERT"):
            settings = replace(settings, tls_cert=Path(env["METALAKE_TLS_CERT"]))
        if env.get("METALAKE_TLS_KEY"):
            settings = replace(settings, tls_key=Path(env["METALAKE_TLS_KEY"]))
        if env.get("METALAKE_TLS_CLIENT_CA"):
            settings = replace(settings, tls_client_ca=Path(env["METALAKE_TLS_CLIENT_CA"]))
        if "METALAKE_UPLOAD_TTL" in env:
            settings = replace(settings, upload_ttl=float(env["METALAKE_UPLOAD_TTL"]))
        if "METALAKE_FILL_TIMEOUT" in env:
            settings = replace(settings, extract_timeout=float(env["METALAKE_FILL_TIMEOUT"]))
        if env.get("METALAKE_WORKERS"):
            settings = replace(settings, workers=int(env["METALAKE_WORKERS"]))
        if "METALAKE_WEBHOOK_TIMEOUT" in env:
            settings = replace(settings, webhook_timeout=float(env["METALAKE_WEBHOOK_TIMEOUT"]))
        if "METALAKE_WEBHOOK_RETRY_BASE" in env:
            settings = replace(
                settings, webhook_retry_base=float(env["METALAKE_WEBHOOK_RETRY_BASE"])
            )
        if "METALAKE_WEBHOOK_RETRY_FOR" in env:
            settings = replace(settings, webhook_retry_for=float(env["METALAKE_WEBHOOK_RETRY_FOR"]))
        if "METALAKE_WEBHOOK_INTERVAL" in env:
            settings = replace(settings, webhook_interval=float(env["METALAKE_WEBHOOK_INTERVAL"]))
        if env.get("METALAKE_HASH_IMAGES", "").lower() in ("0", "false", "no", "off"):
            settings = replace(settings, hash_images=False)
        if data_dir is not None:
            settings = replace(settings, data_dir=Path(data_dir))
        if listen is not None:
            settings = replace(settings, listen=listen)
        if catalog_url is not None:
            settings = replace(settings, catalog_url=catalog_url)
        if migrate is not None:
            settings = replace(settings, migrate=migrate)
        if insecure_no_auth:
            settings = replace(settings, insecure_no_auth=True)
        if workers is not None:
            settings = replace(settings, workers=workers)
        if settings.workers < 1:
            raise ValueError(f"the number of workers must be at least 1, got {settings.workers}")
        return settings

    def catalog(self) -> tuple[str, bool]:
        """The catalog URL, and whether to migrate it at start-up."""
        if self.catalog_url is None:
            # The embedded default needs no set-up: its schema follows the server's.
            return f"sqlite:///{self.data_dir / 'catalog.sqlite3'}", True
        return self.catalog_url, self.migrate
