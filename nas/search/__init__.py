"""The search: settings, the Optuna encoding of a space, samplers, evaluator pools (in process or Ray) and the
batch-synchronous loop."""
