"""Which catalog schema a database has, and bringing it to the one this server runs on.

The schema is created and changed only by the Alembic migrations in server/migrations, shipped
in the package and applied by `metalake migrate` (or at start-up when asked).
"""

from __future__ import annotations

import logging

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

log = logging.getLogger(__name__)


class SchemaError(RuntimeError):
    """The catalog's schema is not the one this server runs on."""


def engine_url(url: str) -> str:
    """SQLAlchemy URL for a catalog URL; plain postgresql:// URLs get the psycopg 3 driver."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def _migrations(connection: Connection | None = None) -> tuple[AlembicConfig, ScriptDirectory]:
    config = AlembicConfig()
    config.set_main_option("script_location", "metalake.server:migrations")
    config.attributes["connection"] = connection
    return config, ScriptDirectory.from_config(config)


def schema_revision(engine: Engine) -> tuple[str | None, str]:
    """(the catalog's revision, or None when empty; the revision this server expects)."""
    _, script = _migrations()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    head = script.get_current_head()
    assert head is not None
    return current, head


def check_schema(engine: Engine, *, migrate: bool) -> None:
    """Raise SchemaError unless the schema is this server's, migrating first if asked."""
    current, head = schema_revision(engine)
    if current == head:
        return
    _, script = _migrations()
    known = {revision.revision for revision in script.walk_revisions()}
    if current is not None and current not in known:
        raise SchemaError(
            f"the catalog's schema is at revision {current!r}, which this server does not know: "
            f"a newer metalake wrote it. Run a metalake that knows it (this one expects {head!r})."
        )
    if not migrate:
        raise SchemaError(
            f"the catalog's schema is at revision {current or 'none (empty catalog)'}; this "
            f"server needs {head!r}. Run `metalake migrate` with the same settings, or start "
            "the server with --migrate."
        )
    with engine.begin() as connection:
        config, _ = _migrations(connection)
        alembic_command.upgrade(config, "head")
    # Alembic's own INFO lines are quieted (see observability.QUIET_LOGGERS): say it once here.
    log.info("catalog schema migrated from %s to %s", current or "empty", head)
