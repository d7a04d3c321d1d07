"""Bulk in, bulk out against a real server: folders, manifests, downloads by filter."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from metalake import Client, Data
from metalake.bulk import matches, walk_folder
from metalake.cli import EXIT_FAILED, EXIT_OK
from tests.conftest import ServerHandle
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


# Bulk downloads.

HOSTILE_NAMES = {
    # stored filename: where it lands, relative to the target
    "../../etc/passwd": "etc/passwd",
    "/abs/path.jpg": "abs/path.jpg",
    "..": None,  # nothing usable: the item's id
    "con.jpg": "_con.jpg",
    "dir/sub/file.jpg": "dir/sub/file.jpg",
    "ctl\x00nul\x07bel\x1b.jpg": "ctlnulbel.jpg",
    "..\\..\\windows\\win.ini": "windows/win.ini",
    "x" * 1000 + ".jpg": "x" * 196 + ".jpg",
    "A.jpg": "A.jpg",
    "a.jpg": "a~{id}.jpg",  # differs only by case: a collision on macOS and Windows
}


def store_with_names(handle: ServerHandle, client: Client, names: list[str]) -> list[Data]:
    """Items with exactly these filenames, sharing one uploaded content. The server refuses
    control characters in names today; older servers and other writers did not, so the test
    writes the catalog rows itself."""
    first = client.get_datalake().upload_data(
        write_jpeg(handle.data_dir.parent / "content.jpg"), {"reference": "hostile"}
    )
    template = asyncio.run_coroutine_threadsafe(
        handle.running.datalake.catalog.get("default", first.id), handle.loop
    ).result()
    for index, name in enumerate(names):
        moment = template.created_at + timedelta(seconds=index + 1)
        record = replace(
            template,
            id=str(uuid.uuid4()),
            filename=name,
            created_at=moment,
            updated_at=moment,
            request_id="",
        )
        asyncio.run_coroutine_threadsafe(
            handle.running.datalake.catalog.add(record), handle.loop
        ).result()
    client.get_datalake().delete_data(first.id)
    return list(client.get_datalake().list_data('reference = "hostile"'))


def test_hostile_names_never_leave_the_target(running_server: ServerHandle, tmp_path: Path) -> None:
    with Client(running_server.target) as client:
        items = store_with_names(running_server, client, list(HOSTILE_NAMES))
        assert [d.filename for d in items] == list(HOSTILE_NAMES)
        outside = tmp_path / "out"
        target = outside / "target"
        before = _outside(tmp_path, outside, running_server.data_dir)
        results = client.get_datalake().download_data(
            filter='reference = "hostile"', target=target, max_workers=3
        )
    assert [r.status for r in results] == ["downloaded"] * len(HOSTILE_NAMES)
    content = (tmp_path / "content.jpg").read_bytes()
    expected = {
        name: (where or items[i].id).replace("{id}", items[i].id)
        for i, (name, where) in enumerate(HOSTILE_NAMES.items())
    }
    for result in results:
        assert result.path == target / expected[result.data.filename]
        assert result.path.resolve().is_relative_to(target.resolve())
        assert result.path.read_bytes() == content
    written = sorted(p for p in outside.rglob("*") if p.is_file())
    assert written == sorted(r.path for r in results)  # and nothing else, anywhere
    assert _outside(tmp_path, outside, running_server.data_dir) == before
    assert not (target / ".metalake-partial").exists()


def _outside(root: Path, *excluded: Path) -> list[tuple[Path, int]]:
    """Every file under root but in the excluded folders, with its size."""
    return sorted(
        (p, p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and not any(p.is_relative_to(e) for e in excluded)
    )


def test_a_bulk_download_rerun_skips_complete_files_and_resumes_partial_ones(
    client: Client, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.bin").write_bytes(os.urandom(300_000 + i))
    client.get_datalake().upload_folder(root, {"reference": "dl"})
    target = tmp_path / "target"
    first = client.get_datalake().download_data(filter='reference = "dl"', target=target)
    assert [r.status for r in first] == ["downloaded"] * 4
    for result in first:
        assert result.path.read_bytes() == (root / result.data.filename).read_bytes()

    # An interrupted run: one file half there, one never written, one whose kept bytes rot.
    half, missing, rotten = first[0], first[1], first[2]
    partials = target / ".metalake-partial"
    partials.mkdir()
    for result, keep in ((half, 150_000), (rotten, 100_000)):
        name = hashlib.sha256(result.data.id.encode()).hexdigest()[:32] + ".part"
        body = result.path.read_bytes()[:keep]
        (partials / name).write_bytes(body if result is half else bytes(len(body)))
        result.path.unlink()
    missing.path.unlink()
    received: list[int] = []
    rerun = client.get_datalake().download_data(
        filter='reference = "dl"', target=target, progress=received.append
    )
    by_id = {r.data.id: r for r in rerun}
    assert by_id[first[3].data.id].status == "complete"
    assert by_id[half.data.id].status == "downloaded"
    assert by_id[half.data.id].resumed_from == 150_000
    assert by_id[missing.data.id].resumed_from == 0
    for result in rerun:
        assert result.path.read_bytes() == (root / result.data.filename).read_bytes()
    assert not partials.exists()


def test_cli_bulk_download_reports_and_fails_with_exit_code_1(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree(tmp_path / "photos")
    t = ("--target", server_target)
    assert run(capsys, "upload", str(root), "--include", "*.jpg", "-q", *t)[0] == EXIT_OK
    target = tmp_path / "target"
    argv = ("download", "--filter", 'filename = "sub/*"', "-o", str(target), *t)
    code, out, err = run(capsys, *argv, "--json")
    assert code == EXIT_OK
    lines = [json.loads(line) for line in out.splitlines()]
    assert sorted(line["path"] for line in lines) == [
        str(target / "sub/b.jpg"),
        str(target / "sub/deep/c.jpg"),
        str(target / "sub/raw/d.jpg"),
    ]
    assert {line["status"] for line in lines} == {"downloaded"}
    assert "3 items: 3 downloaded" in err
    (target / "sub/b.jpg").write_bytes(b"someone else's file")
    code, out, err = run(capsys, *argv)
    assert code == EXIT_FAILED
    assert "sub/b.jpg exists with other content: not overwritten" in err
    assert "3 items: 0 downloaded (0 B), 2 already complete, 1 failed" in err
    assert (target / "sub/b.jpg").read_bytes() == b"someone else's file"
    code, _, err = run(capsys, "download", "ID", "--filter", "size > 1", "-o", str(target), *t)
    assert code == 2
    code, _, err = run(capsys, "download", "--filter", "colour = 1", "-o", str(target), *t)
    assert code == 2
    assert "unknown field 'colour'" in err


def test_a_link_planted_in_the_target_does_not_carry_files_out(
    client: Client, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    (root / "dir/sub").mkdir(parents=True)
    write_jpeg(root / "dir/sub/file.jpg")
    write_jpeg(root / "top.jpg", color=3)
    client.get_datalake().upload_folder(root, {"reference": "link"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "dir").symlink_to(elsewhere, target_is_directory=True)
    results = client.get_datalake().download_data(filter='reference = "link"', target=target)
    by_name = {r.data.filename: r for r in results}
    assert by_name["top.jpg"].status == "downloaded"
    assert by_name["dir/sub/file.jpg"].status == "failed"
    assert "would be written outside" in str(by_name["dir/sub/file.jpg"].error)
    assert list(elsewhere.rglob("*")) == []


def test_download_data_takes_an_id_and_path_or_a_filter_and_target(tmp_path: Path) -> None:
    with Client("127.0.0.1:1") as client:
        datalake = client.get_datalake()
        with pytest.raises(ValueError, match="filter= and target="):
            datalake.download_data("ID", tmp_path, filter="size > 1")  # type: ignore[call-overload]
        with pytest.raises(ValueError, match="filter= and target="):
            datalake.download_data(filter="size > 1")  # type: ignore[call-overload]
