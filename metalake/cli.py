"""The `metalake` command: serve a datalake, upload to it, find, fetch and manage data.

Exit codes: 0 all went well, 1 some files or items failed (or the server could not be
reached), 2 the command was used wrongly (unknown option or field, bad value, missing file, a
filter the server cannot parse) or needs the server install that is not there. Every client
command takes --target (METALAKE_TARGET), --token (METALAKE_TOKEN) and --json (one JSON object
per line).

Start-up is kept short: building the parser imports neither gRPC nor the server; a command
imports what it needs when it runs (the server-side commands are declared in
metalake.cli_server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metalake import export
from metalake import labels as label_rules
from metalake import metadata as md
from metalake._version import __version__
from metalake.bulk import ManifestError, SelectionError, plan_upload
from metalake.cli_server import INSTALL_HINT, ServerNotInstalledError
from metalake.cli_server import add_commands as add_server_commands

if TYPE_CHECKING:
    from metalake.client import Client, Data, Dataset, FileResult, WebhookDelivery

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_TARGET = "127.0.0.1:50051"  # metalake.client.DEFAULT_TARGET, without importing gRPC


class UsageError(Exception):
    """The command line is wrong: exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)
    # Imported here, not at the top: they load gRPC, which --help and --version do not need.
    from metalake.errors import InvalidArgumentError, MetalakeError

    try:
        code: int = args.func(args)
        return code
    except ServerNotInstalledError as error:
        print(f"metalake {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as error:
        print(f"metalake {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (md.InvalidMetadataError, InvalidArgumentError) as error:
        # The server's INVALID_ARGUMENT answers what the user typed (a filter, an id): usage.
        print(f"metalake {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except MetalakeError as error:
        print(f"metalake {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`metalake ls | head`): stop quietly, like other Unix tools,
        # and keep Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metalake",
        description="A datalake of files with typed metadata.",
        epilog="Run `metalake COMMAND --help` for a command's options and examples. "
        "serve, migrate, gc, token, org, extract and plugins need the server install: "
        f"{INSTALL_HINT}.",
    )
    parser.add_argument("--version", action="version", version=f"metalake {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    upload = _client_command(
        commands,
        "upload",
        "upload files",
        "examples:\n  metalake upload a.jpg b.jpg --fill-metadata --tag field\n"
        "  metalake upload photo.jpg --meta reference=7NGOMI --meta latitude=43.6 --json\n"
        "  metalake upload photo.jpg --meta acquired_at=2024-05-01T12:00:00+02:00\n"
        "  metalake upload *.jpg --quiet > ids.txt\n"
        "  metalake upload photos/ --include '*.jpg' --exclude 'raw/*' --tag field\n"
        "  metalake upload photos/ --manifest photos/manifest.csv --meta reference=M7\n\n"
        "Folders are walked recursively (hidden files skipped); each file is stored under its\n"
        "path relative to its folder. Rerunning an interrupted upload sends only what is\n"
        "missing and stores nothing twice.\n\n"
        "exit codes: 0 all stored, 1 some files failed (each on stderr), 2 usage error",
    )
    upload.add_argument("files", nargs="*", type=Path, metavar="PATH", help="files and folders")
    upload.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help="a .csv or .jsonl giving files their metadata and tags (column `path`, relative "
        "to the manifest; the fields; `tags`); without PATH, its files are uploaded",
    )
    upload.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="in folders, send only files matching this (repeatable; '*.jpg', 'raw/*')",
    )
    upload.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="in folders, skip files matching this (repeatable)",
    )
    upload.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a metadata value for every file; keys: {', '.join(md.FIELDS)}",
    )
    upload.add_argument("--fill-metadata", action="store_true", help="fill the rest from files")
    upload.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    upload.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label for every file (repeatable); keys: letters, digits, '_'",
    )
    upload.add_argument(
        "-q", "--quiet", action="store_true", help="print only the ids; no progress bar"
    )
    upload.set_defaults(func=_upload)

    ls = _client_command(
        commands,
        "ls",
        "list data",
        "examples:\n  metalake ls --filter 'manufacturer = \"Canon\" AND latitude > 43'\n"
        '  metalake ls --filter \'acquired_at >= "2024-05-01T00:00:00Z" AND tags:"field"\'\n'
        "  metalake ls --order-by 'acquired_at desc' --limit 10 --json\n"
        "  metalake ls --filter 'reference = \"old\"' --quiet | xargs metalake rm",
    )
    ls.add_argument("--filter", default="", help="AIP-160 filter")
    ls.add_argument("--order-by", default="", help='e.g. "acquired_at desc"')
    ls.add_argument("--limit", type=_positive_int, help="at most this many items")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the ids")
    ls.set_defaults(func=_ls)

    get = _client_command(commands, "get", "show one item", "example:\n  metalake get ID --json")
    get.add_argument("id")
    get.set_defaults(func=_get)

    download = _client_command(
        commands,
        "download",
        "download an item, or every item a filter selects",
        "examples:\n  metalake download ID -o copy.jpg\n"
        '  metalake download --filter \'reference = "M7" AND tags:"field"\' -o mission7/\n\n'
        "With --filter, files are written under the folder -o, verified by SHA-256; a rerun\n"
        "skips complete files and resumes partial ones. Stored names are made safe: nothing\n"
        "is written outside the folder; a name taken twice becomes NAME~ID.EXT.\n\n"
        "exit codes: 0 all downloaded, 1 some items failed (each on stderr), 2 usage error",
    )
    download.add_argument("id", nargs="?", help="one item's id (or use --filter)")
    download.add_argument(
        "-o", "--output", type=Path, required=True, help="file or directory; with --filter a folder"
    )
    download.add_argument("--filter", help="AIP-160 filter: download every item it selects")
    download.add_argument(
        "--workers", type=_positive_int, default=8, help="items at once (default %(default)s)"
    )
    download.add_argument(
        "-q", "--quiet", action="store_true", help="print only the paths written; no progress bar"
    )
    download.set_defaults(func=_download)

    export_ = _client_command(
        commands,
        "export",
        "export the metadata of the items a filter selects",
        "examples:\n  metalake export --filter 'tags:\"field\"' -o field.csv\n"
        "  metalake export --filter 'labels.rig = \"A\"' --format parquet -o rig-a.parquet\n"
        "  metalake export -o everything.jsonl --provenance\n\n"
        "One row per item: id, filename, size, sha256, content_type, created_at, updated_at,\n"
        "the 15 metadata fields, acquired_at_utc_offset, tags, labels (metadata_sources with\n"
        "--provenance). Parquet needs pip install 'metalake[export]'.",
    )
    export_.add_argument("--filter", default="", help="AIP-160 filter (default: every item)")
    export_.add_argument("--format", choices=export.FORMATS, help="default: from -o's suffix")
    export_.add_argument("-o", "--output", type=Path, required=True, help="the file to write")
    export_.add_argument(
        "--provenance", action="store_true", help="add metadata_sources (who set each field)"
    )
    export_.set_defaults(func=_export)

    import_ = _client_command(
        commands,
        "import",
        "register a bucket's objects in place",
        "examples:\n  metalake import s3://acme-photos/2024/ --filter-ext jpg --filter-ext png\n"
        "  metalake import s3://acme-photos --fill-metadata --json\n\n"
        "Every object under the prefix becomes an item that references it; its bytes are not\n"
        "copied. Run it again to add new objects, update changed ones (ETag) and label vanished\n"
        "ones import_state=vanished. Deleting an item never deletes the object. The server\n"
        "reads the bucket with its own credentials (admin role; IAM policy in operations.md).",
    )
    import_.add_argument("source", metavar="s3://BUCKET/PREFIX")
    import_.add_argument(
        "--filter-ext", action="append", default=[], metavar="EXT", help="only these extensions"
    )
    import_.add_argument(
        "--fill-metadata",
        action="store_true",
        help="fill metadata from each object's first bytes (one bounded ranged GET)",
    )
    import_.set_defaults(func=_import)

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

    _add_dataset_commands(commands)

    similar = _client_command(
        commands,
        "similar",
        "find images that look like an item or an image file",
        "examples:\n  metalake similar ID\n  metalake similar ID --max-distance 4 --json\n"
        "  metalake similar --image photo.jpg --filter 'reference = \"7NGOMI\"'",
    )
    similar.add_argument("id", nargs="?", help="a stored image's id")
    similar.add_argument("--image", type=Path, help="a local image instead of an id (<= 4 MiB)")
    similar.add_argument(
        "--max-distance", type=int, help="largest Hamming distance, 0 to 11 (server default 8)"
    )
    similar.add_argument("--filter", default="", help="AIP-160 filter the results must match")
    similar.add_argument("--no-mirrored", action="store_true", help="do not match flipped copies")
    similar.add_argument("--limit", type=_positive_int, help="at most this many results")
    similar.add_argument("-q", "--quiet", action="store_true", help="print only the ids")
    similar.set_defaults(func=_similar)

    dedup = _client_command(
        commands,
        "dedup",
        "report groups of near-duplicate images",
        "examples:\n  metalake dedup\n  metalake dedup --filter 'tags:\"field\"' "
        "--max-distance 6 --json",
    )
    dedup.add_argument("--filter", default="", help="AIP-160 filter: only these items")
    dedup.add_argument(
        "--max-distance", type=int, help="largest Hamming distance, 0 to 11 (server default 8)"
    )
    dedup.set_defaults(func=_dedup)

    _add_webhook_commands(commands)

    add_server_commands(commands, _serve)
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
        help=f"server address (METALAKE_TARGET, default {DEFAULT_TARGET})",
    )
    parser.add_argument("--token", help="API token (METALAKE_TOKEN)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def _add_dataset_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dataset = commands.add_parser(
        "dataset",
        help="freeze, list, compare and download dataset versions",
        description="Dataset snapshots: a version freezes the ids, content hashes and metadata "
        "of the items a filter matches; later changes never alter it.",
    )
    actions = dataset.add_subparsers(dest="dataset_action", required=True, metavar="ACTION")
    create = _client_command(
        actions,
        "create",
        "freeze the items matching a filter as the next version of a dataset",
        "example:\n  metalake dataset create train --filter 'tags:\"labelled\"' "
        "--description 'first cut'",
    )
    create.add_argument("name")
    create.add_argument("--filter", default="", help="AIP-160 filter (default: every item)")
    create.add_argument("--description", default="", help="free text")
    create.set_defaults(func=_dataset_create)

    ls = _client_command(
        actions, "ls", "list dataset versions", "example:\n  metalake dataset ls train --json"
    )
    ls.add_argument("name", nargs="?", default="", help="only this dataset's versions")
    ls.set_defaults(func=_dataset_ls)

    show = _client_command(
        actions,
        "show",
        "show a dataset version, its items or its manifest",
        "examples:\n  metalake dataset show train\n  metalake dataset show train --version 2 "
        "--items --json\n  metalake dataset show train --version 2 --manifest > train-v2.jsonl",
    )
    show.add_argument("name")
    show.add_argument("--version", type=_positive_int, help="default: the latest")
    what = show.add_mutually_exclusive_group()
    what.add_argument("--items", action="store_true", help="list the version's items")
    what.add_argument(
        "--manifest", action="store_true", help="print the version's manifest (JSON Lines)"
    )
    show.set_defaults(func=_dataset_show)

    diff = _client_command(
        actions,
        "diff",
        "list the items added, removed and changed between two versions",
        "example:\n  metalake dataset diff train 1 2",
    )
    diff.add_argument("name")
    diff.add_argument("from_version", type=_positive_int, metavar="FROM")
    diff.add_argument("to_version", type=_positive_int, nargs="?", metavar="TO", help="latest")
    diff.set_defaults(func=_dataset_diff)

    download = _client_command(
        actions,
        "download",
        "download every item of a version, with its manifest",
        "example:\n  metalake dataset download train --version 2 -o ./train-v2",
    )
    download.add_argument("name")
    download.add_argument("--version", type=_positive_int, help="default: the latest")
    download.add_argument("-o", "--output", type=Path, required=True, help="a directory")
    download.set_defaults(func=_dataset_download)


