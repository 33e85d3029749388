"""The accuracy-latency front of a search and its hypervolume, computed by ``moocore`` (a library made for
multi-objective fronts and indicators) on (-accuracy, latency) points, both minimised.

A front for a target holds only models that exist for that target, ranked by that model's own accuracy: on an fp32
target (``model.onnx``) the trial's accuracy objective; on an INT8 target (``model.int8.onnx``) the INT8 model's
validation accuracy (user attribute ``int8_accuracy``), and a trial without an INT8 model (its agreement with fp32
failed the export's rule: user attribute ``int8_error``) is on no INT8 front. ``absent_reason`` says why a trial is
left out; callers add their own reasons (an export that failed) through ``excluded``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import moocore
import numpy as np

from nas.search.study import distinct_trials, feasible


def model_kind(target: str) -> str:
    """``"int8"`` or ``"fp32"``: which exported model ``target`` runs (``LatencyTarget.model_kind``)."""
    from nas.latency.targets import get_target

    return get_target(target).model_kind


def absent_reason(trial: Any, target: str, excluded: Mapping[int, str] | None = None) -> str | None:
    """Why ``trial`` has no model for ``target`` (None when it has one). ``excluded``: trial number -> reason, from
    the caller (for example an export that failed)."""
    if model_kind(target) == "int8":
        error = trial.user_attrs.get("int8_error")
        if error:
            return str(error)
        if trial.user_attrs.get("int8_accuracy") is None:
            return "the trial records no INT8 model accuracy (no INT8 model was evaluated)"
    if excluded and trial.number in excluded:
        return excluded[trial.number]
    return None


def target_accuracy(trial: Any, target: str) -> float:
    """The validation accuracy of the model ``trial`` ships for ``target``: the INT8 model's on an INT8 target, the
    fp32 model's otherwise (call only when ``absent_reason`` is None)."""
    if model_kind(target) == "int8":
        return float(trial.user_attrs["int8_accuracy"])
    return float(trial.values[0])


def pareto_front(study: Any, target: str, *, excluded: Mapping[int, str] | None = None) -> list[Any]:
    """Feasible distinct trials with a model for ``target`` on the (accuracy of that model max, latency-on-``target``
    min) front, fastest first. Trials with equal values are all kept (neither dominates the other)."""
    settings = study.user_attrs["settings"]
    index = 1 + list(settings["targets"]).index(target)
    trials = [trial for trial in distinct_trials(study) if feasible(trial) and absent_reason(trial, target, excluded) is None]
    if not trials:
        return []
    points = np.asarray([[-target_accuracy(trial, target), trial.values[index]] for trial in trials], dtype=float)
    mask = moocore.is_nondominated(points, keep_weakly=True)
    return sorted((trial for trial, keep in zip(trials, mask, strict=True) if keep), key=lambda trial: trial.values[index])


def hypervolume(front: Iterable[Any], index: int, reference_latency: float, *, target: str | None = None) -> float:
    """Area dominated by the front in (accuracy, latency) above accuracy 0 and below ``reference_latency``
    (``index``: the latency's position in ``trial.values``; ``target``: rank by ``target_accuracy`` on it, else by
    the accuracy objective)."""
    points = np.asarray([[-(target_accuracy(trial, target) if target else trial.values[0]), trial.values[index]] for trial in front], dtype=float)
    if len(points) == 0:
        return 0.0
    return float(moocore.hypervolume(points, ref=[0.0, reference_latency]))


__all__ = ["absent_reason", "hypervolume", "model_kind", "pareto_front", "target_accuracy"]
