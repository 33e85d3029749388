"""``adapted``: a latency predictor for a new device from a predictor of another device and a few measurements.

A predictor fitted on device A ranks archs well on A; on device B most of that ranking carries over and what changes
is mostly scale (a faster or slower machine) and the price of compute against everything else. ``adapt`` fits a
correction of A's predictions on at most ``MAX_MEASUREMENTS`` (arch, latency) pairs measured on B::

    log t_B = intercept + slope * log t_A + macs_coefficient * log MACs

- robust: Huber weights (``HUBER_K`` robust standard deviations, scale from the median absolute deviation, never below
  ``SCALE_FLOOR``) by iteratively reweighted least squares, so one disturbed measurement does not tilt the line;
- shrunk toward "B is A scaled" (``slope = 1``, ``macs_coefficient = 0``) by a ridge of strength ``PRIOR_STRENGTH``
  (in squared log units: a residual of about 5 % against a prior spread of about 25 % on each coefficient), so two or
  three measurements give a pure rescaling and ten let the data tilt it; the intercept is free (the speed ratio of
  the devices is exactly what a few measurements determine well);
- deterministic: closed-form solves in a fixed number of steps, no randomness (the seed changes nothing).

The adapted predictor holds its source whole (name, seed, fingerprint and fitted state) inside its own strict-JSON
state, so ``predictor.save(folder)`` writes one ``predictor.json`` that loads by name like any predictor, recording
both the source's fingerprint (``source_fingerprint``) and the new device's (the file's ``fingerprint``).

Made through the registry with no source (``create_predictor("adapted", space)``), it adapts the MAC count itself:
``log t = intercept + slope * log MACs``, the same correction with MACs standing in for device A.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from nas.latency.fingerprint import fingerprint_key
from nas.predictors.base import LatencyPredictor, NotFittedError, PredictorError, register_predictor
from nas.predictors.learned import PieceCosts
from nas.supernets.space import Arch, SearchSpace

logger = logging.getLogger(__name__)

MAX_MEASUREMENTS = 20
"""The most (arch, latency) pairs of the new device ``adapted`` takes: it is a few-shot correction; with more
measurements a predictor fitted on them alone (``gbdt``) is the honest choice."""

PRIOR_STRENGTH = 0.04
"""Ridge strength pulling ``slope`` toward 1 and ``macs_coefficient`` toward 0: (0.05 / 0.25) ** 2."""

HUBER_K = 1.345
"""Residuals beyond this many robust standard deviations get weight ``HUBER_K * scale / |residual|``."""

SCALE_FLOOR = 0.01
"""The robust residual scale never falls below 1 % (log units), so near-exact fits do not down-weight everything."""

ITERATIONS = 50
"""Reweighting steps at most (it stops earlier when the coefficients no longer move)."""

COEFFICIENTS = ("intercept", "slope", "macs_coefficient")


@register_predictor("adapted", kind="latency", features="log of a source predictor's latency (or of MACs) and log MACs", few_shot=MAX_MEASUREMENTS)
class AdaptedPredictor(LatencyPredictor):
    """A robust, ridge-shrunk log-linear correction of ``source``'s predictions (see the module docstring).

    Args:
        space: the search space (``source``'s).
        seed: kept for the protocol; the fit is deterministic without it.
        source: a fitted predictor of another device; ``None`` adapts the MAC count instead.
    """

    min_measurements = 2
    max_measurements: ClassVar[int] = MAX_MEASUREMENTS

    def __init__(self, space: SearchSpace, *, seed: int = 0, source: LatencyPredictor | None = None) -> None:
        super().__init__(space, seed=seed)
        if source is not None:
            _check_source(source, space, self._what())
        self.source = source
        self.costs = PieceCosts.for_space(space)
        self.coefficients: dict[str, float] | None = None
        self.residual_rms_log: float | None = None

    @property
    def source_fingerprint(self) -> dict[str, Any] | None:
        """The fingerprint of the device the source predictor was fitted for (``None`` without a source)."""
        return None if self.source is None else self.source.fingerprint

    def features(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, 2]``: the log of the source's predicted milliseconds (of the MACs without a source), the log MACs."""
        log_macs = np.log(np.maximum(self.costs.matrix(archs)[:, 0], 1.0))
        if self.source is None:
            return np.column_stack([log_macs, log_macs])
        predicted = np.asarray(self.source.predict_features(self.source.features(archs)), dtype=np.float64)
        if predicted.shape != (len(archs),) or not np.all(np.isfinite(predicted) & (predicted > 0)):
            raise PredictorError(f"{self._what()}: the source predictor {self.source.name!r} predicted a latency that is not a finite number > 0")
        return np.column_stack([np.log(predicted), log_macs])

    def fit_features(self, features: np.ndarray, latencies_ms: np.ndarray) -> None:
        if len(features) > self.max_measurements:
            raise PredictorError(
                f"{self._what()} takes at most {self.max_measurements} (arch, measurement) pairs of the new device, got {len(features)}: "
                "it is a few-shot correction of the source predictor; with this many measurements fit a predictor on them alone "
                "(create_predictor('gbdt', space).fit(...)), or pass the ones that span the latency range best"
            )
        targets = np.log(latencies_ms)
        intercept, slope, macs_coefficient, residuals = _robust_fit(features[:, 0], features[:, 1], targets, use_macs=self.source is not None)
        self.coefficients = {"intercept": intercept, "slope": slope, "macs_coefficient": macs_coefficient}
        self.residual_rms_log = float(np.sqrt(np.mean(residuals**2)))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """``exp(intercept + slope * features[:, 0] + macs_coefficient * features[:, 1])``, milliseconds ``[N]``."""
        if self.coefficients is None:
            raise PredictorError(f"{self._what()} has no coefficients; fit it first")
        coefficients = self.coefficients
        return np.exp(coefficients["intercept"] + coefficients["slope"] * features[:, 0] + coefficients["macs_coefficient"] * features[:, 1])

    def state(self) -> dict[str, Any]:
        if self.coefficients is None or self.residual_rms_log is None:
            raise PredictorError(f"{self._what()} has no coefficients; fit it first")
        source = None if self.source is None else self.source.record()
        return {**self.coefficients, "residual_rms_log": self.residual_rms_log, "source": source}

    def load_state(self, state: Mapping[str, Any]) -> None:
        expected = (*COEFFICIENTS, "residual_rms_log", "source")
        missing = [key for key in expected if key not in state]
        unknown = sorted(set(state) - set(expected))
        if missing or unknown:
            raise PredictorError(f"{self._what()} state: missing keys {missing}, unknown keys {unknown}")
        for key in (*COEFFICIENTS, "residual_rms_log"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise PredictorError(f"{self._what()} state: {key} must be a finite number, got {value!r}")
        source = None if state["source"] is None else self._loaded_source(state["source"])
        if source is None and state["macs_coefficient"] != 0:
            raise PredictorError(f"{self._what()} state: macs_coefficient must be 0 without a source, got {state['macs_coefficient']!r}")
        self.source = source
        self.coefficients = {key: float(state[key]) for key in COEFFICIENTS}
        self.residual_rms_log = float(state["residual_rms_log"])

    def _loaded_source(self, record: Any) -> LatencyPredictor:
        if not isinstance(record, Mapping):
            raise PredictorError(f"{self._what()} state: source must be null or a JSON object, got {type(record).__name__}")
        return LatencyPredictor.from_record(dict(record), self.space, where=f"{self._what()} state: source")


def adapt(
    source: LatencyPredictor | str | os.PathLike[str],
    archs: Sequence[Arch],
    measurements_ms: Sequence[float] | np.ndarray,
    fingerprint: Mapping[str, Any],
    *,
    space: SearchSpace | None = None,
) -> AdaptedPredictor:
    """A predictor for the device of ``fingerprint``: ``source`` (a fitted predictor of another device, or the folder
    it was saved in) corrected with ``measurements_ms`` (``[N]`` milliseconds, ``2 <= N <= MAX_MEASUREMENTS``) of
    ``archs`` measured on that device.

    ``space`` is needed when ``source`` is a folder (the source is loaded without a fingerprint check, on purpose:
    it describes another device); otherwise it defaults to the source's space.

    Raises:
        PredictorError: a source that is not fitted, of another space, or unreadable; fewer than 2 or more than
            ``MAX_MEASUREMENTS`` pairs; and every refusal of ``LatencyPredictor.fit``.
    """
    if isinstance(source, str | os.PathLike):
        if space is None:
            raise PredictorError(f"adapt: give space= to load the source predictor from the folder {str(source)!r}")
        source = LatencyPredictor.load(Path(source), space, fingerprint=None)
    if not isinstance(source, LatencyPredictor):
        raise PredictorError(f"adapt: source must be a fitted LatencyPredictor or the folder one was saved in, got {type(source).__name__}")
    if not source.is_fitted:
        raise NotFittedError(f"adapt: the source predictor {source.name!r} is not fitted; fit it on the first device's measurements first")
    adapted = AdaptedPredictor(space if space is not None else source.space, seed=source.seed, source=source)
    adapted.fit(archs, measurements_ms, fingerprint)
    if fingerprint_key(adapted.fingerprint) == fingerprint_key(source.fingerprint):
        logger.warning("adapt: the measurements come from the device and setting the source %r was fitted for; refitting it would use them better", source.name)
    return adapted


def _robust_fit(source_log: np.ndarray, log_macs: np.ndarray, targets: np.ndarray, *, use_macs: bool) -> tuple[float, float, float, np.ndarray]:
    """``(intercept, slope, macs_coefficient, residuals)`` of the Huber-weighted ridge fit of
    ``targets - source_log = intercept + (slope - 1) * source_log + macs_coefficient * log_macs`` (all ``[N]``)."""
    design = np.column_stack([source_log, log_macs]) if use_macs else source_log[:, None]
    response = targets - source_log
    weights = np.ones(len(targets))
    penalty = PRIOR_STRENGTH * np.eye(design.shape[1])
    solution = np.zeros(design.shape[1])
    intercept = 0.0
    for _ in range(ITERATIONS):
        total = weights.sum()
        design_mean = weights @ design / total
        response_mean = float(weights @ response / total)
        centred = design - design_mean
        weighted = centred * weights[:, None]
        updated = np.linalg.solve(centred.T @ weighted + penalty, weighted.T @ (response - response_mean))
        intercept = response_mean - float(design_mean @ updated)
        residuals = response - intercept - design @ updated
        scale = max(1.4826 * float(np.median(np.abs(residuals - np.median(residuals)))), SCALE_FLOOR)
        weights = np.minimum(1.0, HUBER_K * scale / np.maximum(np.abs(residuals), 1e-300))
        converged = np.max(np.abs(updated - solution)) < 1e-12
        solution = updated
        if converged:
            break
    residuals = response - intercept - design @ solution
    slope = 1.0 + float(solution[0])
    macs_coefficient = float(solution[1]) if use_macs else 0.0
    return float(intercept), slope, macs_coefficient, residuals


def _check_source(source: LatencyPredictor, space: SearchSpace, what: str) -> None:
    if not isinstance(source, LatencyPredictor):
        raise PredictorError(f"{what}: source must be a fitted LatencyPredictor, got {type(source).__name__}")
    if not source.is_fitted:
        raise NotFittedError(f"{what}: the source predictor {source.name!r} is not fitted")
    if source.space != space:
        raise PredictorError(f"{what}: the source predictor is for space {source.space.name!r}, not for this space {space.name!r}")


__all__ = ["MAX_MEASUREMENTS", "AdaptedPredictor", "adapt"]
