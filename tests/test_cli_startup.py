"""The command line starts without the server: what client commands load, --version, and what a
thin install (no `server` extra) says when a server command runs."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import metalake
from metalake.cli import DEFAULT_TARGET, main
from metalake.cli_server import INSTALL_HINT, SERVER_IMPORTS, server_command

ROOT = Path(__file__).resolve().parents[1]
# What the server install brings and the client commands must not load.
SERVER_MODULES = ("metalake.server", "metalake.extractors", "sqlalchemy", "alembic", "lark")
HEAVY_MODULES = (
    *SERVER_MODULES,
    "PIL",
    "boto3",
    "botocore",
    "pluggy",
    "psycopg",
    "prometheus_client",
    "pyarrow",  # the `export` extra: loaded by a Parquet export only
)

PROBE = """
import json, sys
from metalake.cli import build_parser
parser = build_parser()
after_build = sorted(sys.modules)
for argv in {argvs!r}:
    parser.parse_args(argv)
print(json.dumps({{"build": after_build, "parse": sorted(sys.modules)}}))
"""


def loaded(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_client_commands_load_no_server_module(tmp_path: Path) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"\xff\xd8")
    argvs = [
        ["upload", str(photo), "--fill-metadata", "--meta", "reference=x"],
        ["ls", "--filter", 'reference = "x"', "--json"],
        ["get", "ID"],
        ["download", "ID", "-o", str(tmp_path)],
        ["rm", "ID"],
        ["watch"],
        ["upload", str(tmp_path), "--include", "*.jpg", "--label", "rig=A"],
        ["download", "--filter", 'labels.rig = "A"', "-o", str(tmp_path)],
        ["export", "--filter", 'labels.rig = "A"', "-o", str(tmp_path / "x.parquet")],
        ["import", "s3://bucket/prefix", "--filter-ext", "jpg", "--fill-metadata"],
    ]
    probe = subprocess.run(
        [sys.executable, "-c", PROBE.format(argvs=argvs)],
        capture_output=True,
        text=True,
        check=True,
    )
    modules = json.loads(probe.stdout)
    assert loaded(modules["build"], HEAVY_MODULES) == []
    assert loaded(modules["parse"], HEAVY_MODULES) == []
    # Not even gRPC is needed to build the parser and check the arguments.
    assert loaded(modules["parse"], ("grpc",)) == []


SDK_MODULES = (
    "metalake",
    "metalake.client",
    "metalake.errors",
    "metalake.metadata",
    "metalake.cli",
    "metalake.v1.datalake_pb2",
    "metalake.v1.datalake_pb2_grpc",
)


def test_the_sdk_imports_no_server_dependency() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {SDK_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "from metalake import Client, MetalakeError\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = json.loads(done.stdout)
    # grpc's own __init__ imports grpc_health and grpc_reflection when they are installed.
    server_only = sorted(SERVER_IMPORTS - {"grpc_health", "grpc_reflection"})
    assert loaded(modules, (*HEAVY_MODULES, *server_only)) == []
    assert "grpc" in modules  # the SDK itself did load


def test_help_and_version_load_no_server_module() -> None:
    for argv in (["--help"], ["--version"], ["serve", "--help"], ["token", "create", "--help"]):
        code = (
            "import json, sys\nfrom metalake.cli import main\n"
            f"code = main({argv!r})\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
            "sys.exit(code)"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert loaded(json.loads(done.stderr.splitlines()[-1]), HEAVY_MODULES) == [], argv


def test_server_commands_keep_their_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    assert "--catalog-url" in capsys.readouterr().out
    assert main(["gc", "--help"]) == 0
    assert "--orphan-age" in capsys.readouterr().out
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    for command in ("serve", "migrate", "gc", "token", "org", "extract", "plugins", "upload"):
        assert re.search(rf"^\s+{command}\s", listing, flags=re.MULTILINE), command


def test_version_has_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"metalake {metalake.__version__}"
    # The installed distribution's version is read from the same place.
    assert importlib.metadata.version("metalake") == metalake.__version__
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    assert "version" not in pyproject["project"]


def test_the_default_target_is_the_sdk_s() -> None:
    from metalake.client import DEFAULT_TARGET as SDK_DEFAULT

    assert DEFAULT_TARGET == SDK_DEFAULT
    upload_help = subprocess.run(
        [sys.executable, "-m", "metalake.cli", "upload", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert SDK_DEFAULT in upload_help


BLOCKED_SERVE = """
import sys
sys.modules["{blocked}"] = None  # as if the distribution were not installed
from metalake.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize(
    ("blocked", "argv"),
    [
        ("sqlalchemy", ["serve"]),
        ("sqlalchemy", ["migrate"]),
        ("sqlalchemy", ["token", "list"]),
        ("sqlalchemy", ["org", "show", "acme"]),
        ("pluggy", ["plugins"]),
        ("PIL", ["extract", "x.jpg"]),
        ("boto3", ["gc"]),
    ],
)
def test_a_server_command_without_the_server_says_what_to_install(
    blocked: str, argv: list[str], tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_SERVE.format(blocked=blocked, argv=argv)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert INSTALL_HINT in lines[0]
    assert lines[0].startswith(f"metalake {argv[0]}: ")
    assert blocked in lines[0]


def test_python_m_metalake_server_without_the_server_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import runpy, sys\n"
        "sys.modules['sqlalchemy'] = None\n"
        "runpy.run_module('metalake.server', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"python -m metalake.server: this command needs the server install (sqlalchemy is "
        f"missing): {INSTALL_HINT}"
    ]


def test_a_genuine_import_bug_is_not_disguised_as_a_missing_install() -> None:
    import argparse

    broken = server_command("metalake.server.no_such_module:run")
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        broken(argparse.Namespace())


def test_server_imports_cover_the_server_extra() -> None:
    """Every top-level module of a distribution the `server` extra brings is recognised as a
    server dependency, so a thin install names it instead of printing a traceback."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = pyproject["project"]["optional-dependencies"]["server"]
    names = {re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0] for requirement in requirements}
    provided = importlib.metadata.packages_distributions()
    for name in names:
        modules = {
            module
            for module, distributions in provided.items()
            if any(d.lower().replace("_", "-") == name.lower() for d in distributions)
            and not module.startswith("_")
        }
        assert modules, f"{name} is not installed in the test environment"
        assert modules <= SERVER_IMPORTS, f"{name} provides {sorted(modules)}"
    base = {
        re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0] for r in pyproject["project"]["dependencies"]
    }
    assert base <= {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos", "tqdm"}
