"""The edge runtime without torch: backends (real ONNX Runtime sessions on small contract graphs built with
onnx.helper), the live reader (real PyAV decoding on a thread), the file/live pipeline, and the reports.

The contract graph has the evim3 I/O (`clip` (N, 1, T, S, S) -> `output`) and metadata; its output is a
closed form of the input (EF = 50 + 10 * mean(clip)), so every test can compute the expected value itself.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import shutil
import threading
import time
import tracemalloc

import av
import numpy as np
import onnx
import pytest
from evim3.cli.report import run_document, write_csv, write_json, write_plot
from evim3.runtime.api import load
from evim3.runtime.backend_ort import OnnxBackend, fallback_note
from evim3.runtime.backends import open_backend
from evim3.runtime.errors import BackendUnavailableError, EchoInputError, ModelFileError
from evim3.runtime.infer import (
    ClipResult,
    InferencePipeline,
    SourceResult,
    Timings,
    expand_sources,
    in_background,
)
from evim3.runtime.live import LiveFrame, LiveReader, is_live_source
from evim3.runtime.meta import INPUT_NAME, META_KEY, OUTPUT_NAME, PRECISION_PROP, ModelMeta, PreprocessSpec
from evim3.runtime.outputs import class_probabilities
from evim3.runtime.preprocess import sample_clip_indices, sliding_clip_starts, video_to_input
from evim3.runtime.provenance import Provenance
from evim3.runtime.tasks import task_spec
from evim3.runtime.video import read_video
from onnx import TensorProto, helper, numpy_helper

# Small clips keep the graphs and videos tiny: 8 frames of 16x16 at 25 fps, every frame (period 1).
SPEC = PreprocessSpec(size=16, fps=25.0, frames=8, period=1, mean=100.0, std=50.0)
EF_META = ModelMeta(preset="contract", model={}, preprocess=SPEC)
CLASS_META = ModelMeta(preset="contract", model={}, preprocess=SPEC, task="classification",
                       class_names=["a4c", "a2c", "other"])
BINARY_META = ModelMeta(preset="contract", model={}, preprocess=SPEC, task="classification",
                        class_names=["normal", "reduced"])


def contract_ef(clips: np.ndarray) -> np.ndarray:
    """What the contract graph computes for an EF model, in numpy."""
    return 50.0 + 10.0 * clips.reshape(len(clips), -1).mean(axis=1, dtype=np.float64)


def make_contract_onnx(path: str | os.PathLike, meta: ModelMeta = EF_META, batch: int | str = "N",
                       input_name: str = INPUT_NAME, metadata: bool = True, frames: int | None = None,
                       outputs: int | None = None) -> str:
    """A real ONNX model with the evim3 contract: EF = 50 + 10 * mean(clip) (task 'ef'), or logits
    mean(clip) * [1, 2, ..., K] (classification; one logit for two classes). `frames` overrides the graph's
    clip length, `outputs` its output width."""
    spec = meta.preprocess
    k = outputs or task_spec(meta.task).output_width(len(meta.class_names))
    shape = [batch, 1, frames or spec.frames, spec.size, spec.size]
    scale, bias = ([[10.0]], [[50.0]]) if meta.task == "ef" else ([list(range(1, k + 1))], [[0.0] * k])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", [input_name, "axes"], ["mean"], keepdims=1),
         helper.make_node("Flatten", ["mean"], ["flat"], axis=1),
         helper.make_node("Mul", ["flat", "scale"], ["scaled"]),
         helper.make_node("Add", ["scaled", "bias"], [OUTPUT_NAME])],
        "contract",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, k])],
        [numpy_helper.from_array(np.array([1, 2, 3, 4], np.int64), "axes"),
         numpy_helper.from_array(np.array(scale, np.float32), "scale"),
         numpy_helper.from_array(np.array(bias, np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # readable by every onnxruntime the project supports
    if metadata:
        helper.set_model_props(model, {META_KEY: meta.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(path))
    return os.fspath(path)


def write_video(path: str | os.PathLike, num_frames: int = 60, fps: int = 25, size: int = 32) -> str:
    """An MPEG-4 AVI whose brightness ramps and whose bright square moves, so every clip differs."""
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            image = np.full((size, size, 3), 40 + 2 * i % 150, np.uint8)
            x = i % (size - 8)
            image[8:16, x:x + 8] = 230
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return os.fspath(path)


@pytest.fixture(scope="module")
def ef_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_contract_onnx(tmp_path_factory.mktemp("models") / "ef.onnx")


@pytest.fixture(scope="module")
def video_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_video(tmp_path_factory.mktemp("videos") / "echo.avi")


# --- outputs -> EF or probabilities ---

def test_class_probabilities_of_one_logit_and_of_several() -> None:
    """Against float64 closed forms on fresh random logits (equal to 1e-12), and finite at extreme logits."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 5, (50, 1))
    sigmoid = 1 / (1 + np.exp(-x[:, 0]))
    np.testing.assert_allclose(class_probabilities(x), np.stack([1 - sigmoid, sigmoid], 1), rtol=0, atol=1e-12)
    logits = rng.normal(0, 5, (50, 4))
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(class_probabilities(logits), softmax, rtol=1e-12, atol=1e-15)
    extreme = class_probabilities(np.array([[-1000.0], [1000.0], [0.0]]))
    np.testing.assert_array_equal(extreme, [[1, 0], [0, 1], [0.5, 0.5]])
    # the small side is not rounded to 1 - 1: sigmoid(-40) = 4.2e-18
    assert class_probabilities(np.array([[40.0]]))[0, 0] == pytest.approx(np.exp(-40.0), rel=1e-12)


