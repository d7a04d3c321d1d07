"""Operator commands that act on the datalake a server uses: migrate, gc, token.

They read the same settings as `metalake serve` (METALAKE_DATA_DIR, METALAKE_CATALOG_URL, ...,
or --data-dir / --catalog-url), so they reach the catalog the servers share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from metalake.metadata import format_datetime
from metalake.server.auth import Role, Tokens
from metalake.server.catalog import Organization, SqlCatalog
from metalake.server.config import Settings
from metalake.server.schema_versions import schema_revision

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = subparsers.add_parser(
        "migrate",
        help="bring the catalog's schema up to date",
        description="Apply the catalog migrations this metalake ships (idempotent).",
        epilog="example: METALAKE_CATALOG_URL=postgresql://metalake@db/metalake metalake migrate",
    )
    _storage_options(migrate)
    migrate.set_defaults(func=_migrate)

    gc = subparsers.add_parser(
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
    gc.set_defaults(func=_gc)

    token = subparsers.add_parser(
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
    create.set_defaults(func=_token_create)
    listing = actions.add_parser("list", help="list tokens (never their secrets)")
    listing.set_defaults(func=_token_list)
    revoke = actions.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=_token_revoke)
    for parser in (create, listing, revoke):
        _storage_options(parser)
    add_org_commands(subparsers)


def add_org_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    org = subparsers.add_parser(
        "org",
        help="an organization's usage and limits",
        description="Show or set an organization's storage quota and maximum file size.",
    )
    actions = org.add_subparsers(dest="org_action", required=True)
    show = actions.add_parser("show", help="usage and limits of an organization")
    show.add_argument("org")
    show.set_defaults(func=_org_show)
    limits = actions.add_parser(
        "limits",
        help="set an organization's limits (omitted: the server's defaults)",
        epilog="example: metalake org limits acme --storage-quota 500000000000 "
        "--max-file-size 2000000000",
    )
    limits.add_argument("org")
    limits.add_argument("--max-file-size", type=int, help="bytes")
    limits.add_argument("--storage-quota", type=int, help="bytes")
    limits.set_defaults(func=_org_limits)
    for parser in (show, limits):
        _storage_options(parser)


def _org_show(args: argparse.Namespace) -> int:
    async def action(catalog: SqlCatalog) -> Organization:
        return await catalog.organization(args.org)

    found = _with_catalog(args, action)
    _print(
        args,
        asdict(found),
        f"{found.org}: {found.used_bytes} bytes used, quota {found.storage_quota}, "
        f"max file size {found.max_file_size}",
    )
    return EXIT_OK


def _org_limits(args: argparse.Namespace) -> int:
    async def action(catalog: SqlCatalog) -> None:
        await catalog.set_organization_limits(
            args.org, max_file_size=args.max_file_size, storage_quota=args.storage_quota
        )

    _with_catalog(args, action)
    return _org_show(args)


def _with_catalog(args: argparse.Namespace, action: Any) -> Any:
    async def run() -> Any:
        catalog = _open_catalog(_settings(args))
        try:
            return await action(catalog)
        finally:
            await catalog.close()

    return asyncio.run(run())


def _storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="embedded data directory (METALAKE_DATA_DIR)")
    parser.add_argument("--catalog-url", help="catalog URL (METALAKE_CATALOG_URL)")
    if not any(a.dest == "json" for a in parser._actions):
        parser.add_argument("--json", action="store_true", help="print JSON")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(data_dir=args.data_dir, catalog_url=args.catalog_url)


def _open_catalog(settings: Settings) -> SqlCatalog:
    url, migrate = settings.catalog()
    if settings.catalog_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SqlCatalog.open(url, migrate=migrate)


def _print(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload) if args.json else text)


def _migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    url, _ = settings.catalog()
    catalog = SqlCatalog.open(url, migrate=True)
    current, head = schema_revision(catalog.engine)
    asyncio.run(catalog.close())
    _print(args, {"revision": current, "head": head}, f"catalog schema at revision {current}")
    return EXIT_OK


def _gc(args: argparse.Namespace) -> int:
    from metalake.server.app import build_datalake

    async def run() -> dict[str, int]:
        datalake = build_datalake(_settings(args))
        try:
            garbage = await datalake.collect_garbage(orphan_age=timedelta(seconds=args.orphan_age))
        finally:
            await datalake.catalog.close()
        return vars(garbage)

    found = asyncio.run(run())
    _print(args, found, ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in found.items()))
    return EXIT_OK


def _with_tokens(args: argparse.Namespace, action: Any) -> Any:
    return _with_catalog(args, lambda catalog: action(Tokens(catalog)))


def _token_create(args: argparse.Namespace) -> int:
    try:
        role = Role.parse(args.role)
        token = _with_tokens(args, lambda t: t.create(args.org, role, args.description))
    except ValueError as error:
        print(f"metalake token create: {error}")
        return EXIT_USAGE
    _print(
        args,
        {"id": token.id, "token": token.secret, "org": token.org, "role": args.role},
        f"{token.secret}\n(id {token.id}, org {token.org}, role {args.role}: "
        "this token is shown once; keep it secret)",
    )
    return EXIT_OK


def _token_list(args: argparse.Namespace) -> int:
    tokens = _with_tokens(args, lambda t: t.list())
    for token in tokens:
        payload = {
            "id": token.id,
            "org": token.org,
            "role": token.role,
            "description": token.description,
            "created_at": format_datetime(token.created_at),
            "revoked_at": format_datetime(token.revoked_at) if token.revoked_at else None,
        }
        state = "revoked" if token.revoked_at else "active"
        _print(
            args,
            payload,
            f"{token.id}  {token.org:<16} {token.role:<6} {state:<8} {token.description}",
        )
    return EXIT_OK


def _token_revoke(args: argparse.Namespace) -> int:
    revoked = _with_tokens(args, lambda t: t.revoke(args.token_id))
    if not revoked:
        print(f"metalake token revoke: no active token {args.token_id!r}")
        return EXIT_FAILED
    _print(args, {"id": args.token_id, "revoked": True}, f"revoked {args.token_id}")
    return EXIT_OK
