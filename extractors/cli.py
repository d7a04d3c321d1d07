"""`metalake extract` and `metalake plugins`: the registry, locally, without a server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metalake.extractors.registry import ExtractorRegistry
from metalake.metadata import to_jsonable

EXIT_OK = 0
EXIT_SOME_FAILED = 1  # some files could not be read; the others were reported


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `extract` and `plugins` commands to a `metalake` command line."""
    extract = subparsers.add_parser(
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
    extract.set_defaults(func=run_extract)

    plugins = subparsers.add_parser(
        "plugins",
        help="list the loaded extractors with their versions, in the order they run",
        description="Extractors honour METALAKE_PLUGINS and METALAKE_DISABLE_PLUGINS.",
    )
    plugins.add_argument("--json", action="store_true", help="a JSON array of objects")
    plugins.set_defaults(func=run_plugins)


def run_extract(args: argparse.Namespace) -> int:
    registry = ExtractorRegistry.from_environment()
    status = EXIT_OK
    for path in args.files:
        try:
            result = registry.extract(path, filename=path.name)
        except OSError as error:
            print(f"{path}: {error.strerror or error}", file=sys.stderr)
            status = EXIT_SOME_FAILED
            continue
        metadata = to_jsonable(result.values)
        if args.json:
            record = {"file": str(path), "metadata": metadata, "sources": result.sources}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"{path}:")
            if not metadata:
                print("  (nothing found)")
            width = max((len(field) for field in metadata), default=0)
            for field, value in metadata.items():
                print(f"  {field:<{width}}  {value}  [{result.sources[field]}]")
        for name, message in result.errors:
            print(f"{path}: extractor {name}: {message}", file=sys.stderr)
    return status


def run_plugins(args: argparse.Namespace) -> int:
    registry = ExtractorRegistry.from_environment()
    described = registry.describe()
    if args.json:
        rows = [info._asdict() for info in described]
        print(json.dumps(rows))
    else:
        for info in described:
            print(f"{info.order:>3}  {info.name:<20} {info.version or '-'}")
    for name, message in registry.load_errors:
        print(f"plugin {name} failed to load: {message}", file=sys.stderr)
    return EXIT_OK
