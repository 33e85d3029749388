"""``linear_macs``: latency as a least-squares line in MACs and parameters.

``latency_ms = intercept_ms + ms_per_mac * MACs + ms_per_parameter * parameters``, fitted by ordinary least squares
on the measurements. It is the simplest honest baseline: MACs and parameters explain much of the latency within one
block family on one device and miss what they do not count (memory traffic, operator fusion, per-node overheads,
INT8 kernels that favour some shapes). It extrapolates linearly, so far outside the fitted range it can predict
nonsense (even below zero); fit it on archs that span the range it is asked about.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nas.predictors.arch_costs import ArchCosts
from nas.predictors.base import LatencyPredictor, PredictorError, register_predictor
from nas.supernets.space import Arch, SearchSpace

COEFFICIENTS = ("intercept_ms", "ms_per_mac", "ms_per_parameter")


@register_predictor("linear_macs", kind="latency", features="MACs and parameters (nas.supernets.costs.arch_cost)")
class LinearMacsPredictor(LatencyPredictor):
    """Least squares of latency on ``[1, MACs, parameters]``; deterministic, so ``seed`` changes nothing."""

    min_measurements = len(COEFFICIENTS)

    def __init__(self, space: SearchSpace, *, seed: int = 0) -> None:
        super().__init__(space, seed=seed)
        self.costs = ArchCosts.for_space(space)
        self.coefficients: dict[str, float] | None = None
        self.training_rmse_ms: float | None = None

    def features(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, 2]``: MACs and parameters of each arch (batch of one)."""
        return self.costs.matrix(archs)

    def fit_features(self, features: np.ndarray, latencies_ms: np.ndarray) -> None:
        """Ordinary least squares on columns scaled to at most 1 in magnitude (``numpy.linalg.lstsq``: the
        minimum-norm solution when MACs and parameters are collinear, e.g. when all archs share one cost)."""
        scale = np.maximum(np.abs(features).max(axis=0), 1.0)
        design = np.column_stack([np.ones(len(features)), features / scale])
        solution, _, _, _ = np.linalg.lstsq(design, latencies_ms, rcond=None)
        values = [float(solution[0]), *(float(value) for value in solution[1:] / scale)]
        if not all(math.isfinite(value) for value in values):
            raise PredictorError(f"latency predictor 'linear_macs': least squares gave non-finite coefficients {values}")
        self.coefficients = dict(zip(COEFFICIENTS, values, strict=True))
        residuals = latencies_ms - self.predict_features(features)
        self.training_rmse_ms = float(np.sqrt(np.mean(residuals**2)))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Each row evaluated on its own, in a fixed order of operations (a batch equals its rows one by one)."""
        if self.coefficients is None:
            raise PredictorError("latency predictor 'linear_macs' has no coefficients; fit it first")
        coefficients = self.coefficients
        return coefficients["intercept_ms"] + coefficients["ms_per_mac"] * features[:, 0] + coefficients["ms_per_parameter"] * features[:, 1]

    def state(self) -> dict[str, Any]:
        if self.coefficients is None:
            raise PredictorError("latency predictor 'linear_macs' has no coefficients; fit it first")
        return {**self.coefficients, "training_rmse_ms": self.training_rmse_ms}

    def load_state(self, state: Mapping[str, Any]) -> None:
        expected = (*COEFFICIENTS, "training_rmse_ms")
        missing = [key for key in expected if key not in state]
        unknown = sorted(set(state) - set(expected))
        if missing or unknown:
            raise PredictorError(f"latency predictor 'linear_macs' state: missing keys {missing}, unknown keys {unknown}")
        for key in expected:
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise PredictorError(f"latency predictor 'linear_macs' state: {key} must be a finite number, got {value!r}")
        self.coefficients = {key: float(state[key]) for key in COEFFICIENTS}
        self.training_rmse_ms = float(state["training_rmse_ms"])


__all__ = ["COEFFICIENTS", "LinearMacsPredictor"]
