"""The one preprocessing: crop, square, resize, resample, normalise; clip sampling; the real echo cine."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import examples

from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.preprocess import (
    crop_square_resize,
    motion_region,
    preprocess,
    preprocess_frames,
    resample_indices,
    sample_clip_indices,
    sliding_clip_starts,
    ultrasound_region,
)
from evim3.runtime.video import Video, read_video


def echo_like(T: int = 40, H: int = 200, W: int = 260, seed: int = 0) -> np.ndarray:
    """A beating blob inside a speckled sector, a static text block top-left, an ECG trace at the bottom."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    frames = np.zeros((T, H, W), np.uint8)
    for t in range(T):
        f = np.zeros((H, W), np.float32)
        sector = (yy > 20) & (yy < 160) & (np.abs(xx - 130) < (yy - 20) * 0.8 + 5)
        f[sector] = rng.uniform(30, 120, sector.sum())
        r = 25 + 12 * np.sin(2 * np.pi * t / 20)
        f[(yy - 90) ** 2 + (xx - 130) ** 2 < r**2] = 10
        f[5:15, 5:40] = 255  # static text
        ecg_x = (t * 7) % W  # an ECG sweep below the sector
        f[185:188, max(0, ecg_x - 3):ecg_x + 3] = 255
        frames[t] = f.astype(np.uint8)
    return frames


def test_motion_region_excludes_text_and_ecg():
    y0, y1, x0, x1 = motion_region(echo_like())
    assert 15 <= y0 <= 30 and 150 <= y1 <= 165  # the sector's rows, not the ECG strip at 185
    assert x0 >= 15 and x1 <= 245  # the sector's width at its widest
    assert y0 > 15  # text block (rows 5..15) left out


def test_static_video_keeps_whole_frame():
    frames = np.full((10, 50, 60), 80, np.uint8)
    assert motion_region(frames) == (0, 50, 0, 60)


def test_resample_30_to_50_fps():
    idx = resample_indices(30, 30.0, 50.0)  # 1 s of video
    assert len(idx) == 49 and idx[0] == 0 and idx[-1] == 29
    assert np.all(np.diff(idx) >= 0) and np.all(np.diff(idx) <= 1)
    np.testing.assert_array_equal(resample_indices(100, 50.2, 50.0), np.arange(100))  # within tolerance
    assert len(resample_indices(100, 100.0, 50.0)) == 50


def test_square_pad_and_resize():
    frames = np.full((2, 40, 80), 200, np.uint8)
    out = crop_square_resize(frames, None, 20)
    assert out.shape == (2, 20, 20)
    assert out[0, 0, 10] == 0 and out[0, 10, 10] == 200  # letterboxed top, content in the middle
    same = np.random.default_rng(0).integers(0, 255, (3, 112, 112), dtype=np.uint8)
    assert crop_square_resize(same, (0, 50, 0, 50), 112) is same  # model-size frames are used as they are


def test_normalisation():
    spec = PreprocessSpec(size=16, fps=50, mean=100.0, std=50.0)
    frames = np.full((4, 16, 16), 150, np.uint8)
    out = preprocess_frames(frames, 50.0, spec)
    assert out.dtype == np.float32 and np.allclose(out, 1.0)


def test_clip_sampling():
    spec = PreprocessSpec(frames=4, period=2)
    np.testing.assert_array_equal(sample_clip_indices(100, spec, 10), [10, 12, 14, 16])
    np.testing.assert_array_equal(sample_clip_indices(5, spec, 0), [0, 2, 4, 1])  # short video loops
    assert sliding_clip_starts(20, spec, 5) == [0, 5, 10]  # span 7: last start 13
    assert sliding_clip_starts(3, spec, 5) == [0]


def test_real_echo_cine_end_to_end():
    video = read_video(examples.get_path("ybr_color"))
    y0, y1, x0, x1 = ultrasound_region(video)
    # The sector sits inside the 240x320 frame, away from the black border and the text columns.
    assert 20 < y0 < y1 < 230 and 60 < x0 < x1 < 280 and (y1 - y0) > 100 and (x1 - x0) > 100
    spec = PreprocessSpec(size=112, fps=50.0, mean=30.0, std=40.0)
    x = preprocess(video, spec)
    assert x.shape == (49, 112, 112) and x.dtype == np.float32 and np.isfinite(x).all()
    assert x.std() > 0.1


def test_preprocess_uses_dicom_region():
    frames = echo_like(T=12)
    video = Video(frames, 50.0, "mem", {"region": (20, 160, 30, 230)})
    assert ultrasound_region(video) == (20, 160, 30, 230)
    out = preprocess(video, PreprocessSpec(size=56, fps=50.0))
    expected = crop_square_resize(frames[:, 20:160, 30:230], None, 56).astype(np.float32)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("fps", [25.0, 50.0, 60.0])
def test_length_after_resampling(fps):
    video = Video(echo_like(T=30), fps, "mem", {})
    out = preprocess(video, PreprocessSpec(size=32, fps=50.0))
    assert abs(len(out) - round(29 * 50 / fps) - 1) <= 1
