"""Look-up-table latency predictors: the sum of each piece's latency measured in isolation, corrected.

The Once-for-All / nn-Meter idea. An arch is the sum of its pieces (``PieceCosts.pieces``: stem, entry projections,
each block config in its context at its input size, head); a hardware profile (``nas profile``) measures every
distinct piece of its sample once, alone, as its own ONNX model (``PieceTable``). The sum misses what a whole graph
does differently (operator fusion across pieces, memory traffic between them, the session's fixed cost per run), so:

- ``lut``: ``latency = intercept + scale * table_sum + per_piece * pieces``, non-negative least squares on the
  profile's fit measurements (three numbers, none below zero: a piece never makes an arch faster; a few measurements
  fit it, which is also how it adapts to a new device);
- ``gbdt_lut``: the ``gbdt`` trees with the table's sum and piece count as two more feature columns.

A piece the table lacks (an arch outside the profile's sample with a piece none of its archs had) is estimated from
its MACs at the median milliseconds per MAC of the measured pieces of its kind (stem, projection, head or the block
type), and counted in the ``estimated`` column; a table with no piece of that kind uses every piece's median.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nas.predictors.arch_costs import Piece, PieceCosts
from nas.predictors.base import LatencyPredictor, PredictorError, register_predictor
from nas.predictors.learned import GbdtPredictor
from nas.supernets.space import Arch, SearchSpace

COEFFICIENTS = ("intercept_ms", "scale", "ms_per_piece")
TABLE_FEATURES = ("table_sum_ms", "pieces")


def piece_id(piece: Piece) -> str:
    """The piece's key as the table's string key (``repr`` of the key tuple: block configs are frozen dataclasses)."""
    return repr(piece.key)


def piece_kind(piece: Piece) -> str:
    """``stem``, ``projection``, ``head`` or the block config's class name."""
    kind = str(piece.key[0])
    return type(piece.key[-1]).__name__ if kind == "block" else kind


class PieceTable:
    """Measured pieces of one space: ``entries[piece_id] = {"ms": ..., "macs": ..., "kind": ...}`` (milliseconds of
    the piece alone, its MACs, ``piece_kind``), and the sums over archs' pieces (cached per arch)."""

    def __init__(self, space: SearchSpace, entries: Mapping[str, Mapping[str, Any]]) -> None:
        if not isinstance(entries, Mapping) or not entries:
            raise PredictorError("a piece table needs at least one measured piece (`nas profile` measures them)")
        checked: dict[str, dict[str, Any]] = {}
        for key, entry in entries.items():
            if not isinstance(key, str) or not isinstance(entry, Mapping) or set(entry) != {"ms", "macs", "kind"}:
                raise PredictorError(f"piece table entry {key!r} must be {{'ms', 'macs', 'kind'}}, got {entry!r}")
            ms, macs = entry["ms"], entry["macs"]
            if isinstance(ms, bool) or not isinstance(ms, int | float) or not (math.isfinite(ms) and ms > 0):
                raise PredictorError(f"piece table entry {key!r}: ms must be a finite number > 0, got {ms!r}")
            if isinstance(macs, bool) or not isinstance(macs, int) or macs < 0 or not isinstance(entry["kind"], str):
                raise PredictorError(f"piece table entry {key!r}: macs must be an integer >= 0 and kind a string")
            checked[key] = {"ms": float(ms), "macs": macs, "kind": entry["kind"]}
        self.space = space
        self.entries = checked
        self.pieces = PieceCosts.for_space(space)
        self._sums: dict[Arch, tuple[float, int, int]] = {}
        by_kind: dict[str, list[float]] = {}
        for entry in checked.values():
            by_kind.setdefault(entry["kind"], []).append(entry["ms"] / max(entry["macs"], 1))
        self._rates = {kind: float(np.median(rates)) for kind, rates in by_kind.items()}
        self._rates[""] = float(np.median([rate for rates in by_kind.values() for rate in rates]))

    @classmethod
    def entry(cls, space: SearchSpace, piece: Piece, ms: float) -> tuple[str, dict[str, Any]]:
        """``(piece_id, entry)`` of a piece measured at ``ms`` milliseconds."""
        return piece_id(piece), {"ms": float(ms), "macs": int(PieceCosts.for_space(space).piece_cost(piece)[1]), "kind": piece_kind(piece)}

    def sums(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, 3]``: per arch the summed milliseconds of its pieces, its piece count, and how many of them were
        estimated (not in the table)."""
        rows = np.empty((len(archs), 3), dtype=np.float64)
        for row, arch in enumerate(archs):
            cached = self._sums.get(arch)
            if cached is None:
                total, estimated = 0.0, 0
                pieces = self.pieces.pieces(arch)
                for piece in pieces:
                    entry = self.entries.get(piece_id(piece))
                    if entry is None:
                        estimated += 1
                        total += self._rates.get(piece_kind(piece), self._rates[""]) * max(self.pieces.piece_cost(piece)[1], 1)
                    else:
                        total += entry["ms"]
                cached = self._sums[arch] = (total, len(pieces), estimated)
            rows[row] = cached
        return rows


def _checked_table(space: SearchSpace, table: Mapping[str, Mapping[str, Any]] | PieceTable | None) -> PieceTable | None:
    if table is None or isinstance(table, PieceTable):
        return table
    return PieceTable(space, table)


def _require_table(table: PieceTable | None, what: str) -> PieceTable:
    if table is None:
        raise PredictorError(f"{what} has no piece table; give one (table=...) or build it with `nas profile`")
    return table


def _table_features(table: PieceTable | None, what: str, archs: Sequence[Arch]) -> np.ndarray:
    """``[N, 2]``: the table's sum (ms) and the piece count of each arch (``TABLE_FEATURES``)."""
    return _require_table(table, what).sums(archs)[:, :2]


