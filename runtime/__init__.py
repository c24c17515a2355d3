"""evim3.runtime: the edge runtime. numpy, PyAV, pydicom, onnxruntime or TensorRT — never torch.

Import submodules directly (``from evim3.runtime.video import read_video``); this package imports nothing
heavy so that ``evim3 --help`` stays fast.
"""
