"""evim3.export: torch -> ONNX -> TensorRT, and parity checks across backends."""
