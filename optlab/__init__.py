"""The model optimization lab: ONNX Runtime, pruning and distillation beside the engine's quantization modes (optlab/run.py)."""
