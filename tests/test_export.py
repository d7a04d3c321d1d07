"""Exports against a real server: every field, typed, in CSV, JSON Lines and Parquet."""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metalake import FIELDS, Client
from metalake.cli import EXIT_OK, EXIT_USAGE
from metalake.export import BASE_COLUMNS
from tests.test_cli import run
from tests.test_sdk import ALL_FIELDS, write_jpeg


@pytest.fixture
def stored(server_target: str, tmp_path: Path) -> list[str]:
    """Three items: every field (acquired_at at +09:00), a naive time, nothing at all."""
    with Client(server_target) as client:
        datalake = client.get_datalake()
        full = datalake.upload_data(
            write_jpeg(tmp_path / "full.jpg"), ALL_FIELDS, tags=["b", "a"], labels={"rig": "A"}
        )
        naive = datalake.upload_data(
            write_jpeg(tmp_path / "naive.jpg", color=2),
            {"acquired_at": datetime(2024, 5, 1, 12, 0), "reference": "N"},
        )
        empty = datalake.upload_data(write_jpeg(tmp_path / "empty.jpg", color=3))
    return [full.id, naive.id, empty.id]


def test_jsonl_export_has_every_field_with_the_offset_kept(
    server_target: str, stored: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all.jsonl"
    code, _, err = run(capsys, "export", "-o", str(out), "--target", server_target)
    assert code == EXIT_OK
    assert "exported 3 items" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == stored  # oldest first
    assert all(list(r) == list(BASE_COLUMNS) for r in rows)
    full, naive, empty = rows
    assert full["acquired_at"] == "2021-04-11T15:47:53.250000+09:00"
    assert full["acquired_at_utc_offset"] == 9 * 3600
    assert {f: full[f] for f in FIELDS if f != "acquired_at"} == {
        f: v for f, v in ALL_FIELDS.items() if f != "acquired_at"
    }
    assert (full["tags"], full["labels"], full["filename"]) == (
        ["a", "b"],
        {"rig": "A"},
        "full.jpg",
    )
    assert full["created_at"].endswith("Z")
    assert (naive["acquired_at"], naive["acquired_at_utc_offset"]) == ("2024-05-01T12:00:00", None)
    assert all(empty[f] is None for f in FIELDS)
    assert "metadata_sources" not in full


def test_csv_export_with_a_filter_and_provenance(
    server_target: str, stored: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "some.csv"
    with Client(server_target) as client:
        count = client.get_datalake().export(out, "acquired_at:*", provenance=True)
    assert count == 2
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == stored[:2]
    full, naive = rows
    assert full["tags"] == "a;b"
    assert json.loads(full["labels"]) == {"rig": "A"}
    assert json.loads(full["metadata_sources"])["latitude"] == "client"
    assert full["latitude"] == "-12.5"
    assert full["acquired_at"] == "2021-04-11T15:47:53.250000+09:00"
    assert (naive["latitude"], naive["labels"], naive["acquired_at_utc_offset"]) == ("", "{}", "")


def test_parquet_export_has_typed_columns(
    server_target: str, stored: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "all.parquet"
    with Client(server_target) as client:
        assert client.get_datalake().export(out) == 3
    table = pq.read_table(out)
    schema = table.schema
    assert schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("acquired_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("latitude").type == pa.float64()
    assert schema.field("size").type == pa.int64()
    assert schema.field("acquired_at_utc_offset").type == pa.int32()
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("labels").type == pa.map_(pa.string(), pa.string())
    rows = table.to_pylist()
    full, naive, empty = rows
    zone = timezone(timedelta(hours=9))
    assert full["acquired_at"] == ALL_FIELDS["acquired_at"].astimezone(UTC)
    assert full["acquired_at"].astimezone(zone) == ALL_FIELDS["acquired_at"]
    assert full["acquired_at_utc_offset"] == 9 * 3600
    assert full["labels"] == [("rig", "A")]
    assert full["tags"] == ["a", "b"]
    assert naive["acquired_at"] == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)  # wall time as UTC
    assert naive["acquired_at_utc_offset"] is None
    assert empty["latitude"] is None
    assert [r["id"] for r in rows] == stored


def test_bad_exports_are_refused_and_leave_nothing(
    server_target: str,
    stored: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = ("--target", server_target)
    code, _, err = run(capsys, "export", "-o", str(tmp_path / "x.txt"), *t)
    assert code == EXIT_USAGE
    assert "--format csv|jsonl|parquet" in err
    code, _, err = run(
        capsys, "export", "--filter", "colour = 1", "-o", str(tmp_path / "x.csv"), *t
    )
    assert code == EXIT_USAGE
    assert "unknown field 'colour'" in err
    assert list(tmp_path.glob("*x.csv*")) == []  # neither the file nor its partial
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as where the extra is not installed
    code, _, err = run(capsys, "export", "-o", str(tmp_path / "x.parquet"), *t)
    assert code == EXIT_USAGE
    assert "pip install 'metalake[export]'" in err
    assert not (tmp_path / "x.parquet").exists()


def test_new_commands_have_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("export", "import", "download"):
        code, out, _ = run(capsys, command, "--help")
        assert code == EXIT_OK
        assert "example" in out
        assert f"metalake {command}" in out
        assert "--target" in out
