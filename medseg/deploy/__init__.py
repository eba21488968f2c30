"""Deployment: exporting a model bundle (ONNX, TorchScript, int8) with a parity check against the eager network."""
