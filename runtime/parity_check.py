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
from evim3.runtime.engine_file import check_engine_compatible, current_gpu, read_engine_header
from evim3.runtime.errors import BackendUnavailableError, ModelFileError
from evim3.runtime.meta import ModelMeta, PreprocessSpec
from evim3.runtime.outputs import class_probabilities, lv_masks

REAL_CLIP_NAME = "pydicom ybr_color echo"
# A reference whose outputs spread (SD over the golden clips) less than this answers about the same for every
# input: parity with it proves nothing about the exported graph. EF points; logits for classification; for
# seg, the LV-minus-background logit of each pixel, its SD over the clips averaged over the pixels
# (reference_spread). A seg reference whose masks are all background or all LV is flat too (flat_reason).
FLAT_SPREAD = {"ef": 1.0, "classification": 0.5, "seg": 0.5}
DATASET_CLIPS = 4  # videos a --data folder adds to the golden clips
VIDEO_SUFFIXES = (".avi", ".mp4", ".mov", ".mkv", ".dcm")


@dataclass(frozen=True)
class Tolerance:
    """Pass when the largest output difference (EF points, or logits), the mean one (when bounded), the cosine
    similarity of all outputs and, for seg, the Dice between the two backends' LV masks are within these bounds."""

    max_abs: float
    min_cosine: float
    max_mean: float | None = None
    min_dice: float = 0.0


# One entry per runtime.meta.PRECISIONS, the only place these bounds are stated.
TOLERANCES = {
    # float32 everywhere: only summation order (and the scan kernels' exp) differs. Measured on the tests'
    # deliberately sensitive model (head gain x300, EF 23-33 over 5 clips): PyTorch with the fused vs the
    # chunked scan 2.7e-5 apart, ONNX Runtime's graph and fused-op forms 0.9-1.2e-4 from either (relative
    # 3e-6, float32 rounding through the depth). 1e-3 keeps a margin and still fails any wrong op (>= 0.01).
    "fp32": Tolerance(max_abs=1e-3, min_cosine=0.99999),
    # float16 weights and compute (scan in float32): a few hundredths of an EF point in practice; the
    # bound is the one that matters clinically (EF is reported to the nearest point).
    "fp16": Tolerance(max_abs=0.5, min_cosine=0.999),
    # 8-bit linear layers (scan, norms and head activations in float32): within a point everywhere and a
    # third of a point on average, below the ~2-point EF differences that matter between readers.
    "int8": Tolerance(max_abs=1.0, min_cosine=0.999, max_mean=0.3),
}
# Task seg: logits of every pixel of every frame, some thousand times more outputs than EF, so the largest
# difference is over more values; and what a reader sees is the mask. fp32: summation order only, logits
# within 1e-3 and masks that differ only at pixels whose two logits tie within that (Dice 0.999, the issue's
# bar). fp16: the masks may move at border pixels; a Dice of 0.98 keeps an LV of ~800 px within ~16 px of
# the fp32 one. Measured on a shrunk random evim3-tiny (tests/test_seg_export.py, 5 clips): fp32 1.9e-6
# logits, Dice 1.0; fp16 5.1e-3 logits, Dice 0.99993.
SEG_TOLERANCES = {
    "fp32": Tolerance(max_abs=1e-3, min_cosine=0.99999, min_dice=0.999),
    "fp16": Tolerance(max_abs=0.5, min_cosine=0.999, min_dice=0.98),
    # 8-bit linear layers: the error grows with the logit, so confident pixels far from the border move most and
    # flip nothing; what a reader sees is bounded by Dice 0.95 (an LV of ~800 px within ~40 px of the fp32 one,
    # about one pixel of its outline) and the mean. Measured on the trained evim3-tiny seg model of BENCHMARKS.md
    # (seg, 9 clips incl. the DICOM and 4 TEST videos): max 2.53 logits (0.28 of the largest), Dice 0.977.
    "int8": Tolerance(max_abs=4.0, min_cosine=0.999, max_mean=0.3, min_dice=0.95),
}


def tolerance(task: str, precision: str) -> Tolerance:
    return (SEG_TOLERANCES if task == "seg" else TOLERANCES)[precision]


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
    """(1, frames, size, size): the first clip of a video file, read and preprocessed exactly as `evim3 infer`
    does."""
    from evim3.runtime.preprocess import sample_clip_indices, video_to_input
    from evim3.runtime.video import read_video

    frames = video_to_input(read_video(os.fspath(path)), spec)
    return frames[sample_clip_indices(len(frames), spec, 0)][None].astype(np.float32)


def real_clip(spec: PreprocessSpec) -> np.ndarray:
    """The first clip of pydicom's example echo cine (ybr_color): real echo content wherever pydicom is."""
    import pydicom.examples

    return video_clip(pydicom.examples.get_path("ybr_color"), spec)