def _table_state(table: PieceTable | None, what: str) -> dict[str, dict[str, Any]]:
    return dict(sorted(_require_table(table, what).entries.items()))


@register_predictor("lut", kind="latency", features="sum of the pieces' isolated latencies (a profile's piece table), corrected by least squares")
class LutPredictor(LatencyPredictor):
    """``intercept + scale * table_sum + per_piece * pieces`` (see the module docstring); deterministic."""

    min_measurements = len(COEFFICIENTS)

    def __init__(self, space: SearchSpace, *, seed: int = 0, table: Mapping[str, Mapping[str, Any]] | PieceTable | None = None) -> None:
        super().__init__(space, seed=seed)
        self.table = _checked_table(space, table)
        self.coefficients: dict[str, float] | None = None

    def features(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, 2]``: the table's sum (ms) and the piece count of each arch."""
        return _table_features(self.table, self._what(), archs)

    def fit_features(self, features: np.ndarray, latencies_ms: np.ndarray) -> None:
        from scipy.optimize import nnls

        design = np.column_stack([np.ones(len(features)), features])
        scale = np.maximum(np.abs(design).max(axis=0), 1e-12)
        solution, _ = nnls(design / scale, latencies_ms)
        values = [float(value) for value in solution / scale]
        if not all(math.isfinite(value) for value in values):
            raise PredictorError(f"{self._what()}: least squares gave non-finite coefficients {values}")
        self.coefficients = dict(zip(COEFFICIENTS, values, strict=True))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        if self.coefficients is None:
            raise PredictorError(f"{self._what()} has no coefficients; fit it first")
        coefficients = self.coefficients
        return coefficients["intercept_ms"] + coefficients["scale"] * features[:, 0] + coefficients["ms_per_piece"] * features[:, 1]

    def state(self) -> dict[str, Any]:
        if self.coefficients is None:
            raise PredictorError(f"{self._what()} has no coefficients; fit it first")
        return {**self.coefficients, "table": _table_state(self.table, self._what())}

    def load_state(self, state: Mapping[str, Any]) -> None:
        expected = (*COEFFICIENTS, "table")
        missing = [key for key in expected if key not in state]
        unknown = sorted(set(state) - set(expected))
        if missing or unknown:
            raise PredictorError(f"{self._what()} state: missing keys {missing}, unknown keys {unknown}")
        for key in COEFFICIENTS:
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise PredictorError(f"{self._what()} state: {key} must be a finite number, got {value!r}")
        self.table = PieceTable(self.space, state["table"])
        self.coefficients = {key: float(state[key]) for key in COEFFICIENTS}


@register_predictor("gbdt_lut", kind="latency", features="gbdt's columns plus the piece table's sum and piece count")
class GbdtLutPredictor(GbdtPredictor):
    """``gbdt`` with two more columns from a piece table: its sum (ms) and the piece count."""

    def __init__(self, space: SearchSpace, *, seed: int = 0, table: Mapping[str, Mapping[str, Any]] | PieceTable | None = None) -> None:
        super().__init__(space, seed=seed)
        self.table = _checked_table(space, table)

    @property
    def extra_feature_names(self) -> tuple[str, ...]:
        return TABLE_FEATURES

    def extra_features(self, archs: Sequence[Arch]) -> np.ndarray:
        return _table_features(self.table, self._what(), archs)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "table": _table_state(self.table, self._what())}

    def load_state(self, state: Mapping[str, Any]) -> None:
        if "table" not in state:
            raise PredictorError(f"{self._what()} state: missing keys ['table']")
        super().load_state({key: value for key, value in state.items() if key != "table"})
        self.table = PieceTable(self.space, state["table"])


__all__ = ["COEFFICIENTS", "GbdtLutPredictor", "LutPredictor", "PieceTable", "piece_id", "piece_kind"]
