"""`evim3 infer` and `evim3 bench` from the command line: real ONNX Runtime sessions, real video decoding.

* Contract graphs (tests/test_runtime.py: EF = 50 + 10 * mean(clip)) test the command's behaviour quickly.
* An end-to-end test exports a random-init evim3-tiny checkpoint and runs `evim3 infer` on a synthetic
  EchoNet AVI and on pydicom's real echo cine, checking each clip's EF against onnxruntime run directly on
  the same preprocessed clip.
* Subprocess tests prove the torch-free path (torch made unimportable) and the one-line bad-source report.
"""

from __future__ import annotations

import csv
import functools
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from evim3.cli.main import app
from evim3.runtime.meta import ModelMeta, PreprocessSpec
from evim3.runtime.preprocess import sample_clip_indices, video_to_input
from evim3.runtime.video import read_video
from test_runtime import CLASS_META, contract_ef, make_contract_onnx, write_video
from typer.testing import CliRunner

runner = CliRunner()


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("infer")
    return {
        "model": make_contract_onnx(root / "ef.onnx"),
        "classifier": make_contract_onnx(root / "cls.onnx", CLASS_META),
        "video": write_video(root / "a.avi", num_frames=60),
        "video2": write_video(root / "b.avi", num_frames=40),
        "root": os.fspath(root),
    }


def expected_clip_efs(video_path: str, model_path: str, stride: int) -> list[float]:
    """EF of every clip as the contract graph defines it, on the same preprocessing as the command."""
    from evim3.runtime.backends import open_backend
    from evim3.runtime.preprocess import sliding_clip_starts

    with open_backend(model_path) as backend:
        spec = backend.meta.preprocess
    frames = video_to_input(read_video(video_path), spec)
    starts = sliding_clip_starts(len(frames), spec, stride)
    return contract_ef(np.stack([frames[sample_clip_indices(len(frames), spec, s)] for s in starts])).tolist()


def test_infer_writes_table_json_csv_and_plot(files: dict[str, str], tmp_path) -> None:
    out = {k: os.fspath(tmp_path / f"out.{k}") for k in ("json", "csv", "png")}
    result = runner.invoke(app, ["infer", files["video"], files["video2"], "--model", files["model"], "--stride", "3",
                                 "--batch", "4", "--json", out["json"], "--csv", out["csv"], "--plot", out["png"]])
    assert result.exit_code == 0, result.output
    assert "a.avi" in result.stdout and "real-time factor" in result.stdout and "inference per batch" in result.stdout
    doc = load_json(out["json"])
    assert doc["stride"] == 3 and doc["failed"] == 0 and doc["preset"] == "contract"
    for source, path in zip(doc["sources"], (files["video"], files["video2"])):
        want = expected_clip_efs(path, files["model"], stride=3)
        got = [c["ef"] for c in source["clips"]]
        np.testing.assert_allclose(got, want, atol=1e-4)  # float32 graph vs float64 numpy mean
        assert source["ef"] == pytest.approx(np.mean(got))
    rows = read_csv(out["csv"])
    assert [r["source"] for r in rows] == [files["video"], files["video2"]]
    assert [float(v) for v in rows[0]["clip_ef"].split(";")] == pytest.approx(
        [c["ef"] for c in doc["sources"][0]["clips"]], abs=1e-3)
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # atomic writes leave no temp files


def test_infer_walks_folders(files: dict[str, str], tmp_path) -> None:
    out = os.fspath(tmp_path / "r.json")
    result = runner.invoke(app, ["infer", files["root"], "--model", files["model"], "--json", out])
    assert result.exit_code == 0, result.output
    assert sorted(os.path.basename(s["source"]) for s in load_json(out)["sources"]) == ["a.avi", "b.avi"]


def test_classification_model_prints_probabilities(files: dict[str, str], tmp_path) -> None:
    out = os.fspath(tmp_path / "c.json")
    result = runner.invoke(app, ["infer", files["video"], "--model", files["classifier"], "--json", out])
    assert result.exit_code == 0, result.output
    assert "p(a4c)" in result.stdout and "EF" not in result.stdout.split("timing")[0]
    source = load_json(out)["sources"][0]
    assert sum(source["probabilities"].values()) == pytest.approx(1.0)
    # logits = mean * [1, 2, 3] with a positive mean: the last class is the most likely.
    assert source["prediction"] == "other"