def dataset_videos(folder: str | os.PathLike, count: int = DATASET_CLIPS, split: str = "TEST") -> list[str]:
    """The first `count` videos of `split` of an EchoNet-layout folder (FileList.csv order), or else the first
    video files of the folder in name order."""
    import csv

    folder = os.fspath(folder)
    filelist = os.path.join(folder, "FileList.csv")
    if os.path.isfile(filelist):
        with open(filelist, newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("Split", "").upper() == split]
        names = [row["FileName"] if os.path.splitext(row["FileName"])[1] else row["FileName"] + ".avi" for row in rows]
        paths = [os.path.join(folder, "Videos", name) for name in names]
    elif os.path.isdir(folder):
        paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.lower().endswith(VIDEO_SUFFIXES)]
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
    names = [f"random {i}" for i in range(count)] + [REAL_CLIP_NAME] + [os.path.basename(p) for p in videos]
    return np.concatenate(clips), names


def reference_spread(golden: Golden) -> float:
    """How much the reference outputs differ between the golden clips: the largest SD over clips of any
    output (EF points, or logits); for seg the SD over clips of each pixel's LV-minus-background logit,
    averaged over the pixels (one pixel that varies does not make a model that answers the same mask for
    every clip responsive)."""
    reference = golden.reference.astype(np.float64)
    if golden.meta.task == "seg":
        return float((reference[:, 1] - reference[:, 0]).std(axis=0).mean())
    return float(reference.std(axis=0).max())


def flat_reason(golden: Golden) -> str | None:
    """Why the reference proves nothing about an exported graph (parity inconclusive), or None: outputs that
    barely depend on the input (FLAT_SPREAD), or seg masks that are all background or all LV."""
    task = golden.meta.task
    spread, bound = reference_spread(golden), FLAT_SPREAD[task]
    if task == "seg":
        masks = lv_masks(golden.reference)
        if not masks.any() or masks.all():
            return f"the reference's LV masks are all {'background' if not masks.any() else 'LV'} on every clip"
    if spread < bound:
        return f"the reference answers nearly the same for every clip (SD {spread:.3g} {spread_unit(task)} < {bound:g})"
    return None


def spread_unit(task: str) -> str:
    return {"ef": "EF points", "classification": "logits", "seg": "LV logits, mean over pixels"}[task]


def compare(reference: np.ndarray, candidate: np.ndarray, task: str, backend: str,
            precision: str) -> ParityRow:
    """One row of the parity table: how far `candidate` is from `reference` (both (N, K))."""
    ref = reference.astype(np.float64)
    out = candidate.astype(np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"{backend}: output shape {out.shape} differs from the reference {ref.shape}")
    diff = np.abs(out - ref)
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    max_rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    norms = float(np.linalg.norm(ref) * np.linalg.norm(out))
    cosine = float(np.sum(ref * out) / norms) if norms > 0 else float(max_abs == 0)
    dice = None
    if task == "ef":
        ef_diff = float(diff.mean())
    elif task == "seg":
        ours, theirs = lv_masks(out), lv_masks(ref)
        ef_diff = float(np.mean(ours != theirs))
        both = int(ours.sum() + theirs.sum())
        dice = 2 * float((ours & theirs).sum()) / both if both else 1.0
    else:
        ef_diff = float(np.abs(class_probabilities(out) - class_probabilities(ref)).mean())
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
    if path.lower().endswith(".engine"):
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
            rows.append(compare(golden.reference, outputs, golden.meta.task, backend.device, precision))
    return rows


def format_table(rows: list[ParityRow], task: str) -> str:
    """The parity table as aligned text, with the tolerances it was judged against."""
    unit = "EF pts" if task == "ef" else "logits"
    diff_name = {"ef": "mean |dEF|", "classification": "mean |dprob|", "seg": "pixels differing"}[task]
    seg = task == "seg"
    header = ["backend", "precision", f"max abs ({unit})", "max rel", "cosine", *(["mask Dice"] if seg else []),
              diff_name, "result"]
    body = [[r.backend, r.precision, f"{r.max_abs:.3g}", f"{r.max_rel:.3g}", f"{r.cosine:.8f}",
             *([f"{r.dice:.6f}"] if seg else []), f"{r.ef_diff:.3g}", "pass" if r.passed else "FAIL"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    bounds = SEG_TOLERANCES if seg else TOLERANCES
    lines.append("tolerances: " + "; ".join(
        f"{p}: max abs <= {t.max_abs:g} {unit}" + (f", mean abs <= {t.max_mean:g}" if t.max_mean is not None else "")
        + f", cosine >= {t.min_cosine:g}" + (f", mask Dice >= {t.min_dice:g}" if seg else "")
        for p, t in bounds.items()))
    return "\n".join(lines)

