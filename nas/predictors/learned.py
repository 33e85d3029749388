"""``gbdt``: gradient-boosted regression trees on an arch's decisions and costs, fitted on log latency.

Features (``GbdtPredictor.feature_names``): the space walk's one-hot decision vector (``SpaceWalk.features``; an
inactive decision is all zeros), the arch's MACs and parameters (``PieceCosts``, exact), then any extra columns a
subclass or the constructor supplies (``ExtraFeatures``: a look-up table's summed latency, say). The target is the
natural log of the latency, so the squared loss weighs relative errors alike across fast and slow archs, and a
prediction is ``exp`` of the model's output (always positive).

The model is scikit-learn's ``GradientBoostingRegressor`` (exact greedy splits, squared error, ``random_state`` =
the seed, no subsampling: a seed and data give the same trees). Its fitted trees are read through the public
``estimators_[i, 0].tree_`` arrays and kept as plain lists (``TreeEnsemble``): ``state()`` is strict JSON and no
pickle is ever written or read. Prediction does not call scikit-learn: each tree is compiled into a table indexed by
the bits of its (at most ``MAX_TESTS_PER_TREE``) distinct split tests, so a batch costs a few numpy operations per
tree, whatever its depth, and each row's result depends on that row alone.

``PieceCosts`` counts parameters and MACs of an arch as the sum of its pieces (stem, entry projections, each block in
its context and at its input size, head), each piece counted once per space; the sum equals
``nas.supernets.costs.arch_cost`` exactly (tested) at a small fraction of the cost of building each subnet.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from nas.predictors.arch_costs import PieceCosts
from nas.predictors.base import LatencyPredictor, PredictorError, register_predictor
from nas.supernets.space import Arch, SearchSpace

logger = logging.getLogger(__name__)

COST_FEATURES = ("macs", "parameters")
"""The cost columns every ``gbdt`` feature matrix has after the walk's one-hot columns."""

MAX_TESTS_PER_TREE = 16
"""The most distinct split tests (feature, threshold) one tree may hold: its table has ``2**tests`` entries."""

ROW_CHUNK = 16384
"""Rows evaluated together in ``TreeEnsemble.predict`` (bounds the memory of the cached test bits)."""

TREE_FIELDS = ("left", "right", "feature", "threshold", "value")


@dataclass(frozen=True, slots=True)
class ExtraFeatures:
    """Extra feature columns for a ``GbdtPredictor``: ``names`` (one per column, saved with the fit) and ``compute``,
    which maps checked archs to a ``[N, len(names)]`` matrix of finite numbers (e.g. a latency table's sum)."""

    names: tuple[str, ...]
    compute: Callable[[Sequence[Arch]], np.ndarray]


@dataclass(frozen=True, slots=True)
class CompiledTree:
    """One tree as a table: ``tests`` its distinct ``(column, threshold)`` splits, ``table[code]`` its leaf value when
    bit ``j`` of ``code`` is ``features[column_j] <= threshold_j``."""

    tests: tuple[tuple[int, float], ...]
    table: np.ndarray
    code_dtype: type


