"""Strict JSON for every file nasforge writes: standard JSON (RFC 8259) that JavaScript's ``JSON.parse`` and other
strict readers accept. Python's ``json`` writes ``NaN`` and ``Infinity`` by default; here a non-finite float becomes
``null`` (``finite``), and the writer puts the reason beside it where a reader needs one (``"speedup": null,
"speedup_note": "only in fp32"``). Serialisation runs with ``allow_nan=False``, so a non-finite number that slipped
past ``finite`` raises instead of reaching a file.

``dumps`` / ``write`` / ``append_line`` write; ``loads`` reads strictly (``NaN``, ``Infinity`` and ``-Infinity`` are
refused).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from nas.durable import atomic_write_text

NonFinite = Literal["null", "error"]


class NonFiniteError(ValueError):
    """A value to be written holds NaN or an infinity where the writer asked for an error instead of ``null``."""


def finite(value: Any, *, nonfinite: NonFinite = "null", where: str = "$") -> Any:
    """A copy of ``value`` (dicts, lists, tuples, scalars; numpy and torch scalars are plain numbers once read with
    ``float()``) with every NaN or infinite float replaced by ``None`` (``nonfinite="null"``), or a
    ``NonFiniteError`` naming its path (``nonfinite="error"``). Other values are returned as they are."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if nonfinite == "error":
            raise NonFiniteError(f"{where} is {value!r}, which strict JSON cannot hold")
        return None
    if isinstance(value, Mapping):
        return {key: finite(item, nonfinite=nonfinite, where=f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item, nonfinite=nonfinite, where=f"{where}[{index}]") for index, item in enumerate(value)]
    return value


def dumps(
    value: Any,
    *,
    indent: int | None = None,
    sort_keys: bool = False,
    separators: tuple[str, str] | None = None,
    default: Callable[[Any], Any] | None = None,
    nonfinite: NonFinite = "null",
) -> str:
    """``json.dumps`` of ``finite(value)`` with ``allow_nan=False``: strict JSON, never ``NaN`` / ``Infinity``."""
    return json.dumps(finite(value, nonfinite=nonfinite), indent=indent, sort_keys=sort_keys, separators=separators, default=default, allow_nan=False)


def write(path: Path, value: Any, *, indent: int | None = 1, sort_keys: bool = False, nonfinite: NonFinite = "null") -> None:
    """Write ``dumps(value)`` and a final newline to ``path`` atomically (``nas.durable.atomic_write_text``): a reader
    sees the old file or the new one, never half of one."""
    atomic_write_text(Path(path), dumps(value, indent=indent, sort_keys=sort_keys, nonfinite=nonfinite) + "\n")


def append_line(path: Path, value: Any, *, nonfinite: NonFinite = "null") -> None:
    """Append ``dumps(value)`` and a newline to a JSON-lines file in one write, flushed and fsynced."""
    with open(path, "ab") as file:
        file.write((dumps(value, nonfinite=nonfinite) + "\n").encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


def loads(text: str | bytes) -> Any:
    """Parse strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` raise ``ValueError`` (``json.JSONDecodeError`` for
    malformed text)."""
    return json.loads(text, parse_constant=_refuse_constant)


__all__ = ["NonFiniteError", "append_line", "dumps", "finite", "loads", "write"]
