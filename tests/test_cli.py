"""The metalake command against a real server: output, --json and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from metalake.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from metalake.server.config import Settings
from tests.conftest import serving
from tests.test_sdk import write_jpeg


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_upload_ls_get_download_rm_round_trip(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", server_target)
    photo = write_jpeg(tmp_path / "photo.jpg", make="Canon")
    code, out, _ = run(
        capsys,
        "upload",
        str(photo),
        "--meta",
        "reference=7NGOMI",
        "--meta",
        "latitude=43.6",
        "--meta",
        "acquired_at=2021-04-11T15:47:53-05:00",
        "--fill-metadata",
        "--tag",
        "field",
        "--json",
        *t,
    )
    assert code == EXIT_OK
    item = json.loads(out)
    assert item["filename"] == "photo.jpg"
    assert item["tags"] == ["field"]
    assert item["metadata"] == {
        "latitude": 43.6,
        "acquired_at": "2021-04-11T15:47:53-05:00",
        "manufacturer": "Canon",
        "reference": "7NGOMI",
    }
    assert item["metadata_sources"]["manufacturer"] == "pillow"

    code, out, _ = run(capsys, "ls", "--filter", 'reference = "7NGOMI"', "--json", *t)
    assert code == EXIT_OK
    assert [json.loads(line)["id"] for line in out.splitlines()] == [item["id"]]

    code, out, _ = run(capsys, "get", item["id"], *t)
    assert code == EXIT_OK
    assert item["id"] in out
    assert "photo.jpg" in out

    code, out, _ = run(capsys, "download", item["id"], "-o", str(tmp_path / "copy.jpg"), *t)
    assert code == EXIT_OK
    assert (tmp_path / "copy.jpg").read_bytes() == photo.read_bytes()

    code, _, _ = run(capsys, "rm", item["id"], *t)
    assert code == EXIT_OK
    code, _, err = run(capsys, "get", item["id"], *t)
    assert code == EXIT_FAILED
    assert "not found" in err


def test_naive_times_print_without_offset(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = write_jpeg(tmp_path / "a.jpg")
    code, out, _ = run(
        capsys,
        "upload",
        str(photo),
        "--meta",
        "acquired_at=2024-05-01T12:00:00",
        "--json",
        "--target",
        server_target,
    )
    assert code == EXIT_OK
    assert json.loads(out)["metadata"]["acquired_at"] == "2024-05-01T12:00:00"


@pytest.fixture
def small_limit_target(tmp_path: Path) -> Iterator[str]:
    """A server that refuses files over 50,000 bytes."""
    settings = Settings(data_dir=tmp_path / "limited", listen="127.0.0.1:0")
    with serving(replace(settings, max_file_size=50_000)) as handle:
        yield handle.target


def test_some_files_failing_is_exit_code_1(
    small_limit_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, last = write_jpeg(tmp_path / "first.jpg"), write_jpeg(tmp_path / "last.jpg", color=5)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(60_000))
    code, out, err = run(
        capsys, "upload", str(first), str(big), str(last), "--json", "--target", small_limit_target
    )
    assert code == EXIT_FAILED
    # The others are stored and printed, in input order; the refused one is named on stderr.
    assert [json.loads(line)["filename"] for line in out.splitlines()] == ["first.jpg", "last.jpg"]
    assert err.count("\n") == 1
    assert f"{big}: " in err
    assert "maximum file size" in err


def test_the_server_refusing_every_file_is_exit_code_1(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = write_jpeg(tmp_path / "a.jpg")
    code, out, err = run(
        capsys, "upload", str(photo), "--tag", "x" * 2000, "--target", server_target
    )
    assert code == EXIT_FAILED
    assert out == ""
    assert "header.tags[0]" in err


def test_quiet_prints_only_ids_for_scripts(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = [str(write_jpeg(tmp_path / f"{i}.jpg", color=i)) for i in range(3)]
    t = ("--target", server_target)
    code, out, err = run(capsys, "upload", *photos, "--meta", "reference=Q", "--quiet", *t)
    assert code == EXIT_OK
    ids = out.split()
    assert len(ids) == 3
    assert err == ""
    code, out, _ = run(capsys, "ls", "--filter", 'reference = "Q"', "-q", *t)
    assert sorted(out.split()) == sorted(ids)
    code, out, _ = run(capsys, "ls", "--limit", "2", "--quiet", *t)
    assert len(out.split()) == 2
    code, out, err = run(capsys, "rm", ids[0], "no-such-id", ids[1], *t)
    assert code == EXIT_FAILED  # one of three could not be deleted; the others were
    assert "no-such-id" in err
    code, out, _ = run(capsys, "ls", "-q", *t)
    assert out.split() == [ids[2]]


def test_get_and_download_json(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = write_jpeg(tmp_path / "a.jpg")
    t = ("--target", server_target)
    _, out, _ = run(capsys, "upload", str(photo), "--meta", "latitude=0", "--json", *t)
    uploaded = json.loads(out)
    code, out, _ = run(capsys, "get", uploaded["id"], "--json", *t)
    assert code == EXIT_OK
    item = json.loads(out)
    assert item == uploaded
    assert item["metadata"] == {"latitude": 0.0}  # the equator, not "absent"
    assert item["content_type"] == "image/jpeg"
    code, out, _ = run(capsys, "download", item["id"], "-o", str(tmp_path / "c.jpg"), "--json", *t)
    assert code == EXIT_OK
    assert json.loads(out) == {**item, "path": str(tmp_path / "c.jpg")}


def test_a_filter_the_server_cannot_parse_is_a_usage_error(
    server_target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "ls", "--filter", "colour = 1", "--target", server_target)
    assert code == EXIT_USAGE
    assert "unknown field 'colour'" in err
    assert out == ""


def test_an_unreachable_server_is_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "ls", "--target", "127.0.0.1:1")
    assert code == EXIT_FAILED
    assert err.startswith("metalake ls: ")


def test_the_target_comes_from_the_environment(
    server_target: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("METALAKE_TARGET", server_target)
    code, out, _ = run(capsys, "ls", "--json")
    assert (code, out) == (EXIT_OK, "")


def test_a_progress_bar_on_a_terminal_only(
    server_target: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    photo = str(write_jpeg(tmp_path / "a.jpg"))
    argv = ("upload", photo, "--json", "--target", server_target)
    code, out, err = run(capsys, *argv)  # captured stderr is not a terminal
    assert (code, err) == (EXIT_OK, "")
    monkeypatch.delenv("METALAKE_NO_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run(capsys, *argv)
    assert code == EXIT_OK
    assert "1/1 files" in err
    assert "100%" in err
    assert json.loads(out)["filename"] == "a.jpg"  # stdout stays clean JSON
    monkeypatch.setenv("METALAKE_NO_PROGRESS", "1")
    assert run(capsys, *argv)[2] == ""
    assert run(capsys, *argv[:-3], "--quiet", "--target", server_target)[2] == ""


def test_the_console_script_exits_with_main_s_code(tmp_path: Path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "metalake.cli", "upload", str(tmp_path / "missing.jpg")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == EXIT_USAGE
    assert "no such file" in missing.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["upload"],
        ["upload", "missing.jpg"],
        ["upload", "{photo}", "--meta", "colour=red"],
        ["upload", "{photo}", "--meta", "latitude=north"],
        ["upload", "{photo}", "--meta", "latitude=95"],
        ["upload", "{photo}", "--meta", "novalue"],
        ["upload", "{photo}", "--meta", "reference=a", "--meta", "reference=b"],
        ["upload", "{photo}", "--meta", "acquired_at=yesterday"],
        ["upload", "{photo}", "{fifo}"],
        ["ls", "--limit", "0"],
        ["ls", "--limit", "many"],
        ["get"],
        ["download", "ID"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_are_exit_code_2(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = write_jpeg(tmp_path / "p.jpg")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    raw = " ".join(argv)
    argv = [a.replace("{photo}", str(photo)).replace("{fifo}", str(fifo)) for a in argv]
    # Nothing listens on port 1: a usage error must be found before any call is tried.
    code, out, err = run(capsys, *argv, *(["--target", "127.0.0.1:1"] if len(argv) > 1 else []))
    assert code == EXIT_USAGE, err
    assert err
    assert out == ""
    if "{fifo}" in raw:  # folders are uploads now; what is neither is still refused
        assert f"not a file or folder: {fifo}" in err


def test_every_command_has_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("upload", "ls", "get", "download", "rm", "watch", "serve"):
        code, out, _ = run(capsys, command, "--help")
        assert code == EXIT_OK
        assert "example" in out
        assert f"metalake {command}" in out
        if command != "serve":
            assert "--json" in out
            assert "--target" in out


def test_tokens_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = str(tmp_path / "data")
    code, out, _ = run(
        capsys,
        "token",
        "create",
        "--org",
        "acme",
        "--role",
        "write",
        "--data-dir",
        data_dir,
        "--json",
    )
    assert code == EXIT_OK
    created = json.loads(out)
    assert created["token"].startswith("mlk_")
    code, out, _ = run(capsys, "token", "list", "--data-dir", data_dir, "--json")
    listed = json.loads(out)
    assert listed["id"] == created["id"]
    assert "token" not in listed  # secrets are never shown again
    code, _, _ = run(capsys, "token", "revoke", created["id"], "--data-dir", data_dir)
    assert code == EXIT_OK
    code, _, _ = run(capsys, "token", "revoke", created["id"], "--data-dir", data_dir)
    assert code == EXIT_FAILED


def test_rerunning_an_interrupted_upload_stores_nothing_twice(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = [write_jpeg(tmp_path / f"{i}.jpg", color=i) for i in range(3)]
    argv = [
        "upload",
        *map(str, photos),
        "--meta",
        "reference=R",
        "--json",
        "--target",
        server_target,
    ]
    # The first run stored two of the three files before it was interrupted.
    code, first, _ = run(capsys, *argv[:1], *map(str, photos[:2]), *argv[4:])
    assert code == EXIT_OK
    code, rerun, _ = run(capsys, *argv)
    assert code == EXIT_OK
    before = [json.loads(line)["id"] for line in first.splitlines()]
    after = [json.loads(line)["id"] for line in rerun.splitlines()]
    assert after[:2] == before  # the same items, not copies
    code, listed, _ = run(capsys, "ls", "--json", "--target", server_target)
    assert len(listed.splitlines()) == 3
