"""Training strategies: which subnets each step trains, with which loss, teacher and learning rate, in which phase.
One module per strategy, registered in ``STRATEGIES`` under its YAML name; every module here is imported on the
first look-up. The interface is described in ``base``."""

from .base import (
    INPLACE,
    STRATEGIES,
    ChoiceFilter,
    FieldFilter,
    FrozenTeacher,
    InplaceTeacher,
    Phase,
    Schedule,
    StrategyError,
    StrategyOptions,
    SubnetTask,
    Teacher,
    TrainingStrategy,
    keep_first,
    keep_largest,
    keep_largest_fields,
    keep_smallest,
    largest_only,
    restrict_space,
    warmup_cosine,
)

__all__ = [
    "INPLACE",
    "STRATEGIES",
    "ChoiceFilter",
    "FieldFilter",
    "FrozenTeacher",
    "InplaceTeacher",
    "Phase",
    "Schedule",
    "StrategyError",
    "StrategyOptions",
    "SubnetTask",
    "Teacher",
    "TrainingStrategy",
    "keep_first",
    "keep_largest",
    "keep_largest_fields",
    "keep_smallest",
    "largest_only",
    "restrict_space",
    "warmup_cosine",
]
