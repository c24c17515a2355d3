"""The metadata every evim3 model file carries: checkpoint JSON, ONNX ``metadata_props`` and the engine header.

One schema for all three, so a model file alone says how to preprocess its input and read its output.
Pure Python (no numpy, no torch): the edge runtime reads it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

# Key under which the JSON document is stored in ONNX metadata_props / safetensors metadata.
META_KEY = "evim3"
# Engine files: MAGIC, then a little-endian uint32 byte length, then the JSON header, then the TensorRT plan.
ENGINE_MAGIC = b"EVIM3TRT"
# Graph I/O names shared by export and runtime.
INPUT_NAME = "clip"  # (N, 1, frames, size, size) float32, already normalised
# What it holds is the task's (evim3.runtime.tasks: EF points, logits, per-pixel logits)
OUTPUT_NAME = "output"
# Of an exported file's weights and compute (checkpoints are fp32). int8: linear layers quantised to 8 bits
# (ONNX: ONNX Runtime's dynamic quantisation, for CPUs; engine: TensorRT INT8 calibrated on clips).
PRECISIONS = ("fp32", "fp16", "int8")
# ONNX metadata_props key of the flat copy of the precision (Netron shows it). Files written before precision
# was a ModelMeta field have it there only.
PRECISION_PROP = f"{META_KEY}.precision"


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw frames become model input; training and inference both read it from here."""

    size: int = 112  # output frames are size x size
    fps: float = 50.0  # frames are resampled to this rate before clip sampling
    frames: int = 32  # clip length (frames fed to the model)
    period: int = 2  # every period-th frame of the resampled video goes into a clip
    mean: float = 0.0  # normalisation, in 0..255 pixel units
    std: float = 1.0

    @property
    def clip_span(self) -> int:
        """Frames of the resampled video one clip covers."""
        return (self.frames - 1) * self.period + 1

    @property
    def clip_seconds(self) -> float:
        return self.clip_span / self.fps

    @property
    def default_stride(self) -> int:
        """Frames between the starts of consecutive clips when none is asked for: half a clip span, so
        that clips overlap by half (`evim3 infer`, `evim3 bench`, evaluation's "all" clips)."""
        return max(1, self.clip_span // 2)


@dataclass
class ModelMeta:
    preset: str
    model: dict[str, Any]  # evim3.config.ModelConfig as a dict
    preprocess: PreprocessSpec
    task: str = "ef"  # a registered task (evim3.runtime.tasks)
    ef_mean: float | None = None
    # EF = ef_std * (network output): the network regresses EF in units of the training set's spread, so
    # fine-tuning from scratch is not stuck predicting the mean. 1.0 for the paper's checkpoints (raw EF).
    ef_std: float = 1.0
    class_names: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # training data summary
    version: str = ""
    precision: str = "fp32"  # one of PRECISIONS: what an exported file computes in

    def __post_init__(self) -> None:
        from evim3.runtime.tasks import task_spec  # the registry imports numpy; this module stays pure Python

        task_spec(self.task)  # ValueError naming the registered tasks
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r} (expected one of {', '.join(PRECISIONS)})")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["format"] = "evim3"
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, precision: str = "fp32") -> ModelMeta:
        """`precision`: for documents written before it was a field (the file's own record of it, if any)."""
        d = json.loads(text)
        if d.pop("format", None) != "evim3":
            raise ValueError("not evim3 metadata (missing format='evim3')")
        d["preprocess"] = PreprocessSpec(**d["preprocess"])
        d.setdefault("precision", precision)
        return cls(**d)

    @classmethod
    def from_onnx_props(cls, props: dict[str, str]) -> ModelMeta:
        """The metadata of an ONNX file's metadata_props (KeyError without META_KEY)."""
        return cls.from_json(props[META_KEY], precision=props.get(PRECISION_PROP, "fp32"))
