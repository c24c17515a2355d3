"""Parity of exported models against PyTorch, without PyTorch: compare backends' outputs on the same clips
with a reference (the "golden" file written where PyTorch runs), and judge them against tolerances stated
per precision.

    golden.npz  = clips (N, 1, T, S, S) float32, their names, PyTorch fp32 outputs (N, K) (seg: (N, 2, T, S, S)
                  logits), ModelMeta JSON

A CPU machine with torch writes it (`evim3 check CKPT --save-golden g.npz`); a GPU machine without torch
checks an engine against it (`evim3 check --load-golden g.npz --engine m.engine`). numpy and the runtime
backends only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from evim3.runtime import fused_scan
from evim3.runtime.atomic import atomic_path
from evim3.runtime.backends import Backend, open_backend
from evim3.runtime.echonet_layout import FILELIST_NAME, video_path
from evim3.runtime.engine_file import check_engine_compatible, current_gpu, read_engine_header
from evim3.runtime.errors import BackendUnavailableError, ModelFileError
from evim3.runtime.formats import format_of
from evim3.runtime.meta import ModelMeta, PreprocessSpec

# The tolerance tables are the tasks' (TaskSpec.tolerances); also importable from here, where parity is judged.
from evim3.runtime.tasks import SEG_TOLERANCES, TOLERANCES, Tolerance, task_spec  # noqa: F401
from evim3.runtime.video import is_video_file_name, open_video

REAL_CLIP_NAME = "pydicom ybr_color echo"
RANDOM_CLIP_PREFIX = "random "  # names of the seeded random clips: "random 0", "random 1", ...
DATASET_CLIPS = 4  # videos a --data folder adds to the golden clips


def tolerance(task: str, precision: str) -> Tolerance:
    return task_spec(task).tolerances[precision]


@dataclass(frozen=True)
class ParityRow:
    backend: str
    precision: str
    max_abs: float  # EF points (task ef) or logits
    max_rel: float  # max_abs / max |reference|
    mean_abs: float  # mean |difference| over every output (EF points or logits)
    cosine: float
    # mean |EF difference| in points (task ef); mean |probability difference| (classification); the share of
    # pixels whose LV mask differs (seg)
    ef_diff: float
    passed: bool
    dice: float | None = None  # seg: Dice between the LV masks of the candidate and of the reference


@dataclass(frozen=True)
class Golden:
    """The shared inputs and PyTorch's answers to them."""

    clips: np.ndarray  # (N, 1, T, S, S) float32, normalised
    names: list[str]  # one per clip: "random 0", ..., REAL_CLIP_NAME
    reference: np.ndarray  # (N, K) float32 PyTorch fp32 outputs
    meta: ModelMeta


def random_clips(spec: PreprocessSpec, count: int, seed: int = 0) -> np.ndarray:
    """(count, 1, frames, size, size) float32 at the scale of normalised echo input (mean 0, std 1)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 1, spec.frames, spec.size, spec.size), dtype=np.float32)


def video_clip(path: str | os.PathLike, spec: PreprocessSpec) -> np.ndarray:
    """(1, frames, size, size): the first clip of a video file as `evim3 infer` cuts it: the same stream of
    preprocessed frames (stream_to_uint8) and the same clip cutting (ClipCutter); a video shorter than a clip
    is looped."""
    from evim3.runtime.infer import ClipCutter
    from evim3.runtime.preprocess import normalise, stream_to_uint8

    with open_video(os.fspath(path)) as reader:
        cutter = ClipCutter(spec, spec.default_stride)
        for frame in stream_to_uint8(reader.frames(), reader.fps, spec, reader.meta["region"]):
            done = cutter.add(frame)
            if done:
                return normalise(done[0][1], spec)[None]
    if cutter.count == 0:
        raise ModelFileError(os.fspath(path), "no frames to cut a clip from")
    return normalise(cutter.clip_at(0)[1], spec)[None]


def real_clip(spec: PreprocessSpec) -> np.ndarray:
    """The first clip of pydicom's example echo cine (ybr_color): real echo content wherever pydicom is."""
    import pydicom.examples

    return video_clip(pydicom.examples.get_path("ybr_color"), spec)


