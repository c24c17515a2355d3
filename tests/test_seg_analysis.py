"""LV segmentation at the edge (evim3.runtime.seg), on masks with real geometry: ellipses whose size follows a
known contraction at a known heart rate (their area-length EF is known in closed form), irregular rhythms,
noisy and missing frames, flat curves, and the synthetic generator's own LV with its EF label.

Tolerances stated at each test. numpy only.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
from evim3.runtime.outputs import lv_evidence, lv_masks
from evim3.runtime.seg import (
    FrameStitcher,
    analyse_lv,
    area_length_volume,
    contour,
    largest_component,
    long_axis_length,
    measure_lv,
)

from evim3.data.synth import _sample_heart

FPS = 50.0
SIZE = 112


def ellipse_mask(a: float, b: float, angle: float = 0.4, centre: tuple[float, float] = (56.0, 56.0),
                 size: int = SIZE, spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Pixels whose centres lie in the ellipse of semi-axes a (long) and b, in physical units of `spacing`."""
    yy, xx = np.mgrid[:size, :size]
    y, x = (yy - centre[0]) * spacing[0], (xx - centre[1]) * spacing[1]
    along = x * math.cos(angle) + y * math.sin(angle)
    across = -x * math.sin(angle) + y * math.cos(angle)
    return (along / a) ** 2 + (across / b) ** 2 <= 1


def contraction(phase: np.ndarray, systole_share: float = 0.35) -> np.ndarray:
    """0 at ED (phase 0), 1 at ES (phase = systole_share), cosine in and out: the synthetic generator's shape."""
    return np.where(phase < systole_share, 0.5 * (1 - np.cos(np.pi * phase / systole_share)),
                    0.5 * (1 + np.cos(np.pi * (phase - systole_share) / (1 - systole_share))))


def beating(beat_seconds: list[float], efs: list[float], fps: float = FPS, start_phase: float = 0.5,
            a0: float = 36.0, b0: float = 13.0, **shape) -> tuple[list[np.ndarray], list[int], list[int], list[float]]:
    """Masks of an LV beating with the given beat lengths and EFs, starting `start_phase` into a beat before
    the first; the ED and ES frames (nearest) of each whole beat and its exact area-length EF. `shape`: more
    arguments of ellipse_mask (angle, centre, size, spacing).

    The ellipse shrinks evenly (a and b by the same factor), so its area-length volume (8 A^2 / (3 pi L) with
    A = pi a b, L = 2 a: the prolate spheroid 4/3 pi a b^2) falls by the cube of that factor.
    """
    lengths = [beat_seconds[0], *beat_seconds]  # a lead-in beat, entered at start_phase
    eds = np.cumsum([0.0, *lengths])[:-1] - start_phase * lengths[0]
    ends = eds + np.array(lengths)
    shrink = [1 - (1 - ef / 100) ** (1 / 3) for ef in [efs[0], *efs]]
    times = np.arange(round(ends[-1] * fps)) / fps
    masks, ed_frames, es_frames, exact = [], [], [], []
    beat_of = np.searchsorted(ends, times, side="right")
    phase = (times - eds[beat_of]) / np.array(lengths)[beat_of]
    scale = 1 - np.array(shrink)[beat_of] * contraction(phase)
    for s in scale:
        masks.append(ellipse_mask(a0 * s, b0 * s, **shape))
    for k in range(1, len(lengths)):
        ed, es = round(eds[k] * fps), round((eds[k] + 0.35 * lengths[k]) * fps)
        if es < len(masks):
            ed_frames.append(ed)
            es_frames.append(es)
            exact.append(100 * (1 - (1 - shrink[k]) ** 3))
    return masks, ed_frames, es_frames, exact


