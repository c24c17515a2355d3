"""The selective scan as one fused op inside ONNX Runtime on CPUs: the edge runtime's optional fast path.

The exported graph is standard ONNX: each selective scan is three ``Scan`` loops of small element-wise ops,
which every ONNX runtime and TensorRT take, but which ONNX Runtime's CPU provider runs as thousands of tiny
kernel calls (~85 % of evim3-tiny's time, BENCHMARKS.md). The exporter records where each scan's inputs and
output are in the graph (metadata ``SCANS_KEY``); ``fuse_scans`` replaces each scan by one ``SelectiveScan``
node whose kernel is the fused C++ kernel the torch extension runs (runtime/csrc/selective_scan_kernel.h,
compiled here without torch, called through ctypes from onnxruntime-extensions' Python-op bridge). The rewrite
happens in memory when a session opens: the file on disk stays the standard graph.

Needs the ``[fast-cpu]`` extra (onnxruntime-extensions, onnx) and a C++ compiler with OpenMP; the kernel is
built once per machine into ~/.cache/evim3/kernels. ``unavailable_reason()`` says what is missing; then the
standard graph runs. No torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from evim3.runtime.errors import ModelFileError
from evim3.runtime.meta import META_KEY

SCANS_KEY = f"{META_KEY}.scans"  # ONNX metadata_props: JSON list, one {role: tensor name} per scan
OP_TYPE = "SelectiveScan"
OP_DOMAIN = "ai.onnx.contrib"  # where onnxruntime-extensions looks up Python ops
# The op's inputs in order, as the exportable scan marks them (evim3/ops/selective_scan.py):
# u, delta (before bias and softplus), z: (b, d, L); A_t = A transposed: (n, d); B, C: (b, L, n), token-major
# as Mamba's x_proj makes them; D, delta_bias: (d, 1). Output: (scan + D u) * silu(z), (b, d, L).
SCAN_INPUTS = ("u", "delta", "A_t", "B", "C", "D", "z", "delta_bias")
SCAN_OUTPUT = "out"

_CSRC = Path(__file__).parent / "csrc" / "selective_scan_op.cpp"
# The scan kernels, shared with the core's torch extension (evim3/ops/selective_scan_cpu.py includes it from
# here): the runtime owns them, so that the edge layer needs nothing from the layer above it.
KERNEL_HEADER = Path(__file__).parent / "csrc" / "selective_scan_kernel.h"
ARCH_ENV = "EVIM3_CPU_ARCH"
# Without it GCC keeps every loop that calls the kernel's exp scalar on AVX2 (a compare may trap, so it is not
# if-converted into a blend; AVX-512's masked instructions hide this): 9x slower built for x86-64-v3. torch
# builds itself with it too. The kernels neither read nor raise floating-point exception flags.
VECTOR_FLAGS = ("-fno-trapping-math",)
_SYMBOL = "evim3_selective_scan_forward"


def missing_extra() -> str | None:
    """None when the [fast-cpu] extra's packages import; else which one is missing, in one line."""
    try:
        import onnx  # noqa: F401
        import onnxruntime_extensions  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install 'evim3[fast-cpu]')"
    return None


def unavailable_reason() -> str | None:
    """None when the fused op can run here; else what is missing, in one line."""
    return missing_extra() or _kernel()[1]