def dataset_videos(folder: str | os.PathLike, count: int = DATASET_CLIPS, split: str = "TEST") -> list[str]:
    """The first `count` videos of `split` of an EchoNet-layout folder (FileList.csv order), or else the first
    video files of the folder in name order."""
    import csv

    folder = os.fspath(folder)
    filelist = os.path.join(folder, FILELIST_NAME)
    if os.path.isfile(filelist):
        with open(filelist, newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("Split", "").upper() == split]
        paths = [video_path(folder, row["FileName"]) for row in rows]
    elif os.path.isdir(folder):
        paths = [path for path in (os.path.join(folder, n) for n in sorted(os.listdir(folder)))
                 if os.path.isfile(path) and is_video_file_name(path)]
    else:
        raise ModelFileError(folder, "not a folder (expected an EchoNet-layout dataset or a folder of videos)")
    paths = [p for p in paths if os.path.isfile(p)][:count]
    if not paths:
        raise ModelFileError(folder, f"no videos found ({split} split of FileList.csv, or video files in the folder)")
    return paths


def parity_inputs(spec: PreprocessSpec, count: int, seed: int = 0,
                  videos: list[str] = ()) -> tuple[np.ndarray, list[str]]:
    """`count` seeded random clips, the real echo clip and the first clip of each of `videos`, and their names."""
    clips = [random_clips(spec, count, seed), real_clip(spec)[None]]
    clips += [video_clip(path, spec)[None] for path in videos]
    names = [f"{RANDOM_CLIP_PREFIX}{i}" for i in range(count)] + [REAL_CLIP_NAME]
    names += [os.path.basename(p) for p in videos]
    return np.concatenate(clips), names


def echo_clips(names: list[str]) -> np.ndarray:
    """Which golden clips are echo (the DICOM cine, the dataset's videos), not seeded white noise: the clips a
    mean error is judged on (compare). An INT8 file's activation scales are calibrated on echo; on white noise
    its layers clip, and the demo's model then erred 0.57-0.72 EF on each random clip against 0.07-0.24 on the
    echo clips (BENCHMARKS.md "issue 26, session 5"). Every clip still counts for every other measure."""
    echo = np.array([not name.startswith(RANDOM_CLIP_PREFIX) for name in names])
    return echo if echo.any() else np.ones(len(names), bool)


def reference_spread(golden: Golden) -> float:
    """How much the reference outputs differ between the golden clips, as the task measures it
    (TaskSpec.reference_spread)."""
    return task_spec(golden.meta.task).reference_spread(golden.reference)


def flat_reason(golden: Golden) -> str | None:
    """Why the reference proves nothing about an exported graph (parity inconclusive), or None: outputs that
    barely depend on the input (the task's flat_spread), or what else the task calls flat (seg: masks all
    background or all LV)."""
    spec = task_spec(golden.meta.task)
    reason = spec.flat_reason(golden.reference)
    spread = reference_spread(golden)
    if reason is None and spread < spec.flat_spread:
        reason = (f"the reference answers nearly the same for every clip (SD {spread:.3g} {spec.spread_unit} < "
                  f"{spec.flat_spread:g})")
    return reason


def compare(reference: np.ndarray, candidate: np.ndarray, task: str, backend: str,
            precision: str, judged_mean: np.ndarray | None = None) -> ParityRow:
    """One row of the parity table: how far `candidate` is from `reference` (both (N, K), N clips). The means
    (mean abs and the task's mean difference) are over the clips `judged_mean` selects (echo_clips; None: all),
    the max, cosine and Dice over every clip."""
    ref = reference.astype(np.float64)
    out = candidate.astype(np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"{backend}: output shape {out.shape} differs from the reference {ref.shape}")
    mean_clips = np.ones(len(ref), bool) if judged_mean is None else judged_mean
    diff = np.abs(out - ref)
    max_abs, mean_abs = float(diff.max()), float(diff[mean_clips].mean())
    max_rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    norms = float(np.linalg.norm(ref) * np.linalg.norm(out))
    cosine = float(np.sum(ref * out) / norms) if norms > 0 else float(max_abs == 0)
    spec = task_spec(task)
    ef_diff, dice = spec.parity_diff(out[mean_clips], ref[mean_clips]).value, spec.parity_diff(out, ref).dice
    tol = tolerance(task, precision)
    passed = (bool(np.isfinite(out).all()) and max_abs <= tol.max_abs and cosine >= tol.min_cosine
              and (tol.max_mean is None or mean_abs <= tol.max_mean) and (dice is None or dice >= tol.min_dice))
    return ParityRow(backend, precision, max_abs, max_rel, mean_abs, cosine, ef_diff, passed, dice)


