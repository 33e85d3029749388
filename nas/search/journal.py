"""Repair of the study journal after a crash: a record cut short by a kill or a full disk mid-append.

Optuna's journal is one JSON record per line. A process killed while appending leaves a last line without its
newline (or one that is not valid JSON); Optuna then fails on every load. ``repair_journal`` moves such a tail into
a side file beside the journal (``study.journal.partial-<time>-<pid>``; never deleted) and truncates the journal to its
last complete record, so the study resumes from there. A broken record in the middle of the file cannot be a
cut-short append: it is reported, and nothing is changed. The file mechanics are ``nas.durable``'s, shared with the
latency cache (``set_aside_cut_record``, which tolerates a bad line mid-file).
"""

from __future__ import annotations

from pathlib import Path

from nas.durable import SetAside, complete_records, is_json, set_aside, set_aside_cut_record

JournalRepair = SetAside
"""What ``repair_journal`` set aside: ``removed_bytes`` from the end of the journal, kept in ``side_file``."""


class JournalError(ValueError):
    """A journal damaged in a way that is not a cut-short last record (the message says where)."""


def repair_journal(path: Path) -> JournalRepair | None:
    """Set aside a cut-short last record of the journal at ``path``; None when the journal is whole (or absent).

    Only the process that holds the run folder's lock may call this (a record being appended looks cut short).
    Raises ``JournalError`` when a record before the last is broken (not something a kill can cause).
    """
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    end, lines = complete_records(data)
    for number, line in enumerate(lines, start=1):
        if line.strip() and not is_json(line):
            raise JournalError(
                f"{path}: record {number} (of {len(lines)}) is not valid JSON; the journal is damaged mid-file, not by a cut-short append, "
                "so it is left as it is (restore it from a copy, or search again in another --out)"
            )
    if end == len(data):
        return None
    return set_aside(path, data, end, len(lines))


__all__ = ["JournalError", "JournalRepair", "repair_journal", "set_aside_cut_record"]
