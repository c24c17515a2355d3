"""What differs per task at the edge, one spec object per task, registered by name (the `task` of a model
file's metadata, evim3.runtime.meta.ModelMeta):

    ef              EF regression: (N, 1) EF in points
    classification  2 classes -> (N, 1) one logit, the evidence for class 1 (trained with BCE, as the paper's
                    classification head); K > 2 classes -> (N, K) logits (cross-entropy). Binary and
                    multi-class are one spec: model files name both "classification", and the class count
                    decides the output width (output_width), the one rule every reader goes through
    seg             LV segmentation: (N, 2, frames, size, size) background and LV logits of every pixel of
                    every frame; the pipeline stitches them into one mask per frame and finds the beats

A spec owns: the output shape the backends check, how raw outputs become per-clip results, the per-video and
per-clip JSON entries, what `evim3 infer` shows of them (table and CSV columns, the live line, the --plot
curve), the description exported files carry, and how parity judges two backends (tolerances per precision,
what "flat" means). The torch half of a task (head, training, `evim3 eval`) is one
module in evim3.tasks, registered under the same name. numpy only.

A new task: subclass TaskSpec, then ``register_task(MyTask())``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from evim3.runtime.meta import OUTPUT_NAME, ModelMeta
from evim3.runtime.outputs import SEG_CLASSES, class_probabilities, lv_evidence, lv_masks


@dataclass(frozen=True)
class Tolerance:
    """Pass when the largest output difference (EF points, or logits), the mean one (when bounded; over the echo
    clips, runtime.parity_check.echo_clips), the cosine similarity of all outputs and, for seg, the Dice between the
    two backends' LV masks are within these bounds."""

    max_abs: float
    min_cosine: float
    max_mean: float | None = None
    min_dice: float = 0.0


# One entry per runtime.meta.PRECISIONS, for outputs with one value per clip (EF points, logits).
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


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table cell: "-" where there is none (None, NaN)."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


@dataclass(frozen=True)
class ParityDiff:
    """How two backends' outputs differ, in the task's terms: `value` is what the parity table's last column
    shows (diff_name), `dice` the LV mask overlap of a task with masks."""

    value: float
    dice: float | None = None


