"""The one preprocessing: each step on constructed frames, clip sampling, and the real echo cine end to end."""

from __future__ import annotations

import numpy as np
import pytest
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.preprocess import (
    frames_to_input,
    motion_region,
    resample_indices,
    sample_clip_indices,
    sliding_clip_starts,
    square_resize,
    stream_to_uint8,
    ultrasound_region,
    video_to_input,
)
from evim3.runtime.video import Video, read_video
from PIL import Image
from pydicom import examples

SPEC = PreprocessSpec(size=112, fps=50.0, frames=16, period=2, mean=40.0, std=50.0)


def fan(height: int, width: int, apex: tuple[int, int], radius: float, half_angle_deg: float) -> np.ndarray:
    """Mask of an ultrasound sector: apex at the top, opening downwards."""
    yy, xx = np.mgrid[:height, :width]
    dy, dx = yy - apex[0], xx - apex[1]
    within_angle = np.abs(np.arctan2(dx, np.maximum(dy, 1e-9))) <= np.radians(half_angle_deg)
    return (dy >= 0) & within_angle & (dy**2 + dx**2 <= radius**2)


def echo_screen(num_frames: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Frames of a scanner screen, and the sector mask: speckle that changes in a sector, static text at the
    top left, a blinking cursor at the top right and a sweeping ECG trace below the sector."""
    rng = np.random.default_rng(0)
    height, width = 120, 160
    sector = fan(height, width, apex=(20, 80), radius=80, half_angle_deg=40)
    frames = np.zeros((num_frames, height, width), np.uint8)
    frames[:, sector] = rng.integers(30, 200, (num_frames, int(sector.sum())))
    frames[:, 3:12, 4:40:6] = 230  # "text": static bars
    frames[::2, 4:8, 150:154] = 255  # a cursor blinking at half the frame rate
    columns = np.arange(width)
    for t in range(num_frames):  # an ECG trace, one pixel thick, sweeping to the right
        frames[t, (111 + 4 * np.sin(2 * np.pi * (columns - 4 * t) / 40)).round().astype(int), columns] = 200
    return frames, sector


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


# --- the ultrasound region ---

def test_motion_region_is_the_sector_without_text_cursor_or_ecg() -> None:
    frames, sector = echo_screen()
    region = ultrasound_region(Video(frames, 50.0, "screen", {"region": None}))
    np.testing.assert_allclose(region, bounding_box(sector), atol=3)
    y0, y1, _, x1 = region
    assert y1 < 106 and y0 > 12 and x1 < 150  # below the text and cursor, above the ECG


def test_a_dicom_region_is_taken_as_it_is() -> None:
    frames, _ = echo_screen()
    assert ultrasound_region(Video(frames, 50.0, "screen", {"region": (5, 50, 10, 90)})) == (5, 50, 10, 90)


def test_still_video_or_only_a_blinking_cursor_keeps_the_whole_frame() -> None:
    frames = np.full((20, 64, 80), 90, np.uint8)
    assert motion_region(frames) == (0, 64, 0, 80)
    frames[::2, 4:8, 70:74] = 255
    assert motion_region(frames) == (0, 64, 0, 80)


def test_thin_margins_are_not_cropped() -> None:
    """An EchoNet-style video: the sector fills the 112x112 frame but for its top corners."""
    rng = np.random.default_rng(1)
    frames = np.zeros((30, 112, 112), np.uint8)
    sector = fan(112, 112, apex=(0, 56), radius=200, half_angle_deg=45)
    frames[:, sector] = rng.integers(20, 220, (30, int(sector.sum())))
    assert motion_region(frames) == (0, 112, 0, 112)
    # ... so preprocessing at the video's own size and rate is normalisation alone.
    expected = (frames.astype(np.float32) - np.float32(SPEC.mean)) / np.float32(SPEC.std)
    np.testing.assert_array_equal(video_to_input(Video(frames, 50.0, "echonet", {"region": None}), SPEC), expected)


# --- square and resize ---

def test_square_resize_keeps_the_aspect_ratio_with_symmetric_black_bars() -> None:
    frames = np.full((3, 50, 100), 200, np.uint8)  # wide: scaled by 112/100 to 56x112, then padded
    squared = square_resize(frames, 112)
    assert squared.shape == (3, 112, 112) and squared.dtype == np.uint8
    assert (squared[:, :28] == 0).all() and (squared[:, 84:] == 0).all()
    assert (squared[:, 28:84] == 200).all()


@pytest.mark.parametrize("side,method", [(224, Image.Resampling.BOX), (56, Image.Resampling.BICUBIC)])
def test_area_averaging_when_shrinking_bicubic_when_enlarging(side: int, method: Image.Resampling) -> None:
    frame = np.random.default_rng(2).integers(0, 256, (side, side), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(frame).resize((112, 112), method))
    np.testing.assert_array_equal(square_resize(frame[None], 112)[0], expected)


def test_frames_of_the_right_size_are_not_resampled() -> None:
    frames = np.random.default_rng(3).integers(0, 256, (4, 112, 112), dtype=np.uint8)
    assert square_resize(frames, 112) is frames


# --- time ---

def test_30_to_50_fps_keeps_the_duration_and_takes_the_nearest_frame() -> None:
    indices = resample_indices(30, 30.0, 50.0)
    assert len(indices) == 50  # one second either way
    np.testing.assert_array_equal(indices[:8], [0, 0, 1, 2, 2, 3, 3, 4])
    np.testing.assert_array_equal(indices, np.floor((np.arange(50) + 0.5) * 30 / 50))
    assert set(indices) == set(range(30)) and indices[-1] == 29 and (np.diff(indices) >= 0).all()


def test_downsampling_and_rates_within_half_a_frame_per_second() -> None:
    np.testing.assert_array_equal(resample_indices(10, 100.0, 50.0), [1, 3, 5, 7, 9])
    np.testing.assert_array_equal(resample_indices(7, 50.4, 50.0), np.arange(7))
    with pytest.raises(ValueError, match="positive"):
        resample_indices(7, 0.0, 50.0)


def test_preprocess_resamples_the_frames_themselves() -> None:
    """Each output frame is a normalised source frame: 30 distinct flat frames at 30 fps, whole-frame region."""
    frames = np.repeat(np.arange(0, 240, 8, dtype=np.uint8), 112 * 112).reshape(30, 112, 112)
    out = frames_to_input(frames, 30.0, SPEC, region=(0, 112, 0, 112))
    assert out.shape == (50, 112, 112) and out.dtype == np.float32
    source_levels = out[:, 0, 0] * SPEC.std + SPEC.mean
    np.testing.assert_allclose(source_levels, frames[resample_indices(30, 30.0, 50.0), 0, 0], atol=1e-4)


# --- normalisation, and one path for files and streams ---

def test_normalisation() -> None:
    frames = np.random.default_rng(4).integers(0, 256, (5, 112, 112), dtype=np.uint8)
    out = frames_to_input(frames, 50.0, SPEC, region=(0, 112, 0, 112))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (frames - 40.0) / 50.0, rtol=1e-6)


@pytest.mark.parametrize("fps", [30.0, 50.2, 100.0, 24.0, 60.0, 17.3])
def test_streamed_preparation_equals_resampling_the_whole_stack(fps: float) -> None:
    """stream_to_uint8, frame by frame, against the whole-array definition: crop, square_resize of the frames
    resample_indices picks (the rounding at the end included). Exact: the same pixels are chosen."""
    rng = np.random.default_rng(int(fps * 10))
    for num_frames in (1, 2, 7, 53):
        frames = rng.integers(0, 256, (num_frames, 40, 60), dtype=np.uint8)
        region = (3, 37, 5, 55)
        streamed = np.stack(list(stream_to_uint8(iter(frames), fps, SPEC, region)))
        expected = square_resize(frames[resample_indices(num_frames, fps, SPEC.fps), 3:37, 5:55], SPEC.size)
        np.testing.assert_array_equal(streamed, expected)


def test_stream_frames_without_a_region_preprocess_as_a_file_does() -> None:
    frames, _ = echo_screen()
    video = Video(frames, 30.0, "screen", {"region": None})
    np.testing.assert_array_equal(frames_to_input(frames, 30.0, SPEC), video_to_input(video, SPEC))


def test_frames_must_be_a_stack_of_gray_images() -> None:
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        frames_to_input(np.zeros((112, 112), np.uint8), 50.0, SPEC)


# --- clips ---

def test_clip_indices_step_by_the_period_and_loop_a_short_video() -> None:
    np.testing.assert_array_equal(sample_clip_indices(100, SPEC, 10), 10 + 2 * np.arange(16))
    looped = sample_clip_indices(20, SPEC, 0)  # a clip spans 31 frames
    np.testing.assert_array_equal(looped, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 0, 2, 4, 6, 8, 10])


def test_sliding_clip_starts() -> None:
    assert SPEC.clip_span == 31
    assert sliding_clip_starts(100, SPEC, 16) == [0, 16, 32, 48, 64]  # 64 + 31 <= 100 < 80 + 31
    assert sliding_clip_starts(31, SPEC, 16) == [0]
    assert sliding_clip_starts(10, SPEC, 16) == [0]  # shorter than a clip: one looped clip
    with pytest.raises(ValueError, match="stride"):
        sliding_clip_starts(100, SPEC, 0)


# --- the real echo ---

def test_real_echo_cine_end_to_end() -> None:
    video = read_video(examples.get_path("ybr_color"))  # 30 frames of 240x320 at 30 fps
    y0, y1, x0, x1 = ultrasound_region(video)
    assert 0 <= y0 < y1 <= 240 and 0 <= x0 < x1 <= 320
    assert y1 - y0 > 120 and x1 - x0 > 120  # the sector, not a part of it
    # The black border, the text on both sides and the status bar at the bottom are left out.
    assert x0 > 60 and x1 < 290 and y0 > 15 and y1 < 220
    assert video.frames[:, :, :x0 - 20].mean() < 5 and video.frames[:, :, x1 + 5:290].mean() < 5

    out = video_to_input(video, SPEC)
    assert out.shape == (50, 112, 112) and out.dtype == np.float32 and np.isfinite(out).all()
    assert out.std() > 0.3  # a picture, not a blank
