"""Latency predictors: one contract over every registered predictor, then what ``linear_macs`` itself promises.

The data are real archs of a tiny space with synthetic "measurements" (a line in MACs plus seeded noise), so no
test measures or times anything.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nas.latency import device_fingerprint, resolve_target
from nas.predictors import (
    PREDICTORS,
    ForeignFingerprintError,
    LatencyPredictor,
    NotFittedError,
    PredictorError,
    create_predictor,
    register_predictor,
)
from nas.predictors.arch_costs import ArchCosts
from nas.space.schema import parse_config
from nas.supernets.registry import DuplicateNameError
from nas.supernets.space import Arch, SearchSpace
from tests.helpers import TINY_DIGITS_SPACE

SEED = 0
NOISE = 0.02


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} in a predictor file")


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return parse_config(TINY_DIGITS_SPACE).space


@pytest.fixture(scope="module")
def archs(space: SearchSpace) -> list[Arch]:
    """30 distinct archs of the tiny space, in a seeded order."""
    rng = np.random.default_rng(SEED)
    found: dict[Arch, None] = {}
    for _ in range(1000):
        found.setdefault(space.sample(rng))
        if len(found) == 30:
            break
    assert len(found) == 30
    return list(found)


@pytest.fixture(scope="module")
def costs(space: SearchSpace, archs: list[Arch]) -> np.ndarray:
    """``[N, 2]`` MACs and parameters of ``archs``."""
    return ArchCosts.for_space(space).matrix(archs)


@pytest.fixture(scope="module")
def measurements_ms(costs: np.ndarray) -> np.ndarray:
    """0.05 ms plus 1 ms per 10 MMACs, times seeded noise of about 2 %."""
    rng = np.random.default_rng(SEED + 1)
    return (0.05 + costs[:, 0] / 1e7) * (1.0 + NOISE * rng.standard_normal(len(costs)))


@pytest.fixture(scope="module")
def fingerprint() -> dict[str, Any]:
    return device_fingerprint(resolve_target("cpu_fp32"), input_shape=(1, 1, 8, 8), input_dtype="float32")


def _options(name: str, space: SearchSpace) -> dict[str, Any]:
    """Constructor options a predictor needs beyond (archs, latencies): a look-up-table predictor gets a synthetic
    piece table (0.01 ms plus 1 ms per 10 MMACs per piece) of every piece of the smallest and largest arch and of 20
    random ones, so some pieces of the test archs are not in it (estimated)."""
    if "table" not in inspect.signature(PREDICTORS.get(name)).parameters:
        return {}
    from nas.predictors.arch_costs import PieceCosts
    from nas.predictors.lut import PieceTable

    rng = np.random.default_rng(SEED + 2)
    pieces = PieceCosts.for_space(space)
    entries = {}
    for arch in [space.smallest(), space.largest(), *(space.sample(rng) for _ in range(20))]:
        for piece in pieces.pieces(arch):
            key, entry = PieceTable.entry(space, piece, 0.01 + pieces.piece_cost(piece)[1] / 1e7)
            entries[key] = entry
    return {"table": entries}


def _create(name: str, space: SearchSpace) -> LatencyPredictor:
    return create_predictor(name, space, seed=SEED, **_options(name, space))


def _fitted(name: str, space: SearchSpace, archs: list[Arch], measurements_ms: np.ndarray, fingerprint: dict[str, Any]) -> LatencyPredictor:
    train = len(archs) * 2 // 3
    return _create(name, space).fit(archs[:train], measurements_ms[:train], fingerprint)


@pytest.mark.parametrize("name", PREDICTORS.names())
class TestEveryPredictor:
    """The contract every registered latency predictor keeps."""

    def test_same_data_and_seed_give_the_same_predictions(
        self, name: str, space: SearchSpace, archs: list[Arch], measurements_ms: np.ndarray, fingerprint: dict[str, Any]
    ) -> None:
        first = _fitted(name, space, archs, measurements_ms, fingerprint).predict(archs)
        second = _fitted(name, space, archs, measurements_ms, fingerprint).predict(archs)
        assert first.shape == (len(archs),) and first.dtype == np.float64
        assert np.all(np.isfinite(first))
        np.testing.assert_array_equal(first, second)

    def test_save_and_load_round_trip_with_the_fingerprint(
        self, name: str, space: SearchSpace, archs: list[Arch], measurements_ms: np.ndarray, fingerprint: dict[str, Any], tmp_path: Path
    ) -> None:
        predictor = _fitted(name, space, archs, measurements_ms, fingerprint)
        path = predictor.save(tmp_path / "profile")
        record = json.loads(path.read_text(), parse_constant=_reject_constant)
        assert record["predictor"] == name and record["fingerprint"] == fingerprint and record["space"] == space.name
        loaded = LatencyPredictor.load(tmp_path / "profile", space, fingerprint=fingerprint)
        assert type(loaded) is type(predictor) and loaded.fingerprint == fingerprint
        np.testing.assert_array_equal(loaded.predict(archs), predictor.predict(archs))
        renamed = {**fingerprint, "target": "my_cpu_target"}
        np.testing.assert_array_equal(PREDICTORS.get(name).load(tmp_path / "profile", space, fingerprint=renamed).predict(archs), predictor.predict(archs))

    def test_a_batch_equals_one_arch_at_a_time(
        self, name: str, space: SearchSpace, archs: list[Arch], measurements_ms: np.ndarray, fingerprint: dict[str, Any]
    ) -> None:
        predictor = _fitted(name, space, archs, measurements_ms, fingerprint)
        batched = predictor.predict(archs)
        single = np.concatenate([predictor.predict([arch]) for arch in archs])
        np.testing.assert_allclose(batched, single, rtol=1e-12, atol=0)
        np.testing.assert_array_equal(predictor.predict(archs[::-1]), batched[::-1])
        assert predictor.predict([]).shape == (0,)

    def test_a_foreign_fingerprint_is_refused_naming_each_field(
        self, name: str, space: SearchSpace, archs: list[Arch], measurements_ms: np.ndarray, fingerprint: dict[str, Any], tmp_path: Path
    ) -> None:
        predictor = _fitted(name, space, archs, measurements_ms, fingerprint)
        predictor.save(tmp_path)
        foreign = {**fingerprint, "cpu_model": "Another CPU", "provider": "CUDAExecutionProvider", "precision": "fp16", "threads": 4}
        with pytest.raises(ForeignFingerprintError) as caught:
            LatencyPredictor.load(tmp_path, space, fingerprint=foreign)
        message = str(caught.value)
        for field in ("cpu_model", "provider", "precision", "threads"):
            assert field in message and field in caught.value.differences, field
        assert "'Another CPU'" in message and str(tmp_path) in message
        named = {"cpu_model", "provider", "precision", "threads"}
        assert named <= set(caught.value.differences) <= named | {"gpu"}, "the GPU counts only when this machine has one"
        with pytest.raises(ForeignFingerprintError, match="threads"):
            predictor.check_fingerprint({**fingerprint, "threads": 2})
        predictor.check_fingerprint(dict(fingerprint))
        loaded = LatencyPredictor.load(tmp_path, space, fingerprint=None)
        np.testing.assert_array_equal(loaded.predict(archs), predictor.predict(archs))

    def test_predicting_before_fit_is_a_clear_error(self, name: str, space: SearchSpace, archs: list[Arch], tmp_path: Path) -> None:
        predictor = _create(name, space)
        assert not predictor.is_fitted
        with pytest.raises(NotFittedError, match=rf"{name}' is not fitted, so it cannot predict: call fit\(archs, measurements_ms, fingerprint\)"):
            predictor.predict(archs)
        with pytest.raises(NotFittedError, match="cannot save"):
            predictor.save(tmp_path)
        with pytest.raises(NotFittedError, match="cannot check_fingerprint"):
            predictor.check_fingerprint({})

    def test_bad_training_data_is_refused_with_the_rule(
        self, name: str, space: SearchSpace, archs: list[Arch], measurements_ms: np.ndarray, fingerprint: dict[str, Any]
    ) -> None:
        predictor = _create(name, space)
        with pytest.raises(PredictorError, match=r"30 archs but 29 measurements_ms"):
            predictor.fit(archs, measurements_ms[:-1], fingerprint)
        bad = measurements_ms.copy()
        bad[3] = np.nan
        with pytest.raises(PredictorError, match=r"measurements_ms\[3\] must be a finite number of milliseconds > 0, got nan"):
            predictor.fit(archs, bad, fingerprint)
        bad[3] = -1.0
        with pytest.raises(PredictorError, match=r"measurements_ms\[3\] .* got -1.0"):
            predictor.fit(archs, bad, fingerprint)
        with pytest.raises(PredictorError, match="lacks the field"):
            predictor.fit(archs, measurements_ms, {"cpu_model": "x"})
        with pytest.raises(PredictorError, match="strict JSON"):
            predictor.fit(archs, measurements_ms, {**fingerprint, "threads": float("nan")})
        with pytest.raises(PredictorError, match=rf"at least {predictor.min_measurements} "):
            predictor.fit(archs[: predictor.min_measurements - 1], measurements_ms[: predictor.min_measurements - 1], fingerprint)
        other = parse_config(TINY_DIGITS_SPACE.replace("width: [8, 12]", "width: [16]")).space
        with pytest.raises(PredictorError, match=r"archs\[0\] is not in space 'tiny'"):
            predictor.fit([other.largest(), *archs[1:]], measurements_ms, fingerprint)
        with pytest.raises(PredictorError, match="takes a sequence of Arch"):
            predictor.fit(archs[0], measurements_ms[:1], fingerprint)  # type: ignore[arg-type]
        assert not predictor.is_fitted


def test_saved_files_of_another_kind_space_or_format_are_refused(
    space: SearchSpace, archs: list[Arch], measurements_ms: np.ndarray, fingerprint: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(PredictorError, match="no saved predictor at"):
        LatencyPredictor.load(tmp_path / "missing", space, fingerprint=fingerprint)
    path = _fitted("linear_macs", space, archs, measurements_ms, fingerprint).save(tmp_path)
    record = json.loads(path.read_text())
    other = parse_config(TINY_DIGITS_SPACE.replace("name: tiny", "name: other")).space
    with pytest.raises(PredictorError, match="a predictor for space 'tiny', not for space 'other'"):
        LatencyPredictor.load(tmp_path, other, fingerprint=fingerprint)
    for change, needle in (
        ({"predictor": "linear_mac"}, "did you mean 'linear_macs'"),
        ({"version": 2}, "version 1, got"),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"state": {**record["state"], "ms_per_mac": "fast"}}, "ms_per_mac must be a finite number"),
    ):
        path.write_text(json.dumps({**record, **change}))
        with pytest.raises(PredictorError, match=needle):
            LatencyPredictor.load(tmp_path, space, fingerprint=fingerprint)
    path.write_text(json.dumps(record).replace(str(record["state"]["intercept_ms"]), "NaN", 1))
    with pytest.raises(PredictorError, match="not strict JSON"):
        LatencyPredictor.load(tmp_path, space, fingerprint=fingerprint)


def test_unknown_and_duplicate_predictor_names(space: SearchSpace) -> None:
    with pytest.raises(PredictorError, match="did you mean 'linear_macs'"):
        create_predictor("linear_mac", space)
    with pytest.raises(DuplicateNameError, match="'linear_macs' is already registered"):
        register_predictor("linear_macs")(PREDICTORS.get("linear_macs"))


def test_linear_macs_recovers_the_line_and_predicts_held_out_archs(
    space: SearchSpace, archs: list[Arch], costs: np.ndarray, measurements_ms: np.ndarray, fingerprint: dict[str, Any]
) -> None:
    exact = 0.05 + costs[:, 0] / 1e7
    predictor = create_predictor("linear_macs", space).fit(archs, exact, fingerprint)
    np.testing.assert_allclose(predictor.predict(archs), exact, rtol=1e-9)
    noisy = _fitted("linear_macs", space, archs, measurements_ms, fingerprint)
    held_out = slice(len(archs) * 2 // 3, None)
    errors = np.abs(noisy.predict(archs[held_out]) / exact[held_out] - 1)
    assert errors.max() < 5 * NOISE, errors
    state = noisy.state()
    assert set(state) == {"intercept_ms", "ms_per_mac", "ms_per_parameter", "training_rmse_ms"}


def test_arch_costs_count_each_arch_once(space: SearchSpace, archs: list[Arch], costs: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    from nas.predictors.arch_costs import PieceCosts
    from nas.supernets.costs import arch_cost

    counted: list[Arch] = []
    real = PieceCosts.cost

    def counting(self: PieceCosts, arch: Arch) -> tuple[int, int]:
        counted.append(arch)
        return real(self, arch)

    monkeypatch.setattr(PieceCosts, "cost", counting)
    cache = ArchCosts(space)
    np.testing.assert_array_equal(cache.matrix(archs[:3]), costs[:3])
    np.testing.assert_array_equal(cache.matrix(archs[:3]), costs[:3])
    assert counted == archs[:3] and len(cache) == 3
    assert [cache.cost(arch) for arch in archs[:3]] == [arch_cost(space, arch) for arch in archs[:3]]
    assert ArchCosts.for_space(space) is ArchCosts.for_space(parse_config(TINY_DIGITS_SPACE).space)
