"""The packages themselves: build the sdist and the wheel, install the thin one in a fresh venv, and
use it against a server run from the full install.

Slow (about 10 s: a build and a pip install), so marked; `make test` runs it. pip installs from
whatever index pip is configured with (on the development machine, a local mirror).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import metalake
from metalake import Client
from metalake.cli_server import INSTALL_HINT
from metalake.extractors.registry import ExtractorRegistry
from metalake.extractors.testing import sample_exif, save_with_pillow
from metalake.metadata import to_jsonable
from tests.serverprocess import ServerProcess

ROOT = Path(__file__).resolve().parents[1]

# What `pip install metalake` may bring: the SDK's dependencies and theirs, nothing of the server.
THIN_DISTRIBUTIONS = {
    "metalake",
    "grpcio",
    "grpcio-status",
    "protobuf",
    "googleapis-common-protos",
    "tqdm",
    "typing-extensions",  # grpcio's
}
SERVER_DISTRIBUTIONS = {
    "sqlalchemy",
    "alembic",
    "psycopg",
    "psycopg-binary",
    "boto3",
    "botocore",
    "s3transfer",
    "lark",
    "pillow",
    "pillow-heif",
    "pluggy",
    "exifread",
    "filetype",
    "prometheus-client",
    "python-json-logger",
    "grpcio-health-checking",
    "grpcio-reflection",
}

pytestmark = pytest.mark.slow


def normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from it (so the sdist is shown to be complete)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def thin(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install metalake-*.whl`, dependencies included: its bin/."""
    home = tmp_path_factory.mktemp("thin")
    venv.create(home, with_pip=False)
    python = home / "bin" / "python"
    (wheel,) = dist.glob("metalake-*.whl")
    # This environment's pip installs into the new one: no pip of its own to bootstrap.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
    )
    return home / "bin"


def run_thin(thin: Path, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "METALAKE_"))}
    env["METALAKE_NO_PROGRESS"] = "1"
    return subprocess.run(
        [str(thin / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=cwd,
    )


def test_the_sdist_and_the_wheel_hold_the_package_under_metalake_only(dist: Path) -> None:
    (sdist,) = dist.glob("metalake-*.tar.gz")
    (wheel,) = dist.glob("metalake-*-py3-none-any.whl")
    import tarfile
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["metalake"]
    tops = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith("-info")}
    assert tops == {"metalake"}
    for module in ("server/app.py", "extractors/registry.py", "plugin.py", "py.typed"):
        assert f"metalake/{module}" in names
    assert "metalake/server/migrations/script.py.mako" in names
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    assert any(m.endswith("/metalake/server/app.py") for m in members)


def test_the_thin_install_brings_no_server_dependency(thin: Path) -> None:
    listing = run_thin(
        thin,
        "python",
        "-c",
        "import importlib.metadata as m, json;"
        "print(json.dumps({d.metadata['Name']: [str(f) for f in d.files or ()]"
        " for d in m.distributions()}))",
    )
    assert listing.returncode == 0, listing.stderr
    installed = json.loads(listing.stdout)
    names = {normalized(name) for name in installed}
    assert names <= THIN_DISTRIBUTIONS, names - THIN_DISTRIBUTIONS
    assert not names & SERVER_DISTRIBUTIONS
    assert {"metalake", "grpcio", "protobuf", "tqdm"} <= names
    # metalake installs one top-level name, its own (and its console script).
    (files,) = [files for name, files in installed.items() if normalized(name) == "metalake"]
    tops = {f.split("/", 1)[0] for f in files if not f.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"metalake", ".."}  # ../../../bin/metalake
    assert {f for f in files if f.startswith("..")} == {"../../../bin/metalake"}


def test_a_thin_server_command_says_what_to_install(thin: Path, tmp_path: Path) -> None:
    for argv in (["serve"], ["migrate"], ["plugins"]):
        done = run_thin(thin, "metalake", *argv, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert INSTALL_HINT in lines[0]
    assert not (tmp_path / "metalake-data").exists()
    version = run_thin(thin, "metalake", "--version")
    assert version.returncode == 0
    assert version.stdout.startswith("metalake ")


def test_the_thin_cli_uploads_to_a_full_server_that_fills_the_metadata(
    thin: Path, tmp_path: Path
) -> None:
    photo = save_with_pillow(tmp_path / "photo.jpg", sample_exif())
    expected = ExtractorRegistry.from_environment().extract(photo, filename="photo.jpg")
    assert expected.values  # the sample has EXIF and GPS for the server to find
    with ServerProcess(tmp_path / "data", tmp_path / "server.log") as server:
        done = run_thin(
            thin,
            "metalake",
            "upload",
            str(photo),
            "--meta",
            "reference=THIN-1",
            "--fill-metadata",
            "--json",
            "--target",
            server.target,
        )
        assert done.returncode == 0, done.stderr
        item = json.loads(done.stdout)
        with Client(server.target) as client:
            stored = client.get_datalake().get_data(item["id"])
    # The full install's server says which version it runs, the one the thin CLI reports.
    assert f"version {metalake.__version__}" in server.log.read_text()
    assert run_thin(thin, "metalake", "--version").stdout.strip() == (
        f"metalake {metalake.__version__}"
    )
    assert item["metadata"] == {**to_jsonable(expected.values), "reference": "THIN-1"}
    assert item["metadata_sources"] == {**expected.sources, "reference": "client"}
    assert stored.to_json()["metadata"] == item["metadata"]
    assert stored.size == photo.stat().st_size
