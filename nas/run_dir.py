"""The run folder's layout. This module alone knows the names of the files and folders a run writes; everything
else asks a ``RunDir`` for a path.

```
RUN/
  config.yaml          the space file as given
  checkpoint/          weights.safetensors + state.json (replaced atomically after every epoch; .tmp/.old beside)
  log.jsonl            one line per epoch
  metrics.json         accuracies of the largest and smallest subnets (and per block family)
  search/study.journal the Optuna study;   search/latency.jsonl  every latency measurement with its fingerprint
  trials.csv  pareto.json  pareto.png  report.md
  pareto/<member>/     model.onnx, model.int8.onnx, arch.yaml, weights.safetensors, export.json
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_WEIGHTS = "weights.safetensors"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"
STAGING_SUFFIX = ".tmp"
PREVIOUS_SUFFIX = ".old"
SEARCH_DIR = "search"
STUDY_FILE = "study.journal"
LATENCY_FILE = "latency.jsonl"
PARETO_DIR = "pareto"
EXPORTS_DIR = "exports"

EXPORT_ARCH_FILE = "arch.yaml"
EXPORT_WEIGHTS_FILE = "weights.safetensors"
EXPORT_SUMMARY_FILE = "export.json"


@dataclass(frozen=True, slots=True)
class RunDir:
    """Paths inside one run folder (nothing is created or read here)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def checkpoint_staging(self) -> Path:
        return self.root / (CHECKPOINT_DIR + STAGING_SUFFIX)

    @property
    def checkpoint_previous(self) -> Path:
        return self.root / (CHECKPOINT_DIR + PREVIOUS_SUFFIX)

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def search(self) -> Path:
        return self.root / SEARCH_DIR

    @property
    def study(self) -> Path:
        return self.search / STUDY_FILE

    @property
    def latency_cache(self) -> Path:
        return self.search / LATENCY_FILE

    @property
    def trials_csv(self) -> Path:
        return self.root / "trials.csv"

    @property
    def pareto_json(self) -> Path:
        return self.root / "pareto.json"

    @property
    def pareto_plot(self) -> Path:
        return self.root / "pareto.png"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def pareto(self) -> Path:
        return self.root / PARETO_DIR

    @property
    def exports(self) -> Path:
        return self.root / EXPORTS_DIR

    def relative(self, path: Path) -> str:
        """``path`` relative to the run folder, with forward slashes (for JSON and reports)."""
        return Path(path).relative_to(self.root).as_posix()
