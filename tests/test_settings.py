"""Settings: one declaration per variable, one loader, and code and docs that agree with both."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from metalake import cli
from metalake.server.config import (
    ELSEWHERE,
    S3_VARIABLES,
    TABLE_END,
    TABLE_START,
    SettingError,
    Settings,
    settings_tables,
    variables,
)

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = ROOT / "docs" / "operations.md"
DECLARED = {variable.name: variable for variable in variables()}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No METALAKE_* variable of the test run (the Makefile exports METALAKE_LISTEN) leaks in."""
    for name in DECLARED:
        monkeypatch.delenv(name, raising=False)


def test_without_variables_the_settings_are_the_defaults() -> None:
    assert Settings.from_env() == Settings()


def test_every_setting_has_its_own_variable() -> None:
    names = [variable.name for variable in variables()]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"METALAKE_[A-Z0-9_]+", name) for name in names)
    assert len([v for v in variables() if v.read_by is None]) == len(fields(Settings))


def test_each_variable_is_parsed_by_its_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALAKE_DATA_DIR", "/srv/metalake")
    monkeypatch.setenv("METALAKE_WORKERS", " 3 ")
    monkeypatch.setenv("METALAKE_MAX_FILE_SIZE", "1000000")
    monkeypatch.setenv("METALAKE_UPLOAD_TTL", "0.5")
    monkeypatch.setenv("METALAKE_HEALTH_INTERVAL", "1e-1")
    monkeypatch.setenv("METALAKE_TLS_CERT", "cert.pem")
    monkeypatch.setenv("METALAKE_CATALOG_URL", "postgresql://db/metalake")
    monkeypatch.setenv("METALAKE_FILL_TIMEOUT", "2.5")
    settings = Settings.from_env()
    assert settings.data_dir == Path("/srv/metalake")
    assert settings.workers == 3
    assert settings.max_file_size == 1_000_000
    assert settings.upload_ttl == 0.5
    assert settings.health_interval == 0.1
    assert settings.tls_cert == Path("cert.pem")
    assert settings.catalog_url == "postgresql://db/metalake"
    assert settings.fill_timeout == 2.5


def test_every_variable_takes_its_own_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every field's type has a parser, and its default is within its own bounds."""
    set_any = False
    for settings_field, variable in zip(fields(Settings), variables(), strict=False):
        value = settings_field.default
        if value is not None:
            monkeypatch.setenv(variable.name, str(value).lower())
            set_any = True
    assert set_any
    assert Settings.from_env() == Settings()


@pytest.mark.parametrize("word", ["1", "true", "YES", "on"])
def test_on_words_turn_a_switch_on(monkeypatch: pytest.MonkeyPatch, word: str) -> None:
    monkeypatch.setenv("METALAKE_MIGRATE", word)
    monkeypatch.setenv("METALAKE_INSECURE_NO_AUTH", word)
    settings = Settings.from_env()
    assert settings.migrate
    assert settings.insecure_no_auth


@pytest.mark.parametrize("word", ["0", "false", "No", "off"])
def test_off_words_turn_a_switch_off(monkeypatch: pytest.MonkeyPatch, word: str) -> None:
    monkeypatch.setenv("METALAKE_HASH_IMAGES", word)
    monkeypatch.setenv("METALAKE_MIGRATE", word)
    settings = Settings.from_env()
    assert not settings.hash_images
    assert not settings.migrate


def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DECLARED:
        monkeypatch.setenv(name, "")
    assert Settings.from_env() == Settings()


