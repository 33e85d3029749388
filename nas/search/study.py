"""The run's Optuna study: journal storage, creating / resuming / loading it, and reading its trials.

The study lives in ``RUN_DIR/search/study.journal`` (Optuna's journal file storage), so a killed search resumes
with ``--resume`` and the file opens in Optuna's own tools::

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend("RUN_DIR/search/study.journal"))
    study = optuna.load_study(study_name="nasforge", storage=storage)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from nas.run_dir import RunDir
from nas.search.samplers import ParamWalk, make_sampler
from nas.search.settings import SearchSettings
from nas.training.loop import RunError

STUDY_NAME = "nasforge"

JOURNAL_LOCK_GRACE_SECONDS = 10


def journal_storage(path: Path) -> Any:
    """Optuna's journal storage on ``path``. The path is made absolute: Optuna's symlink lock points at the path as
    given, and a relative one dangles from inside the folder, so a lock left by a killed process would never be seen
    as stale (the next process spins on it). A lock not released for ``JOURNAL_LOCK_GRACE_SECONDS`` (appends take
    milliseconds) is taken to be a killed process's and broken."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    absolute = str(Path(path).resolve())
    lock = JournalFileSymlinkLock(absolute, grace_period=JOURNAL_LOCK_GRACE_SECONDS)
    return optuna.storages.JournalStorage(JournalFileBackend(absolute, lock_obj=lock))


def open_study(run_dir: Path, settings: SearchSettings, *, resume: bool, walk: ParamWalk | None = None) -> Any:
    """Create (or, with ``resume``, load) the run's study; refuses to mix a different search into an existing one.
    ``walk``: the space's decision walk, for samplers that walk the conditional space themselves."""
    import optuna
    from optuna.study import StudyDirection

    folder = RunDir(run_dir).search
    folder.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).study
    sampler = make_sampler(settings.sampler, seed=settings.seed, population_size=settings.population_size, walk=walk)
    storage = journal_storage(path)
    directions = [StudyDirection.MAXIMIZE] + [StudyDirection.MINIMIZE] * len(settings.targets)
    existing = [summary.study_name for summary in optuna.study.get_all_study_summaries(storage)]
    if STUDY_NAME in existing:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)
        stored = study.user_attrs.get("settings", {})
        if not resume:
            raise RunError(f"{path} already holds a search; add --resume to continue it or choose another --out")
        for key in ("targets", "threads", "batch_size", "latency_limits", "max_params", "max_macs"):
            if key in stored and json.loads(json.dumps(stored[key])) != json.loads(json.dumps(getattr(settings, key))):
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
    """The study of a searched run directory."""
    import optuna

    path = RunDir(run_dir).study
    if not path.exists():
        raise RunError(f"{run_dir} has no search yet ({path} is missing); run `nas run` first")
    return optuna.load_study(study_name=STUDY_NAME, storage=journal_storage(path))


__all__ = ["STUDY_NAME", "distinct_trials", "feasible", "journal_storage", "load_study", "open_study"]
