"""Supernet training: the loop, checkpoints and resume, BN recalibration and accuracy. Strategies (which subnets
each step trains) live in ``nas.supernets.strategies``."""
