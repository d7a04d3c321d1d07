"""The command lines of the server-side commands: serve, migrate, gc, token, org, extract, plugins.

Only their arguments are declared here, so that `metalake --help` and `metalake COMMAND --help`
work, and the client commands start fast, without importing the server (SQLAlchemy, alembic,
lark, Pillow, boto3, ...). Each command's function is imported when it runs. In a thin install
(`pip install metalake`, without the `server` extra) running one prints a single line saying what
to install and exits 2.

A new server-side command is declared here with `server_command("module:function")`; its function
lives in metalake.server or metalake.extractors and takes the parsed arguments.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
Command: TypeAlias = Callable[[argparse.Namespace], int]

INSTALL_HINT = "pip install 'metalake[server]'"

# The import names of the `server` extra's distributions (and of what they pull in that the server
# imports itself). A test keeps this in step with pyproject.toml.
SERVER_IMPORTS = frozenset(
    {
        "PIL",  # Pillow
        "alembic",
        "boto3",
        "botocore",
        "defusedxml",
        "exifread",
        "filetype",
        "grpc_health",  # grpcio-health-checking
        "grpc_reflection",  # grpcio-reflection
        "lark",
        "obstore",
        "pillow_heif",
        "pluggy",
        "prometheus_client",
        "psycopg",
        "pythonjsonlogger",  # python-json-logger
        "rawpy",
        "sqlalchemy",
        "starlette",
        "uuid6",
        "uvicorn",
    }
)


class ServerNotInstalledError(Exception):
    """A server-side command ran where the `server` extra is not installed."""

    def __init__(self, missing: str) -> None:
        self.missing = missing
        super().__init__(
            f"this command needs the server install ({missing} is missing): {INSTALL_HINT}"
        )


def missing_server_module(error: ModuleNotFoundError) -> str | None:
    """The server dependency whose absence `error` reports, or None for any other module (a
    genuine import bug, which must not be disguised as a missing install)."""
    name = error.name or ""
    return name if name.partition(".")[0] in SERVER_IMPORTS else None


def server_command(target: str | Command) -> Command:
    """A command function that imports `target` ("package.module:function") only when it runs,
    and turns a missing server dependency into ServerNotInstalledError."""

    def run(args: argparse.Namespace) -> int:
        try:
            if isinstance(target, str):
                module_name, _, attribute = target.partition(":")
                function: Command = getattr(importlib.import_module(module_name), attribute)
            else:
                function = target
            return function(args)
        except ModuleNotFoundError as error:
            missing = missing_server_module(error)
            if missing is None:
                raise
            raise ServerNotInstalledError(missing) from None

    return run


def add_commands(commands: Subparsers, serve: Command) -> None:
    """Declare every server-side command; `serve` is `metalake serve`'s function."""
    _add_serve(commands, serve)
    _add_admin(commands)
    _add_org(commands)
    _add_extractors(commands)


def _add_serve(commands: Subparsers, serve: Command) -> None:
    parser = commands.add_parser(
        "serve",
        help="run a server",
        description="Serve the datalake (embedded SQLite + local files unless configured).",
        epilog="examples:\n  metalake serve\n  metalake serve --data-dir /srv/metalake "
        "--listen 0.0.0.0:50051",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, help="METALAKE_DATA_DIR (./metalake-data)")
    parser.add_argument("--listen", help="METALAKE_LISTEN (127.0.0.1:50051)")
    parser.add_argument("--catalog-url", help="METALAKE_CATALOG_URL (embedded SQLite)")
    parser.add_argument(
        "--migrate", action="store_true", help="METALAKE_MIGRATE: migrate the catalog at start-up"
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="METALAKE_INSECURE_NO_AUTH: serve a non-loopback address although no API token exists",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="METALAKE_WORKERS: server processes sharing the port (default 1)",
    )
    parser.set_defaults(func=server_command(serve))


def _storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="embedded data directory (METALAKE_DATA_DIR)")
    parser.add_argument("--catalog-url", help="catalog URL (METALAKE_CATALOG_URL)")
    if not any(a.dest == "json" for a in parser._actions):
        parser.add_argument("--json", action="store_true", help="print JSON")


