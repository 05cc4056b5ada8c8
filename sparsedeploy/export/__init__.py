"""Export of pruned checkpoints to deployable graph formats (ONNX with a KV cache)."""
