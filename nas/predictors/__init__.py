"""Latency and accuracy predictors behind one protocol, fitted on measurements from a hardware profile."""
