"""The latency-predictor protocol and the ``PREDICTORS`` registry.

A predictor is fitted on (arch, measured latency) pairs from one device fingerprint and then predicts a batch of
archs at once::

    predictor = create_predictor("linear_macs", space, seed=0)
    predictor.fit(archs, measurements_ms, fingerprint)      # measurements_ms: [N] milliseconds
    predictor.predict(more_archs)                            # -> np.ndarray [M] milliseconds
    predictor.save(folder)                                   # folder/predictor.json, with the fingerprint
    LatencyPredictor.load(folder, space, fingerprint=device_fingerprint(...))   # refuses a foreign fingerprint

A fitted predictor describes one device and one way of measuring: it is never used for another silently.
``load`` and ``check_fingerprint`` compare fingerprints on exactly the fields that
``nas.latency.fingerprint.fingerprint_key`` hashes (CPU model and flags, cores, machine, ONNX Runtime version,
provider, precision, threads, batch size, input, quantization format; the GPU for GPU providers) and raise
``ForeignFingerprintError`` naming every field that differs.

Writing a predictor: subclass ``LatencyPredictor``, implement ``features`` (archs -> ``[N, F]`` matrix; a learned
predictor takes the space's feature vectors here), ``fit_features``, ``predict_features``, ``state`` and
``load_state`` (a strict-JSON dict of everything fitted), and decorate the class with
``@register_predictor("lower_snake_name")``. The base class validates inputs, keeps the fingerprint and writes
and reads the file, so every predictor behaves the same at its edges; ``tests/nas/test_predictors.py`` holds
every registered predictor to that contract.
"""

from __future__ import annotations

import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from nas import jsonio
from nas.latency.fingerprint import describe_differences, fingerprint_differences, fingerprint_key
from nas.latency.targets import LatencyError
from nas.supernets.registry import Registry, UnknownNameError
from nas.supernets.space import Arch, ArchError, SearchSpace

logger = logging.getLogger(__name__)

PREDICTOR_FILE = "predictor.json"
"""The file a saved predictor's folder holds (predictors with large fitted artefacts may add files beside it)."""

FILE_FORMAT = "nasforge.latency_predictor"
FILE_VERSION = 1
FILE_KEYS = ("format", "version", "predictor", "space", "seed", "measurements", "fingerprint", "fingerprint_key", "state")

P = TypeVar("P", bound="LatencyPredictor")


class PredictorError(ValueError):
    """A predictor used against its rules: bad training data, an unreadable saved predictor, an arch outside its
    space."""


class NotFittedError(PredictorError):
    """``predict`` or ``save`` before ``fit`` (or ``load``)."""


