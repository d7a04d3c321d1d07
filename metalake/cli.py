"""The `metalake` command: serve a datalake, upload to it, find, fetch and manage data.

Exit codes: 0 all went well, 1 some files or items failed, 2 the command was used wrongly.
Every client command takes --target (METALAKE_TARGET), --token (METALAKE_TOKEN) and --json
(one JSON object per line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalake import metadata as md
from metalake.client import DEFAULT_TARGET, Client, Data
from metalake.errors import MetalakeError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """The command line is wrong: exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)
    try:
        code: int = args.func(args)
        return code
    except UsageError as error:
        print(f"metalake {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except md.InvalidMetadataError as error:
        print(f"metalake {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except MetalakeError as error:
        print(f"metalake {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metalake",
        description="A datalake of files with typed metadata.",
        epilog="Run `metalake COMMAND --help` for a command's options and examples.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run a server",
        description="Serve the datalake (embedded SQLite + local files unless configured).",
        epilog="examples:\n  metalake serve\n  metalake serve --data-dir /srv/metalake "
        "--listen 0.0.0.0:50051",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--data-dir", type=Path, help="METALAKE_DATA_DIR (./metalake-data)")
    serve.add_argument("--listen", help="METALAKE_LISTEN (127.0.0.1:50051)")
    serve.add_argument("--catalog-url", help="METALAKE_CATALOG_URL (embedded SQLite)")
    serve.add_argument("--migrate", action="store_true", help="migrate the catalog at start-up")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback address although no API token exists",
    )
    serve.set_defaults(func=_serve)

    upload = _client_command(
        commands,
        "upload",
        "upload files",
        "examples:\n  metalake upload a.jpg b.jpg --fill-metadata --tag field\n"
        "  metalake upload photo.jpg --meta reference=7NGOMI --meta latitude=43.6 --json",
    )
    upload.add_argument("files", nargs="+", type=Path, metavar="FILE")
    upload.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a metadata value for every file; keys: {', '.join(md.FIELDS)}",
    )
    upload.add_argument("--fill-metadata", action="store_true", help="fill the rest from files")
    upload.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    upload.add_argument("--quiet", action="store_true", help="no progress bar")
    upload.set_defaults(func=_upload)

    ls = _client_command(
        commands,
        "ls",
        "list data",
        "examples:\n  metalake ls --filter 'manufacturer = \"Canon\" AND latitude > 43'\n"
        "  metalake ls --order-by 'acquired_at desc' --limit 10 --json",
    )
    ls.add_argument("--filter", default="", help="AIP-160 filter")
    ls.add_argument("--order-by", default="", help='e.g. "acquired_at desc"')
    ls.add_argument("--limit", type=int, help="at most this many items")
    ls.set_defaults(func=_ls)

    get = _client_command(commands, "get", "show one item", "example:\n  metalake get ID --json")
    get.add_argument("id")
    get.set_defaults(func=_get)

    download = _client_command(
        commands, "download", "download an item", "example:\n  metalake download ID -o copy.jpg"
    )
    download.add_argument("id")
    download.add_argument("-o", "--output", type=Path, required=True, help="file or directory")
    download.set_defaults(func=_download)

    rm = _client_command(commands, "rm", "delete items", "example:\n  metalake rm ID1 ID2")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.set_defaults(func=_rm)

    watch = _client_command(
        commands,
        "watch",
        "print changes as they happen",
        "example:\n  metalake watch --filter 'tags:\"field\"' --json",
    )
    watch.add_argument("--filter", default="", help="AIP-160 filter")
    watch.add_argument("--resume-token", default="", help="continue after this event")
    watch.set_defaults(func=_watch)

    from extractors.cli import add_commands as add_extractor_commands
    from server.admin import add_commands as add_admin_commands

    add_extractor_commands(commands)
    add_admin_commands(commands)
    return parser


def _client_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    examples: str,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("METALAKE_TARGET", DEFAULT_TARGET),
        help="server address (METALAKE_TARGET, default %(default)s)",
    )
    parser.add_argument("--token", help="API token (METALAKE_TOKEN)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, token=args.token)


def _print_data(data: Data, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data.to_json()), flush=True)
        return
    fields = ", ".join(f"{k}={v}" for k, v in md.to_jsonable(data.metadata).items())
    print(f"{data.id}  {data.filename}  {data.size} bytes  {data.content_type}  {fields}")


