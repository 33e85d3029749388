"""One process at a time per run folder.

``RunLock(run_dir)`` takes an exclusive ``flock`` on ``RUN/.lock`` without waiting. The kernel releases a flock when
its process ends in any way (exit, crash, SIGKILL, reboot), so a holder that died never blocks the next run and
no lock state that a crash, a copy or a move of the folder leaves behind can make nasforge wait: the lock file's
content (who holds it) is only a description for the message. A folder that is busy is refused at once with
``RunBusyError`` naming the holder's process, host and command.

Within one process the lock is re-entrant (``nas run`` trains, searches and exports under one lock).
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from nas import jsonio
from nas.run_dir import CONFIG_FILE, LOCK_FILE

_held: dict[Path, tuple[int, int]] = {}

Parameters = ParamSpec("Parameters")
Result = TypeVar("Result")


class RunBusyError(RuntimeError):
    """The run folder is in use by another process (the message names it)."""


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        return f"process {holder['pid']} on {holder['host']} ({holder['command']}, since {started})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """Exclusive, non-blocking lock of one run folder; a context manager. Raises ``RunBusyError`` if it is held."""

    def __init__(self, run_dir: Path, command: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.command = command or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]) or "python"
        self._key: Path | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = self.run_dir.resolve()
        if key in _held:
            descriptor, count = _held[key]
            _held[key] = (descriptor, count + 1)
            self._key = key
            return self
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.pread(descriptor, 4096, 0).decode("utf-8", "replace"))
            os.close(descriptor)
            raise RunBusyError(f"{self.run_dir} is in use by {holder}; wait for it to finish or stop it (a process that has died holds no lock)") from None
        except OSError:
            os.close(descriptor)
            raise
        description = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": time.time()}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, jsonio.dumps(description).encode(), 0)
        _held[key] = (descriptor, 1)
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        descriptor, count = _held[self._key]
        if count > 1:
            _held[self._key] = (descriptor, count - 1)
        else:
            del _held[self._key]
            os.ftruncate(descriptor, 0)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)
        self._key = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.release()


def holds_lock(run_dir: Path) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    return Path(run_dir).resolve() in _held


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The description the current holder wrote (None when the file is empty or missing)."""
    try:
        text = (Path(run_dir) / LOCK_FILE).read_text()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def writes_inside(run_dir: Path, out: Path | None) -> bool:
    """Whether output to ``out`` (None: the run folder's default place) lands inside ``run_dir``."""
    return out is None or Path(out).resolve().is_relative_to(Path(run_dir).resolve())


def locks_run_dir(run_dir: str, *, out: str | None = None, create: bool = False) -> Callable[[Callable[Parameters, Result]], Callable[Parameters, Result]]:
    """Decorator: the call holds the ``RunLock`` of its argument named ``run_dir`` (``"context.run_dir"`` reads an
    attribute of an argument), so the Python API is as protected as the CLI. With ``out``, the name of an
    output-folder argument, the lock is taken only when the output lands inside the run folder (``writes_inside``);
    writing elsewhere only reads the run. Without ``create`` a folder that is not a run folder (no config file) is
    not locked (nor created): the call itself says what is wrong with it."""

    def decorate(function: Callable[Parameters, Result]) -> Callable[Parameters, Result]:
        signature = inspect.signature(function)

        def argument(arguments: dict[str, Any], dotted: str) -> Any:
            name, *attributes = dotted.split(".")
            value = arguments[name]
            for attribute in attributes:
                value = getattr(value, attribute)
            return value

        @functools.wraps(function)
        def locked(*args: Parameters.args, **kwargs: Parameters.kwargs) -> Result:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            folder = Path(argument(bound.arguments, run_dir))
            if out is not None and not writes_inside(folder, argument(bound.arguments, out)):
                return function(*args, **kwargs)
            if not create and not (folder / CONFIG_FILE).is_file():
                return function(*args, **kwargs)
            with RunLock(folder):
                return function(*args, **kwargs)

        return locked

    return decorate