class TaskSpec:
    """The edge half of a task. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    # Outputs for every pixel of every frame, stitched over overlapping clips into one result per frame
    # (masks, beats), instead of values per clip. Such a task needs a whole file: no live sources.
    per_frame: ClassVar[bool] = False
    # Its per-clip value is the video's EF in points (what the DICOM node reports as the EF measurement).
    reports_ef: ClassVar[bool] = False
    tolerances: ClassVar[dict[str, Tolerance]] = TOLERANCES
    parity_unit: ClassVar[str] = "logits"  # of the parity table's differences
    diff_name: ClassVar[str]  # the parity table's last column
    # A reference whose outputs spread (SD over the golden clips, reference_spread) less than this answers about
    # the same for every input: parity with it proves nothing about the exported graph.
    flat_spread: ClassVar[float] = 0.5
    spread_unit: ClassVar[str] = "logits"
    # How `evim3 infer` labels the one value per clip of the presentation below: "EF" in "%".
    value_label: ClassVar[str | None] = None  # None: the task's name
    value_unit: ClassVar[str] = ""

    def output_width(self, num_classes: int = 0) -> int:
        """Values the network gives per clip (tasks with one output vector per clip)."""
        return 1

    def output_shape(self, meta: ModelMeta) -> tuple[int, ...]:
        """One clip's output shape (the graph's output without its batch axis)."""
        return (self.output_width(len(meta.class_names)),)

    def value_names(self, meta: ModelMeta) -> list[str]:
        """Names of a clip's values when they are named (class probabilities); [] for one unnamed value."""
        return []

    def clip_outputs(self, outputs: np.ndarray, meta: ModelMeta) -> list[Any]:
        """Backend outputs (N, *output_shape) -> one result per clip: its values (list of float) or, for a
        per-frame task, its (T, H, W) evidence for the stitcher."""
        expected = self.output_width(len(meta.class_names))
        if outputs.ndim != 2 or outputs.shape[1] != expected:
            raise ValueError(f"model outputs have shape {outputs.shape}; task {meta.task!r} with "
                             f"{len(meta.class_names)} classes gives (N, {expected})")
        return self.values(outputs).tolist()

    def values(self, outputs: np.ndarray) -> np.ndarray:
        """(N, K) raw outputs -> (N, V) what a clip reports."""
        return outputs.astype(np.float64)

    def video_entry(self, mean: list[float] | None, names: list[str]) -> dict[str, Any]:
        """The per-video keys of `evim3 infer --json` from the mean of the clips' values (None: no clip)."""
        return {}

    def clip_entry(self, values: list[float], names: list[str]) -> dict[str, Any]:
        """The per-clip keys of `evim3 infer --json` from a clip's values (a task with values per clip)."""
        return {self.name: values[0]}

    # What `evim3 infer` shows of a task with values per clip (cli/report.py); `names` are value_names(meta).
    # This base shows one value per clip (its mean over clips per video, and their range); tasks with named
    # values override these.

    def _label(self) -> str:
        """The value's name with its unit: "EF %"."""
        return f"{self.value_label or self.name} {self.value_unit}".rstrip()

    def table_columns(self, names: list[str]) -> list[str]:
        """The terminal table's columns of a video's values."""
        return [self._label(), "clip range"]

    def table_cells(self, mean: list[float], clips: list[list[float]], names: list[str]) -> list[str]:
        """A video's cells under table_columns, from the mean of its clips' values and each clip's."""
        first = [values[0] for values in clips]
        return [fmt(mean[0]), f"{fmt(min(first))}-{fmt(max(first))}"]

    def csv_columns(self, names: list[str]) -> tuple[list[str], str]:
        """The --csv columns of a video's values, and of its clips' values (one ';' list)."""
        return [self.name], f"clip_{self.name}"

    def csv_cells(self, mean: list[float], clips: list[list[float]], names: list[str]) -> tuple[list[str], str]:
        """A video's cells under csv_columns."""
        return [f"{mean[0]:.4f}"], ";".join(f"{values[0]:.4f}" for values in clips)

    def clip_text(self, values: list[float], names: list[str]) -> str:
        """A clip's result on one line, as a live source gives it."""
        return f"{self.value_label or self.name} {values[0]:.1f} {self.value_unit}".rstrip()

    def draw_clips(self, ax: Any, times: list[float], clips: list[list[float]], mean: list[float],
                   names: list[str]) -> None:
        """The --plot curve of a video's clip values over time, on matplotlib axes `ax`."""
        first = [values[0] for values in clips]
        ax.plot(times, first, marker="o")
        ax.axhline(mean[0], linestyle="--", color="gray", label="video mean")
        # At least +-3 (EF points): clip-to-clip noise of a tenth of a point should look like noise.
        middle, half = (max(first) + min(first)) / 2, max(3.0, 0.6 * (max(first) - min(first)))
        ax.set_ylim(middle - half, middle + half)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_ylabel(self._label())
        ax.legend(loc="upper right", fontsize="small")

    def output_description(self, meta: ModelMeta) -> str:
        """What the graph's output means, for the exported file's documentation."""
        raise NotImplementedError

    def reference_spread(self, reference: np.ndarray) -> float:
        """How much reference outputs differ between clips: the largest SD over clips of any output."""
        return float(reference.astype(np.float64).std(axis=0).max())

    def flat_reason(self, reference: np.ndarray) -> str | None:
        """Why a reference proves nothing about an exported graph beyond a small spread, or None."""
        return None

    def parity_diff(self, out: np.ndarray, ref: np.ndarray) -> ParityDiff:
        """The task's own measure of two backends' difference (float64 outputs of the same clips)."""
        return ParityDiff(float(np.abs(out - ref).mean()))


class EFTask(TaskSpec):
    name = "ef"
    reports_ef = True
    parity_unit = "EF pts"
    diff_name = "mean |dEF|"
    flat_spread = 1.0
    spread_unit = "EF points"
    value_label, value_unit = "EF", "%"

    def video_entry(self, mean: list[float] | None, names: list[str]) -> dict[str, Any]:
        return {"ef": None if mean is None else mean[0]}

    def output_description(self, meta: ModelMeta) -> str:
        return f"{OUTPUT_NAME} (N, 1) EF in points"


