"""Inference backends behind one interface, chosen by the model file through the format table
(runtime/formats.py): ``.onnx`` -> ONNX Runtime (backend_ort.py, backend_ort_fused.py), ``.engine`` ->
TensorRT (backend_trt.py). Every backend reads the evim3 metadata the file carries, so the file alone says
how to preprocess the input and read the output.

No torch here (edge devices have none); a backend's engine is imported only when a file of its format is opened.
"""

from __future__ import annotations

import abc
import os
from typing import TYPE_CHECKING

import numpy as np
from evim3.runtime.errors import ModelFileError
from evim3.runtime.formats import format_of
from evim3.runtime.meta import INPUT_NAME, OUTPUT_NAME, ModelMeta
from evim3.runtime.tasks import task_spec

if TYPE_CHECKING:
    from typing_extensions import Self

def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Backend(abc.ABC):
    """A loaded model: ``run(clips (N, 1, T, S, S) float32) -> (N, K) or (N, 2, T, S, S) float32``: the raw
    graph output (EF points or logits; the model's task, evim3.runtime.tasks, says what they mean)."""

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
    """The backend for a model file, by its format (runtime/formats.py: the suffix).

    provider: 'tensorrt' | 'cuda' | 'cpu' for ONNX models (None = the best available); threads: CPU
    threads for ONNX Runtime (None = every CPU this process may use); spinning: whether ONNX Runtime's
    idle worker threads spin-wait for work or sleep (None = the faster for the graph that runs: on for the
    standard graph's scan loops, off with the fused scan op); scan: 'auto' | 'fused' | 'graph', how ONNX
    Runtime on CPU runs the selective scans (backend_ort.SCAN_FORMS).
    """
    path = os.fspath(path)
    fmt = format_of(path)
    if not os.path.isfile(path):
        raise ModelFileError(path, "model file not found")
    return fmt.open()(path, provider=provider, threads=threads, spinning=spinning, scan=scan)


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
    (TaskSpec.output_shape); symbolic dimensions pass."""
    expected = task_spec(meta.task).output_shape(meta)
    fixed = [d if isinstance(d, int) and d > 0 else None for d in shape[1:]]
    if len(shape) != 1 + len(expected) or any(f is not None and f != e for f, e in zip(fixed, expected)):
        classes = f" with {len(meta.class_names)} classes" if meta.class_names else ""
        raise ModelFileError(path, f"{where} output '{OUTPUT_NAME}' has shape {list(shape)}; the metadata "
                                   f"(task {meta.task!r}{classes}) says (N, {', '.join(map(str, expected))})")

