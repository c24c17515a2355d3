"""INT8: `evim3 export --int8` (ONNX Runtime dynamic quantisation of the linear layers), its tolerance in
`evim3 check`, and the batches that calibrate a TensorRT INT8 engine (fed without TensorRT here).

The model is a shrunk evim3-tiny fitted for 60 steps to spread EF over random clips: a random init
answers nearly the same for every clip, and its features vary so little between clips that 8-bit steps
swamp them (measured: int8 error 0.3-0.6x the output spread at random init, 0.03x after fitting, in line
with the 0.02x of the demo's fine-tuned evim3-tiny).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from evim3.cli.main import app
from evim3.export.tensorrt import CalibrationClips
from evim3.runtime.errors import ModelFileError
from evim3.runtime.meta import PRECISIONS, ModelMeta, PreprocessSpec
from evim3.runtime.parity_check import TOLERANCES, compare, load_golden, random_clips, video_clip
from typer.testing import CliRunner

from evim3.checkpoint import save_checkpoint
from evim3.config import get_preset
from evim3.models.evim3 import EViM3

CFG = get_preset("evim3-tiny").replace(frames=8, img_size=32, dim=16, depth=1, d_state=4, final_dim=32)
SPEC = PreprocessSpec(size=32, frames=8, mean=32.5, std=48.0)
META = ModelMeta("evim3-tiny", CFG.to_dict(), SPEC, ef_mean=55.0)
runner = CliRunner()


def run_cli(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def fitted_model(steps: int = 60) -> EViM3:
    """Fitted to EF 35..75 over 16 random clips (single thread: deterministic, and kind to a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = EViM3(CFG, ef_mean=55.0)
        clips = torch.from_numpy(random_clips(SPEC, 16, seed=1))
        target = 55.0 + torch.linspace(-20, 20, 16)[:, None]
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = ((model(clips) - target) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("int8")
    checkpoint = folder / "fitted.safetensors"
    save_checkpoint(checkpoint, fitted_model().state_dict(), META)
    code, output = run_cli("export", checkpoint, "--int8")
    assert code == 0, output
    return {"folder": folder, "checkpoint": checkpoint, "onnx": folder / "fitted.int8.onnx", "output": output}


def test_every_precision_has_one_tolerance() -> None:
    assert set(TOLERANCES) == set(PRECISIONS) and TOLERANCES["int8"].max_abs == 1.0
    assert TOLERANCES["int8"].max_mean == 0.3


def test_int8_export_quantises_the_linear_layers(int8: dict) -> None:
    assert f"wrote {int8['onnx']}: opset 17, int8, batch 1" in int8["output"]
    proto = onnx.load(str(int8["onnx"]))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    weights = {i.name for i in proto.graph.initializer}
    units = 6 * CFG.depth
    linears = 3 * units + CFG.head_layers + 1  # in/x/dt projections of every Mamba unit; the head
    assert ops.count("MatMulInteger") == linears and ops.count("DynamicQuantizeLinear") == linears
    # out_proj stays float32 (export/onnx.py PER_CHANNEL says why): one float MatMul with weights per unit
    float_linears = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert len(float_linears) == units and all(n.op_type == "MatMul" for n in float_linears)
    out_proj = {i.name: list(i.dims) for i in proto.graph.initializer}
    assert all(out_proj[n.input[1]] == [CFG.d_inner, CFG.dim] for n in float_linears)
    assert {o.domain for o in proto.opset_import} == {""}  # standard ONNX: no ONNX Runtime contrib op
    assert {p.key: p.value for p in proto.metadata_props}["evim3.precision"] == "int8"


def test_check_passes_int8_within_its_tolerance(int8: dict, synth_dataset: Path) -> None:
    golden = int8["folder"] / "golden.npz"
    code, output = run_cli("check", int8["checkpoint"], "--onnx", int8["onnx"], "--data", synth_dataset,
                           "--save-golden", golden)
    assert code == 0, output
    row = next(line for line in output.splitlines() if line.startswith("onnxruntime"))
    assert " int8 " in row and row.rstrip().endswith("pass")
    assert "int8: max abs <= 1 EF pts, mean abs <= 0.3" in output and "parity: pass" in output
    assert load_golden(golden).reference.std() >= 1.0  # the model answers differently per clip


def test_check_int8_fails_a_wrong_model(int8: dict) -> None:
    """The random-init model (same config, other weights) exported int8, judged against the fitted model's
    reference; and the right file against a reference moved by 0.5 EF everywhere (the mean bound)."""
    golden = int8["folder"] / "golden-wrong.npz"
    assert run_cli("check", int8["checkpoint"], "--save-golden", golden, "--clips", "3")[0] == 0
    torch.manual_seed(0)
    wrong = int8["folder"] / "random.safetensors"
    save_checkpoint(wrong, EViM3(CFG, ef_mean=55.0).state_dict(), META)
    assert run_cli("export", wrong, "--int8")[0] == 0
    code, output = run_cli("check", "--load-golden", golden, "--onnx", int8["folder"] / "random.int8.onnx")
    assert code == 1 and "parity FAILED" in output, output

    with np.load(golden) as data:
        arrays = dict(data)
    arrays["reference"] = arrays["reference"] + 0.5
    np.savez(int8["folder"] / "golden-shifted.npz", **arrays)
    code, output = run_cli("check", "--load-golden", int8["folder"] / "golden-shifted.npz", "--onnx", int8["onnx"])
    assert code == 1 and "FAIL" in output, output


@pytest.mark.parametrize("offsets, passes", [
    ([0.2, -0.2, 0.25, 0.0], True),
    ([0.35, 0.35, 0.35, 0.35], False),  # every clip within 1 point, but 0.35 on average
    ([1.1, 0.0, 0.0, 0.0], False),  # one clip off by more than a point
])
def test_int8_tolerance_bounds(offsets: list[float], passes: bool) -> None:
    reference = np.array([[40.0], [55.0], [62.0], [70.0]], np.float32)
    candidate = reference + np.array(offsets, np.float32)[:, None]
    assert compare(reference, candidate, "ef", "onnxruntime", "int8").passed is passes


def test_calibration_batches_are_train_clips_preprocessed_as_infer(synth_dataset: Path, tmp_path: Path) -> None:
    """TensorRT's calibrator takes equal batches: 5 TRAIN videos at batch 2 give 2 batches (the fifth is left
    out), each clip the first clip of its video as `evim3 infer` reads it; the cache file round-trips."""
    cache = tmp_path / "m.calib"
    clips = CalibrationClips(SPEC, cache, synth_dataset, batch=2, count=5)
    train = {line.split(",")[0] for line in (synth_dataset / "FileList.csv").read_text().splitlines()
             if line.endswith(",TRAIN")}
    assert len(clips.videos) == 5 and all(Path(v).stem in train for v in clips.videos)
    batches = list(clips)
    assert len(batches) == len(clips) == 2
    for i, batch in enumerate(batches):
        assert batch.shape == clips.shape == (2, 1, 8, 32, 32) and batch.dtype == np.float32
        assert batch.flags["C_CONTIGUOUS"]
        expected = np.stack([video_clip(v, SPEC) for v in clips.videos[2 * i:2 * i + 2]])
        np.testing.assert_array_equal(batch, expected)
    assert clips.read_cache() is None
    clips.write_cache(b"TRT-calibration-table")
    assert CalibrationClips(SPEC, cache).read_cache() == b"TRT-calibration-table"  # no data needed now
    with pytest.raises(ModelFileError, match="no calibration cache"):
        CalibrationClips(SPEC, tmp_path / "missing.calib")


def test_int8_usage_errors(int8: dict) -> None:
    code, output = run_cli("export", int8["checkpoint"], "--int8", "--fp16")
    assert code == 2 and "not both" in output
    code, output = run_cli("export", int8["checkpoint"], "--calib-data", int8["folder"])
    assert code == 2 and "--int8 engine" in output


def tensorrt_and_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_and_gpu(), reason="needs TensorRT and a CUDA GPU")
def test_int8_engine_calibrated_on_a_dataset_matches_pytorch(int8: dict, synth_dataset: Path) -> None:
    """`evim3 export --format engine --int8 --calib-data D` calibrates on D's TRAIN clips and caches the table;
    the engine passes `evim3 check` at the int8 tolerance; a rebuild reads the cache and needs no data."""
    engine, cache = int8["folder"] / "fitted-int8.engine", int8["folder"] / "fitted-int8.calib"
    code, output = run_cli("export", int8["checkpoint"], "--format", "engine", "--int8", "-o", engine,
                           "--calib-data", synth_dataset)
    assert code == 0, output
    assert cache.is_file() and cache.stat().st_size > 0
    code, output = run_cli("check", int8["checkpoint"], "--engine", engine, "--clips", "2")
    assert code == 0 and "parity: pass" in output, output
    code, output = run_cli("export", int8["checkpoint"], "--format", "engine", "--int8", "-o", engine)
    assert code == 0, output