def save_golden(path: str | os.PathLike, golden: Golden) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, clips=golden.clips, names=np.array(golden.names), reference=golden.reference,
                            meta=np.array(golden.meta.to_json()))


def load_golden(path: str | os.PathLike) -> Golden:
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            clips, names, reference = data["clips"], data["names"].tolist(), data["reference"]
            meta = ModelMeta.from_json(str(data["meta"]))
    except FileNotFoundError:
        raise ModelFileError(path, "golden file not found") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(path, f"not an evim3 golden file ({e})") from None
    if clips.ndim != 5 or len(clips) != len(reference) or len(names) != len(clips):
        raise ModelFileError(path, "golden file is inconsistent: clips, names and reference differ in length")
    return Golden(clips.astype(np.float32), names, reference.astype(np.float32), meta)


def check_meta_matches(path: str, meta: ModelMeta, reference: ModelMeta) -> None:
    """The model file must be the model the reference came from (same preset, config and task)."""
    for field in ("preset", "model", "task", "class_names"):
        if getattr(meta, field) != getattr(reference, field):
            raise ModelFileError(path, f"model file is {field} {getattr(meta, field)!r} but the reference "
                                       f"(checkpoint or golden file) is {getattr(reference, field)!r}")


def open_for_parity(path: str, provider: str | None = None, scan: str = "auto") -> tuple[Backend, str]:
    """(backend, precision) for an ONNX file (on `provider`, scans run as `scan` says) or an engine (after
    checking it was built for this TensorRT and GPU)."""
    if format_of(path).name == "engine":  # its precision is in its header, and it must suit this GPU
        header = read_engine_header(path)
        _check_engine_here(path, header)
        return open_backend(path), header.precision
    backend = open_backend(path, provider=provider, scan=scan)
    return backend, backend.meta.precision


def _check_engine_here(path: str, header) -> None:
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(None, "TensorRT is not installed (pip install 'evim3[gpu]' / JetPack): "
                                            "cannot check an engine here") from None
    gpu = current_gpu()
    if gpu is None:
        raise BackendUnavailableError(None, "no CUDA GPU visible through cuda-python (pip install cuda-python)")
    check_engine_compatible(path, header, trt.__version__, *gpu)


def onnx_targets() -> list[tuple[str, str]]:
    """(provider, scan form) pairs parity runs an ONNX file on: CPU with the standard graph always, CPU with
    the fused scan op when it can run here, CUDA when this onnxruntime has it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError(None, "onnxruntime is not installed: pip install onnxruntime") from None
    targets = [("cpu", "graph")]
    if fused_scan.unavailable_reason() is None:
        targets.append(("cpu", "fused"))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        targets.append(("cuda", "graph"))
    return targets


def check_files(golden: Golden, onnx: str | None = None, engine: str | None = None) -> list[ParityRow]:
    """Run the golden clips through every backend the given files allow; one row each."""
    targets = [(onnx, provider, scan) for provider, scan in onnx_targets()] if onnx else []
    if engine:
        targets.append((engine, None, "auto"))
    rows = []
    for path, provider, scan in targets:
        backend, precision = open_for_parity(path, provider, scan)
        with backend:
            check_meta_matches(path, backend.meta, golden.meta)
            outputs = backend.run(golden.clips)
            rows.append(compare(golden.reference, outputs, golden.meta.task, backend.device, precision,
                                echo_clips(golden.names)))
    return rows


def format_table(rows: list[ParityRow], task: str) -> str:
    """The parity table as aligned text, with the tolerances it was judged against."""
    spec = task_spec(task)
    unit = spec.parity_unit
    masks = spec.per_frame  # a task with masks reports their Dice
    header = ["backend", "precision", f"max abs ({unit})", "max rel", "cosine", *(["mask Dice"] if masks else []),
              spec.diff_name, "result"]
    body = [[r.backend, r.precision, f"{r.max_abs:.3g}", f"{r.max_rel:.3g}", f"{r.cosine:.8f}",
             *([f"{r.dice:.6f}"] if masks else []), f"{r.ef_diff:.3g}", "pass" if r.passed else "FAIL"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    bounds = spec.tolerances
    lines.append("tolerances: " + "; ".join(
        f"{p}: max abs <= {t.max_abs:g} {unit}" + (f", mean abs <= {t.max_mean:g}" if t.max_mean is not None else "")
        + f", cosine >= {t.min_cosine:g}" + (f", mask Dice >= {t.min_dice:g}" if masks else "")
        for p, t in bounds.items()))
    return "\n".join(lines)

