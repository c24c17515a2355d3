"""LV segmentation on an EchoNet-Dynamic-layout folder: clips that hold the traced end-diastolic (ED) and
end-systolic (ES) frames, with the LV masks drawn from VolumeTracings.csv (``evim3.data.tracings``).

Which clip. The paper's loader (src/datasets/echo_dynamic_seg_dataset.py) takes the frames from the first
traced frame to the second and stretches them, by trilinear interpolation in time, into one clip whose first
and last frames are the traced ones. That clip runs at a different speed for every video, unlike anything the
model sees when it segments a whole video at the edge (sliding clips at the model's fps and period). evim3
keeps the inference geometry instead: the clip is the ordinary one (every `period`-th frame of the video
resampled to the model's fps) at a start that puts both traced frames inside it, with one of them (the
anchor) exactly on a clip frame. The other lands on a clip frame when their distance is a multiple of the
period; otherwise it replaces the clip frame nearest to it, less than `period` / 2 resampled frames away
(at most 20 ms at the paper's 50 fps and period 2): the clip then shows the traced frame itself, so its mask
is exact. In training the anchor and the start are random (among the starts that hold both frames), in
evaluation the anchor is ED and the pair is centred. A pair further apart than a clip's span keeps the
anchor only; the other frame's position is -1 and it takes no part in loss or metrics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from evim3.data import CROP_PAD
from evim3.data.echonet import EchoNetDataset
from evim3.data.tracings import ed_es_frames, read_tracings, resampled_frame, traced_mask
from evim3.runtime.echonet_layout import TRACINGS_NAME, video_name
from evim3.runtime.errors import DatasetError
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.preprocess import frames_to_uint8, normalise, sample_clip_indices, ultrasound_region
from evim3.runtime.video import read_video

TRACED = ("ED", "ES")  # the order of a seg item's masks and positions


@dataclass(frozen=True)
class TracedFrames:
    """A video's traced frames in its preprocessed form: (ED, ES) resampled frame indices and their LV masks
    (2, size, size) bool at the preprocessed geometry."""

    frames: tuple[int, int]
    masks: np.ndarray


def traced_clip_starts(num_frames: int, spec: PreprocessSpec, traced: tuple[int, int], anchor: int) -> list[int]:
    """Clip starts (resampled frames) with `anchor` on a clip frame and the clip inside the video that hold
    both `traced` frames; failing that, those holding the anchor; failing that (a video shorter than a
    clip, looped from frame 0), [0]."""
    span = spec.clip_span
    aligned = range(anchor % spec.period, max(0, num_frames - span) + 1, spec.period)
    both = [s for s in aligned if s <= min(traced) and max(traced) < s + span]
    return both or [s for s in aligned if s <= anchor < s + span] or [0]


def traced_clip(num_frames: int, spec: PreprocessSpec, traced: tuple[int, int], start: int
                ) -> tuple[np.ndarray, list[int]]:
    """The clip's frame indices (``sample_clip_indices`` at `start`, with a traced frame that falls between
    two clip frames put in place of the nearest) and each traced frame's position in it (-1: not in it)."""
    indices = sample_clip_indices(num_frames, spec, start).copy()
    positions: list[int] = []
    for frame in traced:
        at = np.flatnonzero(indices == frame)
        if len(at):
            positions.append(int(at[0]))
            continue
        nearest = int(np.argmin(np.abs(indices - frame)))
        if abs(int(indices[nearest]) - frame) <= spec.period // 2 and nearest not in positions:
            indices[nearest] = frame
            positions.append(nearest)
        else:
            positions.append(-1)
    return indices, positions


class EchoNetSegDataset(EchoNetDataset):
    """EchoNetDataset's videos (those with two traced frames) as segmentation items: x (1, frames, size,
    size), masks (2, size, size) uint8 (ED, ES; 1 = LV), positions (2,) long (their clip frames, -1 when
    not in the clip), plus file, ef and starts. `clips` "random" (training) or "first" (the deterministic
    clip: ED anchored, the pair centred). TRAIN items are padded and cropped, masks with their frames."""

    def __init__(self, root: str | os.PathLike, split: str, spec: PreprocessSpec, *, clips: str = "random",
                 pad: int = CROP_PAD, keep_ratio: float = 1.0, max_videos: int | None = None, cache: bool = False,
                 substitute_unreadable: bool = False):
        if clips not in ("random", "first"):
            raise ValueError(f"segmentation clips are 'random' or 'first' (the traced clip), got {clips!r}")
        super().__init__(root, split, spec, clips=clips, pad=pad, keep_ratio=keep_ratio, drop_untraced=True,
                         max_videos=max_videos, cache=cache, substitute_unreadable=substitute_unreadable)
        self.tracings_path = os.path.join(os.fspath(root), TRACINGS_NAME)
        tracings = read_tracings(self.tracings_path)
        self.tracings = [tracings[video_name(name)] for name in self.files]
        self.traced: dict[int, TracedFrames] = {}  # filled as videos are decoded (kept with the cache)

    def decode(self, index: int) -> np.ndarray:
        video = read_video(self.paths[index])
        region = ultrasound_region(video)
        tracings = self.tracings[index]
        count = len(video.frames)
        try:
            ed, es = ed_es_frames(tracings)
            if max(ed, es) >= count:
                raise ValueError(f"traced frame {max(ed, es)} is past the video's {count} frames")
            masks = np.stack([traced_mask(tracings[frame], region, self.spec.size) for frame in (ed, es)])
        except ValueError as e:
            raise DatasetError(self.tracings_path, f"{self.files[index]}: {e}") from None
        self.traced[index] = TracedFrames(
            frames=(resampled_frame(ed, count, video.fps, self.spec.fps),
                    resampled_frame(es, count, video.fps, self.spec.fps)),
            masks=masks,
        )
        return frames_to_uint8(video.frames, video.fps, self.spec, region)

    def load_item(self, index: int) -> dict:
        frames = self.video(index)
        traced = self.traced[index]
        ed, es = traced.frames
        if self.clips == "random":  # torch's RNG: seeded per item by the loader
            anchor = traced.frames[int(torch.randint(2, ()))]
            starts = traced_clip_starts(len(frames), self.spec, traced.frames, anchor)
            start = starts[int(torch.randint(len(starts), ()))]
        else:
            starts = traced_clip_starts(len(frames), self.spec, traced.frames, ed)
            centred = (ed + es - self.spec.clip_span + 1) / 2
            start = min(starts, key=lambda s: abs(s - centred))
        indices, positions = traced_clip(len(frames), self.spec, traced.frames, start)
        x = torch.from_numpy(normalise(frames[indices], self.spec))[None]
        masks = torch.from_numpy(traced.masks.astype(np.uint8))
        if self.pad:
            x, masks = self._pad_and_crop(x, masks)
        return {"x": x, "masks": masks, "positions": torch.tensor(positions), "ef": torch.tensor(self.ef[index]),
                "file": self.files[index], "starts": torch.tensor([start])}
