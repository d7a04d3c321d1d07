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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metalake import metadata as md
from metalake._version import __version__
from metalake.cli_server import INSTALL_HINT, ServerNotInstalledError
from metalake.cli_server import add_commands as add_server_commands

if TYPE_CHECKING:
    from metalake.client import Client, Data, Dataset, WebhookDelivery

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
        "  metalake upload *.jpg --quiet > ids.txt\n\n"
        "exit codes: 0 all stored, 1 some files failed (each on stderr), 2 usage error",
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
    return f"{data.id}  {data.filename}  {data.size} bytes  {data.content_type}  {fields}"


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
    metadata = parse_meta(args.meta)
    for path in args.files:
        if not path.is_file():
            raise UsageError(f"{'not a file' if path.exists() else 'no such file'}: {path}")
    total = sum(f.stat().st_size for f in args.files)
    bar = _progress_bar(total, len(args.files), args)
    say: Callable[[str], None] = print if bar is None else bar.write
    failed = 0
    try:
        with _client(args) as client:
            results = client.get_datalake().iter_upload(
                list(args.files),
                metadata,
                fill_metadata=args.fill_metadata,
                tags=args.tag,
                progress=bar.advance if bar is not None else None,
                rerun_safe=True,  # rerunning after an interruption finishes the job, no duplicates
            )
            # In input order, each as soon as it and the files before it are done.
            for path, result in results:
                if isinstance(result, Exception):
                    failed += 1
                    print(f"metalake upload: {path}: {result}", file=sys.stderr)
                else:
                    say(_format_data(result, args))
                    sys.stdout.flush()
                if bar is not None:
                    bar.file_done()
    finally:
        if bar is not None:
            bar.close()
    return EXIT_FAILED if failed else EXIT_OK


class _ProgressBar:
    """A tqdm bar of bytes sent, fed from the upload threads."""

    def __init__(self, total: int, files: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            postfix=f"0/{files} files",
        )
        self._files, self._done = files, 0
        # tqdm's own lock covers drawing, not its counter: uploads report from several threads.
        self._lock = threading.Lock()

    def advance(self, sent: int) -> None:
        with self._lock:
            self._bar.update(sent)

    def file_done(self) -> None:
        with self._lock:
            self._done += 1
            self._bar.set_postfix_str(f"{self._done}/{self._files} files")

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


def _progress_bar(total: int, files: int, args: argparse.Namespace) -> _ProgressBar | None:
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
    with _client(args) as client:
        data = client.get_datalake().get_data(args.id)
        written = data.download(args.output)
    if args.json:
        print(json.dumps({**data.to_json(), "path": str(written)}, ensure_ascii=False))
    else:
        print(f"{data.id} -> {written} ({data.size} bytes, sha256 verified)")
    return EXIT_OK


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
