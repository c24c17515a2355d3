"""On EchoNet-format input the network gets the paper's clip.

The paper's loader (github.com/HenryZhou19/E-ViM3, src/datasets/echo_dynamic_dataset.py, val transform) is
restated here step by step: decode to RGB (OpenCV's FFmpeg backend; here PyAV, the same FFmpeg), /255,
Grayscale (0.2989 R + 0.587 G + 0.114 B), Resize to 112 (nothing to do at 112), Normalize(32.843/255,
50.020/255), the first clip (frames 0, 2, 4, ..., the video repeated when shorter). `evim3 infer`'s input for
the same file must be within one gray level of it.

The videos are synthetic EchoNet-format AVIs (112x112, 50 fps): a sector whose apex sits below a still dark
band of 10 rows, with still dark columns at its right, as in EchoNet's prepared videos, where a motion crop
would cut them away.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
from evim3.runtime.backends import Backend, open_backend
from evim3.runtime.infer import InferencePipeline
from evim3.runtime.meta import ModelMeta, PreprocessSpec
from evim3.runtime.preprocess import motion_region
from test_preprocess import echo_screen, fan
from test_runtime import make_contract_onnx

# The official preprocessing of a converted checkpoint (evim3.convert.official_preprocess), with 16 frames
# instead of 64 to keep the contract graph small: the clip rule does not depend on the count.
OFFICIAL = PreprocessSpec(size=112, fps=50.0, frames=16, period=2, mean=32.843, std=50.020)
OFFICIAL_GRAY = np.array([0.2989, 0.587, 0.114])
STILL_ROWS, STILL_RIGHT_COLUMNS = 10, 15


def echonet_like_frames(num_frames: int, seed: int = 0) -> np.ndarray:
    """(T, 112, 112) uint8: speckle and a beating chamber in a sector whose apex is at row 10; the rows above
    it and the 15 columns at the right stay still (a dark band with a faint static texture)."""
    rng = np.random.default_rng(seed)
    size = 112
    sector = fan(size, size, apex=(STILL_ROWS, 56), radius=130, half_angle_deg=50)
    sector[:, size - STILL_RIGHT_COLUMNS:] = False
    still = rng.integers(0, 12, (size, size)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    frames = np.repeat(still[None], num_frames, axis=0)
    for t in range(num_frames):
        radius = 18 + 8 * np.sin(2 * np.pi * t / 40)  # a chamber beating at 1.25 Hz
        chamber = (yy - 60) ** 2 + (xx - 50) ** 2 < radius**2
        speckle = rng.integers(40, 200, (size, size))
        frames[t][sector] = np.where(chamber, 15, speckle)[sector]
    return frames


def write_avi(path: Path, frames: np.ndarray, codec: str) -> str:
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=50)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = {"qscale": "2"}  # fine quantisation: speckle survives
        for frame in frames:
            rgb = np.repeat(frame[..., None], 3, axis=2)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return os.fspath(path)


def official_first_clip(path: str, spec: PreprocessSpec) -> np.ndarray:
    """The paper's val-transform clip, restated: (frames, 112, 112) float64."""
    with av.open(path) as container:
        rgb = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float64) / 255
    gray = rgb @ OFFICIAL_GRAY  # TT.Grayscale on float tensors: no rounding
    assert gray.shape[1:] == (112, 112)  # TT.Resize((112, 112)) leaves it as it is
    normalised = (gray - spec.mean / 255) / (spec.std / 255)
    needed = spec.frames * spec.period
    if len(normalised) < needed:  # "repeat padding"
        repeats, tail = divmod(needed, len(normalised))
        normalised = np.concatenate([normalised] * repeats + [normalised[:tail]])
    return normalised[spec.period * np.arange(spec.frames)]


class RecordingBackend(Backend):
    """A real ONNX Runtime backend that also keeps every clip it is given (what the network sees)."""

    def __init__(self, inner: Backend):
        self.inner, self.meta, self.path, self.clips = inner, inner.meta, inner.path, []

    @property
    def device(self) -> str:
        return self.inner.device

    def _run_batch(self, clips: np.ndarray) -> np.ndarray:
        self.clips.extend(clips[:, 0])
        return self.inner.run(clips)


@pytest.fixture(scope="module")
def official_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    meta = ModelMeta(preset="contract", model={}, preprocess=OFFICIAL)
    return make_contract_onnx(tmp_path_factory.mktemp("official") / "official.onnx", meta)


def test_the_synthetic_video_has_the_still_band_a_motion_box_would_cut() -> None:
    frames = echonet_like_frames(60)
    moving = frames.max(0) - frames.min(0) > 12
    rows, columns = np.flatnonzero(moving.any(1)), np.flatnonzero(moving.any(0))
    assert rows[0] == STILL_ROWS and columns[-1] == 112 - STILL_RIGHT_COLUMNS - 1
    assert motion_region(frames) == (0, 112, 0, 112)  # recognised as already cropped to its sector


@pytest.mark.parametrize("codec", ["mjpeg", "mpeg4"])
@pytest.mark.parametrize("num_frames", [120, 28])  # a whole clip; a video shorter than one (repeated)
def test_infer_feeds_the_network_the_papers_first_clip(official_model: str, tmp_path: Path, codec: str,
                                                       num_frames: int) -> None:
    path = write_avi(tmp_path / f"echonet.{codec}.avi", echonet_like_frames(num_frames), codec)
    recorder = RecordingBackend(open_backend(official_model, threads=1))
    # One clip, at frame 0: a stride past the end of the video.
    result = InferencePipeline(recorder, stride=10_000).run_file(path)
    assert result.ok, result.error
    ours = recorder.clips[0].astype(np.float64)
    official = official_first_clip(path, OFFICIAL)
    gray_levels = np.abs(ours - official) * OFFICIAL.std
    assert gray_levels.max() <= 1.0, gray_levels.max()  # within one gray level everywhere
    assert gray_levels[:, :STILL_ROWS].max() <= 1.0  # the still band is there, not cropped and padded


def test_a_scanner_screen_is_still_cropped_to_its_sector() -> None:
    frames, sector = echo_screen()
    y0, y1, x0, x1 = motion_region(frames)
    assert (y1 - y0) < 0.8 * frames.shape[1] and (x1 - x0) < 0.8 * frames.shape[2]
    assert sector[y0:y1, x0:x1].sum() >= 0.99 * sector.sum()  # its box, within the 3 pixels of the test above