def parse_meta(pairs: Sequence[str]) -> md.MetadataDict:
    """`key=value` pairs to metadata, each value read as its field's type."""
    raw: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--meta {pair!r}: expected KEY=VALUE")
        if key not in md.FIELDS:
            raise UsageError(
                f"--meta {key!r} is not a metadata field; valid: {', '.join(md.FIELDS)}"
            )
        if key in md.FLOAT_FIELDS:
            try:
                raw[key] = float(value)
            except ValueError:
                raise UsageError(f"--meta {key}: {value!r} is not a number") from None
        else:
            raw[key] = value
    try:
        return md.normalize(raw)
    except md.InvalidMetadataError as error:
        raise UsageError(f"--meta: {error}") from None


def _serve(args: argparse.Namespace) -> int:
    from server.app import StartupError, serve_forever
    from server.config import Settings
    from server.schema_versions import SchemaError

    settings = Settings.from_env(
        data_dir=args.data_dir,
        listen=args.listen,
        catalog_url=args.catalog_url,
        migrate=args.migrate or None,
        insecure_no_auth=args.insecure_no_auth,
    )
    try:
        serve_forever(settings)
    except (StartupError, SchemaError, OSError) as error:
        print(f"metalake serve: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _upload(args: argparse.Namespace) -> int:
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise UsageError(f"no such file: {', '.join(missing)}")
    metadata = parse_meta(args.meta)
    total = sum(f.stat().st_size for f in args.files)
    show_bar = not (args.quiet or args.json or os.environ.get("METALAKE_NO_PROGRESS"))
    bar = _progress_bar(total, show_bar and sys.stderr.isatty())
    with _client(args) as client:
        results = client.get_datalake().upload_data(
            list(args.files),
            metadata,
            fill_metadata=args.fill_metadata,
            tags=args.tag,
            progress=bar.update if bar is not None else None,
            raise_on_error=False,
            rerun_safe=True,  # rerunning after an interruption finishes the job, no duplicates
        )
    if bar is not None:
        bar.close()
    failed = 0
    for path, result in zip(args.files, results, strict=True):
        if isinstance(result, Exception):
            failed += 1
            print(f"metalake upload: {path}: {result}", file=sys.stderr)
        else:
            _print_data(result, args.json)
    return EXIT_FAILED if failed else EXIT_OK


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)


def _ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page_size = min(args.limit or 100, 1000)
        for count, data in enumerate(
            client.get_datalake().list_data(
                args.filter, order_by=args.order_by, page_size=page_size
            )
        ):
            if args.limit is not None and count >= args.limit:
                break
            _print_data(data, args.json)
    return EXIT_OK


def _get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_data(client.get_datalake().get_data(args.id), args.json)
    return EXIT_OK


def _download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.get_datalake().get_data(args.id)
        written = data.download(args.output)
    if args.json:
        print(json.dumps({"id": data.id, "path": str(written), "sha256": data.sha256}))
    else:
        print(f"{data.id} -> {written} ({data.size} bytes, sha256 verified)")
    return EXIT_OK


def _rm(args: argparse.Namespace) -> int:
    failed = 0
    with _client(args) as client:
        datalake = client.get_datalake()
        for data_id in args.ids:
            try:
                datalake.get_data(data_id).delete()
            except MetalakeError as error:
                failed += 1
                print(f"metalake rm: {data_id}: {error}", file=sys.stderr)
                continue
            print(
                json.dumps({"id": data_id, "deleted": True}) if args.json else f"deleted {data_id}"
            )
    return EXIT_FAILED if failed else EXIT_OK


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for event in client.get_datalake().watch(args.filter, resume_token=args.resume_token):
            if args.json:
                print(json.dumps(event), flush=True)
            else:
                print(
                    f"{event['type']:<8} {event['data_id']}  {event['data']['filename']}",
                    flush=True,
                )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
