"""Learned predictors: ``gbdt`` (latency), ``adapted`` (few-shot transfer to a new device) and ``AccuracyPredictor``.

The archs are real archs of Once-for-All's MobileNetV3 space; the "measurements" are synthetic: per block a cost in
its MACs (with a per-kernel-size efficiency), a per-block overhead and a memory term, summed, bent by a saturating
nonlinearity and multiplied by seeded noise of about 2 %. Device B is device A scaled, with another price per MAC and
per byte. Nothing is measured or timed here (``benchmarks/predictor_speed.py`` times them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from scipy.stats import kendalltau
from sklearn.ensemble import GradientBoostingRegressor

from nas.latency import device_fingerprint, resolve_target
from nas.predictors import PREDICTORS, ForeignFingerprintError, LatencyPredictor, NotFittedError, PredictorError, create_predictor, register_predictor
from nas.predictors.accuracy import ACCURACY_PREDICTOR_FILE, AccuracyPredictor, run_accuracy_pairs
from nas.predictors.adapt import MAX_MEASUREMENTS, AdaptedPredictor, adapt
from nas.predictors.arch_costs import ArchCosts
from nas.predictors.learned import ExtraFeatures, GbdtPredictor, PieceCosts
from nas.run_dir import RunDir
from nas.search.study import STUDY_NAME, journal_storage
from nas.space.schema import parse_config
from nas.supernets.space import Arch, SearchSpace
from tests.helpers import TINY_DIGITS_SPACE

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
TRAIN = 400
HELD_OUT = slice(600, 900)
KERNEL_FACTOR = {3: 1.0, 5: 1.4, 7: 2.0}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} in a predictor file")


def _space(name: str) -> SearchSpace:
    return parse_config((SPACES / f"{name}.yaml").read_text()).space


def _block_costs_ms(space: SearchSpace, arch: Arch, ms_per_mmac: float, overhead_ms: float, ms_per_mega_activation: float) -> float:
    """Sum over MBConv blocks of MACs (depthwise ones priced by kernel size), a fixed overhead and a memory term."""
    assert arch.resolution is not None
    size = -(-arch.resolution // space.stem.stride)
    in_channels, total = space.stem.channels, 0.5
    for stage, stage_arch in zip(space.stages, arch.stages, strict=True):
        for position, config in enumerate(stage_arch.blocks):
            out = -(-size // (stage.stride if position == 0 else 1))
            hidden = round(in_channels * config.expand_ratio)
            expand = size * size * in_channels * hidden if config.expand_ratio != 1 else 0
            macs = expand + out * out * hidden * (config.kernel_size**2 * KERNEL_FACTOR[config.kernel_size] + stage_arch.width)
            memory = size * size * hidden / 1e6 * (1.5 if config.squeeze_excite else 1.0)
            total += overhead_ms + ms_per_mmac * macs / 1e6 + ms_per_mega_activation * memory
            in_channels, size = stage_arch.width, out
    return total


def synthetic_latency_ms(space: SearchSpace, archs: list[Arch], *, ms_per_mmac: float = 0.1, overhead_ms: float = 0.15, memory: float = 0.3) -> np.ndarray:
    """``[N]`` noise-free synthetic latencies: block costs bent by a saturating nonlinearity around the space's middle."""

    def cost(arch: Arch) -> float:
        return _block_costs_ms(space, arch, ms_per_mmac, overhead_ms, memory)

    middle = float(np.sqrt(cost(space.smallest()) * cost(space.largest())))
    total = np.array([cost(arch) for arch in archs])
    return total * (1 + 0.25 * np.tanh((total - middle) / middle))


def synthetic_accuracy(space: SearchSpace, archs: list[Arch]) -> np.ndarray:
    """``[N]`` accuracies in (0.55, 0.95): a sigmoid of additive per-choice effects with a square interaction."""
    scores = []
    for arch in archs:
        score = 0.0
        for index, stage_arch in enumerate(arch.stages):
            score += 0.15 * len(stage_arch.blocks) * (1 + 0.1 * index)
            score += sum(0.05 * config.kernel_size + 0.08 * config.expand_ratio + 0.1 * config.squeeze_excite for config in stage_arch.blocks)
        scores.append(score)
    z = np.asarray(scores)
    z = (z - z.mean()) / z.std()
    return 0.55 + 0.4 / (1 + np.exp(-(z + 0.3 * z**2 - 0.5)))


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    """ofa_mbv3 at 224 px only: the synthetic devices below price blocks, not resolutions."""
    return dataclasses.replace(_space("ofa_mbv3"), resolutions=(224,))


