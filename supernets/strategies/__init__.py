"""Training strategies: which subnets each step trains, with which loss and teacher. One module per strategy,
registered in ``STRATEGIES`` under its YAML name; every module here is imported on the first look-up."""

from .base import STRATEGIES, SubnetTask, TrainingStrategy

__all__ = ["STRATEGIES", "SubnetTask", "TrainingStrategy"]
