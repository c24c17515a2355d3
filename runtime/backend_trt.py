"""The TensorRT backend: a `.engine` file (the evim3 header, then a serialized TensorRT 10 plan,
runtime/engine_file.py) run through the named-tensor API with device buffers from cuda-python. TensorRT and
cuda-python are imported when an engine is opened.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from evim3.runtime.backends import Backend, check_input_shape, check_output_shape
from evim3.runtime.errors import BackendUnavailableError, ModelFileError
from evim3.runtime.meta import INPUT_NAME, OUTPUT_NAME


def open_engine(path: str, provider: str | None = None, threads: int | None = None, spinning: bool | None = None,
                scan: str = "auto") -> Backend:
    """The backend of an engine file; ONNX Runtime's options other than provider 'tensorrt' do not apply."""
    if provider not in (None, "tensorrt"):
        raise ModelFileError(path, f"a TensorRT engine runs on TensorRT only, not provider {provider!r}")
    return TensorRTBackend(path)


def import_tensorrt_cuda() -> tuple[Any, Any]:
    """(tensorrt, cuda runtime bindings), or BackendUnavailableError naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(None, "TensorRT is not installed (pip install tensorrt, or JetPack's "
                                            "python3-libnvinfer); use the .onnx model instead") from None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendUnavailableError(None, "cuda-python is not installed (pip install cuda-python): the "
                                                "TensorRT backend needs it for device buffers") from None
    return trt, cudart


class TensorRTBackend(Backend):
    """A serialized TensorRT 10 engine with the evim3 header (runtime/engine_file.py), run through the
    named-tensor API with device buffers from cuda-python's runtime bindings."""

    def __init__(self, path: str):
        trt, self._cudart = import_tensorrt_cuda()
        from evim3.runtime.engine_file import check_engine_compatible, current_gpu, read_engine

        self.path = path
        header, plan = read_engine(path)
        gpu = current_gpu()
        if gpu is None:
            raise BackendUnavailableError(None, "no CUDA GPU is visible through cuda-python: TensorRT engines "
                                                "need the GPU they were built for")
        # A plan only loads on the TensorRT version and GPU that built it: say which differs.
        check_engine_compatible(path, header, trt.__version__, *gpu)
        self.meta = header.meta
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ModelFileError(path, f"TensorRT {trt.__version__} cannot deserialize this engine (see the "
                                       "TensorRT log above)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        if sorted(names) != sorted([INPUT_NAME, OUTPUT_NAME]):
            raise ModelFileError(path, f"engine tensors are {names}; evim3 engines have '{INPUT_NAME}' and "
                                       f"'{OUTPUT_NAME}'")
        shape = tuple(self._engine.get_tensor_shape(INPUT_NAME))
        self.max_batch = check_input_shape(path, shape, self.meta, "engine")
        check_output_shape(path, tuple(self._engine.get_tensor_shape(OUTPUT_NAME)), self.meta, "engine")
        if self.max_batch is None:  # dynamic batch: the optimisation profile bounds it
            self.max_batch = int(self._engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._context = self._engine.create_execution_context()
        self._stream = self._cuda(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._trt_version = trt.__version__

    def _cuda(self, result: tuple) -> Any:
        """cuda-python returns (error, value...): raise on error, return the value."""
        err, *values = result
        if err != self._cudart.cudaError_t.cudaSuccess:
            name = self._cudart.cudaGetErrorName(err)[1]
            raise BackendUnavailableError(self.path, f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else None

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                self._cuda(self._cudart.cudaFree(pointer))
            pointer = self._cuda(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    @property
    def device(self) -> str:
        return f"TensorRT {self._trt_version}"

    def _run_batch(self, clips: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        host_in = np.ascontiguousarray(clips, dtype=self._dtypes[INPUT_NAME])
        if not self._context.set_input_shape(INPUT_NAME, host_in.shape):
            raise ModelFileError(self.path, f"engine rejects input shape {host_in.shape}")
        host_out = np.empty(tuple(self._context.get_tensor_shape(OUTPUT_NAME)), self._dtypes[OUTPUT_NAME])
        d_in = self._device_buffer(INPUT_NAME, host_in.nbytes)
        d_out = self._device_buffer(OUTPUT_NAME, host_out.nbytes)
        self._cuda(cudart.cudaMemcpyAsync(d_in, host_in.ctypes.data, host_in.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
        self._context.set_tensor_address(INPUT_NAME, d_in)
        self._context.set_tensor_address(OUTPUT_NAME, d_out)
        if not self._context.execute_async_v3(int(self._stream)):
            raise ModelFileError(self.path, "TensorRT execution failed (see the TensorRT log above)")
        self._cuda(cudart.cudaMemcpyAsync(host_out.ctypes.data, d_out, host_out.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        self._cuda(cudart.cudaStreamSynchronize(self._stream))
        return host_out.astype(np.float32, copy=False)

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._buffers.clear()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = self._engine = None