@pytest.fixture(scope="module")
def archs(space: SearchSpace) -> list[Arch]:
    """900 distinct archs in a seeded order: 0-399 train device A, 400-599 device B's pool, 600-899 held out."""
    rng = np.random.default_rng(0)
    found: dict[Arch, None] = {}
    for _ in range(2000):
        found.setdefault(space.sample(rng))
        if len(found) == 900:
            break
    return list(found)


@pytest.fixture(scope="module")
def latency_a(space: SearchSpace, archs: list[Arch]) -> np.ndarray:
    return synthetic_latency_ms(space, archs)


@pytest.fixture(scope="module")
def latency_b(space: SearchSpace, archs: list[Arch]) -> np.ndarray:
    """Device B: 1.7 times slower, MACs 3x as expensive relative to A, memory half as expensive."""
    return 1.7 * synthetic_latency_ms(space, archs, ms_per_mmac=0.3, memory=0.15)


def _noisy(latency: np.ndarray, seed: int) -> np.ndarray:
    return latency * np.exp(0.02 * np.random.default_rng(seed).standard_normal(len(latency)))


@pytest.fixture(scope="module")
def fingerprint_a() -> dict[str, Any]:
    return device_fingerprint(resolve_target("cpu_fp32"), input_shape=(1, 3, 224, 224), input_dtype="float32")


@pytest.fixture(scope="module")
def fingerprint_b(fingerprint_a: dict[str, Any]) -> dict[str, Any]:
    return {**fingerprint_a, "cpu_model": "Synthetic device B", "threads": 4}


@pytest.fixture(scope="module")
def gbdt_a(space: SearchSpace, archs: list[Arch], latency_a: np.ndarray, fingerprint_a: dict[str, Any]) -> GbdtPredictor:
    predictor = create_predictor("gbdt", space, seed=0).fit(archs[:TRAIN], _noisy(latency_a, 1)[:TRAIN], fingerprint_a)
    assert isinstance(predictor, GbdtPredictor)
    return predictor


def test_piece_costs_equal_arch_cost_on_every_modality() -> None:
    for name, count in (("digits_quick", 3), ("mqar_quick", 3), ("ofa_mbv3", 1)):
        space = _space(name)
        rng = np.random.default_rng(5)
        sample = [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(count))]
        np.testing.assert_array_equal(PieceCosts(space).matrix(sample), ArchCosts(space).matrix(sample), err_msg=name)
    assert PieceCosts.for_space(_space("digits_quick")) is PieceCosts.for_space(_space("digits_quick"))


def test_gbdt_predicts_held_out_archs_within_ten_percent(gbdt_a: GbdtPredictor, archs: list[Arch], latency_a: np.ndarray) -> None:
    predicted = gbdt_a.predict(archs[HELD_OUT])
    errors = np.abs(predicted / latency_a[HELD_OUT] - 1)
    assert np.mean(errors < 0.10) >= 0.95, np.quantile(errors, [0.5, 0.95, 1.0])
    assert kendalltau(predicted, latency_a[HELD_OUT]).statistic >= 0.9
    assert gbdt_a.feature_names[-2:] == ("macs", "parameters") and len(gbdt_a.feature_names) == len(gbdt_a.space.walk().feature_names) + 2