def check_beats(report, ed_frames: list[int], es_frames: list[int], efs: list[float], ef_tol: float,
                frame_tol: int = 1) -> None:
    assert [b.ed_frame for b in report.beats] == pytest.approx(ed_frames, abs=frame_tol)
    assert [b.es_frame for b in report.beats] == pytest.approx(es_frames, abs=frame_tol)
    assert [b.ef for b in report.beats] == pytest.approx(efs, abs=ef_tol)


def test_area_length_volume_of_an_ellipse_is_its_prolate_spheroid() -> None:
    a, b = 4.1, 1.7
    assert area_length_volume(math.pi * a * b, 2 * a) == pytest.approx(4 / 3 * math.pi * a * b * b, rel=1e-12)


def _flood_fill_components(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Reference: 4-connected components by breadth-first flood fill, pixel by pixel: labels (0 outside the
    mask) and the size of each label (sizes[0] = 0)."""
    labels = np.zeros(mask.shape, int)
    sizes = [0]
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        sizes.append(0)
        queue = deque([start])
        labels[start] = len(sizes) - 1
        while queue:
            y, x = queue.popleft()
            sizes[-1] += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = len(sizes) - 1
                    queue.append((ny, nx))
    return labels, sizes


@pytest.mark.parametrize("density", [0.3, 0.5, 0.6])
def test_largest_component_matches_a_flood_fill_on_random_masks(density: float) -> None:
    """Fresh random masks around the percolation threshold (many components, long thin ones, touching
    diagonally): one whole component of the reference flood fill, of the largest size."""
    rng = np.random.default_rng(int(density * 10))
    for _ in range(30):
        mask = rng.random((rng.integers(1, 40), rng.integers(1, 40))) < density
        labels, sizes = _flood_fill_components(mask)
        got = largest_component(mask)
        if len(sizes) == 1:
            assert not got.any()
            continue
        label = labels[tuple(np.argwhere(got)[0])]
        np.testing.assert_array_equal(got, labels == label)
        assert sizes[label] == max(sizes)
    assert not largest_component(np.zeros((5, 7), bool)).any()


def test_largest_component_drops_islands_and_keeps_holes_out() -> None:
    mask = ellipse_mask(30, 12)
    lv = mask.copy()
    mask[5:8, 5:8] = True  # an island
    mask[56, 56] = False  # a hole
    got = largest_component(mask)
    assert got.sum() == lv.sum() - 1 and not got[5:8, 5:8].any()


@pytest.mark.parametrize("angle", [0.0, 0.4, math.pi / 4, 1.3, math.pi / 2])
def test_long_axis_is_the_ellipse_length_at_any_angle(angle: float) -> None:
    """2a within 1.5 px (pixel centres inside the ellipse: the extent of their squares differs from the
    continuous length by at most a pixel's diagonal)."""
    mask = ellipse_mask(30.3, 11.2, angle)
    assert long_axis_length(mask) == pytest.approx(2 * 30.3, abs=1.5)


def test_long_axis_in_physical_units_with_non_square_pixels() -> None:
    """An ellipse of 3 cm x 1.2 cm semi-axes drawn on 0.05 x 0.08 cm pixels: its long axis in cm within one
    pixel's diagonal, and its area within 3 %."""
    spacing = (0.05, 0.08)
    mask = ellipse_mask(3.0, 1.2, 0.7, spacing=spacing)
    got = measure_lv(mask, spacing)
    assert got.length == pytest.approx(6.0, abs=math.hypot(*spacing))
    assert got.area_px * spacing[0] * spacing[1] == pytest.approx(math.pi * 3.0 * 1.2, rel=0.03)


def test_stitcher_averages_overlapping_clips_and_leaves_uncovered_frames_empty() -> None:
    """Clips of 4 frames every 2nd frame (period 2), starts 0, 3, 6 over 14 frames: frames 1, 11 and 13 are in
    no clip. Mask = mean evidence > 0, on fresh random evidence."""
    rng = np.random.default_rng(0)
    stitcher = FrameStitcher()
    sums, counts = np.zeros((14, 6, 5)), np.zeros(14)
    for start in (0, 3, 6):
        indices = start + 2 * np.arange(4)
        evidence = rng.normal(size=(4, 6, 5)).astype(np.float32)
        stitcher.add(indices, evidence)
        sums[indices] += evidence
        counts[indices] += 1
        stitcher.finish_before(start + 3)
    stitcher.finish_before(14)
    masks = list(stitcher.masks())
    assert len(masks) == 14
    for frame, mask in enumerate(masks):
        if counts[frame] == 0:
            assert mask is None
        else:
            np.testing.assert_array_equal(mask, sums[frame] / counts[frame] > 0)
    assert [i for i, m in enumerate(masks) if m is None] == [1, 11, 13]
    with pytest.raises(ValueError, match="already settled"):
        stitcher.add(np.array([0]), np.zeros((1, 6, 5), np.float32))


def test_lv_evidence_is_the_rule_of_lv_masks() -> None:
    outputs = np.random.default_rng(1).normal(size=(2, 2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(lv_evidence(outputs) > 0, lv_masks(outputs))
    np.testing.assert_allclose(lv_evidence(outputs), outputs[:, 1] - outputs[:, 0])


@pytest.mark.parametrize("bpm,ef", [(40, 60.0), (75, 55.0), (120, 35.0), (180, 50.0)])
def test_regular_rhythm_beats_at_the_right_frames_with_the_exact_ef(bpm: float, ef: float) -> None:
    """Every whole beat found (none invented at the video's ends), ED and ES within a frame, EF within 1.5
    points of the exact area-length EF (pixelised ellipses of ~35 x 13 px)."""
    beats = [60 / bpm] * max(3, round(4 * bpm / 60))
    masks, eds, ess, efs = beating(beats, [ef] * len(beats))
    report = analyse_lv(masks, FPS)
    check_beats(report, eds, ess, efs, ef_tol=1.5)
    assert report.ef_mean == pytest.approx(ef, abs=1.5) and report.ef_sd < 1.0
    assert report.no_beat_reason is None and report.covered_frames == len(masks)


def test_irregular_rhythm_gives_each_beat_its_own_ef() -> None:
    """Beats of 0.5 to 1.3 s (an arrhythmia: 46 to 120 bpm from beat to beat), each with its own EF."""
    beats, efs = [0.8, 0.5, 1.3, 0.6, 0.9], [55.0, 30.0, 65.0, 40.0, 50.0]
    masks, eds, ess, exact = beating(beats, efs)
    report = analyse_lv(masks, FPS)
    check_beats(report, eds, ess, exact, ef_tol=1.5)
    assert report.ef_sd == pytest.approx(np.std(exact, ddof=1), abs=1.0)


def test_noisy_and_missing_frames_make_no_beats_of_their_own() -> None:
    """Pixel flips (1 %: islands and holes), whole frames of a spurious blob, and frames no clip covered
    (None, every 7th and a run of 5): the same beats, EF within 2.5 points, ED/ES within 2 frames (the noise
    moves the flat top or bottom of the curve by a frame; a missing frame there, by one more)."""
    rng = np.random.default_rng(3)
    beats = [0.75] * 5
    masks, eds, ess, efs = beating(beats, [50.0] * 5)
    noisy: list[np.ndarray | None] = [m ^ (rng.random(m.shape) < 0.01) for m in masks]
    for i in range(0, len(noisy), 7):
        noisy[i] = None
    for i in range(60, 65):
        noisy[i] = None
    for i in (20, 95):
        noisy[i] = noisy[i] | ellipse_mask(8, 8, centre=(15.0, 15.0))  # a second blob: not the LV
    report = analyse_lv(noisy, FPS)
    check_beats(report, eds, ess, efs, ef_tol=2.5, frame_tol=2)
    assert f"{sum(m is None for m in noisy)} of {len(noisy)} frames are in no clip: no mask" in report.notes


@pytest.mark.parametrize("jitter", [0.0, 0.015])
def test_a_flat_curve_has_no_beat_and_says_so(jitter: float) -> None:
    """A still LV, exactly or with random +-1.5 % area noise (boundary flicker): no beat, a reason, no EF."""
    rng = np.random.default_rng(5)
    masks = [ellipse_mask(36 * (1 + jitter * rng.uniform(-1, 1)), 13) for _ in range(150)]
    report = analyse_lv(masks, FPS)
    assert report.beats == [] and report.ef_mean is None and report.ef_sd is None
    assert report.no_beat_reason.startswith("no beat found: the LV area varies by")


def test_empty_masks_have_no_beat() -> None:
    report = analyse_lv([np.zeros((8, 8), bool)] * 20, FPS)
    assert report.beats == [] and report.no_beat_reason == "no beat found: 0 frames with an LV mask"
    assert report.notes == ["20 of 20 frames have an empty mask: no LV found"]


def test_areas_in_cm2_and_volumes_in_ml_with_a_spacing() -> None:
    """With a pixel spacing: areas in cm^2, volumes in mL (area-length of cm^2 and cm), the same EF."""
    masks, *_ = beating([0.8] * 3, [60.0] * 3)
    plain, physical = analyse_lv(masks, FPS), analyse_lv(masks, FPS, (0.03, 0.03), "PixelSpacing")
    assert [b.ef for b in physical.beats] == pytest.approx([b.ef for b in plain.beats], abs=1e-9)
    beat = physical.beats[0]
    assert beat.ed_area_cm2 == pytest.approx(beat.ed_area_px * 0.03**2)
    assert beat.edv_ml == pytest.approx(area_length_volume(beat.ed_area_cm2, beat.ed_length))
    assert beat.edv_ml == pytest.approx(4 / 3 * math.pi * 36 * 13**2 * 0.03**3, rel=0.05)
    assert plain.beats[0].edv_ml is None and plain.area_cm2() is None
    assert physical.to_dict()["frame_area_cm2"][0] == pytest.approx(physical.area_px[0] * 0.03**2)


def test_synthetic_generators_lv_gives_its_ef_label_beat_after_beat() -> None:
    """The LV cavity the synthetic generator draws (its soft masks at 0.5), 5 s at 50 fps: every beat's EF
    within 2 points of the video's label (measured: at most 0.7 off), the first labelled ED/ES within a frame."""
    for seed in range(4):
        rng = np.random.default_rng(seed)
        heart = _sample_heart(rng, SIZE, SIZE, 50, 250)
        lv = heart.chambers[0]
        ys, xs = (grid[None].astype(np.float32) for grid in np.mgrid[0:SIZE, 0:SIZE])
        cavity = lv.masks(xs, ys, slice(0, heart.num_frames)).cavity
        area = cavity.sum(axis=(1, 2), dtype=np.float64)
        volume = {f: area_length_volume(area[f], float(np.linalg.norm(np.subtract(*lv.apex_and_base(f)))))
                  for f in (heart.ed_frame, heart.es_frame)}
        label = 100 * (volume[heart.ed_frame] - volume[heart.es_frame]) / volume[heart.ed_frame]
        report = analyse_lv(list(cavity > 0.5), 50.0)
        assert len(report.beats) >= 4
        assert [b.ef for b in report.beats] == pytest.approx([label] * len(report.beats), abs=2.0)
        traced = [b for b in report.beats if abs(b.ed_frame - heart.ed_frame) <= 1]
        assert not traced or abs(traced[0].es_frame - heart.es_frame) <= 1


def test_contour_is_the_border_of_the_mask() -> None:
    mask = np.zeros((7, 7), bool)
    mask[1:6, 2:5] = True
    border = contour(mask)
    assert border.sum() == mask.sum() - 3 and not border[2:5, 3].any() and border[1, 2:5].all()
