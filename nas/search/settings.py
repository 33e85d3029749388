"""The search as run: the YAML ``search`` section with command-line overrides applied, checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nas.search.samplers import SAMPLERS
from nas.space.schema import SearchModel
from nas.training.loop import RunError


@dataclass(frozen=True, slots=True)
class SearchSettings:
    """The search as run: the YAML ``search`` section with command-line overrides applied."""

    trials: int
    sampler: str
    population_size: int
    targets: tuple[str, ...]
    threads: int
    batch_size: int
    measure_seconds: float
    latency_limits: tuple[tuple[str, float], ...] = ()
    max_params: int | None = None
    max_macs: int | None = None
    seed: int = 0
    workers: int = 1
    address: str | None = None
    latency: str = "measured"
    profiles: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, search: SearchModel, **overrides: Any) -> SearchSettings:
        constraints = search.constraints
        values: dict[str, Any] = {
            "trials": search.trials,
            "sampler": search.sampler,
            "population_size": search.population_size,
            "targets": tuple(dict.fromkeys(search.targets)),
            "threads": search.threads,
            "batch_size": search.batch_size,
            "measure_seconds": float(search.measure_seconds),
            "latency_limits": tuple((name, float(limit)) for name, limit in constraints.latency_ms.items()),
            "max_params": constraints.params,
            "max_macs": constraints.macs,
            "seed": search.seed,
            "latency": search.latency,
            "profiles": tuple(sorted(search.profiles.items())),
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        settings = cls(**values)
        from nas.latency.targets import TARGETS
        from nas.supernets.registry import did_you_mean

        unknown = [name for name in settings.targets if name not in TARGETS]
        if unknown:
            raise RunError(f"unknown latency target(s) {unknown}; targets are {list(TARGETS.names())}{did_you_mean(unknown[0], TARGETS.names())}")
        sampler_problem = SAMPLERS.problem(settings.sampler)
        if sampler_problem is not None:
            raise RunError(f"the sampler (search.sampler or --sampler) {sampler_problem}")
        if settings.trials < 1:
            raise RunError(f"--trials must be at least 1, got {settings.trials}")
        for name, _ in settings.latency_limits:
            if name not in settings.targets:
                raise RunError(f"search.constraints.latency_ms names {name!r}, which is not among search.targets {list(settings.targets)}")
        if settings.latency not in ("measured", "predicted"):
            raise RunError(f"search.latency (or --latency) must be 'measured' or 'predicted', got {settings.latency!r}")
        for name, _ in settings.profiles:
            if name not in settings.targets:
                raise RunError(f"search.profiles names target {name!r}, which is not among search.targets {list(settings.targets)}")
        if settings.workers < 1:
            raise RunError(f"--workers must be at least 1, got {settings.workers}")
        return settings

    @property
    def constraint_names(self) -> list[str]:
        names = [f"latency_{name}_ms <= {limit:g}" for name, limit in self.latency_limits]
        if self.max_params is not None:
            names.append(f"params <= {self.max_params}")
        if self.max_macs is not None:
            names.append(f"macs <= {self.max_macs}")
        return names

    @property
    def metric_names(self) -> list[str]:
        return ["accuracy", *(latency_key(name) for name in self.targets)]


def latency_key(target: str) -> str:
    """The name of the latency objective (and user attribute) of ``target``: ``latency_{target}_ms``."""
    return f"latency_{target}_ms"


__all__ = ["SearchSettings", "latency_key"]
