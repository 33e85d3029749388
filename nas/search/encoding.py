"""The Optuna encoding of a search space: conditional, define-by-run, generated from the space's one decision walk
(``nas.supernets.walk``).

A trial suggests ``trial.suggest_categorical(name, choices)`` for each active decision with more than one choice,
in walk order: ``s{i}.depth``, ``s{i}.width``, then for each position ``j`` below the chosen depth ``s{i}.b{j}.type``
(when the stage allows several block types) and the fields of the chosen type only, ``s{i}.b{j}.{type}.{field}``;
then ``size`` (resolution or sequence length). A position past the chosen depth has no parameters, and a field is a
parameter only under its own block type, so a trial's ``params`` are exactly the arch's free decisions and
``arch_from_params(space, trial.params)`` rebuilds the arch.
"""

from __future__ import annotations

from typing import Any

from nas.supernets.space import Arch, SearchSpace
from nas.supernets.walk import space_walk


def suggest_arch(trial: Any, space: SearchSpace) -> Arch:
    """The arch ``trial`` (an ``optuna.Trial``) suggests, one ``suggest_categorical`` per active free decision in walk
    order (an enqueued trial's fixed parameters are taken as given)."""
    return space_walk(space).walk(lambda decision: trial.suggest_categorical(decision.name, list(decision.choices)) if decision.free else decision.choices[0])


def param_distributions(space: SearchSpace) -> dict[str, Any]:
    """Every parameter a trial of ``space`` can have, as Optuna's ``CategoricalDistribution``, in walk order (a
    trial has the subset that its arch makes active)."""
    from optuna.distributions import CategoricalDistribution

    return {decision.name: CategoricalDistribution(list(decision.choices)) for decision in space_walk(space).free_decisions}


def params_from_arch(space: SearchSpace, arch: Arch) -> dict[str, Any]:
    """The parameters of ``arch`` (its active free decisions), as a trial of ``space`` has them; raises ``ArchError``
    when ``arch`` is not in ``space``."""
    return space_walk(space).params(arch)


def arch_from_params(space: SearchSpace, params: dict[str, Any]) -> Arch:
    """The arch that ``params`` describe; raises ``ArchError`` for a missing, unknown or inactive parameter or a value
    outside its choices."""
    return space_walk(space).from_params(params)


__all__ = ["arch_from_params", "param_distributions", "params_from_arch", "suggest_arch"]
