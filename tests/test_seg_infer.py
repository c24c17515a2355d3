"""`evim3 infer --model seg.onnx` end to end: real ONNX Runtime sessions, real decoding, real numbers.

The seg model is a real, if trivial, segmenter built with onnx.helper: it calls a pixel LV where the clip is
darker than a threshold (LV minus background logit = k * (threshold - pixel)), and carries real evim3
metadata (task "seg"). The videos are drawn with numpy: bright, noisy tissue around one dark blood pool, an
ellipse beating at a known rate with a known area-length EF. So the test knows every frame's mask (the
threshold on the decoded, preprocessed frames), every ED and ES and every beat's EF.
"""

from __future__ import annotations

import csv
import json
import math
import os

import av
import numpy as np
import onnx
import pytest
from evim3.cli.main import app
from evim3.runtime.backends import open_backend
from evim3.runtime.errors import ModelFileError
from evim3.runtime.infer import InferencePipeline
from evim3.runtime.meta import INPUT_NAME, META_KEY, OUTPUT_NAME, ModelMeta, PreprocessSpec
from evim3.runtime.preprocess import (
    resized_shape,
    resized_spacing,
    sample_clip_indices,
    sliding_clip_starts,
    video_to_uint8,
)
from evim3.runtime.seg import largest_component
from evim3.runtime.video import read_video
from onnx import TensorProto, helper, numpy_helper
from test_infer_cli import _run_cli
from test_runtime import make_contract_onnx
from test_seg_analysis import beating
from test_video import ultrasound_region_item, write_dicom, write_video
from typer.testing import CliRunner

runner = CliRunner()
# 16 frames every 2nd at 50 fps: a clip spans 31 frames (0.62 s); the default stride is 15 frames.
SPEC = PreprocessSpec(size=64, fps=50.0, frames=16, period=2, mean=100.0, std=50.0)
SEG_META = ModelMeta(preset="threshold", model={}, preprocess=SPEC, task="seg")
THRESHOLD = 95  # gray level between the blood pool (~20) and the tissue (~170)
BEATS, EF = [0.75] * 5, 50.0  # 80 bpm


