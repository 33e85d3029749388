"""The run's Optuna study: journal storage, creating / resuming / loading it, and reading its trials.

The study lives in ``RUN_DIR/search/study.journal`` (Optuna's journal file storage), so a killed search resumes
with ``--resume`` and the file opens in Optuna's own tools::

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend("RUN_DIR/search/study.journal"))
    study = optuna.load_study(study_name="nasforge", storage=storage)
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, cast

from nas import jsonio
from nas.run_dir import RunDir
from nas.run_lock import RunBusyError, RunLock, holds_lock, locks_run_dir
from nas.search.journal import repair_journal
from nas.search.samplers import ParamWalk, make_sampler
from nas.search.settings import SearchSettings
from nas.training.loop import RunError

logger = logging.getLogger(__name__)

STUDY_NAME = "nasforge"

JOURNAL_LOCK_SUFFIX = ".lock"
"""Optuna's journal lock is the journal's path with this suffix (a symbolic link to the journal while held)."""
JOURNAL_LOCK_GRACE_SECONDS = 10
JOURNAL_LOCK_MAX_WAIT_SECONDS = 60


class BoundedJournalLock:
    """The journal's append lock, as ``JournalFileBackend(lock_obj=...)`` takes it (``acquire`` / ``release``): the
    file and protocol of Optuna's ``JournalFileSymlinkLock`` (a symbolic link to the journal, so Optuna's own tools
    and nasforge exclude each other), with every wait bounded. A lock unchanged for ``grace_period`` seconds (appends
    take milliseconds) is a killed writer's and is broken; one that points at a journal that is not there (made for
    this journal at another path: the folder was moved) is broken at once; the wait between tries is slept, never
    spun; after ``max_wait`` seconds of a lock that keeps changing hands the append fails with a ``RunError`` naming
    the lock file."""

    def __init__(self, path: str, *, grace_period: float = JOURNAL_LOCK_GRACE_SECONDS, max_wait: float = JOURNAL_LOCK_MAX_WAIT_SECONDS) -> None:
        self.target = path
        self.lock_file = path + JOURNAL_LOCK_SUFFIX
        self.grace_seconds = grace_period
        self.max_wait = max_wait

    def acquire(self) -> bool:
        started = time.monotonic()
        seen: tuple[int, int] | None = None
        seen_at = started
        pause = 0.001
        while True:
            try:
                os.symlink(self.target, self.lock_file)
                return True
            except FileExistsError:
                pass
            now = time.monotonic()
            if now - started > self.max_wait:
                raise RunError(
                    f"{self.lock_file} kept being taken by other writers for {self.max_wait:.0f} s; is another program appending to the study? "
                    "stop it, or remove the file if no program writes there"
                )
            try:
                status = os.lstat(self.lock_file)
            except FileNotFoundError:
                continue
            stamp = (status.st_ino, status.st_mtime_ns)
            if stamp != seen:
                seen, seen_at = stamp, now
            if _points_nowhere(self.lock_file):
                logger.warning("%s points at a journal that is not there (the run folder was moved); removing it", self.lock_file)
                break_journal_lock(self.lock_file)
            elif now - seen_at > self.grace_seconds:
                logger.warning("%s was not released for %.0f s (a writer was killed mid-append); removing it", self.lock_file, self.grace_seconds)
                break_journal_lock(self.lock_file)
            else:
                time.sleep(pause)
                pause = min(pause * 2, 0.1)

    def release(self) -> None:
        break_journal_lock(self.lock_file)


def _points_nowhere(lock_file: str) -> bool:
    try:
        return not os.path.exists(os.path.join(os.path.dirname(lock_file), os.readlink(lock_file)))
    except OSError:
        return False


def break_journal_lock(lock_file: str | Path) -> bool:
    """Remove the journal lock ``lock_file`` (renamed to a unique name first, so that two processes breaking it at
    once do not remove a lock taken in between). Whether there was one to remove."""
    aside = f"{lock_file}{uuid.uuid4().hex}.rename"
    try:
        os.rename(lock_file, aside)
    except FileNotFoundError:
        return False
    os.unlink(aside)
    return True


def journal_storage(path: Path) -> Any:
    """Optuna's journal storage on ``path`` (made absolute: Optuna's symlink lock points at the path as given, and a
    relative one would dangle from inside the folder), with a ``BoundedJournalLock``. Reading takes no lock."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    absolute = str(Path(path).resolve())
    lock = cast(Any, BoundedJournalLock(absolute))
    return optuna.storages.JournalStorage(JournalFileBackend(absolute, lock_obj=lock))