def _print_dataset(dataset: Dataset, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(dataset.to_json(), ensure_ascii=False), flush=True)
        return
    print(
        f"{dataset.name} v{dataset.version}  {dataset.item_count} items  "
        f"{dataset.total_size} bytes  {md.format_datetime(dataset.created_at)}  "
        f"filter: {dataset.filter or '(all)'}"
        + (f"  {dataset.description}" if dataset.description else ""),
        flush=True,
    )


def _dataset_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        created = client.get_datalake().create_dataset(
            args.name, args.filter, description=args.description
        )
    _print_dataset(created, args)
    return EXIT_OK


def _dataset_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for dataset in client.get_datalake().list_datasets(args.name or None):
            _print_dataset(dataset, args)
    return EXIT_OK


def _dataset_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        datalake = client.get_datalake()
        if args.manifest:
            sys.stdout.buffer.write(datalake.dataset_manifest(args.name, args.version or 0))
            sys.stdout.flush()
        elif args.items:
            for data in datalake.dataset_items(args.name, args.version or 0):
                _print_data(data, args)
        else:
            _print_dataset(datalake.get_dataset(args.name, args.version or 0), args)
    return EXIT_OK


def _dataset_diff(args: argparse.Namespace) -> int:
    with _client(args) as client:
        changes = client.get_datalake().diff_datasets(
            args.name, args.from_version, args.to_version or 0
        )
        for change in changes:
            if args.json:
                print(json.dumps(change.to_json(), ensure_ascii=False), flush=True)
            else:
                shown = change.after or change.before
                name = shown.filename if shown else ""
                print(f"{change.change:<8} {change.data_id}  {name}", flush=True)
    return EXIT_OK