def make_threshold_seg_onnx(path: str | os.PathLike, meta: ModelMeta = SEG_META, frames: int | None = None) -> str:
    """A real seg graph: background logit = k * (pixel - THRESHOLD), LV logit = its negative, on the
    normalised clip; output (N, 2, T, S, S). `frames` overrides the graph's clip length."""
    spec = meta.preprocess
    shape = ["N", 1, frames or spec.frames, spec.size, spec.size]
    graph = helper.make_graph(
        [helper.make_node("Sub", [INPUT_NAME, "threshold"], ["above"]),
         helper.make_node("Mul", ["above", "gain"], ["background"]),
         helper.make_node("Neg", ["background"], ["lv"]),
         helper.make_node("Concat", ["background", "lv"], [OUTPUT_NAME], axis=1)],
        "threshold_seg",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 2, *shape[2:]])],
        [numpy_helper.from_array(np.array((THRESHOLD - spec.mean) / spec.std, np.float32), "threshold"),
         numpy_helper.from_array(np.array(4.0, np.float32), "gain")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    helper.set_model_props(model, {META_KEY: meta.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(path))
    return os.fspath(path)


def echo_frames(masks: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """uint8 frames: tissue 170 +- 25 (fresh noise every frame, so the motion crop keeps the whole picture),
    blood pool 20 +- 10 where the mask is."""
    rng = np.random.default_rng(seed)
    stack = np.stack(masks)
    tissue = 170 + rng.integers(-25, 26, stack.shape)
    blood = 20 + rng.integers(-10, 11, stack.shape)
    return np.where(stack, blood, tissue).astype(np.uint8)


def reference_areas(path: str, spec: PreprocessSpec, stride: int) -> list[float | None]:
    """The LV area of every preprocessed frame that a clip covers (the clips every `stride` frames, and one
    aligned to the video's end): the largest region under THRESHOLD."""
    frames = video_to_uint8(read_video(path), spec)
    starts = sliding_clip_starts(len(frames), spec, stride)
    if starts[-1] + spec.clip_span < len(frames):
        starts.append(len(frames) - spec.clip_span)
    covered = {int(i) for start in starts for i in sample_clip_indices(len(frames), spec, start)}
    return [float(largest_component(f < THRESHOLD).sum()) if i in covered else None for i, f in enumerate(frames)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("seg")
    masks, eds, ess, efs = beating(BEATS, [EF] * len(BEATS), a0=22.0, b0=9.0, centre=(32.0, 32.0), size=64)
    still = [masks[0]] * 100
    return {
        "seg": make_threshold_seg_onnx(root / "seg.onnx"),
        "ef": make_contract_onnx(root / "ef.onnx", ModelMeta(preset="contract", model={}, preprocess=SPEC)),
        "video": os.fspath(write_video(root / "beating.avi", echo_frames(masks), fps=50)),
        "still": os.fspath(write_video(root / "still.avi", echo_frames(still, seed=1), fps=50)),
        "truth": (eds, ess, efs),
        "root": root,
    }


# Odd strides (the default is 31): with period 2, clips alternate between the even and the odd frames, so every
# frame after the first half clip has a mask. An even stride leaves the odd frames to none (a 25 fps curve).
@pytest.mark.parametrize("stride,batch", [(None, 1), (7, 3), (13, 2)])
def test_pipeline_masks_are_the_segmenters_and_beats_are_the_drawn_ones(files: dict, stride: int | None,
                                                                        batch: int) -> None:
    """Every covered frame's LV area equals the threshold applied to the same preprocessed frame (exact: the
    overlapping clips average identical logits), whatever the stride and batch; frames no clip covers have
    none; every beat's ED and ES within a frame of the drawn ones and its EF within 2.5 points of the exact
    area-length EF (64-px frames)."""
    with open_backend(files["seg"]) as backend:
        pipeline = InferencePipeline(backend, stride=stride, batch=batch)
        result = pipeline.run_file(files["video"])
    assert result.ok and result.lv is not None and "ef" not in result.to_dict([])
    assert result.lv.area_px == reference_areas(files["video"], SPEC, pipeline.stride)
    # Period 2: the odd frames of the first half clip have no mask; the last ones do (a clip aligned to the end).
    assert result.lv.area_px[1] is None and result.lv.area_px[-1] is not None
    eds, ess, efs = files["truth"]
    got = [(b.ed_frame, b.es_frame) for b in result.lv.beats]
    assert len(got) == len(eds)
    assert np.abs(np.subtract(got, list(zip(eds, ess)))).max() <= 1
    assert [b.ef for b in result.lv.beats] == pytest.approx(efs, abs=2.5)
    assert result.lv.spacing_cm is None and result.lv.clips == len(result.clips)


def test_a_video_shorter_than_a_clip_is_looped_onto_its_own_frames(files: dict, tmp_path) -> None:
    """28 frames (0.56 s) under the 31-frame clip: one looped clip, its frames stitched back onto the video's
    own (the even ones and, wrapped, the odd ones up to 2 * 15 - 28), and no beat in half a beat."""
    masks, *_ = beating(BEATS[:1], [EF], a0=22.0, b0=9.0, centre=(32.0, 32.0), size=64)
    path = os.fspath(write_video(tmp_path / "short.avi", echo_frames(masks[:28]), fps=50))
    with open_backend(files["seg"]) as backend:
        result = InferencePipeline(backend).run_file(path)
    assert result.ok and len(result.clips) == 1 and result.real_share < 1
    assert result.lv.area_px == reference_areas(path, SPEC, SPEC.default_stride)
    assert result.lv.beats == [] and result.lv.no_beat_reason.startswith("no beat found")


def test_infer_seg_writes_beats_to_json_csv_overlay_and_plot(files: dict, tmp_path) -> None:
    out = {k: os.fspath(tmp_path / f"out.{k}") for k in ("json", "csv", "png", "mp4")}
    result = runner.invoke(app, ["infer", files["video"], "--model", files["seg"], "--json", out["json"],
                                 "--csv", out["csv"], "--plot", out["png"], "--overlay", out["mp4"]])
    assert result.exit_code == 0, result.output
    assert "EF % (beats)" in result.stdout and "LV area ED → ES" in result.stdout
    assert "LV areas in pixels of the model's frame: the file states no pixel spacing" in result.stdout
    with open(out["json"]) as f:
        doc = json.load(f)
    source = doc["sources"][0]
    lv = source["lv"]
    assert doc["task"] == "seg" and "ef" not in source and lv["num_beats"] == len(files["truth"][0])
    assert lv["ef_mean"] == pytest.approx(EF, abs=2.5) and lv["ef_sd"] < 2.0
    assert lv["frame_area_px"] == reference_areas(files["video"], SPEC, SPEC.default_stride)
    assert lv["frame_area_cm2"] is None and lv["beats"][0]["edv_ml"] is None
    with open(out["csv"], newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert "clip_ef" not in row and "ef" not in row
    assert [int(v) for v in row["beat_ed_frame"].split(";")] == [b["ed_frame"] for b in lv["beats"]]
    assert [float(v) for v in row["beat_ef"].split(";")] == pytest.approx([b["ef"] for b in lv["beats"]], abs=1e-4)
    assert len(row["frame_lv_area_px"].split(";")) == lv["frames"]
    assert float(row["lv_ef_mean"]) == pytest.approx(lv["ef_mean"], abs=1e-4)
    assert os.path.getsize(out["png"]) > 0
    check_overlay(out["mp4"], lv)


def check_overlay(path: str, lv: dict) -> None:
    """The overlay has every resampled frame, 4x the model's size, at its fps; the ED frame of the first beat
    shows red contour pixels on the blood pool's border, an ES frame blue ones."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert (stream.height, stream.width) == (4 * SPEC.size, 4 * SPEC.size)
        assert float(stream.average_rate) == pytest.approx(SPEC.fps)
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(stream)]
    assert len(frames) == lv["frames"]

    def share(frame: np.ndarray, rgb: tuple[int, int, int]) -> float:
        return float(np.mean(np.abs(frame - rgb).sum(axis=2) < 90))

    beat = lv["beats"][0]
    assert share(frames[beat["ed_frame"]], (255, 60, 60)) > 0.005
    assert share(frames[beat["es_frame"]], (60, 160, 255)) > 0.005
    assert share(frames[beat["ed_frame"]], (60, 160, 255)) < 0.001


def test_ef_and_seg_models_report_both_efs_side_by_side(files: dict, tmp_path) -> None:
    out_json, out_csv = os.fspath(tmp_path / "both.json"), os.fspath(tmp_path / "both.csv")
    out_png = os.fspath(tmp_path / "both.png")
    result = runner.invoke(app, ["infer", files["video"], "--model", files["ef"], "--model", files["seg"],
                                 "--json", out_json, "--csv", out_csv, "--plot", out_png], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "source" in line)
    assert "EF %" in header.replace("EF % (beats)", "") and "EF % (beats)" in header
    with open(out_json) as f:
        doc = json.load(f)
    source = doc["sources"][0]
    assert doc["task"] == "ef" and [m["task"] for m in doc["models"]] == ["ef", "seg"]
    assert source["ef"] is not None and source["lv"]["ef_mean"] == pytest.approx(EF, abs=2.5)
    with open(out_csv, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["ef"]) == pytest.approx(source["ef"], abs=1e-3) and row["lv_num_beats"] == "5"
    assert os.path.getsize(out_png) > 0


def test_a_still_heart_has_no_beat_and_says_so(files: dict, tmp_path) -> None:
    out_json = os.fspath(tmp_path / "still.json")
    result = runner.invoke(app, ["infer", files["still"], "--model", files["seg"], "--json", out_json])
    assert result.exit_code == 0, result.output
    assert "no beat found: the LV area varies by" in result.stdout
    with open(out_json) as f:
        lv = json.load(f)["sources"][0]["lv"]
    assert lv["beats"] == [] and lv["ef_mean"] is None and lv["no_beat_reason"].startswith("no beat found")


def test_dicom_pixel_spacing_gives_areas_in_cm2_at_the_model_geometry(files: dict, tmp_path) -> None:
    """A 96 x 128 cine whose 2D region (columns 16..111) states 0.02 cm pixels: cropped to 96 x 96 and
    resized to 64, a model pixel is 0.03 cm. The ED area in cm^2 within 3 % of the drawn ellipse's
    (pi a b at 0.02 cm per source pixel), the volumes in mL from the same area-length rule."""
    a0, b0 = 33.0, 13.5
    masks, eds, _, efs = beating(BEATS[:3], [EF] * 3, a0=a0, b0=b0, centre=(48.0, 64.0), size=128)
    frames = echo_frames([m[16:112] for m in masks], seed=2)  # 96 rows x 128 columns
    region = ultrasound_region_item(1, 0, 95, 16, 111)
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.02
    path = write_dicom(tmp_path / "cine.dcm", frames, FrameTime=20, SequenceOfUltrasoundRegions=[region])
    assert read_video(path).meta["spacing_cm"] == (0.02, 0.02)
    with open_backend(files["seg"]) as backend:
        lv = InferencePipeline(backend).run_file(os.fspath(path)).lv
    assert lv.spacing_cm == pytest.approx((0.03, 0.03)) and lv.spacing_source.startswith("SequenceOfUltrasound")
    beat = lv.beats[0]
    assert beat.ed_frame == pytest.approx(eds[0], abs=1)
    assert beat.ed_area_cm2 == pytest.approx(math.pi * a0 * b0 * 0.02**2, rel=0.03)
    assert beat.ed_length == pytest.approx(2 * a0 * 0.02, abs=0.03 * math.sqrt(2) + 0.03)
    assert beat.ef == pytest.approx(efs[0], abs=2.5)


def test_dicom_spacing_from_pixel_spacing_and_none_from_an_ignored_region(tmp_path) -> None:
    frames = np.zeros((3, 40, 50), np.uint8)
    assert read_video(write_dicom(tmp_path / "a.dcm", frames, PixelSpacing=[0.3, 0.25])).meta["spacing_cm"] == \
        pytest.approx((0.03, 0.025))
    outside = ultrasound_region_item(1, 0, 99, 0, 99)  # larger than the image: the file was resized
    outside.PhysicalUnitsXDirection = outside.PhysicalUnitsYDirection = 3
    outside.PhysicalDeltaX = outside.PhysicalDeltaY = 0.02
    meta = read_video(write_dicom(tmp_path / "b.dcm", frames, SequenceOfUltrasoundRegions=[outside])).meta
    assert meta["spacing_cm"] is None and meta["region"] is None
    not_cm = ultrasound_region_item(1, 0, 39, 0, 49)
    not_cm.PhysicalUnitsXDirection = not_cm.PhysicalUnitsYDirection = 4  # seconds: not a distance
    not_cm.PhysicalDeltaX = not_cm.PhysicalDeltaY = 0.02
    assert read_video(write_dicom(tmp_path / "c.dcm", frames, SequenceOfUltrasoundRegions=[not_cm])
                      ).meta["spacing_cm"] is None


@pytest.mark.parametrize("case", ["two seg models", "overlay without seg", "overlay of two videos",
                                  "overlay of a stream", "overlay as a picture"])
def test_usage_errors_are_one_line_before_any_work(files: dict, tmp_path, case: str) -> None:
    overlay = ["--overlay", os.fspath(tmp_path / "o.mp4")]
    args = {"two seg models": [files["video"], "--model", files["seg"], "--model", files["seg"]],
            "overlay without seg": [files["video"], "--model", files["ef"], *overlay],
            "overlay of two videos": [files["video"], files["still"], "--model", files["seg"], *overlay],
            "overlay of a stream": ["rtsp://cart/stream", "--model", files["seg"], *overlay],
            "overlay as a picture": [files["video"], "--model", files["seg"], "--overlay",
                                     os.fspath(tmp_path / "o.png")]}[case]
    result = runner.invoke(app, ["infer", *args])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and ("--model" in line or "--overlay" in line)
    assert os.listdir(tmp_path) == []


def test_a_seg_model_refuses_live_sources(files: dict) -> None:
    with open_backend(files["seg"]) as backend:
        result = InferencePipeline(backend).run_live("rtsp://cart/stream")
    assert not result.ok and "live sources are not supported" in result.error


def test_seg_inference_runs_with_torch_unimportable(files: dict, tmp_path) -> None:
    out = os.fspath(tmp_path / "nt.json")
    proc = _run_cli(["infer", files["video"], "--model", files["seg"], "--json", out, "--overlay",
                     os.fspath(tmp_path / "nt.mp4")], block_torch=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY_MODULES ['torch']"  # only the blocked placeholder
    with open(out) as f:
        assert json.load(f)["sources"][0]["lv"]["num_beats"] == len(files["truth"][0])
    assert os.path.getsize(tmp_path / "nt.mp4") > 0


def test_pixel_spacing_follows_the_resize_of_a_non_square_region() -> None:
    """96 x 128 pixels of 0.02 x 0.03 cm, resized to 48 x 64 (then padded to 64^2): 0.04 x 0.06 cm; the
    picture keeps its physical size (rows x dy, columns x dx)."""
    region = (10, 106, 0, 128)
    assert resized_spacing((0.02, 0.03), region, 64) == pytest.approx((0.04, 0.06))
    assert resized_shape(96, 128, 64) == (48, 64)


def test_a_graph_whose_output_is_no_mask_is_refused_as_seg(tmp_path) -> None:
    """An EF-shaped graph (N, 1) labelled task "seg": refused on loading, naming both shapes."""
    path = make_contract_onnx(tmp_path / "bad.onnx", SEG_META, outputs=1)
    with pytest.raises(ModelFileError, match=r"output 'output' has shape \['N', 1\].*says \(N, 2, 16, 64, 64\)"):
        open_backend(path)