class ForeignFingerprintError(PredictorError):
    """A predictor offered a device fingerprint it was not built for; ``differences`` maps each differing field to
    ``(the predictor's value, the offered value)``."""

    def __init__(self, message: str, differences: Mapping[str, tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.differences = dict(differences)


PREDICTORS: Registry[type[LatencyPredictor]] = Registry("latency predictor", discover="nas.predictors")
"""Every latency predictor class by name. Each module of ``nas.predictors`` is imported on the first look-up, so a
new predictor file registers itself with no list to edit."""


def register_predictor(name: str, **metadata: Any) -> Callable[[type[P]], type[P]]:
    """Class decorator: register a ``LatencyPredictor`` subclass in ``PREDICTORS`` under ``name`` (its ``name``
    attribute is set to it). A taken name raises ``DuplicateNameError``."""

    def decorate(predictor_class: type[P]) -> type[P]:
        if not (isinstance(predictor_class, type) and issubclass(predictor_class, LatencyPredictor)):
            raise TypeError(f"@register_predictor({name!r}) decorates a LatencyPredictor subclass, got {predictor_class!r}")
        PREDICTORS.register(name, predictor_class, source=predictor_class.__module__, **metadata)
        predictor_class.name = name
        return predictor_class

    return decorate


def create_predictor(name: str, space: SearchSpace, *, seed: int = 0, **options: Any) -> LatencyPredictor:
    """A new, unfitted predictor of the registered kind ``name`` for ``space``; ``options`` go to its constructor
    (a look-up-table predictor takes its measured ``table`` this way).

    Raises:
        PredictorError: an unknown name (with the registered names and a "did you mean").
    """
    problem = PREDICTORS.problem(name)
    if problem is not None:
        raise PredictorError(f"latency predictor {problem}")
    return PREDICTORS.get(name)(space, seed=seed, **options)


def strict_json(value: Any, what: str) -> Any:
    """``value`` round-tripped through strict JSON (no NaN or Infinity); raises ``PredictorError`` naming ``what``."""
    try:
        return json.loads(jsonio.dumps(value, nonfinite="error"))
    except (TypeError, ValueError) as error:
        raise PredictorError(f"{what} must be strict JSON (no NaN or Infinity, plain types only): {error}") from None


class LatencyPredictor(ABC):
    """Predicts the latency (milliseconds) of archs of one space on the device of one fingerprint.

    Args:
        space: the search space whose archs it predicts (featurized through it).
        seed: seed of any randomness in fitting (a ``numpy.random.Generator`` made from it); the same data and
            seed give the same predictions.
    """

    name: ClassVar[str] = ""
    """The registered name (set by ``register_predictor``)."""

    min_measurements: ClassVar[int] = 1
    """The fewest (arch, measurement) pairs ``fit`` accepts."""

    def __init__(self, space: SearchSpace, *, seed: int = 0) -> None:
        if not isinstance(space, SearchSpace):
            raise PredictorError(f"{type(self).__name__} needs a SearchSpace, got {type(space).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise PredictorError(f"{type(self).__name__} seed must be an integer >= 0, got {seed!r}")
        self.space = space
        self.seed = seed
        self._fingerprint: dict[str, Any] | None = None
        self._measurements = 0

    @property
    def is_fitted(self) -> bool:
        return self._fingerprint is not None

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The device fingerprint the predictor was fitted for (a copy); raises ``NotFittedError`` before ``fit``."""
        return dict(self._require_fitted("fingerprint"))

    def fit(self, archs: Sequence[Arch], measurements_ms: Sequence[float] | np.ndarray, fingerprint: Mapping[str, Any]) -> LatencyPredictor:
        """Fit on ``archs`` and their measured latencies ``measurements_ms`` (``[N]`` milliseconds, e.g. each
        ``Measurement.median_ms``), all taken on the device and setting of ``fingerprint``
        (``nas.latency.device_fingerprint``). Refitting replaces everything fitted before. Returns ``self``.

        Raises:
            PredictorError: fewer than ``min_measurements`` pairs, lengths that differ, a latency that is not a
                finite positive number, an arch outside the space, or a fingerprint without its required fields.
        """
        checked = self._checked_archs(archs, "fit")
        try:
            latencies = np.asarray(measurements_ms, dtype=np.float64)
        except (TypeError, ValueError):
            latencies = None
        if latencies is None or latencies.ndim != 1 or isinstance(measurements_ms, str | bytes):
            raise PredictorError(f"{self._what()}.fit: measurements_ms must be a flat sequence of milliseconds, got {_short(measurements_ms)}")
        if len(latencies) != len(checked):
            raise PredictorError(f"{self._what()}.fit: {len(checked)} archs but {len(latencies)} measurements_ms; give one per arch")
        if len(checked) < self.min_measurements:
            raise PredictorError(f"{self._what()}.fit needs at least {self.min_measurements} (arch, measurement) pairs, got {len(checked)}")
        for index, value in enumerate(latencies.tolist()):
            if not (math.isfinite(value) and value > 0):
                raise PredictorError(f"{self._what()}.fit: measurements_ms[{index}] must be a finite number of milliseconds > 0, got {value!r}")
        stored = strict_json(dict(fingerprint) if isinstance(fingerprint, Mapping) else fingerprint, f"{self._what()}.fit fingerprint")
        try:
            fingerprint_key(stored)
        except LatencyError as error:
            raise PredictorError(f"{self._what()}.fit: {error}") from None
        self.fit_features(self.features(checked), latencies)
        self._fingerprint = stored
        self._measurements = len(checked)
        logger.info("%s fitted on %d measurements (fingerprint %s)", self._what(), len(checked), fingerprint_key(stored))
        return self

    def predict(self, archs: Sequence[Arch]) -> np.ndarray:
        """Predicted latency of each arch, ``[N]`` float64 milliseconds; a batch is predicted at once, each row
        equal to predicting that arch alone."""
        self._require_fitted("predict")
        checked = self._checked_archs(archs, "predict")
        if not checked:
            return np.zeros(0, dtype=np.float64)
        predictions = np.asarray(self.predict_features(self.features(checked)), dtype=np.float64)
        if predictions.shape != (len(checked),):
            raise PredictorError(f"{self._what()}.predict_features returned shape {predictions.shape}, expected ({len(checked)},)")
        return predictions

    def check_fingerprint(self, fingerprint: Mapping[str, Any]) -> None:
        """Raise ``ForeignFingerprintError`` when ``fingerprint`` differs from the one this predictor was fitted for
        in any field that ``fingerprint_key`` hashes (the message names each field and both values)."""
        own = self._require_fitted("check_fingerprint")
        try:
            differences = fingerprint_differences(own, fingerprint)
        except LatencyError as error:
            raise PredictorError(f"{self._what()}: the offered fingerprint is incomplete: {error}") from None
        if differences:
            raise ForeignFingerprintError(
                f"{self._what()} was built for another device or setting; it differs in {list(differences)} "
                f"(built for vs offered: {describe_differences(differences)}). Fit it on measurements from this device "
                "and setting instead",
                differences,
            )

    def save(self, folder: str | Path) -> Path:
        """Write the fitted predictor with its fingerprint to ``folder/predictor.json`` (strict JSON; the folder is
        created); returns the file's path."""
        record = self.record()
        path = Path(folder) / PREDICTOR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(jsonio.dumps(record, indent=1, sort_keys=True, nonfinite="error") + "\n")
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, folder: str | Path, space: SearchSpace, *, fingerprint: Mapping[str, Any] | None) -> LatencyPredictor:
        """The predictor saved in ``folder``, for ``space``.

        ``fingerprint``: the device and setting it is about to predict for; a saved predictor built for another one
        is refused with ``ForeignFingerprintError``. Pass ``None`` only to load it on purpose without that check
        (to inspect it, or to adapt it to a new device).

        Raises:
            PredictorError: no readable ``predictor.json``, a file of another format or version, an unknown
                predictor name, a predictor of another space, or (called on a subclass) a predictor of another kind.
            ForeignFingerprintError: ``fingerprint`` differs from the saved one.
        """
        path = Path(folder) / PREDICTOR_FILE
        try:
            text = path.read_text()
        except OSError as error:
            raise PredictorError(f"no saved predictor at {path}: {error.strerror or error}") from None
        try:
            record = jsonio.loads(text)
        except ValueError as error:
            raise PredictorError(f"{path} is not strict JSON: {error}") from None
        predictor = cls.from_record(record, space, where=str(path))
        if fingerprint is None:
            logger.info("%s loaded from %s without a fingerprint check, on purpose", predictor._what(), path)
            return predictor
        try:
            predictor.check_fingerprint(fingerprint)
        except ForeignFingerprintError as error:
            raise ForeignFingerprintError(f"{path}: {error}", error.differences) from None
        return predictor

    def record(self) -> dict[str, Any]:
        """What ``save`` writes: the strict-JSON record of the fitted predictor with its fingerprint (a predictor
        that holds another, such as ``adapted``, nests the other's record in its state)."""
        fingerprint = self._require_fitted("save")
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "predictor": self.name,
            "space": self.space.name,
            "seed": self.seed,
            "measurements": self._measurements,
            "fingerprint": fingerprint,
            "fingerprint_key": fingerprint_key(fingerprint),
            "state": strict_json(self.state(), f"{self._what()}.state()"),
        }

    @classmethod
    def from_record(cls, record: Any, space: SearchSpace, *, where: str) -> LatencyPredictor:
        """The fitted predictor ``record`` (``record()``'s output, read from ``where``) describes, for ``space``; no
        fingerprint check (``load`` adds it). Raises ``PredictorError`` as ``load`` does, prefixed with ``where``."""
        if not isinstance(record, dict):
            raise PredictorError(f"{where} must hold a JSON object with keys {list(FILE_KEYS)}, got {type(record).__name__}")
        missing = [key for key in FILE_KEYS if key not in record]
        unknown = sorted(set(record) - set(FILE_KEYS))
        if missing or unknown:
            raise PredictorError(f"{where}: missing keys {missing}, unknown keys {unknown}")
        if record["format"] != FILE_FORMAT or record["version"] != FILE_VERSION:
            raise PredictorError(f"{where}: format must be {FILE_FORMAT!r} version {FILE_VERSION}, got {record['format']!r} version {record['version']!r}")
        try:
            predictor_class = PREDICTORS.get(record["predictor"])
        except UnknownNameError as error:
            raise PredictorError(f"{where}: {error}") from None
        if cls is not LatencyPredictor and not issubclass(predictor_class, cls):
            raise PredictorError(f"{where} holds a {record['predictor']!r} predictor, not a {cls.name or cls.__name__!r} one")
        if record["space"] != space.name:
            raise PredictorError(f"{where} is a predictor for space {record['space']!r}, not for space {space.name!r}")
        predictor = predictor_class(space, seed=record["seed"])
        if not isinstance(record["fingerprint"], dict) or not isinstance(record["state"], dict):
            raise PredictorError(f"{where}: 'fingerprint' and 'state' must be JSON objects")
        try:
            fingerprint_key(record["fingerprint"])
        except LatencyError as error:
            raise PredictorError(f"{where}: {error}") from None
        measurements = record["measurements"]
        if isinstance(measurements, bool) or not isinstance(measurements, int) or measurements < predictor.min_measurements:
            raise PredictorError(f"{where}: 'measurements' must be an integer >= {predictor.min_measurements}, got {measurements!r}")
        predictor.load_state(record["state"])
        predictor._fingerprint = record["fingerprint"]
        predictor._measurements = measurements
        return predictor

    @abstractmethod
    def features(self, archs: Sequence[Arch]) -> np.ndarray:
        """The ``[N, F]`` float64 feature matrix of ``archs`` (already checked to be in the space)."""

    @abstractmethod
    def fit_features(self, features: np.ndarray, latencies_ms: np.ndarray) -> None:
        """Fit on ``features`` ``[N, F]`` and ``latencies_ms`` ``[N]`` (finite, > 0), replacing any earlier fit."""

    @abstractmethod
    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Predicted milliseconds ``[N]`` of ``features`` ``[N, F]``; row ``i`` depends on ``features[i]`` only."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything fitted, as a strict-JSON dict (``load_state`` restores it exactly)."""

    @abstractmethod
    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore ``state()``'s output; raise ``PredictorError`` naming a missing or malformed entry."""

    def _what(self) -> str:
        return f"latency predictor {self.name or type(self).__name__!r}"

    def _require_fitted(self, action: str) -> dict[str, Any]:
        if self._fingerprint is None:
            raise NotFittedError(
                f"{self._what()} is not fitted, so it cannot {action}: call fit(archs, measurements_ms, fingerprint) "
                "or LatencyPredictor.load(folder, space, fingerprint=...) first"
            )
        return self._fingerprint

    def _checked_archs(self, archs: Sequence[Arch], action: str) -> list[Arch]:
        if isinstance(archs, Arch) or isinstance(archs, str | bytes) or not isinstance(archs, Sequence):
            raise PredictorError(f"{self._what()}.{action} takes a sequence of Arch (a batch), got {type(archs).__name__}")
        checked = list(archs)
        walk = self.space.walk()
        for index, arch in enumerate(checked):
            if not isinstance(arch, Arch):
                raise PredictorError(f"{self._what()}.{action}: archs[{index}] must be an Arch, got {type(arch).__name__}")
            try:
                walk.hot_columns(arch)
            except ArchError as error:
                raise PredictorError(f"{self._what()}.{action}: archs[{index}] is not in space {self.space.name!r}: {error}") from None
        return checked


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = [
    "PREDICTORS",
    "PREDICTOR_FILE",
    "ForeignFingerprintError",
    "LatencyPredictor",
    "NotFittedError",
    "PredictorError",
    "create_predictor",
    "register_predictor",
    "strict_json",
]
