"""Writing compressed models for a runtime (ONNX Runtime first)."""
