"""ONNX export: the edge runtime against PyTorch eager and the matmul floor, and the graph form the exporter uses.

    python -m benchmarks export                       # run(): evim3-tiny and evim3
    EVIM3_BENCH_EXPORT_PRESETS=evim3-tiny EVIM3_BENCH_EXPORT_REPEATS=3 python -m benchmarks export   # shorter
    EVIM3_BENCH_EXPORT_THREADS=16 python -m benchmarks export      # a workstation's cores (default 2)
    python -m benchmarks.bench_export --forms         # the export-form comparison (slow: tens of minutes)

run(), for each preset, in one run: one random-init checkpoint, exported as `evim3 export` writes it (and
with --int8), and timed on the same clip by
  eager        PyTorch eager, with the scan this machine's dispatcher picks for CPU tensors (the fused C++
               kernel when it builds; the row names it);
  ort          ONNX Runtime through evim3's own OnnxBackend, exactly as `evim3 infer` opens it: each scan one
               fused op when the [fast-cpu] extra is installed (runtime/fused_scan.py; the row says), worker
               spinning off then;
  ort-graph    the file's standard graph (the scans as Scan loops; `--scan graph`), worker spinning on;
  ort-int8     the --int8 export (Q/DQ linear layers, export/quantize.py; calibrated here on 8 random clips, as
               this benchmark times and does not judge error) through OnnxBackend, as `ort`;
  gemm-floor   every linear layer of the model (and the patch Conv3d) as a plain GEMM of its own shape, on the
               same threads: the time the model's matmuls need, whatever runs the rest.
Each engine lives in its own process (eager and the GEMM floor share PyTorch's), so one's spinning or
OpenMP threads, allocator and caches do not touch another's; all with 2 threads, batch 1; WARMUP untimed calls each, then REPEATS rounds in which every
engine runs once, in an order rotated round by round, with PAUSE_S untimed before each call so that the
threads of the engine that ran last are idle. Median, min and max per engine; the share of the machine's CPU
time that other processes used during the run is recorded (/proc/stat less this process tree's own time), and
a run beside other work is marked so: its numbers are not final. max_abs_diff_ef
is each engine's output against eager's on the same random weights: it shows they compute the same model,
not int8's error on echo content (a random init answers nearly the same EF for every clip; that error is
measured by `evim3 check --data` on a trained checkpoint).

Why the 2026-11-27 records disagreed (ORT 307 ms here, 181.7 ms in bench_runtime, same preset, same hour):
this benchmark then ran ORT with spinning off in the same process as PyTorch, right after each eager call
(torch's OpenMP workers may still be spin-waiting from it when ORT starts on the same cores), after one
warm-up round and over 5 runs, on a shared machine; bench_runtime ran OnnxBackend (spinning on) alone in its process,
3 warm-ups and 20 runs, on a dynamic-batch export. Spinning alone moved ORT's evim3-tiny latency by 2.8x in
a side-by-side check under load (on: 658 ms, off: 233 ms, load average 2.5 on 2 cores); which wins on an
idle machine was for a quiet run to say: on for the standard graph (1.1-1.8x faster), off with the fused op
(BENCHMARKS.md); OnnxBackend now picks by the graph it runs. Weights do not matter (random init with
the same seed in both, and no data-dependent control flow; flushing denormals changed nothing).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

THREADS = int(os.environ.get("EVIM3_BENCH_EXPORT_THREADS", "2"))  # the 2-core machine; more for a workstation
RUN_PRESETS = tuple(os.environ.get("EVIM3_BENCH_EXPORT_PRESETS", "evim3-tiny,evim3").split(","))
FORM_PRESETS = ("evim3-tiny", "evim3", "evim3-p4")
FORMS = ("unrolled", "unrolled-dynamo", "scan")
ENGINES = ("eager", "ort", "ort-graph", "ort-int8", "gemm-floor")
WARMUP = 2
REPEATS = int(os.environ.get("EVIM3_BENCH_EXPORT_REPEATS", "5"))
PAUSE_S = 0.2
# Other processes' share of the machine's CPU time during the run (this process and its engine children
# excluded) above which the numbers are marked not final. The load average cannot judge this: the benchmark's
# own 2 threads hold it near 2.
LOADED = 0.05


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process and its finished
    children): their growth over a run, apart, is what other processes computed meanwhile."""
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return busy, own


