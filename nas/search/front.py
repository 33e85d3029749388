"""The accuracy-latency front of a search and its hypervolume, computed by ``moocore`` (a library made for
multi-objective fronts and indicators) on (-accuracy, latency) points, both minimised."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import moocore
import numpy as np

from nas.search.study import distinct_trials, feasible


def pareto_front(study: Any, target: str) -> list[Any]:
    """Feasible distinct trials on the (accuracy max, latency-on-``target`` min) front, fastest first. Trials with
    equal values are all kept (neither dominates the other)."""
    settings = study.user_attrs["settings"]
    index = 1 + list(settings["targets"]).index(target)
    trials = [trial for trial in distinct_trials(study) if feasible(trial)]
    if not trials:
        return []
    points = np.asarray([[-trial.values[0], trial.values[index]] for trial in trials], dtype=float)
    mask = moocore.is_nondominated(points, keep_weakly=True)
    return sorted((trial for trial, keep in zip(trials, mask, strict=True) if keep), key=lambda trial: trial.values[index])


def hypervolume(front: Iterable[Any], index: int, reference_latency: float) -> float:
    """Area dominated by the front in (accuracy, latency) above accuracy 0 and below ``reference_latency``
    (``index``: the latency's position in ``trial.values``)."""
    points = np.asarray([[-trial.values[0], trial.values[index]] for trial in front], dtype=float)
    if len(points) == 0:
        return 0.0
    return float(moocore.hypervolume(points, ref=[0.0, reference_latency]))


__all__ = ["hypervolume", "pareto_front"]
