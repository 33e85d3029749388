"""Static subnets to ONNX (fp32 and INT8), each checked against PyTorch."""
