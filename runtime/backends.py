"""Inference backends behind one interface, chosen by the model file: ``.onnx`` -> ONNX Runtime,
``.engine`` -> TensorRT. Both read the evim3 metadata the file carries, so the file alone says how to
preprocess the input and read the output.

No torch here (edge devices have none): ONNX Runtime, or TensorRT 10 with device buffers from cuda-python.
Both are imported only when a backend of that kind is opened.
"""

from __future__ import annotations

import abc
import os
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from evim3.runtime import fused_scan
from evim3.runtime.errors import BackendUnavailableError, ModelFileError
from evim3.runtime.meta import INPUT_NAME, META_KEY, OUTPUT_NAME, ModelMeta
from evim3.runtime.outputs import output_shape

if TYPE_CHECKING:
    from typing_extensions import Self

# --provider names -> ONNX Runtime execution providers, best first. Asking for one also allows the ones after it.
ORT_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PROVIDER_CHOICES = tuple(ORT_PROVIDERS)
# How ONNX Runtime on CPU runs the selective scans: 'fused' = one fused op per scan (runtime/fused_scan.py,
# the [fast-cpu] extra), 'graph' = the file's standard Scan loops, 'auto' = fused when it can run here.
SCAN_FORMS = ("auto", "fused", "graph")


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Backend(abc.ABC):
    """A loaded model: ``run(clips (N, 1, T, S, S) float32) -> (N, K) or (N, 2, T, S, S) float32``: the raw
    graph output (EF points or logits; evim3.runtime.outputs says what they mean)."""

    meta: ModelMeta
    path: str
    max_batch: int | None = None  # largest N one call to the engine takes; run() splits bigger inputs

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """What runs the model, for the user: e.g. 'onnxruntime CPUExecutionProvider, 2 threads'."""

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """One clip's shape (1, frames, size, size), from the metadata."""
        spec = self.meta.preprocess
        return (1, spec.frames, spec.size, spec.size)

    def run(self, clips: np.ndarray) -> np.ndarray:
        clips = np.ascontiguousarray(clips, dtype=np.float32)
        if clips.ndim != 5 or clips.shape[1:] != self.input_shape:
            raise ValueError(f"{self.path}: model takes clips (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {clips.shape}")
        step = self.max_batch or len(clips)
        return np.concatenate([self._run_batch(clips[i:i + step]) for i in range(0, len(clips), step)])

    @abc.abstractmethod
    def _run_batch(self, clips: np.ndarray) -> np.ndarray:
        """Run at most max_batch clips."""

    def close(self) -> None:
        """Release the session/engine; the backend is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_backend(path: str | os.PathLike, provider: str | None = None, threads: int | None = None,
                 spinning: bool | None = None, scan: str = "auto") -> Backend:
    """The backend for a model file, by its suffix.

    provider: 'tensorrt' | 'cuda' | 'cpu' for ONNX models (None = the best available); threads: CPU
    threads for ONNX Runtime (None = every CPU this process may use); spinning: whether ONNX Runtime's
    idle worker threads spin-wait for work or sleep (None = the faster for the graph that runs: on for the
    standard graph's scan loops, off with the fused scan op); scan: one of SCAN_FORMS, how ONNX Runtime on
    CPU runs the selective scans (runtime/fused_scan.py).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".onnx", ".engine"):
        hint = " (a training checkpoint: export it first, `evim3 export`)" if suffix == ".safetensors" else ""
        raise ModelFileError(path, f"unknown model file type{hint}; expected .onnx or .engine")
    if not os.path.isfile(path):
        raise ModelFileError(path, "model file not found")
    if suffix == ".onnx":
        return OnnxBackend(path, provider=provider, threads=threads, spinning=spinning, scan=scan)
    if provider not in (None, "tensorrt"):
        raise ModelFileError(path, f"a TensorRT engine runs on TensorRT only, not provider {provider!r}")
    return TensorRTBackend(path)


def check_input_shape(path: str, shape: tuple, meta: ModelMeta, where: str) -> int | None:
    """Compare a model input shape (N, 1, T, S, S; symbolic dims as str/None/-1) with the metadata.

    Returns the fixed batch size, or None when the batch dimension is dynamic.
    """
    spec = meta.preprocess
    expected = (1, spec.frames, spec.size, spec.size)
    fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if len(shape) != 5 or any(f is not None and f != e for f, e in zip(fixed[1:], expected)):
        raise ModelFileError(path, f"{where} input '{INPUT_NAME}' has shape {list(shape)} but the evim3 "
                                   f"metadata says clips of (N, {', '.join(map(str, expected))})")
    return fixed[0]


def check_output_shape(path: str, shape: tuple, meta: ModelMeta, where: str) -> None:
    """The model output must be (N, *per clip) with the per-clip shape the metadata's task implies
    (evim3.runtime.outputs.output_shape); symbolic dimensions pass."""
    expected = output_shape(meta)
    fixed = [d if isinstance(d, int) and d > 0 else None for d in shape[1:]]
    if len(shape) != 1 + len(expected) or any(f is not None and f != e for f, e in zip(fixed, expected)):
        classes = f" with {len(meta.class_names)} classes" if meta.task == "classification" else ""
        raise ModelFileError(path, f"{where} output '{OUTPUT_NAME}' has shape {list(shape)}; the metadata "
                                   f"(task {meta.task!r}{classes}) says (N, {', '.join(map(str, expected))})")


