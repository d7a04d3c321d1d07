"""Bulk transfers: which files a folder upload sends, and under which names.

The SDK (`Datalake.upload_folder`) and the CLI (`metalake upload DIR...`) share these rules, so a
folder means the same thing to both:

- Folders are walked recursively, in sorted order. Hidden files and folders (a name starting
  with ".") are skipped; symbolic links to folders are not followed (no loops), links to files
  are read through.
- `include` / `exclude` are glob patterns (`*`, `?`, `[abc]`, case-sensitive). A pattern
  without "/" is matched against the file's name (`*.jpg`), one with "/" against its path
  relative to the folder (`raw/*`, `2024/*/IMG_*.jpg`; `*` crosses "/"). A file is sent when it
  matches some include pattern (or none is given) and no exclude pattern.
- A file found in a folder is stored under its path relative to that folder, "/"-separated
  (`2024/05/IMG_1.jpg`); a file named directly is stored under its own name.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from metalake import labels as label_rules
from metalake import metadata as md


@dataclass(frozen=True)
class UploadFile:
    """One file of a bulk upload, with everything that travels in its header."""

    path: Path
    filename: str
    metadata: md.MetadataDict = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)


def matches(relative: str, patterns: Iterable[str]) -> bool:
    """Whether a "/"-separated relative path matches one of the patterns (see the module)."""
    name = relative.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatchcase(relative, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(relative, pattern[3:])
            ):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def walk_folder(
    root: Path, *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[tuple[Path, str]]:
    """The files under `root` an upload sends, as (path, relative "/"-separated name), sorted."""
    found: list[tuple[Path, str]] = []
    for directory, folders, files in os.walk(root, followlinks=False):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        base = Path(directory)
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = base / name
            if not path.is_file():  # sockets, FIFOs, dangling links
                continue
            relative = path.relative_to(root).as_posix()
            if include and not matches(relative, include):
                continue
            if exclude and matches(relative, exclude):
                continue
            found.append((path, relative))
    return found


class SelectionError(ValueError):
    """A path given to a bulk upload that cannot be sent: missing, or not a file or folder."""


def select_files(
    paths: Sequence[Path], *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[tuple[Path, str]]:
    """Files named directly, and the files of the folders named, as (path, filename).

    A file named directly is always sent (patterns select among a folder's files only). Every
    missing or unusable path is reported at once, in one SelectionError.
    """
    selected: list[tuple[Path, str]] = []
    problems: list[str] = []
    for path in paths:
        if path.is_dir():
            selected.extend(walk_folder(path, include=include, exclude=exclude))
        elif path.is_file():
            selected.append((path, path.name))
        else:
            problems.append(
                f"{'not a file or folder' if path.exists() else 'no such file'}: {path}"
            )
    if problems:
        raise SelectionError("; ".join(problems))
    return selected


# Manifests: per-file metadata for bulk uploads, from a CSV or JSON Lines file.

MANIFEST_SUFFIXES = (".csv", ".jsonl")
_MAX_REPORTED = 50


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong in a manifest, where it is: line (1-based) and column."""

    file: Path
    line: int
    column: str  # for CSV `3 (latitude)`, for JSON Lines the key; "" for the whole line
    message: str

    def __str__(self) -> str:
        where = f", column {self.column}" if self.column else ""
        return f"{self.file}: line {self.line}{where}: {self.message}"


class ManifestError(ValueError):
    """Every problem of a manifest, found before anything was sent."""

    def __init__(self, problems: list[ManifestProblem]) -> None:
        self.problems = problems
        shown = [str(p) for p in problems[:_MAX_REPORTED]]
        if len(problems) > _MAX_REPORTED:
            shown.append(f"... and {len(problems) - _MAX_REPORTED} more problems")
        super().__init__("\n".join(shown))


@dataclass(frozen=True)
class ManifestRow:
    """One file's entry: its path (absolute, resolved), name, metadata and tags."""

    path: Path
    filename: str
    line: int
    metadata: md.MetadataDict
    tags: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)


class _Cell:
    """A value of one row, with where it came from, for error messages."""

    def __init__(self, column: str, value: object, *, text: bool = False) -> None:
        self.column = column
        self.value = value
        self.text = text  # a CSV cell: text to be read as its column's type


