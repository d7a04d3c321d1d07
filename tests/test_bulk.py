"""Bulk in, bulk out against a real server: folders, manifests, downloads by filter."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from metalake import Client
from metalake.bulk import matches, walk_folder
from metalake.cli import EXIT_FAILED, EXIT_OK
from tests.test_cli import run
from tests.test_sdk import write_jpeg


@pytest.fixture
def client(server_target: str) -> Iterator[Client]:
    with Client(server_target) as client:
        yield client


def make_tree(root: Path) -> Path:
    """A folder as cameras and people leave them: nested, with hidden and unwanted files."""
    for relative, color in [
        ("a.jpg", 1),
        ("sub/b.jpg", 2),
        ("sub/deep/c.jpg", 3),
        ("sub/raw/d.jpg", 4),
        (".hidden.jpg", 5),
        (".git/e.jpg", 6),
        ("sub/.cache/f.jpg", 7),
    ]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        write_jpeg(root / relative, color=color)
    (root / "notes.txt").write_text("not a photo")
    return root


def test_folders_are_walked_recursively_without_hidden_files(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "photos")
    names = [name for _, name in walk_folder(root)]
    assert names == ["a.jpg", "notes.txt", "sub/b.jpg", "sub/deep/c.jpg", "sub/raw/d.jpg"]
    names = [name for _, name in walk_folder(root, include=["*.jpg"], exclude=["sub/raw/*"])]
    assert names == ["a.jpg", "sub/b.jpg", "sub/deep/c.jpg"]


@pytest.mark.parametrize(
    ("relative", "patterns", "expected"),
    [
        ("sub/b.jpg", ["*.jpg"], True),  # no "/": the name
        ("sub/b.JPG", ["*.jpg"], False),  # case-sensitive
        ("sub/b.jpg", ["b.*"], True),
        ("sub/b.jpg", ["sub/*"], True),  # with "/": the relative path
        ("sub/deep/c.jpg", ["sub/*"], True),  # "*" crosses "/"
        ("b.jpg", ["**/b.jpg"], True),  # "**/" also matches at the top
        ("sub/b.jpg", ["raw/*"], False),
    ],
)
def test_glob_patterns(relative: str, patterns: list[str], expected: bool) -> None:
    assert matches(relative, patterns) is expected


def test_upload_folder_stores_relative_names_and_reports_each_file(
    client: Client, tmp_path: Path
) -> None:
    root = make_tree(tmp_path / "photos")
    results = client.get_datalake().upload_folder(
        root, {"reference": "trip"}, include=["*.jpg"], exclude=["sub/raw/*"], tags=["field"]
    )
    assert [r.filename for r in results] == ["a.jpg", "sub/b.jpg", "sub/deep/c.jpg"]
    assert all(r.ok and not r.already_stored for r in results)
    assert [r.path.relative_to(root).as_posix() for r in results] == [r.filename for r in results]
    stored = list(client.get_datalake().list_data('reference = "trip" AND tags:"field"'))
    assert sorted(d.filename for d in stored) == ["a.jpg", "sub/b.jpg", "sub/deep/c.jpg"]


def test_a_rerun_after_an_interruption_sends_only_what_is_missing(
    server_target: str, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.bin").write_bytes(os.urandom(200_000 + i))
    lock, seen = threading.Lock(), []

    def cut_after_three_files(sent: int) -> None:
        with lock:
            seen.append(sent)
            if sum(seen) > 3 * 200_000 + 3:
                raise ConnectionError("the link dropped")

    with Client(server_target, max_workers=1) as client:
        datalake = client.get_datalake()
        first = datalake.upload_folder(root, progress=cut_after_three_files)
        stored_first = {r.filename: r.data.id for r in first if r.data is not None}
        assert 3 <= len(stored_first) < 6  # the interrupted run stored some files, not all
        assert not all(r.ok for r in first)

        rerun = datalake.upload_folder(root)
        assert all(r.ok for r in rerun)
        assert {r.filename for r in rerun if r.already_stored} == set(stored_first)
        for result in rerun:
            assert result.data is not None
            if result.filename in stored_first:
                assert result.data.id == stored_first[result.filename]  # the same item
        assert len(list(datalake.list_data())) == 6  # nothing stored twice
        assert all(r.already_stored for r in datalake.upload_folder(root))


def test_cli_uploads_a_folder_with_a_summary_and_reruns_idempotently(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree(tmp_path / "photos")
    argv = ("upload", str(root), "--include", "*.jpg", "--exclude", "sub/raw/*", "--json")
    code, out, err = run(capsys, *argv, "--meta", "reference=R", "--target", server_target)
    assert code == EXIT_OK
    names = [json.loads(line)["filename"] for line in out.splitlines()]
    assert names == ["a.jpg", "sub/b.jpg", "sub/deep/c.jpg"]
    assert "3 files: 3 uploaded" in err
    assert "0 already stored, 0 failed" in err
    code, out, err = run(capsys, *argv, "--meta", "reference=R", "--target", server_target)
    assert code == EXIT_OK
    assert "3 files: 0 uploaded (0 B), 3 already stored, 0 failed" in err
    code, out, _ = run(capsys, "ls", "-q", "--target", server_target)
    assert len(out.split()) == 3


def test_cli_a_failed_file_in_a_folder_is_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from metalake.server.config import Settings
    from tests.conftest import serving

    root = tmp_path / "photos"
    root.mkdir()
    write_jpeg(root / "small.jpg")
    (root / "big.bin").write_bytes(os.urandom(60_000))
    settings = Settings(data_dir=tmp_path / "limited", listen="127.0.0.1:0")
    with serving(replace(settings, max_file_size=50_000)) as handle:
        code, out, err = run(capsys, "upload", str(root), "--quiet", "--target", handle.target)
    assert code == EXIT_FAILED
    assert len(out.split()) == 1
    assert f"{root / 'big.bin'}: " in err
    assert "maximum file size" in err


def test_a_csv_manifest_gives_each_file_its_metadata(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree(tmp_path / "photos")
    (root / "manifest.csv").write_text(
        "path,latitude,acquired_at,tags,reference\n"
        'a.jpg,43.6,2021-04-11T15:47:53-05:00,"x; y",\n'
        "sub/b.jpg,,,,R-b\n"
    )
    code, out, err = run(
        capsys,
        "upload",
        str(root),
        "--include",
        "*.jpg",
        "--manifest",
        str(root / "manifest.csv"),
        "--meta",
        "weather=sun",
        "--meta",
        "reference=default",
        "--tag",
        "t",
        "--json",
        "--target",
        server_target,
    )
    assert code == EXIT_OK, err
    items = {item["filename"]: item for item in map(json.loads, out.splitlines())}
    assert sorted(items) == ["a.jpg", "sub/b.jpg", "sub/deep/c.jpg", "sub/raw/d.jpg"]
    assert items["a.jpg"]["metadata"] == {
        "latitude": 43.6,
        "acquired_at": "2021-04-11T15:47:53-05:00",
        "weather": "sun",
        "reference": "default",
    }
    assert items["a.jpg"]["tags"] == ["t", "x", "y"]
    assert items["sub/b.jpg"]["metadata"] == {"weather": "sun", "reference": "R-b"}
    # Files the manifest does not describe get only the command's --meta and --tag.
    assert items["sub/deep/c.jpg"]["metadata"] == {"weather": "sun", "reference": "default"}
    assert items["sub/deep/c.jpg"]["tags"] == ["t"]
    assert "4 files: 4 uploaded" in err


def test_a_jsonl_manifest_alone_names_the_files(client: Client, tmp_path: Path) -> None:
    make_tree(tmp_path / "photos")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        json.dumps({"path": "photos/a.jpg", "tags": ["x", "y"], "latitude": 1, "weather": None})
        + "\n\n"
        + json.dumps({"path": "photos/sub/b.jpg", "acquired_at": "2024-05-01T12:00:00"})
        + "\n"
    )
    results = client.get_datalake().upload_folder(manifest=manifest, tags=["t"])
    assert [r.filename for r in results] == ["photos/a.jpg", "photos/sub/b.jpg"]
    first, second = (r.data for r in results)
    assert first is not None
    assert second is not None
    assert (first.latitude, first.weather, first.tags) == (1.0, None, ["t", "x", "y"])
    assert second.acquired_at is not None
    assert second.acquired_at.tzinfo is None


def test_a_broken_manifest_is_refused_whole_naming_line_and_column(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree(tmp_path / "photos")
    manifest = root / "m.csv"
    manifest.write_text(
        "path,latitude,acquired_at,tags\n"
        "a.jpg,43.6,,\n"  # line 2: fine
        "sub/b.jpg,95,yesterday,\n"  # line 3: two bad cells
        "gone.jpg,,,\n"  # line 4: no such file
        "a.jpg,,,\n"  # line 5: described twice
        '"sub/deep/c.jpg",1,\n'  # line 6: too few cells
    )
    code, out, err = run(capsys, "upload", "--manifest", str(manifest), "--target", server_target)
    assert code == 2
    assert out == ""
    assert f"{manifest}: line 3, column 2 (latitude): latitude must be within [-90, 90]" in err
    assert f"{manifest}: line 3, column 3 (acquired_at): 'yesterday' is not an RFC 3339" in err
    assert f"{manifest}: line 4, column 1 (path): 'gone.jpg' does not exist" in err
    assert f"{manifest}: line 5, column 1 (path): 'a.jpg' is already described on line 2" in err
    assert f"{manifest}: line 6: has 3 cells; the header has 4" in err
    manifest.write_text("path,colour\na.jpg,red\n")
    code, _, err = run(capsys, "upload", str(root), "--manifest", str(manifest))
    assert code == 2
    assert f"{manifest}: line 1, column 2 (colour): unknown column 'colour'" in err
    jsonl = root / "m.jsonl"
    jsonl.write_text('{"path": "a.jpg", "tags": "x"}\n{"path": "a.jpg",\n{"path": 3}\n')
    code, _, err = run(capsys, "upload", "--manifest", str(jsonl), "--target", server_target)
    assert code == 2
    assert f"{jsonl}: line 1, column tags: tags must be a list of strings" in err
    assert f"{jsonl}: line 2: is not JSON" in err
    assert f"{jsonl}: line 3, column path: `path` is required" in err
    code, out, _ = run(capsys, "ls", "-q", "--target", server_target)
    assert out == ""  # nothing was sent
