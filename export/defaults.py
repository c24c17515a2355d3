"""The export API's defaults, in a light module (no torch, no onnx): export/onnx.py and export/tensorrt.py
take them as their parameters' defaults, and `evim3 export` shows and passes the same values."""

MIN_OPSET = 17  # the default and lowest ONNX opset: LayerNormalization
ENGINE_WORKSPACE_GIB = 4.0  # TensorRT builder workspace