def _add_admin(commands: Subparsers) -> None:
    migrate = commands.add_parser(
        "migrate",
        help="bring the catalog's schema up to date",
        description="Apply the catalog migrations this metalake ships (idempotent).",
        epilog="example: METALAKE_CATALOG_URL=postgresql://metalake@db/metalake metalake migrate",
    )
    _storage_options(migrate)
    migrate.set_defaults(func=server_command("metalake.server.admin:_migrate"))

    gc = commands.add_parser(
        "gc",
        help="reclaim expired uploads and orphaned bytes",
        description="Delete expired resumable uploads and blobs no item refers to. Servers "
        "also do this at start-up and every 10 minutes.",
        epilog="example: metalake gc --orphan-age 3600",
    )
    _storage_options(gc)
    gc.add_argument(
        "--orphan-age",
        type=float,
        default=3600.0,
        help="seconds a blob without an item must have existed to be deleted (default 3600)",
    )
    gc.set_defaults(func=server_command("metalake.server.admin:_gc"))

    token = commands.add_parser(
        "token",
        help="create, list and revoke API tokens",
        description="API tokens, stored (as hashes) in the catalog the servers use. Once any "
        "token exists, every call needs one.",
    )
    actions = token.add_subparsers(dest="token_action", required=True)
    create = actions.add_parser(
        "create",
        help="create a token and print it (once)",
        epilog="example: metalake token create --org acme --role write --description drone-7",
    )
    create.add_argument("--org", required=True, help="organization the token acts for")
    create.add_argument("--role", required=True, choices=["read", "write", "admin"])
    create.add_argument("--description", default="", help="a note to recognise it by")
    create.set_defaults(func=server_command("metalake.server.admin:_token_create"))
    listing = actions.add_parser("list", help="list tokens (never their secrets)")
    listing.set_defaults(func=server_command("metalake.server.admin:_token_list"))
    revoke = actions.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=server_command("metalake.server.admin:_token_revoke"))
    for parser in (create, listing, revoke):
        _storage_options(parser)


def _add_org(commands: Subparsers) -> None:
    org = commands.add_parser(
        "org",
        help="an organization's usage and limits",
        description="Show or set an organization's storage quota and maximum file size.",
    )
    actions = org.add_subparsers(dest="org_action", required=True)
    show = actions.add_parser("show", help="usage and limits of an organization")
    show.add_argument("org")
    show.set_defaults(func=server_command("metalake.server.admin:_org_show"))
    limits = actions.add_parser(
        "limits",
        help="set an organization's limits (omitted: the server's defaults)",
        epilog="example: metalake org limits acme --storage-quota 500000000000 "
        "--max-file-size 2000000000",
    )
    limits.add_argument("org")
    limits.add_argument("--max-file-size", type=int, help="bytes")
    limits.add_argument("--storage-quota", type=int, help="bytes")
    limits.set_defaults(func=server_command("metalake.server.admin:_org_limits"))
    for parser in (show, limits):
        _storage_options(parser)


def _add_extractors(commands: Subparsers) -> None:
    extract = commands.add_parser(
        "extract",
        help="show what fill_metadata would fill from files, and which extractor fills it",
        description=(
            "Run the extractor registry on local files, as the server's fill_metadata does. "
            "Example: metalake extract photo.jpg scan.tiff --json"
        ),
    )
    extract.add_argument("files", nargs="+", type=Path, metavar="FILE")
    extract.add_argument(
        "--json", action="store_true", help="one JSON object per file, one per line"
    )
    extract.set_defaults(func=server_command("metalake.extractors.cli:run_extract"))

    plugins = commands.add_parser(
        "plugins",
        help="list the loaded extractors with their versions, in the order they run",
        description="Extractors honour METALAKE_PLUGINS and METALAKE_DISABLE_PLUGINS.",
    )
    plugins.add_argument("--json", action="store_true", help="a JSON array of objects")
    plugins.set_defaults(func=server_command("metalake.extractors.cli:run_plugins"))