class ClassificationTask(TaskSpec):
    name = "classification"
    diff_name = "mean |dprob|"

    def output_width(self, num_classes: int = 0) -> int:
        """1 logit for two classes (BCE, as the paper's head), K logits for K > 2 classes."""
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
        return 1 if num_classes == 2 else num_classes

    def value_names(self, meta: ModelMeta) -> list[str]:
        return list(meta.class_names)

    def values(self, outputs: np.ndarray) -> np.ndarray:
        return class_probabilities(outputs)

    def video_entry(self, mean: list[float] | None, names: list[str]) -> dict[str, Any]:
        return {"probabilities": None if mean is None else dict(zip(names, mean)),
                "prediction": None if mean is None else names[int(np.argmax(mean))]}

    def clip_entry(self, values: list[float], names: list[str]) -> dict[str, Any]:
        return {"probabilities": dict(zip(names, values))}

    def table_columns(self, names: list[str]) -> list[str]:
        return ["prediction", *(f"p({n})" for n in names)]

    def table_cells(self, mean: list[float], clips: list[list[float]], names: list[str]) -> list[str]:
        return [names[int(np.argmax(mean))], *(fmt(p, 3) for p in mean)]

    def csv_columns(self, names: list[str]) -> tuple[list[str], str]:
        return ["prediction", *(f"p_{n}" for n in names)], "clip_prediction"

    def csv_cells(self, mean: list[float], clips: list[list[float]], names: list[str]) -> tuple[list[str], str]:
        return ([names[int(np.argmax(mean))], *(f"{p:.6f}" for p in mean)],
                ";".join(names[int(np.argmax(values))] for values in clips))

    def clip_text(self, values: list[float], names: list[str]) -> str:
        best = int(np.argmax(values))
        return f"{names[best]} ({values[best]:.3f})"

    def draw_clips(self, ax: Any, times: list[float], clips: list[list[float]], mean: list[float],
                   names: list[str]) -> None:
        for k, name in enumerate(names):
            ax.plot(times, [values[k] for values in clips], marker="o", label=name)
        ax.set_ylabel("probability")
        ax.legend(loc="upper right", fontsize="small")

    def output_description(self, meta: ModelMeta) -> str:
        return f"{OUTPUT_NAME} (N, K) logits of {', '.join(meta.class_names)}"

    def parity_diff(self, out: np.ndarray, ref: np.ndarray) -> ParityDiff:
        return ParityDiff(float(np.abs(class_probabilities(out) - class_probabilities(ref)).mean()))


class SegTask(TaskSpec):
    name = "seg"
    per_frame = True
    tolerances = SEG_TOLERANCES
    diff_name = "pixels differing"
    spread_unit = "LV logits, mean over pixels"

    def output_shape(self, meta: ModelMeta) -> tuple[int, ...]:
        spec = meta.preprocess
        return (SEG_CLASSES, spec.frames, spec.size, spec.size)

    def clip_outputs(self, outputs: np.ndarray, meta: ModelMeta) -> list[Any]:
        return list(lv_evidence(outputs))

    def output_description(self, meta: ModelMeta) -> str:
        spec = meta.preprocess
        return (f"{OUTPUT_NAME} (N, 2, {spec.frames}, {spec.size}, {spec.size}) background/LV logits of every "
                "pixel of every frame")

    def reference_spread(self, reference: np.ndarray) -> float:
        """The SD over clips of each pixel's LV-minus-background logit, averaged over the pixels (one pixel
        that varies does not make a model that answers the same mask for every clip responsive)."""
        reference = reference.astype(np.float64)
        return float((reference[:, 1] - reference[:, 0]).std(axis=0).mean())

    def flat_reason(self, reference: np.ndarray) -> str | None:
        masks = lv_masks(reference)
        if not masks.any() or masks.all():
            return f"the reference's LV masks are all {'background' if not masks.any() else 'LV'} on every clip"
        return None

    def parity_diff(self, out: np.ndarray, ref: np.ndarray) -> ParityDiff:
        ours, theirs = lv_masks(out), lv_masks(ref)
        both = int(ours.sum() + theirs.sum())
        dice = 2 * float((ours & theirs).sum()) / both if both else 1.0
        return ParityDiff(float(np.mean(ours != theirs)), dice)


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make `spec` the task of its name (a model file's `task`); returns it."""
    _REGISTRY[spec.name] = spec
    return spec


def task_spec(name: str) -> TaskSpec:
    """The registered task `name`; ValueError naming the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (expected one of {', '.join(task_names())})") from None


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


for _spec in (EFTask(), ClassificationTask(), SegTask()):
    register_task(_spec)