@pytest.mark.parametrize("args", [["--batch", "0"], ["--stride", "0"], ["--provider", "vulkan"], []])
def test_usage_errors_exit_2(files: dict[str, str], args: list[str]) -> None:
    sources = [files["video"]] if args else []
    result = runner.invoke(app, ["infer", *sources, "--model", files["model"], *args])
    assert result.exit_code == 2, result.output


def test_bench_reports_latency_table_and_json(files: dict[str, str], tmp_path) -> None:
    out = os.fspath(tmp_path / "bench.json")
    result = runner.invoke(app, ["bench", "--model", files["model"], "--runs", "5", "--warmup", "1", "--batch", "2",
                                 "--json", out])
    assert result.exit_code == 0, result.output
    assert "p99 ms" in result.stdout and "real-time factor" in result.stdout
    doc = load_json(out)
    assert doc["runs"] == 5 and doc["batch"] == 2 and doc["latency_ms"]["p50"] > 0


@pytest.fixture
def http_server(files: dict[str, str]):
    """The test videos served over HTTP on localhost: a real network stream for the live path."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=files["root"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_live_stream_prints_every_clip_as_it_comes(files: dict[str, str], http_server: str, tmp_path) -> None:
    out = os.fspath(tmp_path / "live.json")
    url = f"{http_server}/a.avi"
    result = runner.invoke(app, ["infer", url, "--model", files["model"], "--stride", "4", "--json", out])
    assert result.exit_code == 0, result.output
    source = load_json(out)["sources"][0]
    lines = [line for line in result.stdout.splitlines() if line.startswith(url)]
    assert len(lines) == source["num_clips"] >= 10
    assert lines[0].split()[1:] == ["0.00-0.28", "s", "EF", f"{source['clips'][0]['ef']:.1f}", "%"]
    # The stream is at the model's 25 fps: live clips start where the file's do, with the same EF.
    want = expected_clip_efs(files["video"], files["model"], stride=4)
    np.testing.assert_allclose([c["ef"] for c in source["clips"]], want[:source["num_clips"]], atol=1e-4)
    assert "decoding and preprocessing run on a reader thread" in result.stdout


def test_realtime_flag_reaches_the_live_reader(files: dict[str, str], http_server: str, tmp_path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--realtime makes the reader drop the oldest frames when inference lags (tested on LiveReader itself in
    test_runtime.py); here: the flag gets there, and only with the flag."""
    import evim3.runtime.infer
    from evim3.runtime.live import LiveReader

    made = []

    class RecordingReader(LiveReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.realtime)

    monkeypatch.setattr(evim3.runtime.infer, "LiveReader", RecordingReader)
    for flag, realtime in (([], False), (["--realtime"], True)):
        out = os.fspath(tmp_path / f"rt-{realtime}.json")
        result = runner.invoke(app, ["infer", f"{http_server}/a.avi", "--model", files["model"], "--json", out, *flag])
        assert result.exit_code == 0, result.output
        assert load_json(out)["realtime"] is realtime and load_json(out)["sources"][0]["num_clips"] > 0
    assert made == [False, True]


def test_unreachable_stream_is_a_failed_source(files: dict[str, str], http_server: str) -> None:
    result = runner.invoke(app, ["infer", f"{http_server}/missing.avi", files["video"], "--model", files["model"]])
    assert result.exit_code == 1
    assert "cannot open live source" in result.stderr and "404" in result.stderr


