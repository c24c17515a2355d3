"""The public API, evim3.runtime.load(...).predict(...): every kind of source gives the same result as
`evim3 infer` (the golden record), seg results map back to source frames and pixels, no torch needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import evim3.runtime as rt
import numpy as np
import pydicom
import pytest
from evim3.runtime.errors import EchoInputError, ModelFileError
from evim3.runtime.preprocess import preprocessed_points, resample_indices
from evim3.runtime.video import read_video
from golden import make_inputs, model_paths, read_golden
from test_package import BLOCK_TORCH, run_python
from test_seg_analysis import beating
from test_seg_infer import echo_frames
from test_video import ultrasound_region_item, write_dicom


@pytest.fixture(scope="module")
def golden_case(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("api")
    return {"sources": make_inputs(work, synth_dataset), "models": model_paths(work), "work": work}


def entry(result: rt.Result) -> dict:
    """A result's --json entry with its source cut to the file name, as the golden record keeps it."""
    d = json.loads(json.dumps(result.to_dict()))
    return {**d, "source": os.path.basename(d["source"])}


@pytest.mark.parametrize("model", ["ef", "cls2", "cls3", "threshold"])
def test_predict_gives_the_entries_infer_writes(golden_case: dict, model: str) -> None:
    """to_dict() is `evim3 infer --json`'s entry for the source, and .ef its "ef" (a seg model's: lv.ef_mean)."""
    from golden import differences

    record = read_golden()[model]["json"]["sources"]
    with rt.load(golden_case["models"][model], threads=1) as loaded:
        results = [loaded.predict(source) for source in golden_case["sources"]]
    for result, want in zip(results, record):
        assert differences(entry(result), want, model) == []
        ef = want["lv"]["ef_mean"] if model == "threshold" else want.get("ef")
        assert result.ef == pytest.approx(ef, rel=1e-6) if ef is not None else result.ef is None


def test_a_dataset_a_path_and_frames_give_the_same_result(golden_case: dict) -> None:
    dicom = golden_case["sources"][-1]
    with rt.load(golden_case["models"]["ef"], threads=1) as loaded:
        by_path = loaded.predict(Path(dicom))
        by_dataset = loaded.predict(pydicom.dcmread(dicom))
        video = read_video(dicom)
        by_frames = loaded.predict(iter(video.frames), fps=video.fps, name="cine")
        rgb = loaded.predict([np.repeat(f[..., None], 3, axis=2) for f in video.frames], fps=video.fps)
    assert by_dataset.ef == by_path.ef and [c.values for c in by_dataset.clips] == [c.values for c in by_path.clips]
    assert by_dataset.source.source.startswith("DICOM ") and by_dataset.source.spacing_cm == (0.02, 0.02)
    # Frames carry no DICOM region: the crop is found from the motion, as for a video file.
    assert by_frames.source.source == "cine" and by_frames.source.spacing_cm is None
    assert rgb.ef == by_frames.ef  # gray RGB is its gray


def test_seg_beats_masks_and_provenance_map_back_to_the_source(tmp_path: Path) -> None:
    """A 25 fps DICOM cine, 96 x 128 with its stated region at columns 16..111 and 0.02 cm pixels: the crop
    box is the region, resized to 64 x 64; model frames (50 fps) come from every source frame twice; each
    beat's ED/ES source frame is its model frame's; mask pixels map back through the crop."""
    masks, *_ = beating([0.8] * 3, [45.0] * 3, fps=25.0, a0=33.0, b0=13.5, centre=(48.0, 64.0), size=128)
    frames = echo_frames([m[16:112] for m in masks], seed=3)
    region = ultrasound_region_item(1, 0, 95, 16, 111)
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.02
    path = write_dicom(tmp_path / "cine.dcm", frames, FrameTime=40, SequenceOfUltrasoundRegions=[region])
    with rt.load(model_paths(tmp_path)["threshold"]) as loaded:
        assert loaded.task == "seg" and loaded.meta.preprocess.size == 64
        result = loaded.predict(path)
    source = result.source
    assert source.crop_box == (16, 0, 112, 96) and source.resized_to == (64, 64)
    assert source.fps == pytest.approx(25.0) and source.num_frames == len(frames)
    assert source.model_frames == len(result.masks) == 2 * len(frames)
    np.testing.assert_array_equal(source.source_frames(), resample_indices(len(frames), 25.0, 50.0))
    assert source.model_spacing_cm == pytest.approx((0.03, 0.03))
    assert result.beats and result.ef == result.raw.lv.ef_mean
    for beat in result.beats:
        assert beat.ed_source_frame == beat.beat.ed_frame // 2 and beat.es_source_frame == beat.beat.es_frame // 2
    points = np.array([[20.0, 30.0], [111.0, 0.0], [16.0, 95.0]])
    np.testing.assert_allclose(source.to_source_xy(preprocessed_points(points, source.region, 64)), points)
    assert source.to_dict()["crop_box"] == [16, 0, 112, 96]
    assert result.timings.clips == len(result.clips) and "inference per batch" in result.timings.stages


def test_bad_sources_raise_one_line(golden_case: dict, tmp_path: Path) -> None:
    with rt.load(golden_case["models"]["ef"]) as loaded:
        with pytest.raises(EchoInputError, match="no such file"):
            loaded.predict(tmp_path / "missing.avi")
        with pytest.raises(ValueError, match="fps"):
            loaded.predict([np.zeros((32, 32), np.uint8)] * 40)
        with pytest.raises(EchoInputError, match="too short"):
            loaded.predict([np.zeros((32, 32), np.uint8)] * 3, fps=50)
        assert not loaded.analyse(tmp_path / "missing.avi").ok  # the form that reports instead of raising
    with pytest.raises(ModelFileError, match="model file not found"):
        rt.load(tmp_path / "none.onnx")


def test_load_and_predict_without_torch(golden_case: dict) -> None:
    run_python(BLOCK_TORCH + f"""
import numpy as np
import evim3.runtime as rt
frames = [np.full((40, 40), 40 + (i % 10) * 10, np.uint8) for i in range(60)]
with rt.load({golden_case['models']['ef']!r}) as model:
    assert model.task == "ef"
    result = model.predict(frames, fps=25)
assert result.ef is not None and result.to_dict()["ef"] == result.ef
""", golden_case["work"])


def test_check_takes_the_first_clip_infer_cuts(golden_case: dict) -> None:
    """`evim3 check`'s video clips come from the same streamed preprocessing and clip cutting as `evim3 infer`:
    equal to the first clip of the whole preprocessed video (looped when shorter than a clip)."""
    from evim3.runtime.meta import PreprocessSpec
    from evim3.runtime.parity_check import video_clip
    from evim3.runtime.preprocess import sample_clip_indices, video_to_input

    for spec in (PreprocessSpec(size=32, frames=8, mean=30.0, std=40.0),
                 PreprocessSpec(size=64, frames=40, period=2, mean=30.0, std=40.0)):  # longer than the videos
        for path in golden_case["sources"]:
            frames = video_to_input(read_video(path), spec)
            np.testing.assert_array_equal(video_clip(path, spec), frames[sample_clip_indices(len(frames), spec)][None])
