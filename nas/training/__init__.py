"""Supernet training: the loop (``loop``: phases, teachers, optimizer updates), checkpoints and resume
(``checkpoint``), BN recalibration and accuracy (``evaluation``). What each step trains is the strategy's business
(``nas.supernets.strategies``); nothing here knows a strategy by name."""
