"""The ONNX Runtime backend: a `.onnx` file on ONNX Runtime's CPU, CUDA or TensorRT execution provider, the
graph as exported (its selective scans as standard Scan loops). backend_ort_fused.py runs the same file with
each scan as one fused op. onnxruntime is imported when a model is opened.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from evim3.runtime.backends import Backend, available_cpus, check_input_shape, check_output_shape
from evim3.runtime.errors import BackendUnavailableError, ModelFileError
from evim3.runtime.meta import INPUT_NAME, META_KEY, OUTPUT_NAME, ModelMeta

# --provider names -> ONNX Runtime execution providers, best first. Asking for one also allows the ones after it.
ORT_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PROVIDER_CHOICES = tuple(ORT_PROVIDERS)
# How ONNX Runtime on CPU runs the selective scans: 'fused' = one fused op per scan (backend_ort_fused.py, the
# [fast-cpu] extra), 'graph' = the file's standard Scan loops, 'auto' = fused when it can run here.
SCAN_FORMS = ("auto", "fused", "graph")


def open_onnx(path: str, provider: str | None = None, threads: int | None = None, spinning: bool | None = None,
              scan: str = "auto") -> Backend:
    """The backend of an ONNX file: the standard graph (scan 'graph'), else the fused scan op where it runs."""
    if scan not in SCAN_FORMS:
        raise ValueError(f"unknown scan form {scan!r}; choose one of {', '.join(SCAN_FORMS)}")
    if scan == "graph":
        return OnnxBackend(path, provider=provider, threads=threads, spinning=spinning)
    from evim3.runtime.backend_ort_fused import FusedScanOnnxBackend

    return FusedScanOnnxBackend(path, provider=provider, threads=threads, spinning=spinning,
                                required=scan == "fused")


class OnnxBackend(Backend):
    def __init__(self, path: str, provider: str | None = None, threads: int | None = None,
                 spinning: bool | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError(None, "onnxruntime is not installed: pip install onnxruntime "
                                                "(or onnxruntime-gpu on CUDA machines)") from None
        self.path = path
        self.threads = threads or available_cpus()
        requested = self._requested_providers(ort.get_available_providers(), provider)
        options = ort.SessionOptions()
        model = self._session_graph(path, requested[0])  # None: the file's own graph
        self.fused_scan = model is not None
        if self.fused_scan:
            options.register_custom_ops_library(self._custom_ops_library())
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

    def _session_graph(self, path: str, provider: str) -> bytes | None:
        """The graph ONNX Runtime runs, serialised, when it is not the file's own (None)."""
        return None

    def _custom_ops_library(self) -> str:
        """The shared library of the custom ops a _session_graph uses."""
        raise NotImplementedError

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
