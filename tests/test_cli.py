"""The metalake command against a real server: output, --json and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metalake.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
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


def test_some_files_failing_is_exit_code_1(
    server_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_jpeg(tmp_path / "good.jpg")
    empty_name = tmp_path / "ok.bin"
    empty_name.write_bytes(b"")
    # The server refuses the second file (a tag too long); the first is stored.
    code, out, err = run(capsys, "upload", str(good), "--json", "--target", server_target)
    assert code == EXIT_OK
    code, out, err = run(
        capsys,
        "upload",
        str(good),
        str(empty_name),
        "--tag",
        "x" * 2000,
        "--json",
        "--target",
        server_target,
    )
    assert code == EXIT_FAILED
    assert "header.tags[0]" in err
    assert out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["upload"],
        ["upload", "missing.jpg"],
        ["upload", "{photo}", "--meta", "colour=red"],
        ["upload", "{photo}", "--meta", "latitude=north"],
        ["upload", "{photo}", "--meta", "latitude=95"],
        ["upload", "{photo}", "--meta", "novalue"],
        ["frobnicate"],
    ],
)
def test_usage_errors_are_exit_code_2(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = write_jpeg(tmp_path / "p.jpg")
    argv = [a.replace("{photo}", str(photo)) for a in argv]
    code, _, err = run(capsys, *argv, *(["--target", "127.0.0.1:1"] if len(argv) > 1 else []))
    assert code == EXIT_USAGE, err
    assert err


def test_every_command_has_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("upload", "ls", "get", "download", "rm", "watch", "serve"):
        code, out, _ = run(capsys, command, "--help")
        assert code == EXIT_OK
        assert "example" in out


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
