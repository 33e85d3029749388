"""An accuracy predictor: the inherited-weight validation accuracy of archs of one space, learned from the search.

The search evaluates each candidate with the supernet's weights (BN recalibrated) on the validation split; those
(arch, accuracy) pairs sit in the run's study journal (``run_accuracy_pairs`` reads them: complete trials, one per
arch, the arch in ``user_attrs["arch"]``, the fp32 accuracy in ``values[0]``). ``AccuracyPredictor`` fits them and
predicts a batch of archs at once, in ``[0, 1]``::

    archs, accuracies = run_accuracy_pairs("runs/quick", space)
    predictor = AccuracyPredictor(space, seed=0).fit(archs[:-50], accuracies[:-50])
    predictor.quality(archs[-50:], accuracies[-50:])    # AccuracyQuality(kendall_tau=..., mae=..., pairs=50)
    predictor.save("runs/quick/predictors")               # accuracy_predictor.json, strict JSON

The model is the mean of two that fail differently on search-sized data (tens to thousands of pairs): a ridge
regression (penalty chosen by leave-one-out cross-validation, ``sklearn.linear_model.RidgeCV``, on standardised
columns), which captures the mostly additive effect of each choice from few pairs, and gradient-boosted trees
(``nas.predictors.learned.TreeEnsemble``), which capture interactions once there are enough pairs. Both see the space
walk's one-hot decisions plus log MACs and log parameters (``nas.predictors.learned.PieceCosts``). Their average is
clipped to ``[0, 1]``.

It is not a latency predictor: accuracy belongs to a trained supernet, not to a device, so it has no fingerprint and
is not in ``PREDICTORS``; its file is ``accuracy_predictor.json`` (format ``nasforge.accuracy_predictor``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from nas import jsonio
from nas.predictors.base import NotFittedError, PredictorError, strict_json
from nas.predictors.learned import ROW_CHUNK, PieceCosts, TreeEnsemble
from nas.supernets.space import Arch, ArchError, SearchSpace

logger = logging.getLogger(__name__)

ACCURACY_PREDICTOR_FILE = "accuracy_predictor.json"
FILE_FORMAT = "nasforge.accuracy_predictor"
FILE_VERSION = 1
FILE_KEYS = ("format", "version", "space", "seed", "pairs", "feature_names", "state")
STATE_KEYS = ("ridge", "trees")
RIDGE_KEYS = ("alpha", "intercept", "coefficients", "means", "scales")
COST_FEATURES = ("log_macs", "log_parameters")

RIDGE_ALPHAS = tuple(float(alpha) for alpha in np.logspace(-3, 3, 13))
"""The ridge penalties leave-one-out cross-validation chooses from (on standardised columns)."""


@dataclass(frozen=True, slots=True)
class AccuracyQuality:
    """How well predictions rank and match held-out accuracies: Kendall's tau-b (``None`` when the predictions or the
    accuracies are all equal, so a ranking is undefined), the mean absolute error, and the number of pairs."""

    kendall_tau: float | None
    mae: float
    pairs: int

    def to_dict(self) -> dict[str, Any]:
        return {"kendall_tau": self.kendall_tau, "mae": self.mae, "pairs": self.pairs}


class AccuracyPredictor:
    """Predicts validation accuracy in ``[0, 1]`` of archs of ``space`` (see the module docstring).

    Args:
        space: the search space whose archs it predicts.
        seed: the trees' ``random_state``; the same pairs and seed give the same predictions.
    """

    min_pairs: ClassVar[int] = 10
    n_trees: ClassVar[int] = 200
    learning_rate: ClassVar[float] = 0.08
    max_depth: ClassVar[int] = 3
    min_samples_leaf: ClassVar[int] = 3

    def __init__(self, space: SearchSpace, *, seed: int = 0) -> None:
        if not isinstance(space, SearchSpace):
            raise PredictorError(f"AccuracyPredictor needs a SearchSpace, got {type(space).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise PredictorError(f"AccuracyPredictor seed must be an integer >= 0, got {seed!r}")
        self.space = space
        self.seed = seed
        self.costs = PieceCosts.for_space(space)
        self.trees: TreeEnsemble | None = None
        self.ridge: dict[str, Any] | None = None
        self.pairs = 0

    @property
    def is_fitted(self) -> bool:
        return self.trees is not None and self.ridge is not None

    @property
    def feature_names(self) -> tuple[str, ...]:
        """One name per column of ``features``: the walk's one-hot columns, then ``log_macs``, ``log_parameters``."""
        return (*self.space.walk().feature_names, *COST_FEATURES)

    def features(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, F]`` float64 features of checked ``archs`` (``feature_names``)."""
        costs = self.costs.matrix(archs)
        return np.hstack([self.space.walk().features(archs).astype(np.float64), np.log(np.maximum(costs, 1.0))])

    def fit(self, archs: Sequence[Arch], accuracies: Sequence[float] | np.ndarray) -> AccuracyPredictor:
        """Fit on ``archs`` and their accuracies (``[N]``, each a finite number in ``[0, 1]``); refitting replaces
        the earlier fit. Returns ``self``.

        Raises:
            PredictorError: fewer than ``min_pairs`` pairs, lengths that differ, an accuracy outside ``[0, 1]``, an
                arch outside the space.
        """
        checked = self._checked_archs(archs, "fit")
        targets = self._checked_accuracies(accuracies, len(checked), "fit")
        if len(checked) < self.min_pairs:
            raise PredictorError(f"AccuracyPredictor.fit needs at least {self.min_pairs} (arch, accuracy) pairs, got {len(checked)}")
        features = self.features(checked)
        from sklearn.linear_model import RidgeCV

        means = features.mean(axis=0)
        spread = features.std(axis=0)
        scales = np.where(spread > 0, spread, 1.0)
        ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit((features - means) / scales, targets)
        trees = TreeEnsemble.fit(
            features,
            targets,
            seed=self.seed,
            n_trees=self.n_trees,
            learning_rate=self.learning_rate,
            max_depth=self.max_depth,
            min_samples_leaf=self.min_samples_leaf,
        )
        self.ridge = {
            "alpha": float(ridge.alpha_),
            "intercept": float(ridge.intercept_),
            "coefficients": [float(value) for value in ridge.coef_],
            "means": [float(value) for value in means],
            "scales": [float(value) for value in scales],
        }
        self.trees = trees
        self.pairs = len(checked)
        logger.info("AccuracyPredictor fitted on %d pairs (ridge alpha %g)", len(checked), self.ridge["alpha"])
        return self

    def predict(self, archs: Sequence[Arch]) -> np.ndarray:
        """Predicted accuracy of each arch, ``[N]`` float64 in ``[0, 1]``; each row equals predicting that arch
        alone."""
        self._require_fitted("predict")
        checked = self._checked_archs(archs, "predict")
        if not checked:
            return np.zeros(0, dtype=np.float64)
        return self.predict_features(self.features(checked))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """The clipped mean of the ridge and the trees for each row of ``features`` ``[N, F]``: ``[N]`` in ``[0, 1]``."""
        self._require_fitted("predict")
        assert self.trees is not None and self.ridge is not None
        ridge = self.ridge
        coefficients = np.asarray(ridge["coefficients"])
        means, scales = np.asarray(ridge["means"]), np.asarray(ridge["scales"])
        linear = np.empty(len(features), dtype=np.float64)
        for start in range(0, len(features), ROW_CHUNK):
            block = (features[start : start + ROW_CHUNK] - means) / scales
            linear[start : start + len(block)] = ridge["intercept"] + (block * coefficients).sum(axis=1)
        return np.clip(0.5 * (linear + self.trees.predict(features)), 0.0, 1.0)

    def quality(self, archs: Sequence[Arch], accuracies: Sequence[float] | np.ndarray) -> AccuracyQuality:
        """Kendall's tau-b and the mean absolute error of the predictions of ``archs`` against their measured
        ``accuracies`` (held out from the fit, for an honest figure); at least 2 pairs."""
        self._require_fitted("quality")
        checked = self._checked_archs(archs, "quality")
        measured = self._checked_accuracies(accuracies, len(checked), "quality")
        if len(checked) < 2:
            raise PredictorError(f"AccuracyPredictor.quality needs at least 2 (arch, accuracy) pairs, got {len(checked)}")
        from scipy.stats import kendalltau

        predicted = self.predict(checked)
        tau = float(kendalltau(predicted, measured).statistic)
        return AccuracyQuality(tau if math.isfinite(tau) else None, float(np.mean(np.abs(predicted - measured))), len(checked))

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the fitted predictor to ``folder/accuracy_predictor.json`` (strict JSON; the folder is created)."""
        self._require_fitted("save")
        assert self.trees is not None
        record = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "space": self.space.name,
            "seed": self.seed,
            "pairs": self.pairs,
            "feature_names": list(self.feature_names),
            "state": strict_json({"ridge": self.ridge, "trees": self.trees.state()}, "AccuracyPredictor state"),
        }
        path = Path(folder) / ACCURACY_PREDICTOR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        jsonio.write(path, record, indent=1, sort_keys=True, nonfinite="error")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str], space: SearchSpace) -> AccuracyPredictor:
        """The accuracy predictor saved in ``folder``, for ``space``.

        Raises:
            PredictorError: no readable file, another format or version, another space (or the same name with other
                decisions), a malformed state.
        """
        path = Path(folder) / ACCURACY_PREDICTOR_FILE
        try:
            text = path.read_text()
        except OSError as error:
            raise PredictorError(f"no saved accuracy predictor at {path}: {error.strerror or error}") from None
        try:
            record = jsonio.loads(text)
        except ValueError as error:
            raise PredictorError(f"{path} is not strict JSON: {error}") from None
        if not isinstance(record, dict):
            raise PredictorError(f"{path} must hold a JSON object with keys {list(FILE_KEYS)}, got {type(record).__name__}")
        _require_keys(record, FILE_KEYS, str(path))
        if record["format"] != FILE_FORMAT or record["version"] != FILE_VERSION:
            raise PredictorError(f"{path}: format must be {FILE_FORMAT!r} version {FILE_VERSION}, got {record['format']!r} version {record['version']!r}")
        if record["space"] != space.name:
            raise PredictorError(f"{path} is an accuracy predictor for space {record['space']!r}, not for space {space.name!r}")
        predictor = cls(space, seed=record["seed"])
        if record["feature_names"] != list(predictor.feature_names):
            raise PredictorError(
                f"{path} was fitted on features that the space {space.name!r} no longer gives (its decisions or choices changed); fit it again"
            )
        pairs = record["pairs"]
        if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < cls.min_pairs:
            raise PredictorError(f"{path}: 'pairs' must be an integer >= {cls.min_pairs}, got {pairs!r}")
        state = record["state"]
        if not isinstance(state, dict):
            raise PredictorError(f"{path}: 'state' must be a JSON object")
        _require_keys(state, STATE_KEYS, f"{path}: state")
        predictor.ridge = _checked_ridge(state["ridge"], len(predictor.feature_names), f"{path}: state.ridge")
        trees = TreeEnsemble.from_state(state["trees"], f"{path}: state")
        if trees.n_features != len(predictor.feature_names):
            raise PredictorError(f"{path}: the trees take {trees.n_features} features, the space gives {len(predictor.feature_names)}")
        predictor.trees = trees
        predictor.pairs = pairs
        return predictor

    def _require_fitted(self, action: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"AccuracyPredictor is not fitted, so it cannot {action}: call fit(archs, accuracies) or AccuracyPredictor.load(folder, space)"
            )

    def _checked_archs(self, archs: Sequence[Arch], action: str) -> list[Arch]:
        if isinstance(archs, Arch | str | bytes) or not isinstance(archs, Sequence):
            raise PredictorError(f"AccuracyPredictor.{action} takes a sequence of Arch (a batch), got {type(archs).__name__}")
        checked = list(archs)
        for index, arch in enumerate(checked):
            if not isinstance(arch, Arch):
                raise PredictorError(f"AccuracyPredictor.{action}: archs[{index}] must be an Arch, got {type(arch).__name__}")
            try:
                self.space.check(arch)
            except ArchError as error:
                raise PredictorError(f"AccuracyPredictor.{action}: archs[{index}] is not in space {self.space.name!r}: {error}") from None
        return checked

    def _checked_accuracies(self, accuracies: Sequence[float] | np.ndarray, count: int, action: str) -> np.ndarray:
        try:
            values = np.asarray(accuracies, dtype=np.float64)
        except (TypeError, ValueError):
            values = None
        if values is None or values.ndim != 1 or isinstance(accuracies, str | bytes):
            raise PredictorError(f"AccuracyPredictor.{action}: accuracies must be a flat sequence of numbers in [0, 1], got {type(accuracies).__name__}")
        if len(values) != count:
            raise PredictorError(f"AccuracyPredictor.{action}: {count} archs but {len(values)} accuracies; give one per arch")
        for index, value in enumerate(values.tolist()):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise PredictorError(
                    f"AccuracyPredictor.{action}: accuracies[{index}] must be a finite number in [0, 1] (a fraction, not a percentage), got {value!r}"
                )
        return values


