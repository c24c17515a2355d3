"""INT8 on trained models: error against PyTorch fp32 and latency on 2 CPU threads, every form side by side.

    EVIM3_BENCH_INT8_MODELS=demo=evim3-demo/runs/finetune EVIM3_BENCH_INT8_DATA=evim3-demo/data \\
        python -m benchmarks int8
    EVIM3_BENCH_INT8_VIDEOS=40 EVIM3_BENCH_INT8_REPEATS=20 ...      # TEST videos judged; timed rounds

For each model (name=checkpoint or run folder, comma-separated), in one run on the same clips:
  fp32          `evim3 export` (the float graph), the reference form of the edge;
  dynamic-int8  what `evim3 export --int8` wrote before the Q/DQ form, rebuilt here for comparison only: ONNX
                Runtime's dynamic quantisation of every linear layer but out_proj (the head's output layer
                included), per-call uint8 activations, full-range int8 weights, one scale per tensor; its error
                on this CPU and on a CPU without VNNI differ (export/quantize.py);
  qdq-<method>  `evim3 export --int8` with each calibration method (calibrated on EVIM3_BENCH_INT8_CALIB TRAIN
                videos of the data, the default 64).
Error: the first clip of each of the first EVIM3_BENCH_INT8_VIDEOS TEST videos (preprocessed as `evim3 infer`
does) through PyTorch fp32 and through each file (ONNX Runtime, fused scan op where it runs): max and mean
|dEF|, the 95th percentile, the reference's SD over the clips (a flat reference would prove nothing), and
whether the int8 budget (evim3 check: max <= 1.0, mean <= 0.3) holds; the same on a CPU without VNNI, emulated
(export/avx2_emulation.py: the AVX2 kernel's saturating int16 pair sums, over the first EVIM3_BENCH_INT8_AVX2
clips; its own budget verdict and how many pairs saturated). Latency: every form opened as
`evim3 infer` opens it with 2 threads, batch 1, WARMUP untimed calls, then REPEATS rounds with the forms in
an order rotated round by round; the median, and the ratio to fp32 in the same run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np

THREADS = 2
WARMUP = 3
REPEATS = int(os.environ.get("EVIM3_BENCH_INT8_REPEATS", "20"))
VIDEOS = int(os.environ.get("EVIM3_BENCH_INT8_VIDEOS", "40"))
AVX2_CLIPS = int(os.environ.get("EVIM3_BENCH_INT8_AVX2", "20"))


def _models() -> dict[str, str]:
    spec = os.environ.get("EVIM3_BENCH_INT8_MODELS", "demo=evim3-demo/runs/finetune")
    return dict(item.split("=", 1) for item in spec.split(",") if item)


def _dynamic_int8(fp32_path: str, out: str) -> None:
    """The previous `--int8`: ONNX Runtime's dynamic quantisation of the same layers, kept here to compare."""
    import logging

    import onnx
    from evim3.export.quantize import out_projections, prepared_for_quantiser
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(fp32_path)
    source = out + ".src.onnx"
    onnx.save_model(prepared_for_quantiser(proto), source)
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(source, out, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                         nodes_to_exclude=out_projections(proto))
    finally:
        logging.disable(logging.NOTSET)
    quantized = onnx.load(out)
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(proto.metadata_props)
    onnx.save_model(quantized, out)