def test_flags_win_over_variables_which_win_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALAKE_LISTEN", "0.0.0.0:1")
    monkeypatch.setenv("METALAKE_WORKERS", "2")
    monkeypatch.setenv("METALAKE_INSECURE_NO_AUTH", "true")
    settings = Settings.from_env(listen="127.0.0.1:2")
    assert settings.listen == "127.0.0.1:2"
    assert settings.workers == 2
    assert settings.insecure_no_auth
    # The flag only turns it on: not giving it leaves the variable's choice.
    assert Settings.from_env(insecure_no_auth=False).insecure_no_auth
    assert Settings.from_env(workers=4, data_dir="d").workers == 4
    assert Settings.from_env(data_dir="d").data_dir == Path("d")
    # A flag replaces the variable, which is then not read at all.
    monkeypatch.setenv("METALAKE_WORKERS", "abc")
    assert Settings.from_env(workers=2).workers == 2


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("METALAKE_WORKERS", "abc", "METALAKE_WORKERS must be a whole number >= 1, got 'abc'"),
        ("METALAKE_WORKERS", "0", "METALAKE_WORKERS must be a whole number >= 1, got '0'"),
        ("METALAKE_UPLOAD_TTL", "-1", "METALAKE_UPLOAD_TTL must be a number >= 0, got '-1'"),
        ("METALAKE_GC_INTERVAL", "0", "METALAKE_GC_INTERVAL must be a number > 0, got '0'"),
        ("METALAKE_ORPHAN_AGE", "nan", "METALAKE_ORPHAN_AGE must be a number >= 0, got 'nan'"),
        ("METALAKE_MAX_FILE_SIZE", "1.5", "METALAKE_MAX_FILE_SIZE must be a whole number >= 0"),
        ("METALAKE_DOWNLOAD_CHUNK_SIZE", "8388608", ">= 1024 and <= 4128768, got '8388608'"),
        (
            "METALAKE_HASH_IMAGES",
            "maybe",
            "METALAKE_HASH_IMAGES must be true or false (1/true/yes/on or 0/false/no/off), "
            "got 'maybe'",
        ),
        ("METALAKE_EXTRACT_TIMEOUT", "abc", "METALAKE_EXTRACT_TIMEOUT must be a number"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingError) as refused:
        Settings.from_env()
    assert expected in str(refused.value)
    assert isinstance(refused.value, ValueError)


def test_every_bad_value_is_named_in_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALAKE_WORKERS", "abc")
    monkeypatch.setenv("METALAKE_HASH_IMAGES", "maybe")
    with pytest.raises(SettingError) as refused:
        Settings.from_env()
    assert "METALAKE_WORKERS" in str(refused.value)
    assert "METALAKE_HASH_IMAGES" in str(refused.value)


def test_a_bad_flag_is_refused_naming_the_flag() -> None:
    with pytest.raises(SettingError, match="--workers must be a whole number >= 1, got 0"):
        Settings.from_env(workers=0)


def test_the_http_face_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for off in ("off", "OFF", "0", "false", "no"):
        monkeypatch.setenv("METALAKE_HTTP_LISTEN", off)
        assert Settings.from_env().http_listen is None


