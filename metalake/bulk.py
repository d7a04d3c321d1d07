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

import fnmatch
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from metalake import metadata as md


@dataclass(frozen=True)
class UploadFile:
    """One file of a bulk upload, with everything that travels in its header."""

    path: Path
    filename: str
    metadata: md.MetadataDict = field(default_factory=dict)
    tags: tuple[str, ...] = ()


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