def _dataset_download(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.output.is_dir():
        raise UsageError(f"not a directory: {args.output}")
    with _client(args) as client:
        written = client.get_datalake().download_dataset(args.name, args.output, args.version or 0)
    for data, path in written:
        if args.json:
            print(json.dumps({**data.to_json(), "path": str(path)}, ensure_ascii=False))
        else:
            print(f"{data.id} -> {path}")
    return EXIT_OK


def _similar(args: argparse.Namespace) -> int:
    if (args.id is None) == (args.image is None):
        raise UsageError("give an ID or --image FILE (one of them)")
    if args.image is not None and not args.image.is_file():
        raise UsageError(f"no such file: {args.image}")
    with _client(args) as client:
        results = client.get_datalake().find_similar(
            args.id,
            image=args.image,
            max_distance=args.max_distance,
            filter=args.filter,
            include_mirrored=not args.no_mirrored,
        )
        for count, result in enumerate(results):
            if args.limit is not None and count >= args.limit:
                break
            if args.json:
                print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
            elif args.quiet:
                print(result.data.id, flush=True)
            else:
                flipped = "  (mirror image)" if result.mirrored else ""
                print(
                    f"{result.distance:>2}  {result.data.id}  {result.data.filename}{flipped}",
                    flush=True,
                )
    return EXIT_OK


def _dedup(args: argparse.Namespace) -> int:
    with _client(args) as client:
        groups = client.get_datalake().find_duplicates(
            args.filter or None, max_distance=args.max_distance
        )
    for number, group in enumerate(groups, 1):
        if args.json:
            print(json.dumps({"group": number, "items": [d.to_json() for d in group]}))
            continue
        print(f"group {number}: {len(group)} items")
        for data in group:
            print(f"  {data.id}  {data.filename}  {data.size} bytes")
    if not args.json:
        print(f"{len(groups)} group(s), {sum(len(g) for g in groups)} items", file=sys.stderr)
    return EXIT_OK


def _add_webhook_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    webhook = commands.add_parser(
        "webhook",
        help="send the organization's changes to HTTP endpoints (admin token)",
        description="Webhooks: every change of the organization's items is POSTed as JSON to "
        "each registered URL, signed the Standard Webhooks way, retried for a day.",
    )
    actions = webhook.add_subparsers(dest="webhook_action", required=True, metavar="ACTION")
    add = _client_command(
        actions,
        "add",
        "register an endpoint and print its signing secret (shown once)",
        "example:\n  metalake webhook add https://hooks.example.com/metalake "
        "--events created,deleted --filter 'tags:\"field\"' --json",
    )
    add.add_argument("url")
    add.add_argument(
        "--events",
        default="created,updated,deleted",
        help="comma-separated: created, updated, deleted (default: all three)",
    )
    add.add_argument("--filter", default="", help="AIP-160 filter the item must match")
    add.set_defaults(func=_webhook_add)
    ls = _client_command(
        actions, "ls", "list the organization's webhooks", "example:\n  metalake webhook ls"
    )
    ls.set_defaults(func=_webhook_ls)
    rm = _client_command(
        actions, "rm", "remove a webhook", "example:\n  metalake webhook rm wh_123"
    )
    rm.add_argument("id")
    rm.set_defaults(func=_webhook_rm)
    deliveries = _client_command(
        actions,
        "deliveries",
        "show a webhook's delivery log, newest first",
        "example:\n  metalake webhook deliveries wh_123 --limit 20 --json",
    )
    deliveries.add_argument("id")
    deliveries.add_argument("--limit", type=_positive_int, help="at most this many")
    deliveries.set_defaults(func=_webhook_deliveries)
    test = _client_command(
        actions, "test", "send a test event now", "example:\n  metalake webhook test wh_123"
    )
    test.add_argument("id")
    test.set_defaults(func=_webhook_test)


def _print_delivery(delivery: WebhookDelivery, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(delivery.to_json()), flush=True)
        return
    answer = delivery.response_status if delivery.response_status is not None else "-"
    print(
        f"{delivery.id}  {delivery.event_type:<13} {delivery.status:<9} "
        f"attempts {delivery.attempts}  answer {answer}  {delivery.data_id}  {delivery.error}",
        flush=True,
    )


def _webhook_add(args: argparse.Namespace) -> int:
    events = [e.strip() for e in args.events.split(",") if e.strip()]
    with _client(args) as client:
        try:
            created = client.get_datalake().add_webhook(args.url, events, filter=args.filter)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if args.json:
        print(json.dumps(created.to_json()))
    else:
        print(created.secret)
        print(
            f"(webhook {created.id} -> {created.url}, events {','.join(created.events)}: this "
            "signing secret is shown once; give it to the receiver)",
            file=sys.stderr,
        )
    return EXIT_OK


def _webhook_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for webhook in client.get_datalake().list_webhooks():
            if args.json:
                print(json.dumps(webhook.to_json()))
            else:
                print(
                    f"{webhook.id}  {webhook.url}  {','.join(webhook.events)}  "
                    f"{webhook.filter or '(all items)'}"
                )
    return EXIT_OK


def _webhook_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.get_datalake().delete_webhook(args.id)
    print(json.dumps({"id": args.id, "deleted": True}) if args.json else f"removed {args.id}")
    return EXIT_OK


def _webhook_deliveries(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for count, delivery in enumerate(client.get_datalake().webhook_deliveries(args.id)):
            if args.limit is not None and count >= args.limit:
                break
            _print_delivery(delivery, args)
    return EXIT_OK


def _webhook_test(args: argparse.Namespace) -> int:
    with _client(args) as client:
        delivery = client.get_datalake().test_webhook(args.id)
    _print_delivery(delivery, args)
    return EXIT_OK if delivery.status == "delivered" else EXIT_FAILED


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _client(args: argparse.Namespace) -> Client:
    from metalake.client import Client

    # Client falls back on METALAKE_TARGET, then on DEFAULT_TARGET.
    return Client(args.target, token=args.token)


def _format_data(data: Data, args: argparse.Namespace) -> str:
    if args.json:
        return json.dumps(data.to_json(), ensure_ascii=False)
    if getattr(args, "quiet", False):
        return data.id
    fields = ", ".join(f"{k}={v}" for k, v in md.to_jsonable(data.metadata).items())
    line = f"{data.id}  {data.filename}  {data.size} bytes  {data.content_type}  {fields}"
    if data.labels:
        line += "  labels: " + ", ".join(f"{k}={v}" for k, v in data.labels.items())
    return line


def _print_data(data: Data, args: argparse.Namespace) -> None:
    # Flushed line by line so that a reader of a pipe (jq, xargs) gets each item at once.
    print(_format_data(data, args), flush=True)


def parse_meta(pairs: Sequence[str]) -> md.MetadataDict:
    """`key=value` pairs to metadata, each value read as its field's type."""
    raw: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError(f"--meta {pair!r}: expected KEY=VALUE")
        if key not in md.FIELDS:
            raise UsageError(
                f"--meta {key!r} is not a metadata field; valid: {', '.join(md.FIELDS)}"
            )
        if key in raw:
            raise UsageError(f"--meta {key} is given twice")
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


def parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    """`key=value` pairs to labels, checked as the server checks them."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--label {pair!r}: expected KEY=VALUE")
        if key in labels:
            raise UsageError(f"--label {key} is given twice")
        labels[key] = value
    violations = label_rules.validate(labels, prefix="--label")
    if violations:
        raise UsageError("; ".join(f"{v.field}: {v.description}" for v in violations))
    return labels


def _serve(args: argparse.Namespace) -> int:
    from metalake.server.app import StartupError, serve_forever
    from metalake.server.config import Settings
    from metalake.server.schema_versions import SchemaError

    try:
        settings = Settings.from_env(
            data_dir=args.data_dir,
            listen=args.listen,
            catalog_url=args.catalog_url,
            migrate=args.migrate or None,
            insecure_no_auth=args.insecure_no_auth,
            workers=args.workers,
        )
    except ValueError as error:
        print(f"metalake serve: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        serve_forever(settings)
    except (StartupError, SchemaError, OSError) as error:
        print(f"metalake serve: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _upload(args: argparse.Namespace) -> int:
    from metalake.client import FileResult

    metadata = parse_meta(args.meta)
    labels = parse_labels(args.label)
    if not args.files and args.manifest is None:
        raise UsageError("give files or folders to upload, or --manifest")
    try:
        plan = plan_upload(
            args.files,
            include=args.include,
            exclude=args.exclude,
            metadata=metadata,
            tags=args.tag,
            labels=labels,
            manifest=args.manifest,
        )
    except SelectionError as error:
        raise UsageError(str(error)) from None
    except ManifestError as error:
        raise UsageError(f"the manifest is invalid; nothing was sent:\n{error}") from None
    files = plan.files
    for row in plan.unused_rows:
        print(
            f"metalake upload: {args.manifest}: line {row.line}: {row.filename} is not among "
            "the files of this upload (hidden, excluded or outside the paths given): not sent",
            file=sys.stderr,
        )
    # A summary closes bulk uploads; single files keep their one line per file.
    summarize = (
        any(path.is_dir() for path in args.files) or args.manifest is not None
    ) and not args.quiet
    sizes = {file.path: _size(file.path) for file in files}
    total = sum(sizes.values())
    bar = _progress_bar(total, len(files), args)
    say: Callable[[str], None] = print if bar is None else bar.write
    summary = _Summary()
    try:
        with _client(args) as client:
            results = client.get_datalake().iter_upload_files(
                files,
                fill_metadata=args.fill_metadata,
                progress=bar.advance if bar is not None else None,
                rerun_safe=True,  # rerunning after an interruption finishes the job, no duplicates
            )
            # In input order, each as soon as it and the files before it are done.
            for file, result in results:
                outcome = FileResult.of(file, result, summary.started)
                summary.add(outcome)
                if outcome.error is not None:
                    print(f"metalake upload: {file.path}: {outcome.error}", file=sys.stderr)
                elif outcome.data is not None:
                    say(_format_data(outcome.data, args))
                    sys.stdout.flush()
                if bar is not None:
                    bar.file_done(sizes[file.path])
    finally:
        if bar is not None:
            bar.close()
    if summarize:
        print(f"metalake upload: {summary}", file=sys.stderr)
    return EXIT_FAILED if summary.failed else EXIT_OK


def _size(path: Path) -> int:
    # A file gone since it was selected fails when it is sent, where it is reported.
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Summary:
    """Counts of a bulk upload, for its closing line."""

    def __init__(self) -> None:
        self.started = datetime.now(UTC)
        self.uploaded = self.already = self.failed = self.bytes = 0

    def add(self, result: FileResult) -> None:
        if result.error is not None:
            self.failed += 1
        elif result.already_stored:
            self.already += 1
        else:
            self.uploaded += 1
            self.bytes += result.data.size if result.data is not None else 0

    def __str__(self) -> str:
        total = self.uploaded + self.already + self.failed
        return (
            f"{total} files: {self.uploaded} uploaded ({_human_bytes(self.bytes)}), "
            f"{self.already} already stored, {self.failed} failed"
        )


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class _ProgressBar:
    """A tqdm bar of bytes sent, fed from the upload threads."""

    def __init__(self, total: int | None, files: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            postfix=f"0/{files} files" if files else "0 files",
        )
        self._files, self._done = files, 0
        # Bytes streamed, and bytes of finished files: a file a rerun finds already stored is
        # done without streaming all of itself, so the bar shows the larger of the two.
        self._streamed = self._finished = 0
        # tqdm's own lock covers drawing, not its counter: uploads report from several threads.
        self._lock = threading.Lock()

    def _show(self) -> None:
        position = max(self._streamed, self._finished)
        if position > self._bar.n:
            self._bar.update(position - self._bar.n)

    def advance(self, sent: int) -> None:
        with self._lock:
            self._streamed += sent
            self._show()

    def file_done(self, size: int = 0) -> None:
        with self._lock:
            self._done += 1
            self._finished += size
            self._show()
            # A download learns its files as it lists them: no total then.
            of = f"/{self._files}" if self._files else ""
            self._bar.set_postfix_str(f"{self._done}{of} files")

    def write(self, line: str) -> None:
        # Clears the bar, prints the line on stdout, then draws the bar again below it.
        with self._lock:
            self._bar.write(line, file=sys.stdout)

    def close(self) -> None:
        # Draw the final count and postfix now: tqdm draws at most every 0.1 s, and close alone
        # has been seen to leave the last drawing (0%) on the screen.
        with self._lock:
            self._bar.refresh()
            self._bar.close()


def _progress_bar(total: int | None, files: int, args: argparse.Namespace) -> _ProgressBar | None:
    """A bar on a terminal only: not when stderr is piped or logged, nor when asked not to."""
    if args.quiet or os.environ.get("METALAKE_NO_PROGRESS") or not sys.stderr.isatty():
        return None
    return _ProgressBar(total, files)


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
            _print_data(data, args)
    return EXIT_OK


def _get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_data(client.get_datalake().get_data(args.id), args)
    return EXIT_OK


def _download(args: argparse.Namespace) -> int:
    if (args.id is None) == (args.filter is None):
        raise UsageError("give an item's ID or --filter, not both")
    if args.filter is not None:
        return _download_many(args)
    with _client(args) as client:
        data = client.get_datalake().get_data(args.id)
        written = data.download(args.output)
    if args.json:
        print(json.dumps({**data.to_json(), "path": str(written)}, ensure_ascii=False))
    else:
        print(f"{data.id} -> {written} ({data.size} bytes, sha256 verified)")
    return EXIT_OK


def _download_many(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.output.is_dir():
        raise UsageError(f"with --filter, -o must be a folder: {args.output} is a file")
    bar = _progress_bar(None, 0, args)
    say: Callable[[str], None] = print if bar is None else bar.write
    counts = {"downloaded": 0, "complete": 0, "failed": 0}
    received = 0
    try:
        with _client(args) as client:
            results = client.get_datalake().iter_download(
                args.filter,
                args.output,
                max_workers=args.workers,
                progress=bar.advance if bar is not None else None,
            )
            for result in results:
                counts[result.status] += 1
                if bar is not None:
                    bar.file_done()
                if result.error is not None:
                    print(f"metalake download: {result.data.id}: {result.error}", file=sys.stderr)
                    continue
                if result.status == "downloaded":
                    received += result.data.size - result.resumed_from
                if args.json:
                    line = json.dumps(
                        {
                            **result.data.to_json(),
                            "path": str(result.path),
                            "status": result.status,
                        },
                        ensure_ascii=False,
                    )
                elif args.quiet:
                    line = str(result.path)
                else:
                    line = f"{result.data.id} -> {result.path} ({result.status})"
                say(line)
                sys.stdout.flush()
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        total = sum(counts.values())
        print(
            f"metalake download: {total} items: {counts['downloaded']} downloaded "
            f"({_human_bytes(received)}), {counts['complete']} already complete, "
            f"{counts['failed']} failed",
            file=sys.stderr,
        )
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def _export(args: argparse.Namespace) -> int:
    try:
        chosen = export.format_of(args.output, args.format)
        if chosen == "parquet":
            export.require_pyarrow()
    except export.ExportError as error:
        raise UsageError(str(error)) from None
    with _client(args) as client:
        count = client.get_datalake().export(
            args.output, args.filter, format=chosen, provenance=args.provenance
        )
    if args.json:
        print(json.dumps({"path": str(args.output), "items": count, "format": chosen}))
    else:
        print(f"exported {count} items to {args.output} ({chosen})", file=sys.stderr)
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    if not args.source.startswith("s3://"):
        raise UsageError(f"{args.source!r} is not an s3://bucket/prefix URL")
    with _client(args) as client:
        report = client.get_datalake().import_objects(
            args.source, extensions=args.filter_ext, fill_metadata=args.fill_metadata
        )
    for where, why in report["failures"]:
        print(f"metalake import: {where}: {why}", file=sys.stderr)
    if args.json:
        print(json.dumps({**report, "failures": [list(f) for f in report["failures"]]}))
    else:
        print(
            f"{report['listed']} objects: {report['added']} added, {report['updated']} updated, "
            f"{report['unchanged']} unchanged, {report['vanished']} vanished, "
            f"{len(report['failures'])} failed; {report['bytes_read']} bytes read "
            f"(at most {report['header_bytes_limit']} per object)"
        )
    return EXIT_FAILED if report["failures"] else EXIT_OK


def _rm(args: argparse.Namespace) -> int:
    from metalake.errors import MetalakeError

    failed = 0
    with _client(args) as client:
        datalake = client.get_datalake()
        for data_id in args.ids:
            try:
                datalake.delete_data(data_id)
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
