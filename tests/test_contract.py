"""The contract: documented everywhere, and protected against breaking changes."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from hypothesis import given
from hypothesis import strategies as st

from metalake import metadata as md
from metalake.v1 import datalake_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
PROTO = "metalake/v1/datalake.proto"
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "set.pb"
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{include}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            PROTO,
        ]
    )
    assert status == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    [file] = [f for f in files.file if f.name == PROTO]
    return file


def test_every_element_of_the_contract_has_a_comment(tmp_path: Path) -> None:
    file = descriptor_set(tmp_path)
    commented = {
        tuple(location.path)
        for location in file.source_code_info.location
        if location.leading_comments.strip()
    }
    missing: list[str] = []
    # Paths per descriptor.proto: FileDescriptorProto 4 message_type, 5 enum_type, 6 service;
    # DescriptorProto 2 field, 3 nested_type, 4 enum_type; EnumDescriptorProto 2 value;
    # ServiceDescriptorProto 2 method.

    def check_enum(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...]) -> None:
        if path not in commented:
            missing.append(enum.name)
        for v, value in enumerate(enum.value):
            if (*path, 2, v) not in commented:
                missing.append(f"{enum.name}.{value.name}")

    def check_message(message: descriptor_pb2.DescriptorProto, path: tuple[int, ...]) -> None:
        if message.options.map_entry:
            return  # a map field's synthetic entry: the field itself is checked
        if path not in commented:
            missing.append(message.name)
        for f, field in enumerate(message.field):
            if (*path, 2, f) not in commented:
                missing.append(f"{message.name}.{field.name}")
        for n, nested in enumerate(message.nested_type):
            check_message(nested, (*path, 3, n))
        for e, enum in enumerate(message.enum_type):
            check_enum(enum, (*path, 4, e))

    for m, message in enumerate(file.message_type):
        check_message(message, (4, m))
    for e, enum in enumerate(file.enum_type):
        check_enum(enum, (5, e))
    for s, service in enumerate(file.service):
        if (6, s) not in commented:
            missing.append(service.name)
        for r, method in enumerate(service.method):
            if (6, s, 2, r) not in commented:
                missing.append(f"{service.name}.{method.name}")
    assert missing == [], f"undocumented in {PROTO}: {missing}"


def test_the_comment_check_sees_a_missing_comment(tmp_path: Path) -> None:
    """The check above is not vacuous: protoc reports comments where it parses them."""
    file = descriptor_set(tmp_path)
    locations = {tuple(loc.path): loc for loc in file.source_code_info.location}
    [latitude] = [
        (4, m, 2, f)
        for m, message in enumerate(file.message_type)
        if message.name == "Metadata"
        for f, field in enumerate(message.field)
        if field.name == "latitude"
    ]
    assert "[-90, 90]" in locations[latitude].leading_comments


def test_every_rpc_is_in_the_error_reference(tmp_path: Path) -> None:
    file = descriptor_set(tmp_path)
    errors = (ROOT / "docs" / "errors.md").read_text()
    missing = [m.name for m in file.service[0].method if f"`{m.name}`" not in errors]
    assert missing == [], f"docs/errors.md does not cover {missing}"


def test_every_status_code_the_server_maps_is_in_the_error_reference() -> None:
    from google.rpc import code_pb2

    from metalake.server.servicer import _CODES

    errors = (ROOT / "docs" / "errors.md").read_text()
    codes = {code_pb2.Code.Name(code) for code in _CODES.values()} | {"INTERNAL"}
    missing = sorted(code for code in codes if f"`{code}`" not in errors)
    assert missing == [], f"docs/errors.md never mentions {missing}"


@pytest.fixture
def buf() -> Path:
    if not BUF.exists():
        pytest.skip("buf is not installed here: `make buf` installs it (npm)")
    return BUF


def test_buf_breaking_catches_a_removed_field(buf: Path, tmp_path: Path) -> None:
    before, after = tmp_path / "before", tmp_path / "after"
    for copy in (before, after):
        shutil.copytree(ROOT / "protos", copy / "protos")
        shutil.copy(ROOT / "buf.yaml", copy / "buf.yaml")
    proto = after / "protos" / PROTO
    text = proto.read_text()
    assert "  string content_type = 5;\n" in text
    proto.write_text(text.replace("  string content_type = 5;\n", "", 1))

    same = subprocess.run(
        [buf, "breaking", str(before), "--against", str(before)],
        capture_output=True,
        text=True,
    )
    assert same.returncode == 0, same.stdout + same.stderr
    broken = subprocess.run(
        [buf, "breaking", str(after), "--against", str(before)],
        capture_output=True,
        text=True,
    )
    assert broken.returncode != 0
    assert "content_type" in broken.stdout + broken.stderr


def test_the_contract_lints_clean(buf: Path) -> None:
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def _breaking_script(repo: Path, buf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [repo / "scripts" / "buf-breaking.sh", *args],
        env={**os.environ, "BUF": str(buf)},
        capture_output=True,
        text=True,
    )


def test_the_ci_script_fails_on_a_breaking_commit(buf: Path, tmp_path: Path) -> None:
    """scripts/buf-breaking.sh, as CI runs it, on a repository whose last commit breaks."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "buf-breaking.sh", repo / "scripts")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "before the contract")
    first = _breaking_script(repo, buf)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "nothing to compare" in first.stdout

    shutil.copytree(ROOT / "protos", repo / "protos")
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "the contract")
    no_contract_before = _breaking_script(repo, buf)
    assert no_contract_before.returncode == 0, no_contract_before.stdout + no_contract_before.stderr
    assert "no protos/" in no_contract_before.stdout

    proto = repo / "protos" / PROTO
    proto.write_text(proto.read_text() + "\n// A new message is compatible.\nmessage Extra {}\n")
    _git(repo, "commit", "-q", "-am", "an addition")
    compatible = _breaking_script(repo, buf)
    assert compatible.returncode == 0, compatible.stdout + compatible.stderr

    text = proto.read_text()
    proto.write_text(text.replace("  string content_type = 5;\n", "", 1))
    _git(repo, "commit", "-q", "-am", "a removed field")
    broken = _breaking_script(repo, buf)
    assert broken.returncode != 0
    assert "content_type" in broken.stdout + broken.stderr
    assert _breaking_script(repo, buf, "HEAD").returncode == 0
    assert _breaking_script(repo, buf, "HEAD~2").returncode != 0
    assert _breaking_script(repo, buf, "no-such-ref").returncode != 0


_OFFSETS = st.none() | st.integers(-86_399, 86_399).map(lambda s: timezone(timedelta(seconds=s)))


@given(
    moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    zone=_OFFSETS,
)
def test_a_capture_time_travels_as_protobuf_s_own_conversions_write_it(
    moment: datetime, zone: timezone | None
) -> None:
    # to_proto computes the Timestamp and Duration itself (FromDatetime is pure Python and
    # slow): the message must be the one protobuf's conversions build, and read back the same.
    value = moment.replace(tzinfo=zone)
    message = md.to_proto({"acquired_at": value, "weather": "fog"})
    expected = pb.Metadata(weather="fog")
    offset = value.utcoffset()
    expected.acquired_at.FromDatetime(
        value.astimezone(UTC) if offset is not None else value.replace(tzinfo=UTC)
    )
    if offset is not None:
        expected.acquired_at_utc_offset.FromTimedelta(offset)
    assert message == expected
    values, violations = md.from_proto(message)
    assert not violations
    back = values["acquired_at"]
    assert isinstance(back, datetime)
    assert back == value
    assert back.utcoffset() == offset
