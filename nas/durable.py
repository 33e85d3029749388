"""Crash-safe file primitives for everything a run writes: a kill, a full disk or a power cut at any instant leaves
either the old content or the new one, never half of it, and a cut-short append is detected and set aside.

- ``atomic_write_bytes`` / ``atomic_write_text``: a temporary sibling, fsynced, renamed over the target.
- ``set_aside_cut_record``: an append-only JSON-lines file whose last record was cut short keeps that tail in a side
  file (``<name>.partial-<time>-<pid>``, never deleted) and is truncated to its last complete record.
- ``staging_folder`` / ``replace_folder``: a folder written beside its target and renamed into place, so a killed
  writer never leaves a half folder under the target's name.

Nothing here knows the run folder's layout (``nas.run_dir``) or locks it (``nas.run_lock``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".tmp"
PREVIOUS_SUFFIX = ".old"


def fsync_directory(folder: Path) -> None:
    """Make the names created, renamed or removed in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (the temporary sibling is this process's own)."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}{STAGING_SUFFIX}-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class SetAside:
    """What ``set_aside_cut_record`` moved: ``removed_bytes`` from the end of ``path``, kept in ``side_file``;
    ``kept_records`` complete records stay before it."""

    path: Path
    side_file: Path
    removed_bytes: int
    kept_records: int

    @property
    def journal(self) -> Path:
        return self.path

    def __str__(self) -> str:
        return (
            f"repaired {self.path}: its last record was cut short ({self.removed_bytes} bytes, kept in {self.side_file}); "
            f"it continues from the {self.kept_records} complete record(s) before it"
        )


def is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def complete_records(data: bytes) -> tuple[int, list[bytes]]:
    """Where the complete records of JSON-lines ``data`` end, and their lines. A record is complete when its newline
    was written and the line parses; only the last line can be cut short by a kill."""
    end = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
    lines = data[:end].splitlines(keepends=True)
    if lines and not is_json(lines[-1]):
        end -= len(lines[-1])
        lines.pop()
    return end, lines


def set_aside(path: Path, data: bytes, end: int, kept_records: int) -> SetAside:
    """Copy ``data[end:]`` (the bytes of ``path`` after ``end``) into a new side file beside ``path``, durably, then
    truncate ``path`` to ``end``; logs a warning that says what was kept where."""
    path = Path(path)
    stamp = f"{path.name}.partial-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    side_file = path.with_name(stamp)
    for index in range(1, 100):
        if not side_file.exists():
            break
        side_file = path.with_name(f"{stamp}-{index}")
    with open(side_file, "xb") as side:
        side.write(data[end:])
        side.flush()
        os.fsync(side.fileno())
    with open(path, "r+b") as file:
        file.truncate(end)
        file.flush()
        os.fsync(file.fileno())
    fsync_directory(path.parent)
    result = SetAside(path, side_file, len(data) - end, kept_records)
    logger.warning("%s", result)
    return result


def set_aside_cut_record(path: Path) -> SetAside | None:
    """For an append-only JSON-lines file: set aside a cut-short last record (``set_aside``), so the next append
    starts on a line of its own. None when nothing is cut (or the file is absent). Only the process that alone
    writes the file may call this: a record being appended looks cut short."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    end, lines = complete_records(data)
    return None if end == len(data) else set_aside(path, data, end, len(lines))


def staging_folder(target: Path) -> Path:
    """The sibling a new version of folder ``target`` is written into before ``replace_folder``."""
    target = Path(target)
    return target.with_name(target.name + STAGING_SUFFIX)


def previous_folder(target: Path) -> Path:
    target = Path(target)
    return target.with_name(target.name + PREVIOUS_SUFFIX)


def clear_leftovers(target: Path) -> None:
    """Remove what a killed ``replace_folder`` of ``target`` left: its staging folder, and the previous version when
    ``target`` itself is in place (when it is not, the previous version is the complete one and is put back)."""
    target = Path(target)
    shutil.rmtree(staging_folder(target), ignore_errors=True)
    previous = previous_folder(target)
    if previous.exists():
        if target.exists():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(previous, target)


def replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` in place of ``target`` (absent or not) by renames; the files in
    ``staging`` are fsynced first. A kill at any instant leaves ``target`` complete (old or new) or absent with the
    old version beside it (``clear_leftovers`` puts it back)."""
    staging, target = Path(staging), Path(target)
    for file in staging.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_directory(staging)
    previous = previous_folder(target)
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(target, previous)
    os.replace(staging, target)
    fsync_directory(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


__all__ = [
    "SetAside",
    "atomic_write_bytes",
    "atomic_write_text",
    "clear_leftovers",
    "complete_records",
    "fsync_directory",
    "is_json",
    "replace_folder",
    "set_aside",
    "set_aside_cut_record",
    "staging_folder",
]