def test_binary_model_gives_two_probabilities_from_one_logit(tmp_path, video_file: str) -> None:
    """A two-class model has one output (the logit of class 1): the pipeline reports [1 - p, p]."""
    path = make_contract_onnx(tmp_path / "binary.onnx", BINARY_META)
    with open_backend(path) as backend:
        pipeline = InferencePipeline(backend, stride=4)
        result = pipeline.run_file(video_file)
    assert result.ok and pipeline.class_names == ["normal", "reduced"]
    frames = video_to_input(read_video(video_file), SPEC)
    clips = clips_of(frames, sliding_clip_starts(len(frames), SPEC, 4))
    logit = clips.reshape(len(clips), -1).mean(1, dtype=np.float64)  # the contract graph: mean(clip) * 1
    p = 1 / (1 + np.exp(-logit))
    np.testing.assert_allclose([c.values for c in result.clips], np.stack([1 - p, p], 1), atol=1e-6)
    assert result.to_dict(pipeline.class_names)["prediction"] in ("normal", "reduced")


# --- backends ---

def test_onnx_backend_runs_the_graph_and_reads_its_metadata(ef_model: str) -> None:
    with open_backend(ef_model, threads=1) as backend:
        assert isinstance(backend, OnnxBackend)
        assert backend.meta == EF_META
        assert backend.providers == ["CPUExecutionProvider"] and backend.fallback is None
        assert "CPUExecutionProvider, 1 threads" in backend.device
        clips = np.random.default_rng(0).standard_normal((5, 1, 8, 16, 16), dtype=np.float32)
        out = backend.run(clips)
    assert out.shape == (5, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], contract_ef(clips), atol=1e-4)  # float32 mean of 2048 values


def test_fixed_batch_graph_is_fed_in_chunks_with_the_last_one_padded(tmp_path) -> None:
    path = make_contract_onnx(tmp_path / "b2.onnx", batch=2)
    clips = np.random.default_rng(1).standard_normal((5, 1, 8, 16, 16), dtype=np.float32)
    with open_backend(path) as backend:
        assert backend.max_batch == 2
        out = backend.run(clips)
    np.testing.assert_allclose(out[:, 0], contract_ef(clips), atol=1e-4)