def test_gbdt_trees_are_the_fitted_model_and_save_as_plain_json(
    gbdt_a: GbdtPredictor, space: SearchSpace, archs: list[Arch], latency_a: np.ndarray, fingerprint_a: dict[str, Any], tmp_path: Path
) -> None:
    features = gbdt_a.features(archs)
    model = GradientBoostingRegressor(n_estimators=200, learning_rate=0.08, max_depth=3, min_samples_leaf=3, random_state=0)
    model.fit(features[:TRAIN], np.log(_noisy(latency_a, 1)[:TRAIN]))
    np.testing.assert_allclose(np.log(gbdt_a.predict_features(features)), model.predict(features), rtol=1e-12, atol=1e-12)
    path = gbdt_a.save(tmp_path)
    record = json.loads(path.read_text(), parse_constant=_reject_constant)
    trees = record["state"]["trees"]["trees"]
    assert len(trees) == 200 and set(trees[0]) == {"left", "right", "feature", "threshold", "value"}
    assert all(isinstance(value, int | float) for tree in trees for column in tree.values() for value in column)
    loaded = LatencyPredictor.load(tmp_path, space, fingerprint=fingerprint_a)
    assert isinstance(loaded, GbdtPredictor)
    np.testing.assert_array_equal(loaded.predict(archs), gbdt_a.predict(archs))
    assert loaded.state() == gbdt_a.state()


def test_gbdt_same_seed_same_trees(space: SearchSpace, archs: list[Arch], latency_a: np.ndarray, fingerprint_a: dict[str, Any]) -> None:
    measured = _noisy(latency_a, 1)[:60]
    first, second = (create_predictor("gbdt", space, seed=7).fit(archs[:60], measured, fingerprint_a) for _ in range(2))
    assert first.state() == second.state()
    np.testing.assert_array_equal(first.predict(archs[HELD_OUT]), second.predict(archs[HELD_OUT]))


def test_gbdt_refuses_malformed_trees(gbdt_a: GbdtPredictor, space: SearchSpace, fingerprint_a: dict[str, Any], tmp_path: Path) -> None:
    path = gbdt_a.save(tmp_path)
    record = json.loads(path.read_text())
    tree = record["state"]["trees"]["trees"][0]
    for change, needle in (
        ({"left": [0, *tree["left"][1:]]}, r"trees\.trees\[0\]: node 0 must be a leaf .* or have children in \(0, "),
        ({"feature": [10_000, *tree["feature"][1:]]}, rf"a feature in \[0, {len(record['state']['feature_names'])}\), got .* feature 10000"),
        ({"value": tree["value"][:-1]}, "must be non-empty lists of one length"),
        ({"threshold": ["0.5", *tree["threshold"][1:]]}, "threshold and value must be finite numbers"),
    ):
        broken = json.loads(json.dumps(record))
        broken["state"]["trees"]["trees"][0] = {**tree, **change}
        path.write_text(json.dumps(broken))
        with pytest.raises(PredictorError, match=needle):
            LatencyPredictor.load(tmp_path, space, fingerprint=fingerprint_a)
    other_names = json.loads(json.dumps(record))
    other_names["state"]["feature_names"][0] = "s9.depth=2"
    path.write_text(json.dumps(other_names))
    with pytest.raises(PredictorError, match=r"first difference: column 0 is 's9.depth=2' in the file"):
        LatencyPredictor.load(tmp_path, space, fingerprint=fingerprint_a)


