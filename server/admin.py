"""Operator commands that act on the datalake a server uses: migrate, gc, token, org.

They read the same settings as `metalake serve` (METALAKE_DATA_DIR, METALAKE_CATALOG_URL, ...,
or --data-dir / --catalog-url), so they reach the catalog the servers share. Their arguments are
declared in metalake.cli_server, so that the command line is built without importing the server.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from metalake.metadata import format_datetime
from metalake.server.auth import Role, Tokens
from metalake.server.catalog import Organization, OrganizationCatalog, SqlCatalog
from metalake.server.config import SettingError, Settings
from metalake.server.schema_versions import schema_revision

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Command = Callable[[argparse.Namespace], int]


def _command(function: Command) -> Command:
    """A command that, like `metalake serve`, answers a bad setting with one line naming it."""

    @functools.wraps(function)
    def run(args: argparse.Namespace) -> int:
        try:
            return function(args)
        except SettingError as error:
            print(f"metalake {args.command}: {error}", file=sys.stderr)
            return EXIT_USAGE

    return run


@_command
def _org_show(args: argparse.Namespace) -> int:
    async def action(catalog: OrganizationCatalog) -> Organization:
        return await catalog.organization(args.org)

    found = _with_catalog(args, action)
    _print(
        args,
        asdict(found),
        f"{found.org}: {found.used_bytes} bytes used, quota {found.storage_quota}, "
        f"max file size {found.max_file_size}",
    )
    return EXIT_OK


@_command
def _org_limits(args: argparse.Namespace) -> int:
    async def action(catalog: OrganizationCatalog) -> None:
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


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(data_dir=args.data_dir, catalog_url=args.catalog_url)


def _open_catalog(settings: Settings) -> SqlCatalog:
    url, migrate = settings.catalog()
    if settings.catalog_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SqlCatalog.open(url, migrate=migrate)


def _print(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload) if args.json else text)


@_command
def _migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    url, _ = settings.catalog()
    catalog = SqlCatalog.open(url, migrate=True)
    current, head = schema_revision(catalog.engine)
    asyncio.run(catalog.close())
    _print(args, {"revision": current, "head": head}, f"catalog schema at revision {current}")
    return EXIT_OK


@_command
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


@_command
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


@_command
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


@_command
def _token_revoke(args: argparse.Namespace) -> int:
    revoked = _with_tokens(args, lambda t: t.revoke(args.token_id))
    if not revoked:
        print(f"metalake token revoke: no active token {args.token_id!r}")
        return EXIT_FAILED
    _print(args, {"id": args.token_id, "revoked": True}, f"revoked {args.token_id}")
    return EXIT_OK
