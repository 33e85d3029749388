"""Repair of the study journal after a crash: a record cut short by a kill or a full disk mid-append.

Optuna's journal is one JSON record per line. A process killed while appending leaves a last line without its
newline (or one that is not valid JSON); Optuna then fails on every load. ``repair_journal`` moves such a tail into
a side file beside the journal (``study.journal.partial-<time>``; never deleted) and truncates the journal to its
last complete record, so the study resumes from there. A broken record in the middle of the file cannot be a
cut-short append: it is reported, and nothing is changed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class JournalError(ValueError):
    """A journal damaged in a way that is not a cut-short last record (the message says where)."""


@dataclass(frozen=True, slots=True)
class JournalRepair:
    """What ``repair_journal`` set aside: ``removed_bytes`` from the end of the journal, kept in ``side_file``."""

    journal: Path
    side_file: Path
    removed_bytes: int
    kept_records: int

    def __str__(self) -> str:
        return (
            f"repaired {self.journal}: its last record was cut short ({self.removed_bytes} bytes, kept in {self.side_file}); "
            f"the study resumes from the {self.kept_records} complete record(s) before it"
        )


def _complete(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def repair_journal(path: Path) -> JournalRepair | None:
    """Set aside a cut-short last record of the journal at ``path``; None when the journal is whole (or absent).

    Raises ``JournalError`` when a record before the last is broken (not something a kill can cause).
    """
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data:
        return None
    end = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
    lines = data[:end].splitlines(keepends=True)
    if lines and not _complete(lines[-1]):
        end -= len(lines[-1])
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if line.strip() and not _complete(line):
            raise JournalError(f"{path}: record {number} (of {len(lines)}) is not valid JSON; the journal is damaged mid-file, not by a cut-short append")
    if end == len(data):
        return None
    side_file = path.with_name(f"{path.name}.partial-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    side_file.write_bytes(data[end:])
    with open(path, "r+b") as journal:
        journal.truncate(end)
        journal.flush()
        os.fsync(journal.fileno())
    repair = JournalRepair(path, side_file, len(data) - end, len(lines))
    logger.warning("%s", repair)
    return repair
