"""Latency predictors behind one protocol (``base``), fitted on measurements from one device fingerprint.

- ``base``: ``LatencyPredictor`` (fit, batched predict, save and load with the fingerprint, refusal of a foreign
  fingerprint), the ``PREDICTORS`` registry and its errors;
- ``arch_costs``: parameters and MACs per arch, counted once;
- ``linear``: ``linear_macs``, least squares of latency on MACs and parameters.

Every module here is imported on the first look-up in ``PREDICTORS``, so a new predictor is one file.
"""

from nas.predictors.base import (
    PREDICTOR_FILE,
    PREDICTORS,
    ForeignFingerprintError,
    LatencyPredictor,
    NotFittedError,
    PredictorError,
    create_predictor,
    register_predictor,
)

__all__ = [
    "PREDICTORS",
    "PREDICTOR_FILE",
    "ForeignFingerprintError",
    "LatencyPredictor",
    "NotFittedError",
    "PredictorError",
    "create_predictor",
    "register_predictor",
]
