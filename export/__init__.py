"""Export trained checkpoints to ONNX and write the Triton model repository."""
