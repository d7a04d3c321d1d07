"""The contract: documented everywhere, and protected against breaking changes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

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
    missing = []
    # Paths per descriptor.proto: 4 message_type, 2 field, 5 enum_type, 2 value, 6 service,
    # 2 method.
    for m, message in enumerate(file.message_type):
        if (4, m) not in commented:
            missing.append(message.name)
        for f, field in enumerate(message.field):
            if (4, m, 2, f) not in commented:
                missing.append(f"{message.name}.{field.name}")
    for e, enum in enumerate(file.enum_type):
        if (5, e) not in commented:
            missing.append(enum.name)
        for v, value in enumerate(enum.value):
            if (5, e, 2, v) not in commented:
                missing.append(f"{enum.name}.{value.name}")
    for s, service in enumerate(file.service):
        if (6, s) not in commented:
            missing.append(service.name)
        for r, method in enumerate(service.method):
            if (6, s, 2, r) not in commented:
                missing.append(f"{service.name}.{method.name}")
    assert missing == [], f"undocumented in {PROTO}: {missing}"


def test_every_rpc_is_in_the_error_reference(tmp_path: Path) -> None:
    file = descriptor_set(tmp_path)
    errors = (ROOT / "docs" / "errors.md").read_text()
    missing = [m.name for m in file.service[0].method if f"`{m.name}`" not in errors]
    assert missing == [], f"docs/errors.md does not cover {missing}"


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
