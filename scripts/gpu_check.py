"""The GPU check: every CUDA path of evim3 in one run, a table on stdout and JSON in $OUT.

Run through scripts/gpu_check.sh on a machine with one NVIDIA GPU (no internet needed). Each check is
independent: a missing optional piece (mamba-ssm, onnxruntime-gpu, TensorRT) is reported as "skipped"
with the reason, a failure as "FAIL" with the error, and the script goes on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch

from evim3.config import PRESETS
from evim3.models import EViM3
from evim3.ops import fused_available, selective_scan_chunked, selective_scan_ref

RESULTS: list[dict] = []
TRAIN_DEVICE = "cuda"  # the real-loop check; a CPU dry run of this script sets "cpu"


def check(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        def run() -> None:
            t0 = time.perf_counter()
            try:
                row = fn() or {}
                row.setdefault("status", "ok")
            except SkipCheck as e:
                row = {"status": "skipped", "why": str(e)}
            except Exception as e:  # noqa: BLE001 -- one failing check must not hide the others
                row = {"status": "FAIL", "why": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            row["check"], row["seconds"] = name, round(time.perf_counter() - t0, 2)
            RESULTS.append(row)
            print(f"[{row['status']:>7}] {name}: {json.dumps({k: v for k, v in row.items() if k not in ('check', 'status')})}",
                  flush=True)
        return run
    return wrap


class SkipCheck(Exception):
    pass


def _timed(fn: Callable, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@check("chunked scan on CUDA vs float64 reference")
def scan_parity() -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, n, L = 2, 64, 16, 4099
    kw = {"device": "cuda", "generator": g}
    u, z = torch.randn(b, d, L, **kw), torch.randn(b, d, L, **kw)
    delta = torch.randn(b, d, L, **kw).exp() * 0.3  # heavy-tailed dt
    A = -torch.rand(d, n, **kw) * 8 - 0.1
    B, C = torch.randn(b, n, L, **kw), torch.randn(b, n, L, **kw)
    D, bias = torch.randn(d, **kw), torch.randn(d, **kw)
    ref = selective_scan_ref(u.double(), delta.double(), A.double(), B.double(), C.double(), D.double(),
                             z.double(), bias.double(), True)
    out = selective_scan_chunked(u, delta, A, B, C, D, z, bias, True)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    row = {"rel_l2_fp32_vs_fp64": rel, "finite": bool(torch.isfinite(out).all())}
    if rel > 1e-5 or not row["finite"]:
        row["status"] = "FAIL"
    if fused_available():
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        fused = selective_scan_fn(u, delta, A, B, C, D, z, bias, True)
        row["fused_rel_l2_vs_fp64"] = ((fused.double() - ref).norm() / ref.norm()).item()
    return row


def _train_step(preset: str, batch: int) -> dict:
    cfg = PRESETS[preset]
    model = EViM3(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clip = torch.randn(batch, 1, cfg.frames, cfg.img_size, cfg.img_size, device="cuda")
    target = torch.full((batch, 1), 55.0, device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(clip).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    seconds = _timed(step, repeats=3)
    peak = torch.cuda.max_memory_allocated() / 2**30
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        infer = _timed(lambda: model(clip), repeats=5)
    return {"batch": batch, "train_step_s": round(seconds, 4), "train_clips_per_s": round(batch / seconds, 2),
            "infer_clips_per_s": round(batch / infer, 2), "peak_gib": round(peak, 2),
            "scan": "mamba-ssm fused" if fused_available() else "chunked"}


@check("evim3 bf16 forward+backward")
def train_evim3() -> dict:
    return _train_step("evim3", batch=4)


@check("evim3-p4 bf16 forward+backward")
def train_p4() -> dict:
    return _train_step("evim3-p4", batch=2)


@check("evim3-p4 MAE pre-training step (bf16, STC 0.8, token-skipping encoder)")
def pretrain_p4() -> dict:
    from evim3.models.pretrain import EViM3MAE

    cfg = PRESETS["evim3-p4"]
    model = EViM3MAE(cfg, mask_ratio=0.8).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = 4
    clip = torch.randn(batch, 1, cfg.frames, cfg.img_size, cfg.img_size, device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(clip)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    seconds = _timed(step, repeats=3)
    return {"batch": batch, "step_s": round(seconds, 4), "clips_per_s": round(batch / seconds, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


@check("evim3 train on CUDA: the real loop (synthetic data, fine-tune, resume, pre-train)")
def train_loop_cuda() -> dict:
    try:
        from evim3.data.synth import generate_dataset
    except ImportError as e:
        raise SkipCheck(f"video I/O not installed ({e})") from None
    from evim3.train.loop import train
    from evim3.train.recipe import TrainConfig

    tmp = tempfile.mkdtemp()
    generate_dataset(os.path.join(tmp, "data"), 24, seed=0, workers=4)
    base = TrainConfig(stage="finetune", data=os.path.join(tmp, "data"), out=os.path.join(tmp, "ft"),
                       preset="evim3-tiny", frames=16, period=4, batch=4, accum=1, epochs=2, lr=4e-3, pad=4,
                       device=TRAIN_DEVICE, workers=2, stats_videos=8, log_every=1)
    first = train(base, stop_after=3)  # as if stopped after step 3, then resumed to the end
    resumed = train(base.replace(resume=True))
    pre = train(base.replace(stage="pretrain", out=os.path.join(tmp, "pre"), epochs=1))
    row = {"stopped_at_step": first["step"], "resumed_to_step": resumed["step"], "val_mae": resumed["final"].get("val_mae"),
           "pretrain_loss": pre["final"].get("val_loss"), "resumed_wall_s": round(resumed["wall_s"], 1)}
    finite = [v for v in (row["val_mae"], row["pretrain_loss"]) if v is not None]
    if first["step"] != 3 or resumed["step"] != 2 * resumed["steps_per_epoch"] or not all(map(math.isfinite, finite)):
        row["status"] = "FAIL"
    return row


@check("mamba-ssm Mamba state_dict loads into evim3 Mamba (strict) with equal output")
def mamba_ssm_compat() -> dict:
    try:
        from mamba_ssm.modules.mamba_simple import Mamba as OfficialMamba
    except Exception as e:  # noqa: BLE001
        raise SkipCheck(f"mamba-ssm not installed ({type(e).__name__})") from None
    from evim3.modules import Mamba

    official = OfficialMamba(d_model=192).cuda()
    ours = Mamba(d_model=192).cuda()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 777, 192, device="cuda")
    with torch.no_grad():
        ref, out = official(x), ours(x)
        ours.use_fast_path = False
        slow = ours(x)
    return {"max_abs_fused": (ref - out).abs().max().item(), "max_abs_chunked": (ref - slow).abs().max().item()}


@check("ONNX Runtime CUDA vs PyTorch (evim3-tiny)")
def ort_cuda() -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        raise SkipCheck("onnxruntime not installed") from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SkipCheck(f"no CUDAExecutionProvider (providers: {ort.get_available_providers()})")
    path, model, cfg = _export_tiny()
    sess = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    clip = torch.randn(1, 1, cfg.frames, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        ref = model(clip).numpy()
    out = sess.run(None, {"clip": clip.numpy()})[0]
    t0 = time.perf_counter()
    for _ in range(20):
        sess.run(None, {"clip": clip.numpy()})
    return {"providers": sess.get_providers(), "max_abs_ef": float(abs(out - ref).max()),
            "latency_ms": round((time.perf_counter() - t0) / 20 * 1000, 2)}


@check("TensorRT engine vs PyTorch (evim3-tiny)")
def tensorrt_engine() -> dict:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise SkipCheck("TensorRT not installed") from None
    from evim3.export.tensorrt import build_engine
    from evim3.runtime.backends import open_backend

    path, model, cfg = _export_tiny()
    engine_path = path.replace(".onnx", ".engine")
    build_engine(path, engine_path)
    backend = open_backend(engine_path)
    clip = torch.randn(1, 1, cfg.frames, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        ref = model(clip).numpy()
    out = backend.run(clip.numpy())
    return {"max_abs_ef": float(abs(out - ref).max())}


_EXPORTED: dict = {}


def _export_tiny():
    if not _EXPORTED:
        from evim3.export.onnx import export_onnx
        from evim3.runtime.meta import ModelMeta, PreprocessSpec

        cfg = PRESETS["evim3-tiny"]
        model = EViM3(cfg).eval()
        meta = ModelMeta(preset="evim3-tiny", model=cfg.to_dict(), ef_mean=55.0,
                         preprocess=PreprocessSpec(frames=cfg.frames, mean=30.0, std=45.0))
        path = os.path.join(tempfile.mkdtemp(), "tiny.onnx")
        export_onnx(model, meta, path)
        _EXPORTED.update(path=path, model=model, cfg=cfg)
    return _EXPORTED["path"], _EXPORTED["model"], _EXPORTED["cfg"]


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to check.")
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
          f"mamba-ssm fused: {fused_available()}", flush=True)
    for fn in (scan_parity, train_evim3, train_p4, pretrain_p4, train_loop_cuda, mamba_ssm_compat, ort_cuda, tensorrt_engine):
        fn()
    print("\n| check | status | seconds | details |\n|---|---|---|---|")
    for r in RESULTS:
        details = {k: v for k, v in r.items() if k not in ("check", "status", "seconds")}
        print(f"| {r['check']} | {r['status']} | {r['seconds']} | {json.dumps(details)} |")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": RESULTS}, f, indent=2)
    return 1 if any(r["status"] == "FAIL" for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
