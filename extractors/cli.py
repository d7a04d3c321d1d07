"""`metalake extract` and `metalake plugins`: the registry, locally, without a server.

Their arguments are declared in metalake.cli_server; the functions here run them.
"""

from __future__ import annotations

import argparse
import json
import sys

from metalake.extractors.registry import ExtractorRegistry
from metalake.metadata import to_jsonable

EXIT_OK = 0
EXIT_SOME_FAILED = 1  # some files could not be read; the others were reported


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