def read_manifest(manifest: Path) -> dict[Path, ManifestRow]:
    """Read and check every row of a manifest; keyed by the file's resolved path.

    Columns (CSV header, JSON Lines keys): `path` (required, relative to the manifest's
    folder), any metadata field, `tags` (`;`-separated in CSV, a list in JSON Lines) and
    `labels.KEY` (in JSON Lines also `labels`, an object). An empty CSV cell or a JSON null is
    "not given". Raises ManifestError listing every problem.
    """
    suffix = manifest.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ManifestError(
            [ManifestProblem(manifest, 0, "", "a manifest must be a .csv or a .jsonl file")]
        )
    try:
        with manifest.open(encoding="utf-8-sig", newline="") as handle:
            raw = list(
                _csv_rows(manifest, handle) if suffix == ".csv" else _jsonl_rows(manifest, handle)
            )
    except OSError as error:
        raise ManifestError(
            [ManifestProblem(manifest, 0, "", f"cannot be read: {error}")]
        ) from None
    except UnicodeDecodeError as error:
        raise ManifestError(
            [ManifestProblem(manifest, 0, "", f"is not UTF-8 text: {error}")]
        ) from None
    problems: list[ManifestProblem] = []
    rows: dict[Path, ManifestRow] = {}
    base = manifest.parent
    for line, cells in raw:
        if isinstance(cells, ManifestProblem):
            problems.append(cells)
            continue
        row = _check_row(manifest, base, line, cells, problems)
        if row is None:
            continue
        earlier = rows.get(row.path)
        if earlier is not None:
            problems.append(
                ManifestProblem(
                    manifest,
                    line,
                    cells["path"].column,
                    f"{row.filename!r} is already described on line {earlier.line}",
                )
            )
            continue
        rows[row.path] = row
    if problems:
        raise ManifestError(problems)
    return rows


def _csv_rows(
    manifest: Path, handle: Iterable[str]
) -> Iterable[tuple[int, dict[str, _Cell] | ManifestProblem]]:
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None:
        yield 1, ManifestProblem(manifest, 1, "", "is empty: the first line names the columns")
        return
    names = [name.strip() for name in header]
    bad_header = False
    for index, name in enumerate(names, 1):
        problem = _column_problem(name, names[: index - 1])
        if problem:
            bad_header = True
            yield 1, ManifestProblem(manifest, 1, f"{index} ({name})", problem)
    if "path" not in names:
        bad_header = True
        yield 1, ManifestProblem(manifest, 1, "", "has no `path` column")
    if bad_header:
        return
    line = reader.line_num + 1
    for values in reader:
        start, line = line, reader.line_num + 1
        if not any(v.strip() for v in values):
            continue  # a blank line
        if len(values) != len(names):
            yield (
                start,
                ManifestProblem(
                    manifest, start, "", f"has {len(values)} cells; the header has {len(names)}"
                ),
            )
            continue
        yield (
            start,
            {
                name: _Cell(f"{index} ({name})", value, text=True)
                for index, (name, value) in enumerate(zip(names, values, strict=True), 1)
                if value.strip()
            },
        )


def _jsonl_rows(
    manifest: Path, handle: Iterable[str]
) -> Iterable[tuple[int, dict[str, _Cell] | ManifestProblem]]:
    for line, text in enumerate(handle, 1):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as error:
            yield (
                line,
                ManifestProblem(manifest, line, "", f"is not JSON: {error}"),
            )
            continue
        if not isinstance(item, dict):
            yield (
                line,
                ManifestProblem(manifest, line, "", "must be a JSON object"),
            )
            continue
        yield line, {key: _Cell(key, value) for key, value in item.items() if value is not None}


def _column_problem(name: str, before: Sequence[str]) -> str | None:
    if name in before:
        return "is named twice"
    if name == "path" or name == "tags" or name in md.FIELDS:
        return None
    if name.startswith("labels."):
        return label_rules.check_key(name.removeprefix("labels."))
    return (
        f"unknown column {name!r}; columns are path, tags, labels.KEY and the fields "
        f"{', '.join(md.FIELDS)}"
    )


