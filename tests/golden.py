"""Golden outputs of the edge pipeline: what `evim3 infer` (and the masks behind a seg model's report) gives for
fixed models on fixed inputs, recorded once (scripts/make_golden.py) and compared by tests/test_golden.py, so
that a refactoring of the runtime that changes a number fails.

The models are committed (tests/data/golden/*.onnx, small): a fitted shrunk evim3-tiny EF model, a binary and a
3-class classification model and a seg model (random weights, seeded), all written by `evim3 export`'s
exporter, plus the brightness-threshold seg graph of test_seg_infer (built here: it finds real beats). The
inputs are made here, deterministically: the synthetic dataset's TEST videos (the `synth_dataset` fixture's
parameters), a beating-LV video and the same as a DICOM cine with an ultrasound region and pixel spacing.

No torch here except in build_models (the script's part).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from evim3.cli.main import app
from evim3.runtime.meta import ModelMeta
from test_seg_analysis import beating
from test_seg_infer import echo_frames, make_threshold_seg_onnx
from test_video import ultrasound_region_item, write_dicom, write_video
from typer.testing import CliRunner

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"
GOLDEN_JSON = GOLDEN_DIR / "golden.json"
# The committed exported models (scripts/make_golden.py) and the threshold graph made at test time.
EXPORTED_MODELS = ("ef", "cls2", "cls3", "seg")
MODELS = (*EXPORTED_MODELS, "threshold")
# Floats compare within this relative (and, near 0, absolute) difference: one thread, so the same machine
# gives the same bits; the bound covers another CPU's float32 rounding (an EF of 50 is 4e-6 from its next
# float32, 8e-8 relative).
RTOL = 1e-6
# Run-dependent fields of the --json document: timings, the machine, paths.
VOLATILE_KEYS = frozenset({"timings", "model_load_s", "device"})


def build_models(folder: Path) -> None:
    """Write the exported golden models into `folder` (torch; scripts/make_golden.py)."""
    import torch
    from evim3.export.onnx import export_onnx
    from test_int8 import CFG, META, fitted_model

    from evim3.models.evim3 import EViM3

    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(fitted_model(), META, folder / "ef.onnx")
    for name, classes in (("cls2", ["normal", "abnormal"]), ("cls3", ["a4c", "a2c", "plax"])):
        torch.manual_seed(1)
        meta = ModelMeta("evim3-tiny", CFG.to_dict(), META.preprocess, task="classification", class_names=classes)
        export_onnx(EViM3(CFG, task="classification", num_classes=len(classes)).eval(), meta, folder / f"{name}.onnx")
    torch.manual_seed(2)
    meta = ModelMeta("evim3-tiny", CFG.to_dict(), META.preprocess, task="seg")
    export_onnx(EViM3(CFG, task="seg").eval(), meta, folder / "seg.onnx")


def model_paths(work: Path) -> dict[str, str]:
    """Every golden model: the committed ones, and the threshold graph written into `work`."""
    paths = {name: os.fspath(GOLDEN_DIR / f"{name}.onnx") for name in EXPORTED_MODELS}
    paths["threshold"] = make_threshold_seg_onnx(work / "threshold.onnx")
    return paths


def make_inputs(work: Path, synth_root: Path) -> list[str]:
    """The golden sources, in order: the synthetic TEST videos, a beating LV (AVI) and a DICOM cine of it
    with a stated 2D region (a border cropped off) and 0.02 cm pixels."""
    names = sorted(line.split(",")[0] for line in (synth_root / "FileList.csv").read_text().splitlines()[1:]
                   if line.rstrip().endswith("TEST"))
    videos = [os.fspath(synth_root / "Videos" / f"{name}.avi") for name in names]
    masks, *_ = beating([0.75] * 4, [50.0] * 4, a0=22.0, b0=9.0, centre=(32.0, 32.0), size=64)
    avi = write_video(work / "beating.avi", echo_frames(masks), fps=50)
    big, *_ = beating([0.8] * 3, [40.0] * 3, a0=33.0, b0=13.5, centre=(48.0, 64.0), size=128)
    frames = echo_frames([m[16:112] for m in big], seed=2)
    frames[:, :, :16] = 0  # a still border left of the stated region
    region = ultrasound_region_item(1, 0, 95, 16, 111)
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.02
    dicom = write_dicom(work / "beating.dcm", frames, FrameTime=20, SequenceOfUltrasoundRegions=[region])
    return [*videos, os.fspath(avi), os.fspath(dicom)]


def _strip(value: Any, roots: list[str]) -> Any:
    """The document without VOLATILE_KEYS, every path cut to its file name."""
    if isinstance(value, dict):
        return {k: _strip(v, roots) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root + os.sep, "")
        return value
    return value


def infer_report(model: str, sources: list[str], work: Path) -> dict[str, Any]:
    """`evim3 infer SOURCES --model MODEL --json --csv --threads 1`: the JSON document (minus timings, device
    and directories) and the CSV text (directories removed)."""
    out_json, out_csv = work / "out.json", work / "out.csv"
    args = ["infer", *sources, "--model", model, "--json", os.fspath(out_json), "--csv", os.fspath(out_csv),
            "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    roots = sorted({os.path.dirname(p) for p in [*sources, model]}, key=len, reverse=True)
    document = _strip(json.loads(out_json.read_text()), roots)
    csv_text = out_csv.read_text()
    for root in roots:
        csv_text = csv_text.replace(root + os.sep, "")
    return {"json": document, "csv": csv_text}


def mask_digest(masks: list[np.ndarray | None]) -> list[str | None]:
    """Per frame: sha256 of the bit-packed LV mask (None where no clip covered the frame)."""
    return [None if m is None else hashlib.sha256(np.packbits(m).tobytes()).hexdigest()[:16] for m in masks]


def seg_masks(model: str, source: str) -> list[str | None]:
    """The per-frame LV masks a seg model's report is computed from (the public API's), as mask_digest."""
    import evim3.runtime as rt

    with rt.load(model, threads=1) as loaded:
        return mask_digest(loaded.predict(source).masks)


def compute(work: Path, synth_root: Path) -> dict[str, Any]:
    """Every golden output: per model, its `evim3 infer` report on every source; per seg model, the masks."""
    sources = make_inputs(work, synth_root)
    models = model_paths(work)
    golden: dict[str, Any] = {}
    for name, path in models.items():
        golden[name] = infer_report(path, sources, work)
        if name in ("seg", "threshold"):
            golden[name]["masks"] = {os.path.basename(s): seg_masks(path, s) for s in sources}
    return golden


def differences(got: Any, want: Any, where: str = "") -> list[str]:
    """Where `got` differs from `want`: floats beyond RTOL, anything else not equal; CSV text compared cell by
    cell (its numbers as floats)."""
    if isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            return [f"{where}: keys {sorted(set(got) ^ set(want))} differ"]
        return [d for k in want for d in differences(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items, golden {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        close = math.isclose(got, want, rel_tol=RTOL, abs_tol=RTOL)
        return [] if close else [f"{where}: {got!r}, golden {want!r}"]
    if isinstance(want, str) and isinstance(got, str) and where.endswith(".csv"):
        return differences(_csv_cells(got), _csv_cells(want), where + "#")
    return [] if got == want and type(got) is type(want) else [f"{where}: {got!r}, golden {want!r}"]


_NUMBER = re.compile(r"-?\d+\.\d+(e-?\d+)?")


def _csv_cells(text: str) -> list[Any]:
    """CSV text as tokens: decimal numbers as floats (within RTOL), everything else as text."""
    return [float(t) if _NUMBER.fullmatch(t) else t for t in re.split(r"([,;\n])", text)]


def write_golden(golden: dict[str, Any]) -> None:
    GOLDEN_JSON.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


def read_golden() -> dict[str, Any]:
    return json.loads(GOLDEN_JSON.read_text())

