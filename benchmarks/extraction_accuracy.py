"""Agreement of the built-in extractors with exiftool (the oracle) on folders of real files.

The files are third-party test images, never committed: the shared corpus, Pillow's own test
images (its sdist's Tests/images) and exiftool's (its source's t/images). `make accuracy` fetches
the last two through their registries (PyPI, Debian) into a temporary folder and runs this.

    python -m benchmarks.extraction_accuracy corpus [FOLDER]      # the files of expected.json
    python -m benchmarks.extraction_accuracy pillow FOLDER        # every file in FOLDER
    python -m benchmarks.extraction_accuracy exiftool FOLDER      # still-image formats only

Fields and rules are those of ../shared/corpus/README.md. For each file, every field that either
side has is one value; it agrees when both have it and they are equal within the corpus
tolerances. A value exiftool does not read is *invented* and counts as a miss. Capture times
whose offset metalake derived from the GPS clock (source `...+gps-clock`) compare their wall time,
as the offset is not something the file records. By default the oracle is exiftool run here,
reading EXIF and then, for the fields EXIF leaves empty, the XMP properties the `xmp` extractor
maps; `--exif-only` leaves the `xmp` extractor out and compares with EXIF alone (for the corpus:
with expected.json, which the rules made from exiftool 12.57's EXIF reading).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metalake.extractors.registry import ExtractorRegistry, builtin_plugins
from metalake.extractors.testing import (
    as_json_fields,
    exiftool_fields,
    exiftool_path,
    same_fields,
)

SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
# Still-image formats: exiftool's MIME type is image/*, plus those with an application/ type.
STILL_IMAGE_TYPES = frozenset({"MIFF", "PSD", "PSB"})


def still_images(paths: Iterable[Path]) -> list[Path]:
    """The files exiftool identifies as still images (by MIME type), in a stable order."""
    paths = sorted(paths)
    executable = exiftool_path()
    if executable is None:
        raise SystemExit("exiftool is not installed (apt-get install libimage-exiftool-perl)")
    completed = subprocess.run(
        [executable, "-j", "-MIMEType", "-FileType", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    keep = {
        record["SourceFile"]
        for record in json.loads(completed.stdout or "[]")
        if str(record.get("MIMEType", "")).startswith("image/")
        or record.get("FileType") in STILL_IMAGE_TYPES
    }
    return [path for path in paths if str(path) in keep]


@dataclass(frozen=True)
class Comparison:
    agreed: int
    compared: int
    problems: list[str]
    """One line per disagreement."""
    cpu: dict[Path, float]
    """Seconds of CPU the registry took on each file: a crafted file that costs far more than
    its size shows at the top."""


def compare(
    registry: ExtractorRegistry,
    files: Mapping[Path, Mapping[str, Any]],
    root: Path,
    fields: Iterable[str],
) -> Comparison:
    wanted = frozenset(fields)
    agreed = compared = 0
    problems: list[str] = []
    cpu: dict[Path, float] = {}
    for path, want in files.items():
        started = time.process_time()
        result = registry.extract(path, filename=path.name)
        cpu[path] = time.process_time() - started
        got = {k: v for k, v in as_json_fields(result.values).items() if k in wanted}
        want = {k: v for k, v in want.items() if k in wanted}
        if "gps-clock" in result.sources.get("acquired_at", "") and "acquired_at" in got:
            got["acquired_at"] = str(got["acquired_at"])[:19]
        keys = set(want) | set(got)
        wrong = same_fields(want, got)
        compared += len(keys)
        agreed += len(keys) - len(wrong)
        name = path.relative_to(root) if path.is_relative_to(root) else path
        problems += [f"{name}: {problem}" for problem in wrong]
    return Comparison(agreed, compared, problems, cpu)


def _exiftool_version() -> str:
    completed = subprocess.run(
        [str(exiftool_path()), "-ver"], capture_output=True, text=True, check=False
    )
    return "exiftool " + completed.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("set", choices=["corpus", "pillow", "exiftool"])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--exif-only", action="store_true", help="without the xmp extractor")
    parser.add_argument("--quiet", action="store_true", help="the figure only, no misses")
    args = parser.parse_args(argv)
    plugins = builtin_plugins()
    if args.exif_only:
        plugins = [(name, plugin) for name, plugin in plugins if name != "xmp"]
    registry = ExtractorRegistry(plugins, timeout=None)
    fields = [
        "acquired_at",
        "acquired_by",
        "resolution_x",
        "resolution_y",
        "resolution_unit",
        "compression",
        "manufacturer",
        "software",
        "color_space",
        "latitude",
        "longitude",
        "altitude",
    ]
    if args.set == "corpus":
        root = args.folder or Path(os.environ.get("METALAKE_CORPUS", SHARED_CORPUS))
        manifest = json.loads((root / "expected.json").read_text())
        fields = manifest["fields"]
        files: dict[Path, Mapping[str, Any]] = {
            root / name: want for name, want in manifest["files"].items()
        }
        oracle = f"expected.json ({manifest.get('oracle', 'exiftool')})"
        if not args.exif_only:
            files = dict(exiftool_fields(files, xmp=True))
            oracle = _exiftool_version()
    else:
        if args.folder is None or not args.folder.is_dir():
            parser.error(f"{args.set} needs the folder of its test images")
        root = args.folder
        paths = [p for p in root.rglob("*") if p.is_file()]
        paths = still_images(paths) if args.set == "exiftool" else sorted(paths)
        files = dict(exiftool_fields(paths, xmp=not args.exif_only))
        oracle = (
            "exiftool "
            + subprocess.run(
                [str(exiftool_path()), "-ver"], capture_output=True, text=True, check=False
            ).stdout.strip()
        )
    # Pillow imports its format plugins on its first Image.open: not any file's own cost.
    registry.extract(__file__)
    found = compare(registry, files, root, fields)
    share = found.agreed / found.compared if found.compared else 1.0
    xmp = "EXIF only" if args.exif_only else "EXIF then XMP"
    print(
        f"{args.set}: {found.agreed}/{found.compared} values agree = {share:.1%} over "
        f"{len(files)} files (oracle {oracle}, {xmp})"
    )
    slowest = sorted(found.cpu, key=found.cpu.__getitem__, reverse=True)[:3]
    print(
        f"{args.set}: CPU per file {sum(found.cpu.values()) * 1000 / max(1, len(files)):.2f} ms; "
        "slowest: "
        + ", ".join(
            f"{path.name} {found.cpu[path] * 1000:.1f} ms ({path.stat().st_size:,} bytes)"
            for path in slowest
        )
    )
    if not args.quiet:
        for line in found.problems:
            print("  ", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
