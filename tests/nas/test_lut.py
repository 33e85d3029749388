"""Look-up-table predictors (``lut``, ``gbdt_lut``): the table's sums, the estimate of a piece the table lacks, and
the correction fitted on whole-arch measurements. Synthetic tables and latencies: nothing here is timed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from nas.latency import device_fingerprint, resolve_target
from nas.predictors import PredictorError, create_predictor
from nas.predictors.arch_costs import PieceCosts
from nas.predictors.lut import PieceTable, piece_id, piece_kind
from nas.space.schema import load_config
from nas.supernets.space import Arch, SearchSpace

RATE = {"stem": 3e-8, "projection": 2e-8, "head": 1e-8}
"""Milliseconds per MAC of each kind in the synthetic tables (blocks: 5e-8)."""


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return load_config("digits_quick").space


@pytest.fixture(scope="module")
def archs(space: SearchSpace) -> list[Arch]:
    rng = np.random.default_rng(0)
    return list(dict.fromkeys(space.sample(rng) for _ in range(80)))[:60]


@pytest.fixture(scope="module")
def fingerprint() -> dict[str, Any]:
    return device_fingerprint(resolve_target("cpu_fp32"))


def synthetic_table(space: SearchSpace, archs: list[Arch]) -> dict[str, dict[str, Any]]:
    costs = PieceCosts.for_space(space)
    entries = {}
    for arch in archs:
        for piece in costs.pieces(arch):
            key, entry = PieceTable.entry(space, piece, RATE.get(piece_kind(piece), 5e-8) * max(costs.piece_cost(piece)[1], 1))
            entries[key] = entry
    return entries


def truth(space: SearchSpace, archs: list[Arch]) -> np.ndarray:
    """The exact piece sums of the synthetic rates."""
    costs = PieceCosts.for_space(space)
    return np.array([sum(RATE.get(piece_kind(piece), 5e-8) * max(costs.piece_cost(piece)[1], 1) for piece in costs.pieces(arch)) for arch in archs])


def test_the_table_sums_each_archs_pieces(space: SearchSpace, archs: list[Arch]) -> None:
    table = PieceTable(space, synthetic_table(space, archs))
    sums = table.sums(archs)
    np.testing.assert_allclose(sums[:, 0], truth(space, archs), rtol=1e-12)
    assert np.all(sums[:, 2] == 0)
    costs = PieceCosts.for_space(space)
    assert sums[0, 1] == len(costs.pieces(archs[0])) and len({piece_id(piece) for piece in costs.pieces(archs[0])}) <= sums[0, 1]


def test_a_piece_the_table_lacks_is_estimated_from_its_kind(space: SearchSpace, archs: list[Arch]) -> None:
    known = synthetic_table(space, archs[:10])
    table = PieceTable(space, known)
    sums = table.sums(archs[10:])
    assert sums[:, 2].sum() > 0, "some pieces of the other archs are not in the table"
    np.testing.assert_allclose(sums[:, 0], truth(space, archs[10:]), rtol=1e-9, err_msg="each kind has one rate, so the estimate is exact")


def test_lut_fits_the_correction_and_round_trips(space: SearchSpace, archs: list[Arch], fingerprint: dict[str, Any], tmp_path: Any) -> None:
    table = synthetic_table(space, archs)
    pieces = PieceTable(space, table).sums(archs)[:, 1]
    measured = 0.2 + 1.3 * truth(space, archs) + 0.004 * pieces
    predictor = create_predictor("lut", space, table=table).fit(archs[:40], measured[:40], fingerprint)
    coefficients = predictor.coefficients
    assert coefficients is not None
    assert coefficients["intercept_ms"] == pytest.approx(0.2) and coefficients["scale"] == pytest.approx(1.3)
    assert coefficients["ms_per_piece"] == pytest.approx(0.004)
    np.testing.assert_allclose(predictor.predict(archs[40:]), measured[40:], rtol=1e-9)
    predictor.save(tmp_path)
    loaded = type(predictor).load(tmp_path, space, fingerprint=fingerprint)
    np.testing.assert_array_equal(loaded.predict(archs), predictor.predict(archs))


def test_lut_coefficients_are_never_negative(space: SearchSpace, archs: list[Arch], fingerprint: dict[str, Any]) -> None:
    table = synthetic_table(space, archs)
    pieces = PieceTable(space, table).sums(archs)[:, 1]
    measured = np.maximum(0.5 + 1.1 * truth(space, archs) - 0.01 * pieces, 0.01)
    coefficients = create_predictor("lut", space, table=table).fit(archs[:40], measured[:40], fingerprint).coefficients
    assert coefficients is not None and min(coefficients.values()) >= 0.0, "a piece never makes an arch faster"


def test_gbdt_lut_uses_the_tables_sum(space: SearchSpace, archs: list[Arch], fingerprint: dict[str, Any]) -> None:
    table = synthetic_table(space, archs)
    measured = 0.05 + truth(space, archs)
    with_table = create_predictor("gbdt_lut", space, table=table).fit(archs[:45], measured[:45], fingerprint)
    assert with_table.feature_names[-2:] == ("table_sum_ms", "pieces")
    errors = np.abs(with_table.predict(archs[45:]) / measured[45:] - 1)
    assert np.mean(errors < 0.1) >= 0.8


def test_a_table_predictor_without_a_table_or_with_a_bad_one_is_a_clear_error(space: SearchSpace, archs: list[Arch], fingerprint: dict[str, Any]) -> None:
    with pytest.raises(PredictorError, match="no piece table; give one .* `nas profile`"):
        create_predictor("lut", space).fit(archs[:5], np.ones(5), fingerprint)
    with pytest.raises(PredictorError, match="at least one measured piece"):
        create_predictor("lut", space, table={})
    key = next(iter(synthetic_table(space, archs[:1])))
    with pytest.raises(PredictorError, match="ms must be a finite number > 0"):
        create_predictor("gbdt_lut", space, table={key: {"ms": float("nan"), "macs": 1, "kind": "stem"}})