class OnnxBackend(Backend):
    def __init__(self, path: str, provider: str | None = None, threads: int | None = None,
                 spinning: bool | None = None, scan: str = "auto"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError(None, "onnxruntime is not installed: pip install onnxruntime "
                                                "(or onnxruntime-gpu on CUDA machines)") from None
        if scan not in SCAN_FORMS:
            raise ValueError(f"unknown scan form {scan!r}; choose one of {', '.join(SCAN_FORMS)}")
        self.path = path
        self.threads = threads or available_cpus()
        requested = self._requested_providers(ort.get_available_providers(), provider)
        options = ort.SessionOptions()
        model = self._fused_model(path, scan, requested[0])  # None: the file's own graph
        self.fused_scan = model is not None
        if self.fused_scan:
            options.register_custom_ops_library(fused_scan.register_op())
        # Spinning workers answer the Scan loops' thousands of small ops sooner on an idle CPU, and steal
        # the cores of everything else on a busy one -- the fused op's own threads included (measured,
        # evim3-tiny: fused 34 ms with spinning off, 47-83 ms on; the standard graph 71 ms on, 118 off).
        self.spinning = (not self.fused_scan) if spinning is None else spinning
        # Explicit CPU threads: ORT's default (all physical cores, spinning) fights the decode thread.
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        options.log_severity_level = 3  # errors only: ORT's warnings are not actionable for the user
        try:
            self.session = ort.InferenceSession(path if model is None else model, options,
                                                providers=self._provider_options(requested))
        except Exception as e:  # noqa: BLE001 -- ORT raises its own types (Fail, InvalidProtobuf, NoSuchFile...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelFileError(path, f"ONNX Runtime cannot load the model: {first}") from None
        self.providers: list[str] = self.session.get_providers()
        self.fallback = fallback_note(requested, self.providers)
        if self.fallback:
            print(f"warning: {path}: {self.fallback}", file=sys.stderr)
        self.meta = self._read_meta()
        self._check_io()

    def _fused_model(self, path: str, scan: str, provider: str) -> bytes | None:
        """The graph with the fused scan op, serialised, when `scan` asks for it and it can run here; None
        for the file's own graph. scan='fused' raises where 'auto' falls back (saying why, unless the op does
        not apply: a GPU provider, or the optional extra not installed)."""
        if scan == "graph":
            return None
        not_applicable = ("the fused scan op runs on CPU only" if provider != "CPUExecutionProvider"
                          else fused_scan.missing_extra())
        reason = not_applicable or fused_scan.unavailable_reason()
        if reason is None:
            try:
                return fused_scan.fused_model_bytes(path, self.threads)
            except ModelFileError:
                return None  # not an ONNX file: ONNX Runtime's own load says so, as for any file
            except ValueError as e:
                reason = str(e)
        if scan == "fused":
            raise BackendUnavailableError(path, f"cannot run the fused scan op: {reason}")
        if not_applicable is None:
            print(f"warning: {path}: running the standard scan graph ({reason})", file=sys.stderr)
        return None

    @staticmethod
    def _requested_providers(available: list[str], provider: str | None) -> list[str]:
        if provider is not None and provider not in ORT_PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
        chain = list(ORT_PROVIDERS.values())
        if provider is not None:
            wanted = ORT_PROVIDERS[provider]
            if wanted not in available:
                raise BackendUnavailableError(None, f"this onnxruntime has no {wanted} (it has "
                                                    f"{', '.join(available)}); install onnxruntime-gpu")
            chain = chain[chain.index(wanted):]
        return [p for p in chain if p in available]

    @staticmethod
    def _provider_options(requested: list[str]) -> list[Any]:
        if "TensorrtExecutionProvider" not in requested:
            return requested
        # Building a TensorRT engine takes minutes: keep it between runs.
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "evim3", "ort-trt")
        os.makedirs(cache, exist_ok=True)
        trt = ("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache})
        return [trt if p == "TensorrtExecutionProvider" else p for p in requested]

    def _read_meta(self) -> ModelMeta:
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise ModelFileError(self.path, "ONNX model carries no evim3 metadata (export it with `evim3 export`)")
        try:
            return ModelMeta.from_onnx_props(props)
        except (ValueError, TypeError, KeyError) as e:
            raise ModelFileError(self.path, f"evim3 metadata is invalid ({e})") from None

    def _check_io(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise ModelFileError(self.path, f"ONNX graph has inputs {[i.name for i in inputs]} and outputs "
                                            f"{[o.name for o in outputs]}; evim3 models take '{INPUT_NAME}' "
                                            f"and give '{OUTPUT_NAME}'")
        self.max_batch = check_input_shape(self.path, tuple(inputs[0].shape), self.meta, "ONNX")
        check_output_shape(self.path, tuple(next(o.shape for o in outputs if o.name == OUTPUT_NAME)), self.meta,
                           "ONNX")

    @property
    def device(self) -> str:
        cpu = (f", {self.threads} threads{', fused scan' if self.fused_scan else ''}"
               f"{'' if self.spinning else ', no spinning'}" if self.providers[0] == "CPUExecutionProvider" else "")
        return f"onnxruntime {self.providers[0]}{cpu}"

    def _run_batch(self, clips: np.ndarray) -> np.ndarray:
        if self.max_batch and len(clips) < self.max_batch:  # a fixed-batch graph: pad the last chunk
            padded = np.zeros((self.max_batch, *clips.shape[1:]), np.float32)
            padded[: len(clips)] = clips
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: padded})[0][: len(clips)]
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: clips})[0]

    def close(self) -> None:
        self.session = None  # ORT frees the session with its last reference


def fallback_note(requested: list[str], used: list[str]) -> str | None:
    """ORT silently drops providers whose libraries fail to load; say so when the best one was dropped."""
    if not requested or not used or used[0] == requested[0]:
        return None
    dropped = [p for p in requested if p not in used]
    return (f"onnxruntime fell back to {used[0]}: {', '.join(dropped)} could not start "
            "(check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs)")


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