def test_metalake_serve_exits_with_the_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("METALAKE_DATA_DIR", str(tmp_path / "never"))
    monkeypatch.setenv("METALAKE_UPLOAD_TTL", "-1")
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err == (
        "metalake serve: METALAKE_UPLOAD_TTL must be a number >= 0, got '-1'\n"
    )
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "command", [["gc"], ["migrate"], ["org", "show", "acme"], ["token", "list"]]
)
def test_operator_commands_exit_with_the_error_too(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: list[str],
) -> None:
    monkeypatch.setenv("METALAKE_HASH_IMAGES", "maybe")
    assert cli.main([*command, "--data-dir", str(tmp_path / "never")]) == 2
    assert capsys.readouterr().err == (
        f"metalake {command[0]}: METALAKE_HASH_IMAGES must be true or false "
        "(1/true/yes/on or 0/false/no/off), got 'maybe'\n"
    )
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("command", [["-m", "metalake.cli", "serve"], ["-m", "metalake.server"]])
def test_a_server_process_exits_with_the_error(command: list[str], tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "METALAKE_DATA_DIR": str(tmp_path / "never")}
    env |= {"METALAKE_WORKERS": "abc", "METALAKE_HASH_IMAGES": "maybe"}
    done = subprocess.run(
        [sys.executable, *command], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "METALAKE_WORKERS must be a whole number >= 1, got 'abc'" in lines[0]
    assert "METALAKE_HASH_IMAGES must be true or false" in lines[0]


def test_the_serve_flags_are_the_declared_ones() -> None:
    """Each declared flag is an option of `metalake serve` (declared in metalake.cli_server, which
    cannot import the server) whose help names its variable, and a keyword of Settings.from_env."""
    parser = cli.build_parser()
    serve = next(
        choice
        for action in parser._actions
        if action.choices and isinstance(action.choices, dict)
        for name, choice in action.choices.items()
        if name == "serve"
    )
    options = {o: a for a in serve._actions for o in a.option_strings if o.startswith("--")}
    keywords = set(inspect.signature(Settings.from_env).parameters)
    flagged = {v.flag: v.name for v in variables() if v.flag}
    assert set(flagged) == set(options) - {"--help"}
    for flag, name in flagged.items():
        assert name in (options[flag].help or ""), f"{flag}'s help does not name {name}"
        assert flag.removeprefix("--").replace("-", "_") in keywords


def _generated_block() -> str:
    text = OPERATIONS.read_text()
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    assert 0 <= start < end, "docs/operations.md lost the markers of its generated settings"
    return text[start : end + len(TABLE_END)]


def test_the_docs_tables_are_generated_from_the_declaration() -> None:
    assert _generated_block() == settings_tables(), (
        "docs/operations.md's settings tables are stale: run `make settings-table`"
    )


def test_every_declared_variable_is_documented_with_its_default() -> None:
    rows = {}
    for line in _generated_block().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        named = re.fullmatch(r"`(METALAKE_[A-Z0-9_]+)`", cells[1]) if len(cells) > 1 else None
        if named:
            rows[named.group(1)] = cells
    assert set(rows) == set(DECLARED)
    for name, cells in rows.items():
        assert cells[-1], name
        assert cells[-1] == DECLARED[name].default, name
    # Defaults as the code has them, not as someone remembered them.
    assert rows["METALAKE_UPLOAD_TTL"][-1] == "86400"
    assert rows["METALAKE_EXTRACT_TIMEOUT"][-1] == "5"
    assert rows["METALAKE_FILL_TIMEOUT"][-1] == "10"
    from metalake.client import DEFAULT_TARGET

    assert DEFAULT_TARGET in rows["METALAKE_TARGET"][-1]


def test_no_undeclared_variable_is_documented() -> None:
    """Names in docs/ (benchmark knobs and `PREFIX_*` families aside) are declared ones."""
    for page in (ROOT / "docs").rglob("*.md"):
        text = re.sub(r"METALAKE_[A-Z_]+_\*", "", page.read_text())
        for name in set(re.findall(r"METALAKE_[A-Z0-9_]*[A-Z0-9]", text)):
            if not name.startswith("METALAKE_BENCH_"):
                assert name in DECLARED, f"{page.name} documents {name}, which nothing declares"


def _python_sources() -> list[Path]:
    found = []
    for folder in ("server", "extractors", "metalake"):
        for path in (ROOT / folder).rglob("*.py"):
            if not path.is_symlink() and "v1" not in path.relative_to(ROOT).parts:
                found.append(path)
    return found


READ = re.compile(r"""(?:environ|env|getenv)\s*(?:\.get\(|\[|\()\s*["'](METALAKE_[A-Z0-9_]+)["']""")


def test_every_variable_the_code_reads_is_declared() -> None:
    read: dict[str, Path] = {}
    named: set[str] = set()
    for path in _python_sources():
        text = path.read_text()
        read |= {name: path for name in READ.findall(text)}
        # Names kept in constants and read through them (registry, observability).
        named |= set(re.findall(r"""["'](METALAKE_[A-Z0-9_]+)["']""", text))
    assert {"METALAKE_NO_PROGRESS", "METALAKE_TARGET"} <= set(read), "the scan is broken"
    undeclared = {name: str(path) for name, path in read.items() if name not in DECLARED}
    assert undeclared == {}
    assert sorted(named - set(DECLARED)) == []


def test_variables_read_elsewhere_are_read_where_declared() -> None:
    for variable in ELSEWHERE:
        assert variable.read_by is not None
        module = variable.read_by.removeprefix("metalake.")
        module = module if module.startswith(("server.", "extractors.")) else variable.read_by
        path = ROOT / (module.replace(".", "/") + ".py")
        assert variable.name in path.read_text(), f"{path} does not read {variable.name}"


def test_the_s3_variables_are_the_ones_read_and_documented() -> None:
    read = set()
    for path in (ROOT / "server").rglob("*.py"):
        read |= set(re.findall(r"""["'](AWS_[A-Z0-9_]+)["']""", path.read_text()))
    assert read == set(S3_VARIABLES)
    text = OPERATIONS.read_text()
    section = text[text.index("## S3 object storage") :]
    table = section[section.index("| variable | meaning |") :].split("\n\n")[0]
    assert set(re.findall(r"AWS_[A-Z0-9_]*[A-Z0-9]", table)) == set(S3_VARIABLES)