def _run_cli(args: list[str], block_torch: bool = False) -> subprocess.CompletedProcess:
    """`evim3 ARGS` in a fresh interpreter; with block_torch, importing torch fails there, and the process
    prints the torch/training modules it loaded anyway as its last stdout line."""
    code = textwrap.dedent(f"""
        import sys
        if {block_torch}:
            sys.modules["torch"] = None  # `import torch` now raises ImportError
        from evim3.cli.main import main
        sys.argv = ["evim3", *{args!r}]
        try:
            main()
        except SystemExit as e:
            code = e.code
        # `evim3 export`'s defaults come from the export layer's light modules (no onnx, no torch)
        light = ("evim3.export", "evim3.export.calibration", "evim3.export.defaults")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "safetensors")
                       or m.startswith(("evim3.models", "evim3.checkpoint", "evim3.export")) and m not in light)
        print("HEAVY_MODULES", heavy)
        sys.exit(code)
    """)
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          timeout=120)


def test_infer_runs_with_torch_unimportable(files: dict[str, str], tmp_path) -> None:
    out = os.fspath(tmp_path / "nt.json")
    proc = _run_cli(["infer", files["video"], "--model", files["model"], "--json", out], block_torch=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY_MODULES ['torch']"  # only the blocked placeholder
    # Default stride: half the contract model's clip span (8 frames at period 1).
    want = expected_clip_efs(files["video"], files["model"], stride=4)
    np.testing.assert_allclose([c["ef"] for c in load_json(out)["sources"][0]["clips"]], want, atol=1e-4)


def test_bad_sources_are_reported_one_line_each_and_the_rest_run(files: dict[str, str], tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 20)
    missing = os.fspath(tmp_path / "missing.avi")
    out = os.fspath(tmp_path / "bad.json")
    proc = _run_cli(["infer", files["video"], missing, os.fspath(text), files["video2"], "--model", files["model"],
                     "--json", out])
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in proc.stderr
    assert errors[0].startswith(f"error: {missing}: ") and errors[1].startswith(f"error: {text}: ")
    doc = load_json(out)
    assert [s["ok"] for s in doc["sources"]] == [True, False, False, True] and doc["failed"] == 2
    assert doc["sources"][3]["num_clips"] > 0


def test_short_videos_warn_with_their_real_frame_share_and_too_short_ones_are_refused(tmp_path) -> None:
    """Clip of 8 frames every 3rd at 25 fps: 22 frames, 0.88 s. 16 frames (0.64 s) loop: indices 0, 3, ...,
    15 are real (6 of 8); 10 frames (0.4 s) are under the 0.5 s minimum; 40 frames are whole clips."""
    spec = PreprocessSpec(size=16, fps=25.0, frames=8, period=3, mean=100.0, std=50.0)
    model = make_contract_onnx(tmp_path / "long-clip.onnx", ModelMeta(preset="contract", model={}, preprocess=spec))
    videos = [write_video(tmp_path / f"{n}.avi", num_frames=n) for n in (16, 10, 40)]
    out_json, out_csv = os.fspath(tmp_path / "s.json"), os.fspath(tmp_path / "s.csv")
    proc = _run_cli(["infer", *videos, "--model", model, "--json", out_json, "--csv", out_csv])
    assert proc.returncode == 1, proc.stderr
    refusal = (f"error: {videos[1]}: video is too short: 0.40 s, the model needs at least 0.50 s (half its "
               "0.88 s clip, and at least 0.5 s)")
    assert proc.stderr.strip().splitlines() == [refusal]
    assert "1 short" in proc.stdout and "shorter than the model's clip" in proc.stdout
    assert f"{videos[0]}: warning: shorter than the model's clip, which loops it (75 % real frames)" in proc.stdout
    short, refused, whole = load_json(out_json)["sources"]
    assert short["ok"] and short["real_frame_share"] == 0.75 and short["clips"][0]["real_frame_share"] == 0.75
    assert not refused["ok"] and whole["real_frame_share"] == 1.0
    assert all(c["real_frame_share"] == 1.0 for c in whole["clips"])
    rows = read_csv(out_csv)
    assert [r["real_frame_share"] for r in rows] == ["0.750", "1.000", "1.000"]
    assert rows[0]["clip_real_frame_share"] == "0.750"


# --- end to end with a real exported model ---

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init evim3-tiny checkpoint exported to ONNX, as `evim3 export` does."""
    from evim3.export.onnx import export_checkpoint

    from evim3.checkpoint import build_model, save_checkpoint
    from evim3.config import get_preset

    root = tmp_path_factory.mktemp("tiny")
    cfg = get_preset("evim3-tiny")
    meta = ModelMeta(preset="evim3-tiny", model=cfg.to_dict(), ef_mean=55.0,
                     preprocess=PreprocessSpec(size=cfg.img_size, frames=cfg.frames, mean=40.0, std=50.0))
    import torch

    torch.manual_seed(0)
    save_checkpoint(root / "tiny.safetensors", build_model(meta).state_dict(), meta)
    return export_checkpoint(root / "tiny.safetensors", root / "tiny.onnx").path


@pytest.mark.slow
def test_end_to_end_exported_tiny_on_synthetic_avi_and_real_dicom(tiny_onnx: str, synth_dataset, tmp_path) -> None:
    import onnxruntime as ort
    import pydicom.examples

    avi = min((synth_dataset / "Videos").glob("*.avi"))
    dicom = pydicom.examples.get_path("ybr_color")
    out_json, out_csv = os.fspath(tmp_path / "e2e.json"), os.fspath(tmp_path / "e2e.csv")
    result = runner.invoke(app, ["infer", os.fspath(avi), os.fspath(dicom), "--model", tiny_onnx, "--stride", "16",
                                 "--json", out_json, "--csv", out_csv])
    assert result.exit_code == 0, result.output
    doc = load_json(out_json)
    session = ort.InferenceSession(tiny_onnx, providers=["CPUExecutionProvider"])
    spec = ModelMeta.from_json(session.get_modelmeta().custom_metadata_map["evim3"]).preprocess
    from evim3.runtime.preprocess import sliding_clip_starts

    for source in doc["sources"]:
        assert source["ok"] and source["num_clips"] >= 1
        frames = video_to_input(read_video(source["source"]), spec)
        starts = sliding_clip_starts(len(frames), spec, 16)
        assert len(starts) == source["num_clips"]
        direct = [session.run(None, {"clip": frames[sample_clip_indices(len(frames), spec, s)][None, None]})[0][0, 0]
                  for s in starts]
        # Same graph, same input, same provider: equal up to float32 summation order.
        np.testing.assert_allclose([c["ef"] for c in source["clips"]], direct, atol=1e-4)
        assert np.isfinite(source["ef"])
    rows = read_csv(out_csv)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert len(rows[1]["clip_ef"].split(";")) == doc["sources"][1]["num_clips"]


@pytest.fixture(scope="module")  # module scope: set up before (so instead of) the module-scoped export
def needs_tensorrt() -> None:
    """Skip (before any export work) unless TensorRT, cuda-python and a CUDA GPU are all here."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU machines only)")
    from evim3.runtime.engine_file import current_gpu

    if current_gpu() is None:
        pytest.skip("no CUDA GPU visible through cuda-python")


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime_and_runs_infer(needs_tensorrt: None, tiny_onnx: str, tmp_path) -> None:
    import pydicom.examples
    from evim3.export.tensorrt import build_engine
    from evim3.runtime.backend_trt import TensorRTBackend
    from evim3.runtime.backends import open_backend

    engine = build_engine(tiny_onnx, tmp_path / "tiny.engine").path
    clips = np.random.default_rng(0).standard_normal((3, 1, 32, 112, 112), dtype=np.float32)
    with open_backend(engine) as trt_backend, open_backend(tiny_onnx, provider="cpu") as ort_backend:
        assert isinstance(trt_backend, TensorRTBackend)
        # An fp32 engine (TF32 off) against ORT's fp32 CPU kernels: summation order only.
        np.testing.assert_allclose(trt_backend.run(clips), ort_backend.run(clips), atol=1e-3)
    out = os.fspath(tmp_path / "trt.json")
    result = runner.invoke(app, ["infer", pydicom.examples.get_path("ybr_color"), "--model", engine, "--json", out])
    assert result.exit_code == 0, result.output
    assert np.isfinite(load_json(out)["sources"][0]["ef"])
