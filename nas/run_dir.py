"""The run folder's layout. This module alone knows the names of the files and folders a run writes; everything
else asks a ``RunDir`` for a path.

```
RUN/
  .lock                held (flock) by the one process working in the folder; says who (nas.run_lock)
  config.yaml          the space file as given
  origin.json          the folder the space file came from (its plugins: are resolved against it)
  checkpoint/          weights.safetensors + state.json (replaced atomically after every epoch; .tmp/.old beside)
  log.jsonl            one line per epoch
  attempts.jsonl       one line per start of training (time, workers, the epoch it resumed from, host)
  ray_train/           Ray Train's own storage when training ran on Ray (--workers > 1 or --address)
  metrics.json         accuracies of the largest and smallest subnets (and per block family)
  search/study.journal the Optuna study;   search/latency.jsonl  every latency measurement with its fingerprint
  trials.csv  pareto.json  pareto.png  report.md
  pareto/<member>/     model.onnx, model.int8.onnx, arch.yaml, weights.safetensors, export.json
  sorted/<member>/, sorted.json, report.md   nas export --sorted (a SortedNet family)
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nas import jsonio

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
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
SORTED_DIR = "sorted"

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
    def origin(self) -> Path:
        return self.root / "origin.json"

    def record_origin(self, base_dir: Path | None) -> None:
        """Remember the space file's folder, so that its relative ``plugins:`` resolve when the run is reloaded."""
        if base_dir is None:
            return
        temporary = self.origin.with_name(self.origin.name + STAGING_SUFFIX)
        temporary.write_text(jsonio.dumps({"base_dir": str(Path(base_dir).resolve())}))
        os.replace(temporary, self.origin)

    def origin_dir(self) -> Path | None:
        """The space file's folder recorded by ``record_origin`` (None if the run has no record)."""
        try:
            return Path(json.loads(self.origin.read_text())["base_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

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
    def attempts(self) -> Path:
        """One line per start of training: in process, or of a Ray Train worker group (restarts included)."""
        return self.root / "attempts.jsonl"

    @property
    def ray_train(self) -> Path:
        """Ray Train's own storage for the run (its reports; nasforge's checkpoint stays in ``checkpoint/``)."""
        return self.root / "ray_train"

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
    def front_check(self) -> Path:
        """Predicted-latency searches: each front member's predicted latency against its measurement."""
        return self.search / "front_check.json"

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

    @property
    def sorted(self) -> Path:
        """The members of a SortedNet family (``nas export RUN --sorted``)."""
        return self.root / SORTED_DIR

    def relative(self, path: Path) -> str:
        """``path`` relative to the run folder, with forward slashes (for JSON and reports)."""
        return Path(path).relative_to(self.root).as_posix()
