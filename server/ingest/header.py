"""What the client says about a file before its bytes arrive, and the one place it is checked."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from metalake import labels
from metalake.metadata import (
    FieldViolation,
    MetadataDict,
    check_string,
    check_value,
    has_control_characters,
    normalize,
    to_jsonable,
)
from metalake.server.errors import InvalidRequest

MAX_FILENAME_LENGTH = 1024
MAX_TAGS = 100
MAX_REQUEST_ID_LENGTH = 128
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+(\s*;.*)?$")


@dataclass(frozen=True)
class UploadHeader:
    """What the client says about a file before its bytes arrive.

    Built as the client sent it, problems included: `check_header` reports them all at once.
    """

    filename: str
    metadata: MetadataDict = field(default_factory=dict)
    fill_metadata: bool = False
    tags: tuple[str, ...] = ()
    content_type: str = ""
    request_id: str = ""
    expected_sha256: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # Metadata the client sent that is not even a value (an acquired_at out of range), so not
    # in `metadata`: reported with the header's other problems.
    unreadable: tuple[FieldViolation, ...] = ()

    def to_json(self) -> str:
        """For a resumable upload's catalog row (once checked: nothing is unreadable)."""
        fields = asdict(self)
        del fields["unreadable"]
        fields["metadata"] = to_jsonable(self.metadata)
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UploadHeader:
        fields = json.loads(text)
        metadata = normalize(fields.pop("metadata"))
        return cls(metadata=metadata, tags=tuple(fields.pop("tags")), **fields)

    def violations(self) -> list[FieldViolation]:
        """Every reason this header cannot be accepted, with the field at fault."""
        found = check_filename(self.filename, "header.filename")
        if len(self.tags) > MAX_TAGS:
            found.append(
                FieldViolation("header.tags", f"at most {MAX_TAGS} tags, got {len(self.tags)}")
            )
        for i, tag in enumerate(self.tags):
            problem = "must not be empty" if not tag else check_string(tag)
            if problem:
                found.append(FieldViolation(f"header.tags[{i}]", problem))
        if self.content_type and not (
            len(self.content_type) <= 255 and _CONTENT_TYPE.match(self.content_type)
        ):
            found.append(
                FieldViolation("header.content_type", "must be a MIME type like image/jpeg")
            )
        if len(self.request_id) > MAX_REQUEST_ID_LENGTH:
            found.append(
                FieldViolation(
                    "header.request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters"
                )
            )
        if self.expected_sha256 and not _SHA256.match(self.expected_sha256):
            found.append(
                FieldViolation("header.expected_sha256", "must be 64 lowercase hex digits")
            )
        found.extend(self.unreadable)
        for name, value in self.metadata.items():
            problem = check_value(name, value)
            if problem:
                found.append(FieldViolation(f"header.metadata.{name}", problem))
        found.extend(labels.validate(self.labels, prefix="header.labels"))
        return found


def check_filename(filename: str, field_path: str) -> list[FieldViolation]:
    """A filename is a label: any text but empty, over-long or with control characters."""
    if not filename.strip():
        return [FieldViolation(field_path, "must not be empty")]
    if len(filename) > MAX_FILENAME_LENGTH:
        return [
            FieldViolation(
                field_path,
                f"must be at most {MAX_FILENAME_LENGTH} characters, got {len(filename)}",
            )
        ]
    if has_control_characters(filename):
        return [FieldViolation(field_path, "must not contain control characters")]
    return []


def check_header(header: UploadHeader) -> None:
    """Refuse a header with every reason at once: the only check an upload's header gets."""
    violations = header.violations()
    if violations:
        raise InvalidRequest("the upload header is invalid", violations)


def check_extraction_header(filename: str) -> None:
    """ExtractMetadata's header names only the file."""
    violations = check_filename(filename, "header.filename")
    if violations:
        raise InvalidRequest("the extraction header is invalid", violations)
