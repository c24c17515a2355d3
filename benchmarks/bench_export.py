"""ONNX export: ONNX Runtime CPU against PyTorch eager, and the graph form the exporter uses.

    python -m benchmarks export                       # run(): ORT vs eager, evim3-tiny and evim3
    python -m benchmarks.bench_export --forms         # the export-form comparison (slow: tens of minutes)

run(): batch 1, 2 threads for both, random-init models of each preset, timed in the same process with
the two runtimes interleaved run by run (so both see the same machine load); medians reported.
Target: ORT <= 0.6x eager for evim3-tiny.

--forms: how the selective scan reaches the graph, at evim3-tiny, evim3 and evim3-p4 --
  unrolled:         the chunked scan's Python loops unrolled by the TorchScript exporter (dynamo=False)
  unrolled-dynamo:  the same loops unrolled by torch.export + the dynamo exporter
  scan:             evim3's export (ONNX Scan loops through torch.ops.higher_order.scan, dynamo exporter)
-- node count, nodes per scan, export time and peak memory, ORT latency and peak memory; each export and
each ORT run in its own process, so peak RSS is that job's.
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

THREADS = 2
RUN_PRESETS = ("evim3-tiny", "evim3")
FORM_PRESETS = ("evim3-tiny", "evim3", "evim3-p4")
FORMS = ("unrolled", "unrolled-dynamo", "scan")


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
    # ORT's workers spin after each run; interleaved with eager in one process they would steal torch's
    # cores (measured: eager 10-40x slower). Off, as for torch's own threads between calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(presets: tuple[str, ...] = RUN_PRESETS, runs: int = 5) -> dict:
    """ORT CPU vs PyTorch eager latency, batch 1, same process, interleaved."""
    import torch
    from evim3.export.onnx import export_onnx

    torch.set_num_threads(THREADS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            model, meta = _model_and_meta(preset)
            path = os.path.join(tmp, f"{preset}.onnx")
            exported = export_onnx(model, meta, path)
            session = _ort_session(path)
            clip = np.random.default_rng(0).standard_normal((1, *session.get_inputs()[0].shape[1:]),
                                                             dtype=np.float32)
            x = torch.from_numpy(clip)
            eager_s, ort_s = [], []
            with torch.no_grad():
                for timing in range(runs + 1):  # the first round warms both up and is not counted
                    t0 = time.perf_counter()
                    reference = model(x).numpy()
                    t1 = time.perf_counter()
                    output = session.run(None, {"clip": clip})[0]
                    t2 = time.perf_counter()
                    if timing:
                        eager_s.append(t1 - t0)
                        ort_s.append(t2 - t1)
            eager_ms, ort_ms = 1e3 * statistics.median(eager_s), 1e3 * statistics.median(ort_s)
            rows.append({
                "preset": preset, "tokens": model.cfg.num_tokens, "eager_ms": eager_ms, "ort_ms": ort_ms,
                "ort/eager": ort_ms / eager_ms, "max_abs_diff": float(np.abs(output - reference).max()),
                "onnx_nodes": exported.stats.nodes, "nodes_per_scan": exported.stats.nodes_per_scan,
                "export_s": exported.seconds,
            })
    return {"rows": rows, "threads": THREADS, "batch": 1, "runs": runs, "statistic": "median",
            "target": "ORT <= 0.6x eager for evim3-tiny", "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__}


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
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    if args.forms:
        result = compare_forms(tuple(args.presets or FORM_PRESETS), tuple(args.only or FORMS), runs=args.runs)
    else:
        result = run(tuple(args.presets or RUN_PRESETS), runs=args.runs)
    json.dump(result, sys.stdout, indent=2, default=str)
    print()


if __name__ == "__main__":
    main()