def prepare_journal(run_dir: Path) -> None:
    """Make the run's journal safe to open for writing; only the holder of the run folder's lock may call this.

    No other nasforge process can be appending to it, so a cut-short last record is set aside (``repair_journal``,
    which logs a warning saying what it kept where) and a leftover Optuna lock (a process killed mid-append, or a
    copy of the folder) is stale and removed at once instead of after the grace period. Raises ``JournalError``
    when the journal is damaged mid-file."""
    if not holds_lock(run_dir):
        raise RuntimeError(f"prepare_journal({run_dir}) needs the run folder's lock (nas.run_lock.RunLock)")
    path = RunDir(run_dir).study
    repair_journal(path)
    lock_file = Path(str(path) + JOURNAL_LOCK_SUFFIX)
    if os.path.lexists(lock_file):
        break_journal_lock(lock_file)
        logger.warning("removed %s, left by a process stopped mid-append (this process holds the run folder, so no one else writes)", lock_file)
    for leftover in path.parent.glob(f"{path.name}{JOURNAL_LOCK_SUFFIX}*.rename"):
        leftover.unlink(missing_ok=True)


@locks_run_dir("run_dir", create=True)
def open_study(run_dir: Path, settings: SearchSettings, *, resume: bool, walk: ParamWalk | None = None) -> Any:
    """Create (or, with ``resume``, load) the run's study; refuses to mix a different search into an existing one.
    ``walk``: the space's decision walk, for samplers that walk the conditional space themselves. The journal is
    repaired first (``prepare_journal``); the caller holds the run folder's lock for as long as it writes to the study
    (``run_search`` does)."""
    import optuna
    from optuna.study import StudyDirection

    folder = RunDir(run_dir).search
    folder.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).study
    prepare_journal(run_dir)
    sampler = make_sampler(settings.sampler, seed=settings.seed, population_size=settings.population_size, walk=walk)
    storage = journal_storage(path)
    directions = [StudyDirection.MAXIMIZE] + [StudyDirection.MINIMIZE] * len(settings.targets)
    existing = [summary.study_name for summary in optuna.study.get_all_study_summaries(storage)]
    if STUDY_NAME in existing:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)
        stored = study.user_attrs.get("settings", {})
        if not resume:
            raise RunError(f"{path} already holds a search; add --resume to continue it or choose another --out")
        for key in ("targets", "threads", "batch_size", "latency_limits", "max_params", "max_macs", "latency"):
            if key in stored and json.loads(jsonio.dumps(stored[key])) != json.loads(jsonio.dumps(getattr(settings, key))):
                raise RunError(f"{path} was searched with {key} = {stored[key]}, this run asks for {getattr(settings, key)}; choose another --out")
        return study
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, directions=directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(settings.metric_names)
    study.set_user_attr("settings", {key: getattr(settings, key) for key in SearchSettings.__dataclass_fields__ if key != "address"})
    study.set_user_attr("constraints", settings.constraint_names)
    return study


def feasible(trial: Any) -> bool:
    """Whether every constraint the trial recorded (``Trial.set_constraint``) is met."""
    return all(value <= 0 for value in trial.constraints.values())


def distinct_trials(study: Any) -> list[Any]:
    """Complete trials, one per arch (duplicates dropped)."""
    from optuna.trial import TrialState

    return [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "duplicate_of" not in trial.user_attrs]


def load_study(run_dir: Path) -> Any:
    """The study of a searched run directory, for reading. When no other process holds the folder, the journal is
    repaired first (``prepare_journal``); when one does, it is read as it stands (Optuna skips a record still being
    appended) and nothing is changed."""
    import optuna

    path = RunDir(run_dir).study
    if not path.exists():
        raise RunError(f"{run_dir} has no search yet ({path} is missing); run `nas run` first")
    try:
        with RunLock(run_dir):
            prepare_journal(run_dir)
    except RunBusyError:
        logger.info("%s is being searched by another process; reading its study as it stands", run_dir)
    except OSError as error:
        logger.info("cannot take %s for a repair of its journal (%s); reading its study as it stands", run_dir, error)
    return optuna.load_study(study_name=STUDY_NAME, storage=journal_storage(path))


__all__ = [
    "STUDY_NAME",
    "BoundedJournalLock",
    "break_journal_lock",
    "distinct_trials",
    "feasible",
    "journal_storage",
    "load_study",
    "open_study",
    "prepare_journal",
]
