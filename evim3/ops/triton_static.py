"""Static facts about the Triton scan kernels on a GPU architecture, without a GPU: each kernel compiled by Triton for
sm_90 (H100/H200) and its PTX assembled by Triton's bundled ptxas with -v, which reports registers per thread and
spill stores/loads. A spill (registers overflowing to local memory) in a scan kernel is a slowdown no CPU test would
see, so tests/test_triton_sm90.py asserts there is none; scripts/gpu_check.py prints the same table beside its
timings.

    python -m evim3.ops.triton_static          # the table, on any machine with Triton (no GPU needed)
    python -m evim3.ops.triton_static --json   # the same as JSON (what the test and gpu_check.py read)

Run it in a process without TRITON_INTERPRET=1 (``report_in_subprocess``): under the interpreter the kernels are
interpreted functions, not compilable ones.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Pointer arguments that carry activations: bf16 under autocast (what a training step compiles); the rest float32.
_BF16_POINTERS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "gout_ptr", "out_ptr", "du_ptr", "ddelta_ptr",
                  "dz_ptr"}
_ALL_ON = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "SAVE_CKPT": True, "HAS_GLAST": True,
           "SAVE_DSP": True}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel as the model launches it: module, name, warps and its constexprs beyond the all-on flags."""

    module: str
    name: str
    num_warps: int
    constexprs: tuple[tuple[str, object], ...]


def kernel_specs() -> list[KernelSpec]:
    """Every Triton kernel of the scans, old and new, at the `evim3` configuration (BLOCK_L 128, d_state 16)."""
    from evim3.ops import selective_scan_triton as base

    chunk = (("BLOCK_L", base.BLOCK_L), ("BLOCK_N", 16))
    old = "evim3.ops.selective_scan_triton"
    pre = "evim3.ops.selective_scan_triton_pre"
    specs = [
        KernelSpec(old, "_scan_fwd_kernel", base.NUM_WARPS, chunk),
        KernelSpec(old, "_scan_bwd_carry_kernel", base.NUM_WARPS, chunk),
        KernelSpec(old, "_scan_bwd_grad_kernel", base.GRAD_NUM_WARPS, chunk),
        KernelSpec(pre, "_prepass_kernel", 4, (("BLOCK", 1024),)),
    ]
    for stages in (1, 2):
        staged = (*chunk, ("STAGES", stages))
        specs += [KernelSpec(pre, "_pre_fwd_kernel", base.NUM_WARPS, staged),
                  KernelSpec(pre, "_pre_bwd_carry_kernel", base.NUM_WARPS, staged),
                  KernelSpec(pre, "_pre_bwd_grad_kernel", base.GRAD_NUM_WARPS, staged)]
    # Not here: the gradient kernel at 4 warps (twice the tile per thread) takes all 255 registers and spills 8 B
    # with STAGES=2 (measured with this module), so no launch uses it.
    return specs


@dataclass(frozen=True)
class StaticReport:
    kernel: str
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int


def compile_for(spec: KernelSpec, capability: int = 90) -> StaticReport:
    """Compile `spec` for sm_<capability> and read ptxas -v. Raises when Triton cannot target it here."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec.module), spec.name)
    if not hasattr(fn, "arg_names"):
        raise RuntimeError(f"{spec.name} is not a compilable JIT function here (TRITON_INTERPRET=1 is set?)")
    values = {**_ALL_ON, **dict(spec.constexprs)}
    signature, constexprs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[arg] = "constexpr"
            constexprs[(i,)] = values[arg]
        elif arg.endswith("_ptr"):
            signature[arg] = "*bf16" if arg in _BF16_POINTERS else "*fp32"
        else:
            signature[arg] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": spec.num_warps})
    ptxas = _ptxas_path(get_ptxas, capability)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        # Triton's own ptxas options (backends/nvidia/compiler.py make_cubin), so the counts are the GPU run's
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}"]
        log = subprocess.run([ptxas, *flags, str(ptx), "-o", str(ptx.with_suffix(".o"))],
                             capture_output=True, text=True, check=True).stderr
    label = f"{spec.name}[STAGES={dict(spec.constexprs).get('STAGES', '-')},warps={spec.num_warps}]"
    return _parse(label, spec.num_warps, log)


def _ptxas_path(get_ptxas, capability: int) -> str:
    """Triton's bundled ptxas across versions: get_ptxas(arch) -> tool with .path (3.4+), get_ptxas() -> the same
    or a (path, version) pair (older)."""
    try:
        tool = get_ptxas(capability)
    except TypeError:
        tool = get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


def _parse(kernel: str, num_warps: int, log: str) -> StaticReport:
    """ptxas -v's 'Used N registers' and 'S bytes stack frame, X bytes spill stores, Y bytes spill loads'."""
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or frame is None:
        raise RuntimeError(f"ptxas -v output not understood for {kernel}: {log[-500:]}")
    stack, stores, loads = map(int, frame.groups())
    return StaticReport(kernel, num_warps, int(registers.group(1)), stores, loads, stack)


def target_unavailable() -> str | None:
    """Why Triton cannot compile for sm_90 here, or None when it can (CPU-only machines can: bundled ptxas)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas

        _ptxas_path(get_ptxas, 90)  # raises when no ptxas is bundled or found
    except Exception as e:  # noqa: BLE001 -- any failure means "cannot", with the reason
        return f"Triton cannot target sm_90 here: {type(e).__name__}: {e}"
    return None


def report(capability: int = 90) -> list[StaticReport]:
    return [compile_for(spec, capability) for spec in kernel_specs()]


def report_in_subprocess(capability: int = 90, timeout_s: float = 300) -> list[StaticReport]:
    """report() in a fresh Python without TRITON_INTERPRET (a test session or dry run sets it process-wide)."""
    import json
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    done = subprocess.run([sys.executable, "-m", "evim3.ops.triton_static", "--json", str(capability)], env=env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compiling the Triton kernels for sm_{capability} failed: {done.stderr[-2000:]}")
    return [StaticReport(**row) for row in json.loads(done.stdout)]


if __name__ == "__main__":
    import dataclasses
    import json
    import sys

    if "--json" in sys.argv:
        capability = int(sys.argv[-1]) if sys.argv[-1].isdigit() else 90
        print(json.dumps([dataclasses.asdict(r) for r in report(capability)]))
        sys.exit(0)
    for r in report():
        print(f"{r.kernel:40s} warps {r.num_warps}  registers {r.registers:3d}  spill stores {r.spill_stores} "
              f"loads {r.spill_loads}  stack {r.stack_bytes} B")