def _check_row(
    manifest: Path,
    base: Path,
    line: int,
    cells: dict[str, _Cell],
    problems: list[ManifestProblem],
) -> ManifestRow | None:
    found = len(problems)

    def problem(cell: _Cell | None, message: str) -> None:
        problems.append(ManifestProblem(manifest, line, cell.column if cell else "", message))

    metadata: md.MetadataDict = {}
    tags: tuple[str, ...] = ()
    labels: dict[str, str] = {}
    for name, cell in cells.items():
        if name == "path":
            continue
        if name == "tags":
            tags = _tags(cell, problem)
        elif name == "labels" and not cell.text:
            if not isinstance(cell.value, dict):
                problem(cell, "labels must be an object of KEY: value")
                continue
            for key, value in cell.value.items():
                why = label_rules.check_key(key) or label_rules.check_value(value)
                if why:
                    problem(cell, why)
                else:
                    labels[key] = value
        elif name.startswith("labels."):
            key = name.removeprefix("labels.")
            why = label_rules.check_key(key) or label_rules.check_value(cell.value)
            if why:
                problem(cell, why)
            else:
                assert isinstance(cell.value, str)
                labels[key] = cell.value
        elif name in md.FIELDS:
            value = _typed(name, cell, problem)
            if value is not None:
                metadata[name] = value
        else:  # JSON Lines keys are not checked with a header
            problem(cell, _column_problem(name, ()) or "")
    path_cell = cells.get("path")
    if path_cell is None or not isinstance(path_cell.value, str) or not path_cell.value.strip():
        problem(path_cell, "`path` is required: the file this row describes")
        return None
    relative = path_cell.value.strip()
    path = base / relative
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        problem(path_cell, f"{relative!r} {state} (paths are relative to the manifest's folder)")
    if len(problems) > found:
        return None
    resolved = path.resolve()
    try:
        filename = resolved.relative_to(base.resolve()).as_posix()
    except ValueError:
        filename = resolved.name
    if len(labels) > label_rules.MAX_LABELS:
        problem(None, f"at most {label_rules.MAX_LABELS} labels, got {len(labels)}")
        return None
    return ManifestRow(resolved, filename, line, metadata, tags, labels)


def _typed(
    name: str, cell: _Cell, problem: Callable[[_Cell, str], None]
) -> md.MetadataValue | None:
    value = cell.value
    if isinstance(value, str) and (cell.text or name in md.TIMESTAMP_FIELDS):
        text = value.strip()
        if name in md.FLOAT_FIELDS:
            try:
                value = float(text)
            except ValueError:
                problem(cell, f"{name} must be a number, got {text!r}")
                return None
        elif name in md.TIMESTAMP_FIELDS:
            try:
                value = md.parse_datetime(text)
            except ValueError as error:
                problem(cell, str(error))
                return None
    elif name in md.FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    why = md.check_value(name, value)
    if why is not None:
        problem(cell, f"{name} {why}")
        return None
    assert isinstance(value, float | str | datetime)
    return value


def _tags(cell: _Cell, problem: Callable[[_Cell, str], None]) -> tuple[str, ...]:
    value = cell.value
    if cell.text and isinstance(value, str):
        tags = [t.strip() for t in value.split(";") if t.strip()]
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        tags = list(value)
    else:
        problem(cell, "tags must be a list of strings (';'-separated in CSV)")
        return ()
    for tag in tags:
        why = "must not be empty" if not tag else md.check_string(tag)
        if why:
            problem(cell, f"tag {tag[:40]!r} {why}")
            return ()
    return tuple(tags)


@dataclass(frozen=True)
class Plan:
    """What a bulk upload sends, and the manifest rows that name no file of it."""

    files: list[UploadFile]
    unused_rows: list[ManifestRow]


def plan_upload(
    paths: Sequence[Path],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    metadata: md.MetadataDict | None = None,
    tags: Sequence[str] = (),
    labels: dict[str, str] | None = None,
    manifest: Path | None = None,
) -> Plan:
    """The files to send with their names, metadata and tags, checked before anything is sent.

    Without `paths`, the manifest's files are sent. A file the manifest describes gets
    `metadata` overridden field by field by its row, and `tags` plus its row's tags; other files
    get `metadata` and `tags` only; labels go as metadata does. Raises SelectionError or
    ManifestError.
    """
    rows = read_manifest(manifest) if manifest is not None else {}
    base = dict(metadata or {})
    if paths:
        selected = select_files(paths, include=include, exclude=exclude)
        if manifest is not None:  # a manifest inside the folder it describes is not data
            itself = manifest.resolve()
            selected = [(p, name) for p, name in selected if p.resolve() != itself]
    else:
        selected = [(row.path, row.filename) for row in rows.values()]
    files: list[UploadFile] = []
    used: set[Path] = set()
    for path, filename in selected:
        row = rows.get(path.resolve()) if rows else None
        if row is None:
            files.append(UploadFile(path, filename, base, tuple(tags), dict(labels or {})))
            continue
        used.add(row.path)
        merged_tags = tuple(dict.fromkeys([*tags, *row.tags]))
        merged_labels = {**(labels or {}), **row.labels}
        files.append(
            UploadFile(path, filename, {**base, **row.metadata}, merged_tags, merged_labels)
        )
    unused = [row for key, row in rows.items() if key not in used]
    return Plan(files, unused)