def run_accuracy_pairs(run_dir: str | os.PathLike[str], space: SearchSpace) -> tuple[list[Arch], np.ndarray]:
    """The (arch, inherited validation accuracy) pairs a search recorded in ``run_dir``: one per distinct arch of a
    complete trial, in trial order; accuracies ``[N]`` (the fp32 model's, ``values[0]``). ``space`` is the run's
    (``parse_config`` of its ``config.yaml``); each arch is read strictly against it.

    Raises:
        PredictorError: a trial without an arch, or an arch outside ``space``.
        RunError: the folder has no search yet.
    """
    from nas.search.study import distinct_trials, load_study

    study = load_study(Path(run_dir))
    archs: list[Arch] = []
    accuracies: list[float] = []
    for trial in distinct_trials(study):
        arch_json = trial.user_attrs.get("arch")
        if not isinstance(arch_json, str):
            raise PredictorError(f"{run_dir}: trial {trial.number} has no 'arch' attribute; it was not written by `nas run`")
        try:
            archs.append(Arch.from_json(arch_json, space, source=f"{run_dir}: trial {trial.number}'s arch"))
        except ArchError as error:
            raise PredictorError(str(error)) from None
        accuracies.append(float(trial.values[0]))
    return archs, np.asarray(accuracies, dtype=np.float64)