def _model_and_meta(preset: str):
    import torch
    from evim3.runtime.meta import ModelMeta, PreprocessSpec

    from evim3.checkpoint import build_model
    from evim3.config import get_preset

    torch.manual_seed(0)
    cfg = get_preset(preset)
    meta = ModelMeta(preset, cfg.to_dict(), PreprocessSpec(size=cfg.img_size, frames=cfg.frames), ef_mean=55.0)
    return build_model(meta).eval(), meta


def _ort_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # one job per process here
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------- run(): engines side by side

def linear_shapes(model, clip) -> list[tuple[int, int, int]]:
    """(M, K, N) of every GEMM the model's forward does on `clip`: each linear call (nn.Linear, and
    F.linear on a module's weight, as Mamba's dt_proj; M = rows of its input) and the patch Conv3d as the
    GEMM of its patches."""
    import torch
    from torch import nn
    from torch.overrides import TorchFunctionMode

    shapes = []

    class Linears(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                x, weight = args[0], args[1]
                shapes.append((x.numel() // x.shape[-1], weight.shape[1], weight.shape[0]))
            return func(*args, **(kwargs or {}))

    def conv(module, args, output):
        patch = int(np.prod(module.kernel_size)) * module.in_channels
        shapes.append((output.numel() // module.out_channels, patch, module.out_channels))

    hooks = [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, nn.Conv3d)]
    with torch.no_grad(), Linears():
        model(clip)
    for hook in hooks:
        hook.remove()
    return shapes


def _torch_worker(conn, checkpoint: str, clip: np.ndarray) -> None:
    """Eager forward and the GEMM floor on THREADS threads; answers 'eager' / 'gemm-floor' with (seconds, output)."""
    import torch

    from evim3.checkpoint import load_model
    from evim3.ops.selective_scan import scan_name

    torch.set_num_threads(THREADS)
    model, _ = load_model(checkpoint)
    x = torch.from_numpy(clip)
    shapes = linear_shapes(model, x)
    gen = torch.Generator().manual_seed(0)
    gemms = [(torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    conn.send({"scan": scan_name("cpu"), "gemms": len(shapes), "gflop": flops / 1e9})
    with torch.no_grad():
        while (engine := conn.recv()) is not None:
            t0 = time.perf_counter()
            if engine == "eager":
                out = model(x).numpy()
            else:
                for a, w in gemms:
                    torch.nn.functional.linear(a, w)
                out = None
            conn.send((time.perf_counter() - t0, out))


def _ort_worker(conn, path: str, scan: str, clip: np.ndarray) -> None:
    """An OnnxBackend exactly as `evim3 infer --scan SCAN` opens one, on THREADS threads."""
    from evim3.runtime.backends import open_backend

    with open_backend(path, provider="cpu", threads=THREADS, scan=scan) as backend:
        conn.send({"device": backend.device})
        while conn.recv() is not None:
            t0 = time.perf_counter()
            out = backend.run(clip)
            conn.send((time.perf_counter() - t0, out))


def _start(target, args: tuple):
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    process = ctx.Process(target=target, args=(there, *args), daemon=True)
    process.start()
    return process, here


def _side_by_side(checkpoint: str, onnx_paths: dict[str, tuple[str, str]], clip: np.ndarray) -> tuple[dict, dict]:
    """{engine: [seconds per repeat]}, {engine: its output (None for the GEMM floor)}, and what each worker
    reported when it started."""
    torch_proc, torch_conn = _start(_torch_worker, (checkpoint, clip))
    workers = {"eager": torch_conn, "gemm-floor": torch_conn}
    procs = [torch_proc]
    info = {"torch": torch_conn.recv()}
    for engine, (path, scan) in onnx_paths.items():
        proc, conn = _start(_ort_worker, (path, scan, clip))
        workers[engine] = conn
        procs.append(proc)
        info[engine] = conn.recv()
    engines = [e for e in ENGINES if e in workers]
    times: dict[str, list[float]] = {e: [] for e in engines}
    outputs: dict[str, np.ndarray | None] = {}
    try:
        for round_ in range(WARMUP + REPEATS):
            shift = round_ % len(engines)
            for engine in engines[shift:] + engines[:shift]:
                time.sleep(PAUSE_S)
                workers[engine].send(engine)
                seconds, outputs[engine] = workers[engine].recv()
                if round_ >= WARMUP:
                    times[engine].append(seconds)
    finally:
        for conn in {id(c): c for c in workers.values()}.values():
            conn.send(None)
        for proc in procs:
            proc.join(timeout=60)
    return times, outputs, info


def run(presets: tuple[str, ...] = RUN_PRESETS) -> dict:
    """Every engine on the same clip, side by side (see the module docstring)."""
    import torch
    from evim3.export.calibration import Calibration
    from evim3.export.onnx import export_checkpoint
    from evim3.runtime.parity_check import random_clips

    from evim3.checkpoint import save_checkpoint

    started, (busy_before, own_before) = time.perf_counter(), _cpu_seconds()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            model, meta = _model_and_meta(preset)
            checkpoint = os.path.join(tmp, f"{preset}.safetensors")
            save_checkpoint(checkpoint, model.state_dict(), meta)
            exported = export_checkpoint(checkpoint, os.path.join(tmp, f"{preset}.onnx"))
            paths = {"ort": (exported.path, "auto"), "ort-graph": (exported.path, "graph")}
            try:  # ONNX Runtime's quantiser differs between versions: a failure is a row, not the end of the run
                calibration = Calibration(os.path.join(tmp, f"{preset}.calib.json"),
                                          clips=random_clips(meta.preprocess, 8, seed=1))
                int8 = export_checkpoint(checkpoint, os.path.join(tmp, f"{preset}.int8.onnx"), int8=calibration)
                paths["ort-int8"] = (int8.path, "auto")
            except Exception as e:  # noqa: BLE001
                rows.append({"preset": preset, "engine": "ort-int8",
                             "detail": f"--int8 export failed: {type(e).__name__}: {str(e)[:160]}"})
            clip = np.random.default_rng(0).standard_normal((1, 1, meta.preprocess.frames, meta.preprocess.size,
                                                             meta.preprocess.size), dtype=np.float32)
            times, outputs, info = _side_by_side(checkpoint, paths, clip)
            eager_ms = 1e3 * statistics.median(times["eager"])
            for engine, seconds in times.items():
                ms = [1e3 * s for s in seconds]
                row = {"preset": preset, "engine": engine, "median_ms": statistics.median(ms), "min_ms": min(ms),
                       "max_ms": max(ms), "vs_eager": statistics.median(ms) / eager_ms}
                if engine == "eager":
                    row["detail"] = f"scan {info['torch']['scan']}"
                elif engine == "gemm-floor":
                    gflop = info["torch"]["gflop"]
                    row["detail"] = (f"{info['torch']['gemms']} GEMMs, {gflop:.1f} GFLOP, "
                                     f"{gflop / (statistics.median(ms) / 1e3):.0f} GFLOP/s")
                else:
                    row["detail"] = info[engine]["device"]
                    row["max_abs_diff_ef"] = float(np.abs(outputs[engine] - outputs["eager"]).max())
                rows.append(row)
            rows.append({"preset": preset, "engine": "(graph)", "detail": f"{exported.stats.nodes} ONNX nodes, "
                         f"{exported.stats.nodes_per_scan:.0f} per scan, export {exported.seconds:.0f} s"})
    busy_after, own_after = _cpu_seconds()
    others = max(0.0, (busy_after - busy_before) - (own_after - own_before))
    others_share = others / ((time.perf_counter() - started) * (os.cpu_count() or 1))
    loaded = others_share > LOADED
    return {"rows": rows, "threads": THREADS, "batch": 1, "warmup": WARMUP, "repeats": REPEATS,
            "statistic": "median (min, max) over repeats, engines interleaved, one process each",
            "other_processes_cpu_share": round(others_share, 3),
            "status": ("UNDER LOAD (other processes computing): not final, rerun on a quiet machine" if loaded
                       else "quiet machine"),
            "targets": "ort <= 1.0x eager (evim3-tiny, evim3); evim3: ort <= 1.6x gemm-floor",
            "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}


# ---------------------------------------------------------------- export-form comparison (--forms)

def _export_job(preset: str, form: str, path: str, results: mp.Queue) -> None:
    """Child process: export `preset` in `form`; report time, peak RSS and graph sizes."""
    import onnx
    import torch
    from evim3.export.onnx import export_onnx

    model, meta = _model_and_meta(preset)
    t0 = time.perf_counter()
    clip = torch.zeros(1, 1, model.cfg.frames, model.cfg.img_size, model.cfg.img_size)
    with torch.no_grad():
        if form == "scan":
            export_onnx(model, meta, path)
        elif form == "unrolled":  # the legacy tracer runs the model: every intermediate stays alive
            torch.onnx.export(model, (clip,), path, dynamo=False, opset_version=17,
                              input_names=["clip"], output_names=["output"])
        else:  # "unrolled-dynamo": the same loops unrolled, traced with fake tensors (no activations kept)
            program = torch.export.export(model, (clip,), strict=False)
            torch.onnx.export(program, dynamo=True, opset_version=18, input_names=["clip"],
                              output_names=["output"], optimize=True).save(path)
    seconds = time.perf_counter() - t0
    units = 6 * model.cfg.depth
    results.put({"export_s": seconds, "export_peak_mib": _peak_rss_mib(), **_graph_sizes(onnx.load(path), units)})


def _graph_sizes(proto, units: int) -> dict:
    """Nodes in all (Scan bodies included), per residual Mamba unit (the same measure for both forms),
    and the scan-tagged nodes per selective scan (scan form only: the unrolled graph has no tags)."""
    from evim3.export.onnx import graph_stats

    stats = graph_stats(proto)
    return {"nodes": stats.nodes, "nodes_per_unit": stats.nodes / units,
            "nodes_per_scan": stats.nodes_per_scan or None}


def _ort_job(path: str, runs: int, results: mp.Queue) -> None:
    """Child process: ORT session on `path`; median latency of `runs` after one warm-up, peak RSS."""
    t0 = time.perf_counter()
    session = _ort_session(path)
    load_s = time.perf_counter() - t0
    clip = np.random.default_rng(0).standard_normal((1, *session.get_inputs()[0].shape[1:]), dtype=np.float32)
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        session.run(None, {"clip": clip})
        if i:
            times.append(time.perf_counter() - t0)
    results.put({"ort_load_s": load_s, "ort_ms": 1e3 * statistics.median(times), "ort_peak_mib": _peak_rss_mib()})


def _in_child(target, args: tuple, timeout: float) -> dict:
    """Run target(*args, queue) in a fresh process; its result, or {"error": why there is none}."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, results))
    process.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return results.get(timeout=5)
            except queue.Empty:
                if not process.is_alive():
                    return {"error": f"child exited with {process.exitcode}"}
                if time.monotonic() > deadline:
                    return {"error": f"no result within {timeout:.0f} s"}
    finally:
        if process.is_alive():
            process.kill()
        process.join()


def compare_forms(presets: tuple[str, ...] = FORM_PRESETS, forms: tuple[str, ...] = FORMS, runs: int = 3,
                  timeout: float = 3600.0) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            for form in forms:
                path = os.path.join(tmp, f"{preset}-{form}.onnx")
                row = {"preset": preset, "form": form, **_in_child(_export_job, (preset, form, path), timeout)}
                if "error" not in row:
                    row.update(_in_child(_ort_job, (path, runs), timeout))
                    os.remove(path)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return {"rows": rows, "threads": THREADS, "batch": 1, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", action="store_true", help="compare unrolled vs Scan export forms")
    parser.add_argument("--presets", nargs="*", help="presets to measure")
    parser.add_argument("--only", nargs="*", choices=FORMS, help="--forms: just these forms")
    parser.add_argument("--runs", type=int, default=3, help="--forms: ORT runs per form")
    args = parser.parse_args(argv)
    if args.forms:
        result = compare_forms(tuple(args.presets or FORM_PRESETS), tuple(args.only or FORMS), runs=args.runs)
    else:
        result = run(tuple(args.presets or RUN_PRESETS))
    json.dump(result, sys.stdout, indent=2, default=str)
    print()


if __name__ == "__main__":
    main()
