"""The ONNX Runtime backend with the fused scan op: the same `.onnx` file, each selective scan's Scan loops
swapped for one op running the fused C++ kernel (runtime/fused_scan.py, the [fast-cpu] extra), on CPU.
Where the op cannot run it runs the standard graph (backend_ort.py), saying why, unless asked for it alone.
"""

from __future__ import annotations

import sys

from evim3.runtime import fused_scan
from evim3.runtime.backend_ort import OnnxBackend
from evim3.runtime.errors import BackendUnavailableError, ModelFileError


class FusedScanOnnxBackend(OnnxBackend):
    def __init__(self, path: str, provider: str | None = None, threads: int | None = None,
                 spinning: bool | None = None, required: bool = False):
        self.required = required  # scan 'fused': fail rather than run the standard graph
        super().__init__(path, provider=provider, threads=threads, spinning=spinning)

    def _custom_ops_library(self) -> str:
        return fused_scan.register_op()

    def _session_graph(self, path: str, provider: str) -> bytes | None:
        """The graph with the fused scan op, serialised, when it can run here; else None (the file's own
        graph). `required` raises where it would fall back (saying why, unless the op does not apply: a GPU
        provider, or the optional extra not installed)."""
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
        if self.required:
            raise BackendUnavailableError(path, f"cannot run the fused scan op: {reason}")
        if not_applicable is None:
            print(f"warning: {path}: running the standard scan graph ({reason})", file=sys.stderr)
        return None