def test_gbdt_takes_extra_columns_from_the_constructor_or_a_subclass(
    space: SearchSpace, archs: list[Arch], latency_a: np.ndarray, fingerprint_a: dict[str, Any], tmp_path: Path
) -> None:
    table = {arch: float(value) for arch, value in zip(archs, 0.9 * latency_a, strict=True)}

    def table_sum(batch: Any) -> np.ndarray:
        return np.array([[table[arch]] for arch in batch])

    extra = ExtraFeatures(("table_sum_ms",), table_sum)
    measured = _noisy(latency_a, 1)
    with_table = GbdtPredictor(space, extra_features=extra)
    with_table.fit(archs[:100], measured[:100], fingerprint_a)
    assert with_table.feature_names[-3:] == ("macs", "parameters", "table_sum_ms")
    errors = np.abs(with_table.predict(archs[HELD_OUT]) / latency_a[HELD_OUT] - 1)
    assert np.mean(errors < 0.05) >= 0.95, "a column that explains the latency is used"
    with_table.save(tmp_path)
    loaded = LatencyPredictor.load(tmp_path, space, fingerprint=fingerprint_a)
    assert isinstance(loaded, GbdtPredictor)
    with pytest.raises(PredictorError, match=r"fitted with the extra feature columns \['table_sum_ms'\]; give them with use_extra_features"):
        loaded.predict(archs[:3])
    with pytest.raises(PredictorError, match=r"fitted with extra columns \['table_sum_ms'\], got \['other'\]"):
        loaded.use_extra_features(ExtraFeatures(("other",), table_sum))
    loaded.use_extra_features(extra)
    np.testing.assert_array_equal(loaded.predict(archs[HELD_OUT]), with_table.predict(archs[HELD_OUT]))
    with pytest.raises(PredictorError, match=r"taken by the cost columns"):
        GbdtPredictor(space, extra_features=ExtraFeatures(("macs",), table_sum))
    with pytest.raises(PredictorError, match=r"must be a \[2, 1\] matrix, got shape \(2,\)"):
        GbdtPredictor(space, extra_features=ExtraFeatures(("bad",), lambda batch: np.ones(len(batch)))).features(archs[:2])
    with pytest.raises(PredictorError, match="hold a non-finite value"):
        GbdtPredictor(space, extra_features=ExtraFeatures(("bad",), lambda batch: np.full((len(batch), 1), np.nan))).features(archs[:2])

    class TableGbdt(GbdtPredictor):
        @property
        def extra_feature_names(self) -> tuple[str, ...]:
            return ("table_sum_ms",)

        def extra_features(self, archs: Any) -> np.ndarray:
            return table_sum(archs)

    register_predictor("test_table_gbdt")(TableGbdt)
    try:
        subclassed = create_predictor("test_table_gbdt", space).fit(archs[:100], measured[:100], fingerprint_a)
        np.testing.assert_array_equal(subclassed.predict(archs[HELD_OUT]), with_table.predict(archs[HELD_OUT]))
        subclassed.save(tmp_path / "subclass")
        reloaded = LatencyPredictor.load(tmp_path / "subclass", space, fingerprint=fingerprint_a)
        assert type(reloaded) is TableGbdt
        np.testing.assert_array_equal(reloaded.predict(archs[HELD_OUT]), with_table.predict(archs[HELD_OUT]))
    finally:
        PREDICTORS.unregister("test_table_gbdt")


def test_ten_measurements_adapt_a_predictor_to_a_new_device(
    gbdt_a: GbdtPredictor,
    space: SearchSpace,
    archs: list[Arch],
    latency_a: np.ndarray,
    latency_b: np.ndarray,
    fingerprint_a: dict[str, Any],
    fingerprint_b: dict[str, Any],
    tmp_path: Path,
) -> None:
    assert kendalltau(gbdt_a.predict(archs[HELD_OUT]), latency_a[HELD_OUT]).statistic >= 0.92, "the premise: A's predictor ranks A well"
    gbdt_a.save(tmp_path / "device_a")
    measured_b = _noisy(latency_b, 2)
    adapted = adapt(tmp_path / "device_a", archs[400:410], measured_b[400:410], fingerprint_b, space=space)
    predicted = adapted.predict(archs[HELD_OUT])
    assert kendalltau(predicted, latency_b[HELD_OUT]).statistic >= 0.9
    assert np.mean(np.abs(predicted / latency_b[HELD_OUT] - 1) < 0.10) >= 0.95
    assert adapted.fingerprint == fingerprint_b and adapted.source_fingerprint == fingerprint_a
    again = adapt(gbdt_a, archs[400:410], measured_b[400:410], fingerprint_b)
    np.testing.assert_array_equal(again.predict(archs[HELD_OUT]), predicted)

    path = adapted.save(tmp_path / "device_b")
    record = json.loads(path.read_text(), parse_constant=_reject_constant)
    assert record["predictor"] == "adapted" and record["fingerprint"] == fingerprint_b
    assert record["state"]["source"]["fingerprint"] == fingerprint_a and record["state"]["source"]["predictor"] == "gbdt"
    loaded = LatencyPredictor.load(tmp_path / "device_b", space, fingerprint=fingerprint_b)
    assert isinstance(loaded, AdaptedPredictor) and loaded.source_fingerprint == fingerprint_a
    np.testing.assert_array_equal(loaded.predict(archs[HELD_OUT]), predicted)
    with pytest.raises(ForeignFingerprintError, match="cpu_model"):
        LatencyPredictor.load(tmp_path / "device_b", space, fingerprint=fingerprint_a)