def _require_keys(record: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [key for key in keys if key not in record]
    unknown = sorted(set(record) - set(keys))
    if missing or unknown:
        raise PredictorError(f"{where}: missing keys {missing}, unknown keys {unknown}")


def _checked_ridge(ridge: Any, n_features: int, where: str) -> dict[str, Any]:
    if not isinstance(ridge, dict):
        raise PredictorError(f"{where} must be a JSON object")
    _require_keys(ridge, RIDGE_KEYS, where)
    for key in ("alpha", "intercept"):
        value = ridge[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise PredictorError(f"{where}.{key} must be a finite number, got {value!r}")
    for key in ("coefficients", "means", "scales"):
        values = ridge[key]
        if not isinstance(values, list) or len(values) != n_features:
            raise PredictorError(f"{where}.{key} must be a list of {n_features} numbers (one per feature)")
        for index, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (key == "scales" and value <= 0):
                raise PredictorError(f"{where}.{key}[{index}] must be a finite number{' > 0' if key == 'scales' else ''}, got {value!r}")
    return {key: float(ridge[key]) if key in ("alpha", "intercept") else [float(value) for value in ridge[key]] for key in RIDGE_KEYS}


__all__ = ["ACCURACY_PREDICTOR_FILE", "AccuracyPredictor", "AccuracyQuality", "run_accuracy_pairs"]
