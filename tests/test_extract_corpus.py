"""Agreement with exiftool on real camera files (../shared/corpus, or $METALAKE_CORPUS)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from metalake.extractors.registry import ExtractorRegistry, builtin_plugins
from metalake.extractors.testing import (
    as_json_fields,
    exiftool_fields,
    exiftool_path,
    same_fields,
)

CORPUS = Path(
    os.environ.get(
        "METALAKE_CORPUS", Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
    )
)
REQUIRED_AGREEMENT = 0.995


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    manifest = CORPUS / "expected.json"
    if not manifest.is_file():
        pytest.skip(f"no corpus at {CORPUS} (set METALAKE_CORPUS to a folder with expected.json)")
    data: dict[str, Any] = json.loads(manifest.read_text())
    return data


def test_builtins_agree_with_exiftool_on_the_corpus(expected: dict[str, Any]) -> None:
    # expected.json holds what the rules read from EXIF: the EXIF extractors answer for it (the
    # xmp extractor's values are checked against exiftool's XMP reading below).
    registry = ExtractorRegistry([p for p in builtin_plugins() if p[0] != "xmp"])
    fields: list[str] = expected["fields"]
    compared = agreed = 0
    invented: list[str] = []
    disagreements: list[str] = []
    derived: list[str] = []
    for name, want in expected["files"].items():
        result = registry.extract(CORPUS / name, filename=name)
        got = as_json_fields(result.values)
        got = {field: value for field, value in got.items() if field in fields}
        if result.sources.get("acquired_at", "").endswith("+gps-clock"):
            # The offset is derived, not recorded: expected.json says what the file records, so
            # the wall time is what compares (test_gps_clock checks the offsets).
            recorded = want.get("acquired_at", "")[19:]
            assert recorded == "", f"{name}: an offset from the GPS clock where one is recorded"
            got["acquired_at"] = got["acquired_at"][:19]
            derived.append(name)
        problems = same_fields(want, got)
        invented += [f"{name}: {field}" for field in got if field not in want]
        disagreements += [f"{name}: {problem}" for problem in problems]
        # Every field of every file counts, absent-and-absent included.
        compared += len(fields)
        agreed += len(fields) - len(problems)
    present = sum(len(want) for want in expected["files"].values())
    wrong_present = len(disagreements) - len(invented)
    print(
        f"\ncorpus agreement: {agreed}/{compared} field values = {agreed / compared:.4%} "
        f"over {len(expected['files'])} files; on the {present} values exiftool reads: "
        f"{present - wrong_present}/{present} = {(present - wrong_present) / present:.4%}; "
        f"invented: {len(invented)}; offsets from the GPS clock: {len(derived)}"
    )
    for line in disagreements:
        print("  ", line)
    assert invented == [], "values exiftool does not read"
    assert (present - wrong_present) / present >= REQUIRED_AGREEMENT
    assert agreed / compared >= REQUIRED_AGREEMENT


@pytest.mark.skipif(exiftool_path() is None, reason="exiftool is the oracle of the XMP values")
def test_every_builtin_agrees_with_exiftool_on_the_corpus_xmp_included(
    expected: dict[str, Any],
) -> None:
    """All built-ins, xmp included, against exiftool run here (EXIF, then XMP for the fields
    EXIF leaves empty): nothing invented, every value agreed."""
    registry = ExtractorRegistry(builtin_plugins())
    paths = [CORPUS / name for name in expected["files"]]
    oracle = exiftool_fields(paths, xmp=True)
    problems: list[str] = []
    from_xmp = 0
    for path in paths:
        result = registry.extract(path, filename=path.name)
        got = as_json_fields(result.values)
        if result.sources.get("acquired_at", "").endswith("+gps-clock"):
            got["acquired_at"] = got["acquired_at"][:19]
        from_xmp += sum(source == "xmp" for source in result.sources.values())
        problems += [f"{path.name}: {problem}" for problem in same_fields(oracle[path], got)]
    assert problems == []
    assert from_xmp > 0  # the corpus has XMP-only values: the xmp extractor was exercised