def test_adaptation_is_robust_and_shrinks_toward_a_rescaling(
    gbdt_a: GbdtPredictor, archs: list[Arch], latency_b: np.ndarray, fingerprint_b: dict[str, Any]
) -> None:
    measured = _noisy(latency_b, 2)[400:410]
    clean = adapt(gbdt_a, archs[400:410], measured, fingerprint_b)
    disturbed = measured.copy()
    disturbed[4] *= 3.0
    robust = adapt(gbdt_a, archs[400:410], disturbed, fingerprint_b)
    assert kendalltau(robust.predict(archs[HELD_OUT]), latency_b[HELD_OUT]).statistic >= 0.9
    ratio = robust.predict(archs[HELD_OUT]) / clean.predict(archs[HELD_OUT])
    assert np.all(np.abs(ratio - 1) < 0.05), "one measurement three times too slow moves predictions by under 5 %"
    two = adapt(gbdt_a, archs[400:402], measured[:2], fingerprint_b)
    assert two.coefficients is not None and abs(two.coefficients["slope"] - 1) < 0.05 and abs(two.coefficients["macs_coefficient"]) < 0.05


def test_adaptation_refuses_too_many_or_too_few_measurements(
    gbdt_a: GbdtPredictor, space: SearchSpace, archs: list[Arch], latency_b: np.ndarray, fingerprint_b: dict[str, Any], tmp_path: Path
) -> None:
    count = MAX_MEASUREMENTS + 1
    with pytest.raises(PredictorError, match=rf"takes at most {MAX_MEASUREMENTS} \(arch, measurement\) pairs of the new device, got {count}: it is a few-shot"):
        adapt(gbdt_a, archs[400 : 400 + count], latency_b[400 : 400 + count], fingerprint_b)
    with pytest.raises(PredictorError, match=r"needs at least 2 \(arch, measurement\) pairs, got 1"):
        adapt(gbdt_a, archs[400:401], latency_b[400:401], fingerprint_b)
    with pytest.raises(PredictorError, match="give space= to load the source predictor"):
        adapt(tmp_path, archs[400:405], latency_b[400:405], fingerprint_b)
    with pytest.raises(NotFittedError, match="not fitted"):
        adapt(create_predictor("gbdt", space), archs[400:405], latency_b[400:405], fingerprint_b)
    tiny = parse_config(TINY_DIGITS_SPACE).space
    with pytest.raises(PredictorError, match="for space 'ofa_mbv3', not for this space 'tiny'"):
        AdaptedPredictor(tiny, source=gbdt_a)


def test_adapted_without_a_source_adapts_the_mac_count(space: SearchSpace, archs: list[Arch], latency_b: np.ndarray, fingerprint_b: dict[str, Any]) -> None:
    bare = create_predictor("adapted", space).fit(archs[400:410], latency_b[400:410], fingerprint_b)
    assert isinstance(bare, AdaptedPredictor) and bare.source is None and bare.source_fingerprint is None
    assert bare.coefficients is not None and bare.coefficients["macs_coefficient"] == 0.0
    assert kendalltau(bare.predict(archs[HELD_OUT]), latency_b[HELD_OUT]).statistic > 0.7


def test_accuracy_predictor_ranks_held_out_archs_and_round_trips(space: SearchSpace, archs: list[Arch], tmp_path: Path) -> None:
    accuracies = synthetic_accuracy(space, archs)
    measured = np.clip(accuracies + 0.005 * np.random.default_rng(3).standard_normal(len(accuracies)), 0, 1)
    predictor = AccuracyPredictor(space, seed=0).fit(archs[:300], measured[:300])
    quality = predictor.quality(archs[HELD_OUT], accuracies[HELD_OUT])
    assert quality.kendall_tau is not None and quality.kendall_tau >= 0.8 and quality.mae < 0.03 and quality.pairs == 300
    assert set(quality.to_dict()) == {"kendall_tau", "mae", "pairs"}
    predicted = predictor.predict(archs[HELD_OUT])
    np.testing.assert_allclose(np.concatenate([predictor.predict([arch]) for arch in archs[600:620]]), predicted[:20], rtol=1e-12, atol=0)
    path = predictor.save(tmp_path)
    assert path.name == ACCURACY_PREDICTOR_FILE
    json.loads(path.read_text(), parse_constant=_reject_constant)
    loaded = AccuracyPredictor.load(tmp_path, space)
    np.testing.assert_array_equal(loaded.predict(archs[HELD_OUT]), predicted)
    again = AccuracyPredictor(space, seed=0).fit(archs[:300], measured[:300])
    np.testing.assert_array_equal(again.predict(archs[HELD_OUT]), predicted)