class TreeEnsemble:
    """Fitted boosted regression trees as plain arrays: ``prediction = baseline + learning_rate * sum(tree(x))``.

    Each tree is five equal-length lists over its nodes (node 0 the root; children have larger indices than their
    parent): ``left`` / ``right`` child indices (-1 at a leaf), ``feature`` (column index, -1 at a leaf),
    ``threshold`` (go left when ``float32(x[feature]) <= threshold``, as scikit-learn's trees compare) and ``value``
    (the leaf's output, 0 at inner nodes).
    """

    def __init__(self, baseline: float, learning_rate: float, trees: list[dict[str, list[Any]]], n_features: int) -> None:
        self.baseline = baseline
        self.learning_rate = learning_rate
        self.trees = trees
        self.n_features = n_features
        self._compiled = [_compile(tree) for tree in trees]

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        targets: np.ndarray,
        *,
        seed: int,
        n_trees: int,
        learning_rate: float,
        max_depth: int,
        min_samples_leaf: int,
    ) -> TreeEnsemble:
        """Squared-error gradient boosting (``sklearn.ensemble.GradientBoostingRegressor``) of ``targets`` ``[N]`` on
        ``features`` ``[N, F]``, read back into plain arrays."""
        from sklearn.ensemble import GradientBoostingRegressor

        model = GradientBoostingRegressor(
            loss="squared_error",
            n_estimators=n_trees,
            learning_rate=learning_rate,
            max_depth=max_depth,
            min_samples_leaf=min_samples_leaf,
            subsample=1.0,
            random_state=seed,
        )
        model.fit(features, targets)
        baseline = float(np.ravel(model.init_.constant_)[0])
        trees = []
        for estimator in model.estimators_[:, 0]:
            tree = estimator.tree_
            leaf = tree.children_left < 0
            trees.append(
                {
                    "left": np.where(leaf, -1, tree.children_left).tolist(),
                    "right": np.where(leaf, -1, tree.children_right).tolist(),
                    "feature": np.where(leaf, -1, tree.feature).tolist(),
                    "threshold": np.where(leaf, 0.0, tree.threshold).tolist(),
                    "value": np.where(leaf, tree.value[:, 0, 0], 0.0).tolist(),
                }
            )
        return cls(baseline, float(learning_rate), trees, features.shape[1])

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``[N]`` float64 outputs of ``features`` ``[N, F]``; row ``i`` depends on ``features[i]`` only (the trees
        are summed in one fixed order per row)."""
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise PredictorError(f"the trees take [N, {self.n_features}] features, got shape {features.shape}")
        outputs = np.empty(len(features), dtype=np.float64)
        for start in range(0, len(features), ROW_CHUNK):
            block = np.asfortranarray(features[start : start + ROW_CHUNK], dtype=np.float32)
            bits: dict[tuple[int, float], np.ndarray] = {}
            total = np.zeros(len(block), dtype=np.float64)
            for tree in self._compiled:
                code: np.ndarray = np.zeros(len(block), dtype=tree.code_dtype)
                for position, test in enumerate(tree.tests):
                    bit = bits.get(test)
                    if bit is None:
                        bit = bits[test] = (block[:, test[0]] <= np.float64(test[1])).view(np.uint8)
                    if tree.code_dtype is np.uint8:
                        code |= bit << position
                    else:
                        code |= bit.astype(np.uint16) << position
                total += tree.table[code]
            outputs[start : start + len(block)] = self.baseline + self.learning_rate * total
        return outputs

    def state(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "learning_rate": self.learning_rate, "n_features": self.n_features, "trees": self.trees}

    @classmethod
    def from_state(cls, state: Any, what: str) -> TreeEnsemble:
        """The ensemble ``state()`` described; ``PredictorError`` (prefixed with ``what``) naming the first malformed
        entry."""
        if not isinstance(state, Mapping):
            raise PredictorError(f"{what}: the trees must be a JSON object, got {type(state).__name__}")
        expected = ("baseline", "learning_rate", "n_features", "trees")
        missing = [key for key in expected if key not in state]
        unknown = sorted(set(state) - set(expected))
        if missing or unknown:
            raise PredictorError(f"{what}: trees: missing keys {missing}, unknown keys {unknown}")
        for key in ("baseline", "learning_rate"):
            if not _is_finite_number(state[key]):
                raise PredictorError(f"{what}: trees.{key} must be a finite number, got {state[key]!r}")
        n_features = state["n_features"]
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise PredictorError(f"{what}: trees.n_features must be an integer >= 1, got {n_features!r}")
        if not isinstance(state["trees"], list) or not state["trees"]:
            raise PredictorError(f"{what}: trees.trees must be a non-empty list of trees")
        trees = [_checked_tree(tree, n_features, f"{what}: trees.trees[{index}]") for index, tree in enumerate(state["trees"])]
        return cls(float(state["baseline"]), float(state["learning_rate"]), trees, n_features)


def _checked_tree(tree: Any, n_features: int, where: str) -> dict[str, list[Any]]:
    if not isinstance(tree, Mapping) or set(tree) != set(TREE_FIELDS):
        keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise PredictorError(f"{where} must be an object with exactly the keys {list(TREE_FIELDS)}, got {keys}")
    columns = [tree[field] for field in TREE_FIELDS]
    size = len(columns[0]) if isinstance(columns[0], list) else -1
    if size < 1 or any(not isinstance(column, list) or len(column) != size for column in columns):
        raise PredictorError(f"{where}: {list(TREE_FIELDS)} must be non-empty lists of one length (one entry per node)")
    left, right, feature, threshold, value = columns
    for node in range(size):
        children = (left[node], right[node], feature[node])
        if any(isinstance(item, bool) or not isinstance(item, int) for item in children):
            raise PredictorError(f"{where}: node {node}: left, right and feature must be integers, got {children}")
        if not (_is_finite_number(threshold[node]) and _is_finite_number(value[node])):
            raise PredictorError(f"{where}: node {node}: threshold and value must be finite numbers, got {threshold[node]!r}, {value[node]!r}")
        if left[node] == -1 and right[node] == -1 and feature[node] == -1:
            continue
        if not (node < left[node] < size and node < right[node] < size and 0 <= feature[node] < n_features):
            raise PredictorError(
                f"{where}: node {node} must be a leaf (left, right, feature all -1) or have children in ({node}, {size}) and a feature in "
                f"[0, {n_features}), got left {left[node]}, right {right[node]}, feature {feature[node]}"
            )
    return {field: list(column) for field, column in zip(TREE_FIELDS, columns, strict=True)}


def _compile(tree: Mapping[str, list[Any]]) -> CompiledTree:
    left = np.asarray(tree["left"], dtype=np.int64)
    right = np.asarray(tree["right"], dtype=np.int64)
    inner = np.flatnonzero(left >= 0)
    tests = sorted({(int(tree["feature"][node]), float(tree["threshold"][node])) for node in inner})
    if len(tests) > MAX_TESTS_PER_TREE:
        raise PredictorError(f"a tree holds {len(tests)} distinct split tests; at most {MAX_TESTS_PER_TREE} are supported (fit shallower trees)")
    position = {test: index for index, test in enumerate(tests)}
    node_test = np.zeros(len(left), dtype=np.int64)
    for node in inner:
        node_test[node] = position[(int(tree["feature"][node]), float(tree["threshold"][node]))]
    codes = np.arange(1 << len(tests), dtype=np.int64)
    nodes = np.zeros(len(codes), dtype=np.int64)
    for _ in range(len(left)):
        at_inner = left[nodes] >= 0
        if not at_inner.any():
            break
        goes_left = ((codes >> node_test[nodes]) & 1).astype(bool)
        nodes = np.where(at_inner, np.where(goes_left, left[nodes], right[nodes]), nodes)
    table = np.asarray(tree["value"], dtype=np.float64)[nodes]
    code_dtype = np.uint8 if len(tests) <= 8 else np.uint16
    return CompiledTree(tuple(tests), table, code_dtype)


def _is_finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@register_predictor("gbdt", kind="latency", features="walk one-hot decisions, MACs and parameters (+ extra columns)", target="log latency")
class GbdtPredictor(LatencyPredictor):
    """Gradient-boosted trees of log latency on ``feature_names`` (see the module docstring).

    Args:
        space: the search space.
        seed: the trees' ``random_state``.
        extra_features: extra columns after the cost columns. A subclass supplies its own instead by overriding
            ``extra_feature_names`` and ``extra_features`` (and registering under its own name, so that it loads by
            name); a predictor fitted with constructor-supplied columns loads without them and predicts only once
            ``use_extra_features`` gives them again.

    The hyperparameters are class attributes (``n_trees``, ``learning_rate``, ``max_depth``, ``min_samples_leaf``),
    so a subclass changes them without rewriting anything.
    """

    min_measurements = 10
    n_trees: ClassVar[int] = 200
    learning_rate: ClassVar[float] = 0.08
    max_depth: ClassVar[int] = 3
    min_samples_leaf: ClassVar[int] = 3

    def __init__(self, space: SearchSpace, *, seed: int = 0, extra_features: ExtraFeatures | None = None) -> None:
        super().__init__(space, seed=seed)
        self.costs = PieceCosts.for_space(space)
        self._extra = _checked_extra(extra_features, self._what())
        self.trees: TreeEnsemble | None = None
        self.fitted_feature_names: tuple[str, ...] | None = None
        self.training_rmse_log: float | None = None

    @property
    def extra_feature_names(self) -> tuple[str, ...]:
        """Names of the extra columns (a subclass overrides this with ``extra_features``)."""
        return self._extra.names if self._extra is not None else ()

    def extra_features(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, len(extra_feature_names)]`` extra columns of ``archs`` (checked; a subclass overrides this)."""
        if self._extra is None:
            return np.zeros((len(archs), 0), dtype=np.float64)
        return self._extra.compute(archs)

    def use_extra_features(self, extra_features: ExtraFeatures) -> None:
        """Give the extra columns a loaded predictor was fitted with (their names must be the saved ones)."""
        extra = _checked_extra(extra_features, self._what())
        if self.fitted_feature_names is not None and extra is not None:
            saved = self.fitted_feature_names[len(self.base_feature_names) :]
            if extra.names != saved:
                raise PredictorError(f"{self._what()} was fitted with extra columns {list(saved)}, got {list(extra.names)}")
        self._extra = extra

    @property
    def base_feature_names(self) -> tuple[str, ...]:
        """The walk's one-hot column names, then ``COST_FEATURES``."""
        return (*self.space.walk().feature_names, *COST_FEATURES)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """One name per column of ``features``: the walk's one-hot columns, ``macs``, ``parameters``, the extras."""
        return (*self.base_feature_names, *self.extra_feature_names)

    def features(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, F]`` float64: one-hot decisions, MACs, parameters, extra columns (``feature_names``)."""
        one_hot = self.space.walk().features(archs)
        extra = np.asarray(self.extra_features(archs), dtype=np.float64)
        names = self.extra_feature_names
        if extra.shape != (len(archs), len(names)):
            raise PredictorError(f"{self._what()}: the extra features {list(names)} must be a [{len(archs)}, {len(names)}] matrix, got shape {extra.shape}")
        if not np.all(np.isfinite(extra)):
            raise PredictorError(f"{self._what()}: the extra features {list(names)} hold a non-finite value")
        return np.hstack([one_hot.astype(np.float64), self.costs.matrix(archs), extra])

    def fit_features(self, features: np.ndarray, latencies_ms: np.ndarray) -> None:
        targets = np.log(latencies_ms)
        self.trees = TreeEnsemble.fit(
            features,
            targets,
            seed=self.seed,
            n_trees=self.n_trees,
            learning_rate=self.learning_rate,
            max_depth=self.max_depth,
            min_samples_leaf=self.min_samples_leaf,
        )
        self.fitted_feature_names = self.feature_names
        self.training_rmse_log = float(np.sqrt(np.mean((self.trees.predict(features) - targets) ** 2)))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """``exp`` of the trees' output for each row of ``features`` ``[N, F]``: milliseconds ``[N]``."""
        if self.trees is None:
            raise PredictorError(f"{self._what()} has no trees; fit it first")
        if self.fitted_feature_names != self.feature_names:
            raise PredictorError(self._feature_mismatch())
        return np.exp(self.trees.predict(features))

    def state(self) -> dict[str, Any]:
        if self.trees is None or self.fitted_feature_names is None:
            raise PredictorError(f"{self._what()} has no trees; fit it first")
        return {"feature_names": list(self.fitted_feature_names), "training_rmse_log": self.training_rmse_log, "trees": self.trees.state()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        expected = ("feature_names", "training_rmse_log", "trees")
        missing = [key for key in expected if key not in state]
        unknown = sorted(set(state) - set(expected))
        if missing or unknown:
            raise PredictorError(f"{self._what()} state: missing keys {missing}, unknown keys {unknown}")
        names = state["feature_names"]
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise PredictorError(f"{self._what()} state: feature_names must be a list of strings")
        base = self.base_feature_names
        if tuple(names[: len(base)]) != base:
            raise PredictorError(
                f"{self._what()} state: fitted on columns that the space {self.space.name!r} does not give "
                f"(its decisions or choices changed); first difference: {_first_difference(names, base)}; fit it again"
            )
        if not _is_finite_number(state["training_rmse_log"]):
            raise PredictorError(f"{self._what()} state: training_rmse_log must be a finite number, got {state['training_rmse_log']!r}")
        trees = TreeEnsemble.from_state(state["trees"], f"{self._what()} state")
        if trees.n_features != len(names):
            raise PredictorError(f"{self._what()} state: {len(names)} feature_names but trees over {trees.n_features} features")
        self.trees = trees
        self.fitted_feature_names = tuple(names)
        self.training_rmse_log = float(state["training_rmse_log"])

    def _feature_mismatch(self) -> str:
        assert self.fitted_feature_names is not None
        saved = list(self.fitted_feature_names[len(self.base_feature_names) :])
        given = list(self.extra_feature_names)
        if saved and not given:
            return (
                f"{self._what()} was fitted with the extra feature columns {saved}; give them with "
                "use_extra_features(ExtraFeatures(names, compute)) before predicting"
            )
        return f"{self._what()} was fitted with the extra feature columns {saved}, but this instance supplies {given}"


def _checked_extra(extra: ExtraFeatures | None, what: str) -> ExtraFeatures | None:
    if extra is None:
        return None
    if not isinstance(extra, ExtraFeatures):
        raise PredictorError(f"{what}: extra_features must be an ExtraFeatures(names, compute), got {type(extra).__name__}")
    if not all(isinstance(name, str) and name for name in extra.names) or len(set(extra.names)) != len(extra.names):
        raise PredictorError(f"{what}: extra feature names must be distinct non-empty strings, got {list(extra.names)}")
    taken = sorted(set(extra.names) & set(COST_FEATURES))
    if taken:
        raise PredictorError(f"{what}: extra feature names {taken} are taken by the cost columns {list(COST_FEATURES)}")
    return extra


def _first_difference(saved: Sequence[str], given: Sequence[str]) -> str:
    for index, (left, right) in enumerate(zip(saved, given, strict=False)):
        if left != right:
            return f"column {index} is {left!r} in the file, {right!r} now"
    return f"the file has {len(saved)} columns, the space gives {len(given)} before the extras"


__all__ = ["COST_FEATURES", "ExtraFeatures", "GbdtPredictor", "PieceCosts", "TreeEnsemble"]
