"""Measured latency profiles, found by device name."""
