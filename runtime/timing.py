"""The one way the runtime times its work: a Stopwatch adds up the seconds of `with` blocks and of the steps of
an iterator (on whichever thread runs them); a Stage keeps one sample per call (per video, frame, batch...);
Timings holds the stages of one source, or, added up, of a whole run. numpy only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")
_END = object()  # end of an iterator, for next()


def latency_percentiles(seconds: list[float], quantiles: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """{'p50': ms, ...} of a list of durations in seconds."""
    values = np.percentile(np.asarray(seconds) * 1e3, quantiles) if seconds else [float("nan")] * len(quantiles)
    return {f"p{q}": float(v) for q, v in zip(quantiles, values)}


class Stopwatch:
    """Seconds spent inside `with` blocks and producing the items of iterators passed to ``over``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> Self:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._t0

    def over(self, items: Iterable[T]) -> Iterator[T]:
        """`items`, adding the time spent producing each (not the time the consumer holds it)."""
        iterator = iter(items)
        while True:
            t0 = time.perf_counter()
            item = next(iterator, _END)
            self.seconds += time.perf_counter() - t0
            if item is _END:
                return
            yield item


@dataclass
class Stage:
    """Durations of one pipeline stage, one sample per call (per video, per frame, per batch...)."""

    unit: str
    seconds: list[float] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return float(sum(self.seconds))

    def timed(self) -> _Sample:
        """A `with` block whose duration becomes one sample."""
        return _Sample(self)

    def to_dict(self) -> dict:
        return {"unit": self.unit, "count": len(self.seconds), "total_s": self.total_s,
                **{f"{k}_ms": v for k, v in latency_percentiles(self.seconds, (50, 95)).items()}}


class _Sample(Stopwatch):
    def __init__(self, stage: Stage) -> None:
        super().__init__()
        self.stage = stage

    def __exit__(self, *exc: object) -> None:
        super().__exit__()
        self.stage.seconds.append(self.seconds)


@dataclass
class Timings:
    stages: dict[str, Stage] = field(default_factory=dict)  # "decode per video", "inference per batch", ...
    video_s: float = 0.0  # seconds of video analysed
    wall_s: float = 0.0  # wall time spent on sources (model loading excluded)
    clips: int = 0

    def stage(self, name: str, unit: str) -> Stage:
        """The stage `name` timed per `unit`; files and live streams time decoding per video/per frame."""
        return self.stages.setdefault(f"{name} per {unit}", Stage(unit))

    def add(self, other: Timings) -> None:
        """Add another source's timings to these (a run's totals)."""
        for key, stage in other.stages.items():
            self.stages.setdefault(key, Stage(stage.unit)).seconds.extend(stage.seconds)
        self.video_s += other.video_s
        self.wall_s += other.wall_s
        self.clips += other.clips

    def total(self, name: str) -> float:
        return sum(s.total_s for key, s in self.stages.items() if key.startswith(f"{name} "))

    @property
    def realtime_factor(self) -> float:
        """Video seconds analysed per wall second."""
        return self.video_s / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def input_share(self) -> float:
        """Fraction of the wall time spent decoding and preprocessing."""
        return (self.total("decode") + self.total("preprocess")) / self.wall_s if self.wall_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"stages": {k: s.to_dict() for k, s in self.stages.items()}, "video_s": self.video_s,
                "wall_s": self.wall_s, "clips": self.clips, "realtime_factor": self.realtime_factor,
                "decode_preprocess_share": self.input_share}
