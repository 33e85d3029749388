"""Run outputs: trials.csv, pareto.json, pareto.png and report.md."""
