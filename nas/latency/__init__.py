"""Latency measurement through ONNX Runtime: targets, the device fingerprint, the interleaved protocol and
op-type profiles."""
