"""`metalake extract` and `metalake plugins`, through the `metalake` command's own parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metalake.cli import build_parser
from metalake.extractors.testing import sample_exif, save_with_pillow


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


def test_extract_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = save_with_pillow(tmp_path / "photo.jpg", sample_exif())
    blank = tmp_path / "blank.txt"
    blank.write_text("nothing here")
    assert run(["extract", str(photo), str(blank), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["file"] == str(photo)
    assert first["metadata"]["acquired_at"] == "2021-06-01T12:34:56+02:00"
    assert first["metadata"]["latitude"] == pytest.approx(-33.8568)
    assert first["sources"]["latitude"] == "gps"
    assert first["sources"]["manufacturer"] == "pillow"
    assert second == {"file": str(blank), "metadata": {}, "sources": {}}


def test_extract_text_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = save_with_pillow(tmp_path / "photo.png", sample_exif())
    assert run(["extract", str(photo), str(tmp_path / "absent.jpg")]) == 1
    out, err = capsys.readouterr()
    assert "manufacturer" in out
    assert "Metalake Optics  [pillow]" in out
    assert "absent.jpg" in err


def test_plugins(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALAKE_PLUGINS", "pillow,exifread,gps")
    assert run(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["name"], row["order"]) for row in rows] == [
        ("pillow", 1),
        ("exifread", 2),
        ("gps", 3),
    ]
    assert all(row["version"] for row in rows)
    assert run(["plugins"]) == 0
    assert "pillow" in capsys.readouterr().out