def run() -> dict:
    import onnx
    import torch
    from evim3.export.avx2_emulation import avx2_evaluator, saturated_pairs
    from evim3.export.calibration import CALIBRATION_METHODS, CALIBRATION_VIDEOS, Calibration
    from evim3.export.onnx import export_checkpoint
    from evim3.runtime.backends import open_backend
    from evim3.runtime.parity_check import TOLERANCES, dataset_videos, video_clip

    from evim3.checkpoint import checkpoint_file, load_model

    data = os.environ.get("EVIM3_BENCH_INT8_DATA", "evim3-demo/data")
    calib_videos = int(os.environ.get("EVIM3_BENCH_INT8_CALIB", str(CALIBRATION_VIDEOS)))
    budget = TOLERANCES["int8"]
    torch.set_num_threads(THREADS)
    rows = []
    for name, path in _models().items():
        checkpoint = checkpoint_file(path)
        model, meta = load_model(checkpoint)
        videos = dataset_videos(data, VIDEOS, split="TEST")
        clips = np.stack([video_clip(v, meta.preprocess) for v in videos]).astype(np.float32)
        with torch.no_grad():
            reference = np.concatenate([model(torch.from_numpy(c[None])).numpy() for c in clips])
        with tempfile.TemporaryDirectory() as tmp:
            files = {"fp32": export_checkpoint(checkpoint, os.path.join(tmp, "fp32.onnx")).path}
            _dynamic_int8(files["fp32"], os.path.join(tmp, "dynamic.onnx"))
            files["dynamic-int8"] = os.path.join(tmp, "dynamic.onnx")
            for method in CALIBRATION_METHODS:
                calibration = Calibration(os.path.join(tmp, f"{method}.calib.json"), data, calib_videos, method)
                t0 = time.perf_counter()
                files[f"qdq-{method}"] = export_checkpoint(checkpoint, os.path.join(tmp, f"{method}.onnx"),
                                                           int8=calibration).path
                print(f"   {name}: qdq-{method} exported in {time.perf_counter() - t0:.0f} s", flush=True)
            backends = {form: open_backend(file, threads=THREADS) for form, file in files.items()}
            outputs = {form: np.concatenate([b.run(c[None]) for c in clips]) for form, b in backends.items()}
            times: dict[str, list[float]] = {form: [] for form in backends}
            forms = list(backends)
            for _ in range(WARMUP):
                for b in backends.values():
                    b.run(clips[:1])
            for r in range(REPEATS):
                for form in forms[r % len(forms):] + forms[:r % len(forms)]:
                    t0 = time.perf_counter()
                    backends[form].run(clips[r % len(clips)][None])
                    times[form].append(time.perf_counter() - t0)
            for b in backends.values():
                b.close()
            avx2 = {}
            for form, file in files.items():
                if form == "fp32":
                    continue
                evaluator = avx2_evaluator(onnx.load(file))
                out = np.concatenate([evaluator.run(None, {"clip": c[None]})[0] for c in clips[:AVX2_CLIPS]])
                avx2[form] = (np.abs(out - reference[:AVX2_CLIPS]).ravel(), saturated_pairs())
        fp32_ms = 1e3 * statistics.median(times["fp32"])
        for form, out in outputs.items():
            err = np.abs(out - reference).ravel()
            ms = 1e3 * statistics.median(times[form])
            rows.append({"model": name, "form": form, "clips": len(clips), "ref_sd_ef": float(reference.std()),
                         "max_abs_def": float(err.max()), "mean_abs_def": float(err.mean()),
                         "p95_abs_def": float(np.percentile(err, 95)),
                         "int8_budget": "-" if form == "fp32" else
                         ("pass" if err.max() <= budget.max_abs and err.mean() <= budget.max_mean else "FAIL"),
                         "median_ms": ms, "vs_fp32": ms / fp32_ms})
            if form in avx2:
                err, saturated = avx2[form]
                rows[-1].update({"avx2_max_abs_def": float(err.max()), "avx2_mean_abs_def": float(err.mean()),
                                 "avx2_budget": "pass" if err.max() <= budget.max_abs and
                                 err.mean() <= budget.max_mean else "FAIL", "avx2_saturated_pairs": saturated})
    with open("/proc/cpuinfo") as f:
        cpu_flags = f.read()
    return {"rows": rows, "threads": THREADS, "repeats": REPEATS, "data": data,
            "vnni": "avx512_vnni" in cpu_flags or "avx_vnni" in cpu_flags}