def test_backend_rejects_clips_of_another_shape(ef_model: str) -> None:
    with open_backend(ef_model) as backend, pytest.raises(ValueError, match=r"\(N, 1, 8, 16, 16\)"):
        backend.run(np.zeros((1, 1, 9, 16, 16), np.float32))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        ({"metadata": False}, "carries no evim3 metadata"),
        ({"frames": 12}, r"input 'clip' has shape \['N', 1, 12, 16, 16\] but the evim3 metadata"),
        ({"input_name": "video"}, "evim3 models take 'clip'"),
        ({"meta": BINARY_META, "outputs": 2}, r"'output' has shape \['N', 2\]; .* 2 classes\) says \(N, 1\)"),
    ],
)
def test_model_file_that_breaks_the_contract_is_one_line_error(tmp_path, build: dict, message: str) -> None:
    path = make_contract_onnx(tmp_path / "bad.onnx", **build)
    with pytest.raises(ModelFileError, match=message) as info:
        open_backend(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(path)


def test_precision_is_read_from_the_metadata_and_from_files_written_before_it_was_a_field(tmp_path) -> None:
    fp16 = dataclasses.replace(EF_META, precision="fp16")
    with open_backend(make_contract_onnx(tmp_path / "new.onnx", fp16)) as backend:
        assert backend.meta.precision == "fp16"
    # An older file: the JSON has no precision; the flat metadata_props key is its only record.
    old_json = json.loads(EF_META.to_json())
    del old_json["precision"]
    path = make_contract_onnx(tmp_path / "old.onnx", metadata=False)
    model = onnx.load(path)
    helper.set_model_props(model, {META_KEY: json.dumps(old_json), PRECISION_PROP: "fp16"})
    onnx.save(model, path)
    with open_backend(path) as backend:
        assert backend.meta.precision == "fp16"
    assert ModelMeta.from_json(json.dumps(old_json)).precision == "fp32"  # a checkpoint's JSON
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        dataclasses.replace(EF_META, precision="int4")


def test_unusable_model_paths(tmp_path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not protobuf" * 10)
    with pytest.raises(ModelFileError, match="ONNX Runtime cannot load the model"):
        open_backend(corrupt)
    with pytest.raises(ModelFileError, match="model file not found"):
        open_backend(tmp_path / "missing.onnx")
    with pytest.raises(ModelFileError, match="training checkpoint: export it first"):
        open_backend(tmp_path / "run.safetensors")


def test_provider_that_this_onnxruntime_lacks_is_refused(ef_model: str) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendUnavailableError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        open_backend(ef_model, provider="cuda")
    with pytest.raises(ValueError, match="unknown provider"):
        open_backend(ef_model, provider="vulkan")


def test_fallback_note_names_the_providers_that_did_not_start() -> None:
    requested = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    note = fallback_note(requested, ["CPUExecutionProvider"])
    assert "fell back to CPUExecutionProvider" in note and "TensorrtExecutionProvider, CUDAExecutionProvider" in note
    assert fallback_note(requested, requested) is None
    assert fallback_note(["CPUExecutionProvider"], ["CPUExecutionProvider"]) is None


def test_tensorrt_backend_without_tensorrt_says_what_is_missing(tmp_path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here; the GPU test covers the engine path")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"EVIM3TRT")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed") as info:
        open_backend(engine)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelFileError, match="runs on TensorRT only"):
        open_backend(engine, provider="cpu")


def test_benchmark_reports_latency_and_real_time_factor(ef_model: str) -> None:
    with load(ef_model, stride=4) as model:
        result = model.benchmark(batch=3, warmup=1, runs=7)
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert result["runs"] == 7 and result["clip"] == [1, 8, 16, 16]
    # 25 fps with a clip every 4 frames: 6.25 clips per video second.
    assert result["realtime_factor"] == pytest.approx(result["clips_per_s"] / 6.25)
    json.dumps(result)  # the CLI writes it as JSON


# --- live reader ---

def test_live_sources_are_recognised() -> None:
    assert is_live_source("rtsp://cart-3/echo") and is_live_source("/dev/video0")
    assert not is_live_source("/data/echo.avi") and not is_live_source("folder")


def test_live_reader_delivers_every_frame_in_order(video_file: str) -> None:
    with LiveReader(video_file, queue_seconds=0.2) as reader:
        frames = list(reader.frames())
    assert [f.index for f in frames] == list(range(60)) and reader.dropped == 0
    assert frames[0].image.shape == (32, 32) and frames[0].image.dtype == np.uint8
    np.testing.assert_allclose([f.time for f in frames], np.arange(60) / 25, atol=1e-6)


def test_realtime_reader_drops_the_oldest_frames_when_the_consumer_lags(video_file: str) -> None:
    # Queue of 0.2 s = 5 frames; nothing is consumed until the reader has decoded the whole file.
    with LiveReader(video_file, queue_seconds=0.2, realtime=True) as reader:
        deadline = time.monotonic() + 30
        while len(reader.decode.seconds) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        frames = list(reader.frames())
    assert [f.index for f in frames] == list(range(55, 60))
    assert reader.dropped == 55


def test_unopenable_live_source_is_an_input_error(tmp_path) -> None:
    with pytest.raises(EchoInputError, match="cannot open live source"):
        LiveReader(os.fspath(tmp_path / "no-such-stream.avi"))


# --- the pipeline ---

def clips_of(frames: np.ndarray, starts: list[int]) -> np.ndarray:
    return np.stack([frames[sample_clip_indices(len(frames), SPEC, s)] for s in starts])


def test_file_pipeline_runs_every_sliding_clip_in_batches(ef_model: str, video_file: str) -> None:
    frames = video_to_input(read_video(video_file), SPEC)
    starts = sliding_clip_starts(len(frames), SPEC, 3)
    want = contract_ef(clips_of(frames, starts))
    with open_backend(ef_model) as backend:
        results = {batch: InferencePipeline(backend, stride=3, batch=batch) for batch in (1, 4)}
        outputs = {batch: pipeline.run_file(video_file) for batch, pipeline in results.items()}
    for result in outputs.values():
        assert result.ok and len(result.clips) == len(starts)
        np.testing.assert_allclose([c.values[0] for c in result.clips], want, atol=1e-4)
        assert [c.start_s for c in result.clips] == pytest.approx([s / SPEC.fps for s in starts])
        assert result.mean_values()[0] == pytest.approx(want.mean(), abs=1e-4)
        assert result.duration_s == pytest.approx(60 / 25)
    timings = results[4].timings
    assert set(timings.stages) == {"decode per video", "preprocess per video", "inference per batch"}
    assert len(timings.stages["inference per batch"].seconds) == -(-len(starts) // 4)
    assert timings.clips == len(starts) and timings.video_s == pytest.approx(2.4)
    assert timings.realtime_factor > 0 and 0 < timings.input_share < 1


def test_peak_memory_of_a_file_does_not_grow_with_its_length(ef_model: str, tmp_path) -> None:
    """tracemalloc's peak (numpy's buffers are traced, on every thread) over `run_file` of a 4 s and a 24 s
    video of 256x256 frames at 25 fps: within 2 MB of each other, where keeping every decoded frame would add
    500 x 64 kB = 33 MB. Both hold the first 2 s at source size for the motion crop (3.3 MB)."""
    peaks = {}
    with open_backend(ef_model, threads=1) as backend:
        for seconds in (4, 24):
            path = write_video(tmp_path / f"{seconds}s.avi", num_frames=25 * seconds, size=256)
            pipeline = InferencePipeline(backend)
            tracemalloc.start()
            try:
                result = pipeline.run_file(path)
                peaks[seconds] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert result.ok and result.duration_s == pytest.approx(seconds)
    assert peaks[24] - peaks[4] < 2e6, peaks
    assert peaks[24] < 3.3e6 + 8e6, peaks  # the motion window and a few clips' float32


def test_prefetching_thread_passes_items_and_errors_in_order_and_stops_when_closed() -> None:
    def produce():
        yield from range(5)
        raise EchoInputError("x.avi", "cut short")

    got = []
    with pytest.raises(EchoInputError, match="cut short"):
        got.extend(in_background(produce(), depth=2))
    assert got == [0, 1, 2, 3, 4]
    endless = in_background(itertools.count(), depth=3)
    assert [next(endless) for _ in range(4)] == [0, 1, 2, 3]
    endless.close()  # joins the producer, which was blocked on the full queue
    assert not [t for t in threading.enumerate() if t.name == "evim3-decode"]


def test_default_stride_is_half_a_clip_span(ef_model: str) -> None:
    with open_backend(ef_model) as backend:
        assert InferencePipeline(backend).stride == SPEC.clip_span // 2
        with load(ef_model) as model:
            assert model.benchmark(runs=1, warmup=0)["stride"] == SPEC.clip_span // 2
        with pytest.raises(ValueError, match="stride and batch must be >= 1"):
            InferencePipeline(backend, batch=0)
    assert PreprocessSpec(frames=1).default_stride == 1  # a one-frame clip still advances


def test_bad_file_is_a_result_with_its_reason_not_an_exception(ef_model: str, tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    with open_backend(ef_model) as backend:
        pipeline = InferencePipeline(backend)
        for path in (os.fspath(text), os.fspath(tmp_path / "missing.avi")):
            result = pipeline.run_file(path)
            assert not result.ok and result.error.startswith(path) and "\n" not in result.error


def test_expand_sources_walks_folders_and_flags_empty_ones(tmp_path, video_file: str) -> None:
    nested = tmp_path / "study" / "series"
    nested.mkdir(parents=True)
    copy = nested / "echo.avi"
    shutil.copy(video_file, copy)
    (tmp_path / "empty").mkdir()
    items = list(expand_sources([os.fspath(tmp_path / "study"), os.fspath(tmp_path / "empty"), "rtsp://cart/1"]))
    assert items[0] == (os.fspath(copy), None)
    assert items[1][0] == os.fspath(tmp_path / "empty") and "no video" in str(items[1][1])
    assert items[2] == ("rtsp://cart/1", None)


def test_live_pipeline_gives_the_clips_of_the_file_pipeline(ef_model: str, video_file: str) -> None:
    # The video is at the model's 25 fps, so the live window of 8 source frames is one clip exactly and the
    # live clips start where the file pipeline's do (every `stride` frames).
    seen = []
    with open_backend(ef_model) as backend:
        live = InferencePipeline(backend, stride=4).run_live(video_file, on_clip=seen.append)
        whole = InferencePipeline(backend, stride=4).run_file(video_file)
    assert live.ok and seen == live.clips and live.dropped_frames == 0
    by_start = {round(c.start_s, 3): c.values[0] for c in whole.clips}
    common = [c for c in live.clips if round(c.start_s, 3) in by_start]
    assert len(common) >= len(live.clips) - 1 and len(common) >= 10
    np.testing.assert_allclose([c.values[0] for c in common], [by_start[round(c.start_s, 3)] for c in common],
                               atol=1e-4)
    assert all(c.end_s - c.start_s == pytest.approx((SPEC.clip_span - 1) / 25) for c in live.clips)


def test_live_clips_never_span_dropped_frames(ef_model: str) -> None:
    rng = np.random.default_rng(0)
    indices = [*range(10), *range(20, 40)]  # frames 10..19 were dropped by a --realtime reader
    frames = [LiveFrame(i, i / 25, rng.integers(0, 255, (32, 32), dtype=np.uint8)) for i in indices]
    with open_backend(ef_model) as backend:
        pipeline = InferencePipeline(backend, stride=4)
        result = SourceResult("test", provenance=Provenance("test", 25.0, 0, None, SPEC))
        clips = list(pipeline._live_clips(iter(frames), 25.0, result, Timings()))
    spans = [(round(c.start_s * 25), round(c.end_s * 25)) for c in clips]
    assert spans == [(0, 7), (20, 27), (24, 31), (28, 35), (32, 39)]


# --- reports ---

def test_reports_write_every_source_and_null_for_missing_numbers(tmp_path) -> None:
    ok = SourceResult("a.avi", clips=[ClipResult(0.0, 1.0, [60.0]), ClipResult(0.5, 1.5, [64.0])], duration_s=2.0,
                      strip=[(0.0, np.zeros((16, 16), np.float32)), (1.0, np.ones((16, 16), np.float32))])
    bad = SourceResult("b.avi", error="b.avi: not a video (no video stream)")
    timings = Timings()  # nothing ran: NaN percentiles and real-time factor
    doc = run_document([ok, bad], timings, {"model": "m.onnx"}, class_names=[])
    write_json(tmp_path / "r.json", doc)
    write_csv(tmp_path / "r.csv", [ok, bad], class_names=[], clip_task="ef")
    assert write_plot(os.fspath(tmp_path / "r.png"), [ok, bad], class_names=[]) == 1
    with open(tmp_path / "r.json") as f:
        loaded = json.load(f)  # strict JSON: would fail on NaN
    assert loaded["failed"] == 1 and loaded["sources"][0]["ef"] == pytest.approx(62.0)
    assert loaded["timings"]["realtime_factor"] is None
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["clip_ef"] == "60.0000;64.0000" and rows[0]["clip_start_s"] == "0.000;0.500"
    assert rows[1]["status"] == "failed" and rows[1]["error"] == bad.error and rows[1]["ef"] == ""
    with open(tmp_path / "r.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