# Downloads: a stored filename is a label from whoever uploaded it, never trusted as a path.

# Names Windows gives to devices, with or without an extension (CON, con.jpg, LPT1.txt).
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}
)
_UNPORTABLE = re.compile(r'[<>:"|?*]')
# Bytes per path component: 255 is the limit of every common filesystem; the rest leaves room
# for the "~<id>" a name collision adds.
MAX_COMPONENT_BYTES = 200
MAX_DEPTH = 16
# Where unfinished downloads wait, inside the target, to be resumed by a rerun.
PARTIAL_DIR = ".metalake-partial"


def local_path(filename: str, fallback: str) -> PurePosixPath:
    """The relative path a stored filename is written to, safe on every common filesystem.

    The name is split at "/" and "\\"; empty, "." and ".." parts are dropped (so nothing climbs
    out, and "/abs/x.jpg" is "abs/x.jpg"); control characters are removed; characters Windows
    refuses (<>:"|?*) become "_"; trailing dots and spaces go; Windows device names (con.jpg)
    get a "_" in front; each part is cut to MAX_COMPONENT_BYTES (keeping its extension), and
    only the last MAX_DEPTH parts are kept. Nothing left: `fallback` (the item's id).
    """
    parts: list[str] = []
    for raw in re.split(r"[/\\]", filename):
        part = "".join(c for c in raw if c.isprintable() or c == " ")
        part = _UNPORTABLE.sub("_", part).strip().rstrip(". ")
        if part in ("", ".", ".."):
            continue
        if part.split(".", 1)[0].upper() in _RESERVED or (not parts and part == PARTIAL_DIR):
            part = "_" + part
        parts.append(_cut(part, MAX_COMPONENT_BYTES))
    if not parts:
        return PurePosixPath(_cut(_UNPORTABLE.sub("_", fallback), MAX_COMPONENT_BYTES) or "item")
    return PurePosixPath(*parts[-MAX_DEPTH:])


def _cut(part: str, limit: int) -> str:
    """`part` within `limit` UTF-8 bytes, its extension (if short) kept."""
    if len(part.encode()) <= limit:
        return part
    stem, dot, extension = part.rpartition(".")
    if not dot or not stem or len(extension.encode()) > 16:
        stem, extension = part, ""
    keep = limit - len(extension.encode()) - (1 if extension else 0)
    cut = stem.encode()[:keep].decode(errors="ignore")
    return f"{cut}.{extension}" if extension else cut


class Placement:
    """Assigns each item of a bulk download its path, resolving collisions predictably.

    Items are placed in the order they are listed (created_at, then id). The first item to
    claim a path gets it; a later one whose path is taken (also when the names differ only by
    case, or a folder and a file would share a name) is written as `stem~<id>.ext` in the same
    folder, or, when one of its folders is a file already, as `<name>~<id>.ext` at the top.
    """

    def __init__(self) -> None:
        self._files: set[str] = set()
        self._folders: set[str] = set()

    def place(self, filename: str, item_id: str) -> PurePosixPath:
        wanted = local_path(filename, item_id)
        path = wanted
        if not self._free(path):
            path = self._suffixed(wanted, item_id)
            if not self._free(path):
                path = self._suffixed(PurePosixPath(wanted.name), item_id)
            count = 1
            while not self._free(path):  # only if a stored name mimics this very suffix
                count += 1
                path = self._suffixed(PurePosixPath(wanted.name), f"{item_id}~{count}")
        self._files.add(_key(path))
        self._folders.update(_key(parent) for parent in path.parents if parent.parts)
        return path

    def _free(self, path: PurePosixPath) -> bool:
        key = _key(path)
        if key in self._files or key in self._folders:
            return False
        return not any(_key(parent) in self._files for parent in path.parents if parent.parts)

    @staticmethod
    def _suffixed(path: PurePosixPath, item_id: str) -> PurePosixPath:
        tag = "~" + (local_path(item_id, "id").name)
        stem, dot, extension = path.name.rpartition(".")
        name = f"{stem}{tag}.{extension}" if dot and stem else f"{path.name}{tag}"
        return path.with_name(name)


def _key(path: PurePosixPath) -> str:
    # Case-insensitive filesystems (macOS, Windows) see A.jpg and a.jpg as one file.
    return path.as_posix().casefold()