@functools.cache
def _kernel() -> tuple[Any, str | None]:
    """(the compiled kernel's C function, None) or (None, why it could not be built). Built once per machine
    and source (-march=native: a cache shared between machines keys builds by CPU flags); ~2 s, silently."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return None, "no C++ compiler found (set CXX) to build the fused scan kernel"
    header = KERNEL_HEADER
    for source in (header, _CSRC):
        if not source.is_file():
            return None, f"the fused scan kernel's source is missing ({source})"
    flags = ["-O3", arch_flag(), *VECTOR_FLAGS, "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    tag = hashlib.sha1(b"\0".join([_CSRC.read_bytes(), header.read_bytes(), " ".join(flags).encode(),
                                   _cpu_flags().encode(), compiler.encode()])).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "evim3" / "kernels"
    library = cache / f"selective_scan_op-{platform.machine()}-{tag}.so"
    if not library.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as folder:  # built aside, moved in whole
            built = Path(folder) / library.name
            result = subprocess.run([compiler, *flags, f"-I{KERNEL_HEADER.parent}", str(_CSRC), "-o", str(built)],
                                    check=False, capture_output=True, text=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
                return None, f"building the fused scan kernel failed: {last[:200]}"
            os.replace(built, library)
    function = getattr(ctypes.CDLL(str(library)), _SYMBOL)
    pointer = ctypes.POINTER(ctypes.c_float)
    function.argtypes = [pointer] * 8 + [ctypes.c_int64] * 4 + [ctypes.c_int, pointer]
    function.restype = None
    return function, None


def arch_flag() -> str:
    """The -march the scan kernels are built for: this CPU's (native) unless EVIM3_CPU_ARCH names another
    x86-64 level or CPU, e.g. x86-64-v3 to run the AVX2 code on an AVX-512 machine (benchmarks/bench_step.py)."""
    return f"-march={os.environ.get(ARCH_ENV, 'native')}"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def selective_scan_op(u: np.ndarray, delta: np.ndarray, A_t: np.ndarray, B: np.ndarray, C: np.ndarray,
                      D: np.ndarray, z: np.ndarray, delta_bias: np.ndarray, threads: int = 1) -> np.ndarray:
    """The SelectiveScan op on numpy arrays in the layouts of SCAN_INPUTS, on `threads` threads."""
    function, reason = _kernel()
    if function is None:
        raise RuntimeError(reason)
    batch, d, length = u.shape
    n = A_t.shape[0]
    expected = {"delta": (delta.shape, u.shape), "z": (z.shape, u.shape), "A_t": (A_t.shape, (n, d)),
                "B": (B.shape, (batch, length, n)), "C": (C.shape, (batch, length, n)),
                "D": ((D.size,), (d,)), "delta_bias": ((delta_bias.size,), (d,))}
    wrong = [f"{name} {tuple(got)} (expected {want})" for name, (got, want) in expected.items() if tuple(got) != want]
    if wrong:  # the C kernel trusts its sizes: check them here
        raise ValueError(f"SelectiveScan inputs do not fit u {u.shape}: {', '.join(wrong)}")

    def ready(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    arrays = [ready(u), ready(delta), ready(A_t.T), ready(B), ready(C), ready(D.reshape(d)), ready(z),
              ready(delta_bias.reshape(d))]
    out = np.empty((batch, d, length), np.float32)
    pointer = ctypes.POINTER(ctypes.c_float)
    function(*(a.ctypes.data_as(pointer) for a in arrays), batch, d, length, n, int(threads),
             out.ctypes.data_as(pointer))
    return out


class _BufferOutput(np.ndarray):
    """onnxruntime-extensions hands a Python op's output to C++ as ``out.flatten().tolist()``: a Python list
    of every float (21 ms for one 1.4 MB output, measured), more than the scan itself. This array's tolist()
    is itself, which pybind11 copies as one buffer (0.12 ms)."""

    def flatten(self, order: str = "C") -> np.ndarray:
        return self.reshape(-1)

    def tolist(self) -> np.ndarray:  # type: ignore[override]
        return self.view(np.ndarray)


@functools.cache
def register_op() -> str:
    """Declare the SelectiveScan Python op to onnxruntime-extensions (once per process); returns the path of
    its custom-op library, for ``SessionOptions.register_custom_ops_library``."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    @onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float] * len(SCAN_INPUTS),
             outputs=[PyCustomOpDef.dt_float], attrs={"threads": PyCustomOpDef.dt_int64})
    def _selective_scan(*inputs: np.ndarray, threads: int) -> np.ndarray:
        return selective_scan_op(*inputs, threads=threads).view(_BufferOutput)

    return get_library_path()


def scan_boundaries(props: dict[str, str]) -> list[dict[str, str]] | None:
    """Each scan's {role: tensor name} from a model's metadata_props; None when the file has none (exported
    before evim3 recorded them, or a graph whose scans could not all be marked)."""
    if SCANS_KEY not in props:
        return None
    scans = json.loads(props[SCANS_KEY])
    roles = {*SCAN_INPUTS, SCAN_OUTPUT}
    if not isinstance(scans, list) or not all(isinstance(s, dict) and set(s) == roles for s in scans):
        raise ValueError(f"metadata {SCANS_KEY} is not a list of {sorted(roles)} maps")
    return scans


def fused_model_bytes(path: str, threads: int) -> bytes | None:
    """The ONNX file at `path` with its scans fused (fuse_scans), serialised for ONNX Runtime; None when its
    graph has no Scan loop to replace. ValueError when it has some but does not record where its scans are;
    ModelFileError when it is not an ONNX file."""
    import onnx

    try:
        model = onnx.load(path)
    except Exception as e:  # noqa: BLE001 -- protobuf raises DecodeError, OSError, RuntimeError...
        raise ModelFileError(path, f"not a readable ONNX file ({type(e).__name__})") from None
    scans = scan_boundaries({p.key: p.value for p in model.metadata_props})
    if not scans:
        if not any(node.op_type == "Scan" for node in model.graph.node):
            return None
        raise ValueError("the file does not record where its scans are (exported before evim3 did: export it again)")
    return fuse_scans(model, scans, threads).SerializeToString()


def fuse_scans(model: Any, scans: list[dict[str, str]], threads: int) -> Any:
    """The onnx.ModelProto `model` with each scan in `scans` replaced by one SelectiveScan node (running on
    `threads` threads) and the nodes only those scans used removed. Raises ValueError when a recorded
    tensor is not in the graph (the file was edited after export)."""
    import onnx

    graph = model.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    known = set(producers) | {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for k, scan in enumerate(scans):
        missing = [scan[role] for role in (*SCAN_INPUTS, SCAN_OUTPUT) if scan[role] not in known]
        if missing:
            raise ValueError(f"scan {k}: tensors {missing} of the recorded scan boundaries are not in the graph")
        index = producers[scan[SCAN_OUTPUT]]
        graph.node[index].CopyFrom(onnx.helper.make_node(
            OP_TYPE, [scan[role] for role in SCAN_INPUTS], [scan[SCAN_OUTPUT]], name=f"evim3_fused_scan_{k}",
            domain=OP_DOMAIN, threads=int(threads)))
    _remove_unused(graph)
    if not any(entry.domain == OP_DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(OP_DOMAIN, 1))
    return model


def _remove_unused(graph: Any) -> None:
    """Drop nodes and initializers nothing reaches from the graph outputs (a Scan body's references to
    outer values count as uses)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(names_read(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def names_read(node: Any) -> set[str]:
    """The node's inputs and every outer value its subgraphs read."""
    import onnx

    names = {name for name in node.input if name}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            inner = {name for n in attr.g.node for name in n.output} | {i.name for i in attr.g.input}
            inner |= {t.name for t in attr.g.initializer}
            names |= {name for n in attr.g.node for name in names_read(n) if name not in inner}
    return names