def test_accuracy_predictions_are_clipped_to_the_unit_interval(space: SearchSpace, archs: list[Arch]) -> None:
    near_one = 0.97 + 0.03 * (synthetic_accuracy(space, archs[:60]) - 0.55) / 0.4
    predictor = AccuracyPredictor(space).fit(archs[:60], near_one)
    features = predictor.features(archs[:4])
    features[:, -2:] += np.array([[50.0, 50.0], [-50.0, -50.0], [0.0, 0.0], [0.0, 0.0]])
    predicted = predictor.predict_features(features)
    assert np.all((predicted >= 0) & (predicted <= 1)) and predicted[0] == 1.0 and predicted[1] < predicted[0]


def test_accuracy_predictor_refuses_bad_inputs(space: SearchSpace, archs: list[Arch], tmp_path: Path) -> None:
    predictor = AccuracyPredictor(space)
    with pytest.raises(NotFittedError, match=r"cannot predict: call fit\(archs, accuracies\)"):
        predictor.predict(archs[:2])
    accuracies = synthetic_accuracy(space, archs[:20])
    with pytest.raises(PredictorError, match=r"accuracies\[2\] must be a finite number in \[0, 1\] \(a fraction, not a percentage\), got 87.0"):
        predictor.fit(archs[:20], [*accuracies[:2], 87.0, *accuracies[3:]])
    with pytest.raises(PredictorError, match="20 archs but 19 accuracies"):
        predictor.fit(archs[:20], accuracies[:19])
    with pytest.raises(PredictorError, match=r"at least 10 \(arch, accuracy\) pairs, got 9"):
        predictor.fit(archs[:9], accuracies[:9])
    tiny = parse_config(TINY_DIGITS_SPACE).space
    with pytest.raises(PredictorError, match=r"archs\[0\] is not in space 'ofa_mbv3'"):
        predictor.fit([tiny.largest(), *archs[1:20]], accuracies)
    with pytest.raises(PredictorError, match="takes a sequence of Arch"):
        predictor.fit(archs[0], accuracies[:1])  # type: ignore[arg-type]
    predictor.fit(archs[:20], accuracies)
    with pytest.raises(PredictorError, match="quality needs at least 2"):
        predictor.quality(archs[:1], accuracies[:1])
    path = predictor.save(tmp_path)
    with pytest.raises(PredictorError, match="for space 'ofa_mbv3', not for space 'tiny'"):
        AccuracyPredictor.load(tmp_path, tiny)
    record = json.loads(path.read_text())
    for change, needle in (
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"version": 2}, "version 1, got"),
        ({"state": {**record["state"], "ridge": {**record["state"]["ridge"], "alpha": "big"}}}, r"state\.ridge\.alpha must be a finite number"),
    ):
        path.write_text(json.dumps({**record, **change}))
        with pytest.raises(PredictorError, match=needle):
            AccuracyPredictor.load(tmp_path, space)
    with pytest.raises(PredictorError, match="no saved accuracy predictor"):
        AccuracyPredictor.load(tmp_path / "missing", space)


def test_run_accuracy_pairs_reads_the_distinct_complete_trials(space: SearchSpace, archs: list[Arch], tmp_path: Path) -> None:
    run = tmp_path / "run"
    RunDir(run).search.mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY_NAME, storage=journal_storage(RunDir(run).study), directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.81, 2.0], user_attrs={"arch": archs[0].to_json()}))
    study.add_trial(optuna.trial.create_trial(values=[0.77, 1.0], user_attrs={"arch": archs[1].to_json()}))
    study.add_trial(optuna.trial.create_trial(values=[0.81, 2.0], user_attrs={"arch": archs[0].to_json(), "duplicate_of": 0}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"arch": archs[2].to_json(), "error": "boom"}))
    found, accuracies = run_accuracy_pairs(run, space)
    assert found == archs[:2]
    np.testing.assert_array_equal(accuracies, [0.81, 0.77])
