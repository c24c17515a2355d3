"""INT8: `evim3 export --int8` (one explicitly quantised Q/DQ ONNX for ONNX Runtime and TensorRT 10/11,
calibrated on TRAIN clips, export/quantize.py), its tolerance in `evim3 check`, and the integer arithmetic
of x86 CPUs without VNNI, emulated.

The model is a shrunk evim3-tiny fitted for 60 steps to spread EF over random clips: a random init
answers nearly the same for every clip, and its features vary so little between clips that 8-bit steps
swamp them (measured: int8 error 0.3-0.6x the output spread at random init, 0.03x after fitting, in line
with the 0.02x of the demo's fine-tuned evim3-tiny).

Why the emulation: ONNX Runtime picks its integer kernels by CPU (MLAS reads CPUID; nothing forces another
path). On x86 without VNNI the uint8 x int8 kernel multiplies with VPMADDUBSW, which adds each pair of
products into a saturating int16, so the machine that runs the tests (VNNI) computes other numbers than a
user's AVX2 laptop. export/avx2_emulation.py computes a layer exactly as that instruction does; the int8 graph is
evaluated with it (ONNX's reference evaluator, each quantised MatMul replaced) and must equal the exact
integer product: the 7-bit weights leave no pair that can saturate. The same evaluation of a graph whose
weights use the full 8-bit range does saturate, so the emulation can see the failure it guards against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from evim3.cli.main import app
from evim3.export.avx2_emulation import (
    INT16_MAX,
    avx2_evaluator,
    avx2_u8s8_products,
    emulated_products,
    saturated_pairs,
)
from evim3.export.calibration import CALIBRATION_SPLIT
from evim3.export.quantize import WEIGHT_LEVELS, calibration_videos, quantized_layers
from evim3.export.trt_rules import check_graph
from evim3.runtime.meta import PRECISIONS, ModelMeta, PreprocessSpec
from evim3.runtime.parity_check import (
    TOLERANCES,
    compare,
    dataset_videos,
    load_golden,
    random_clips,
    video_clip,
)
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
def int8(tmp_path_factory: pytest.TempPathFactory, synth_dataset: Path) -> dict:
    folder = tmp_path_factory.mktemp("int8")
    checkpoint = folder / "fitted.safetensors"
    save_checkpoint(checkpoint, fitted_model().state_dict(), META)
    code, output = run_cli("export", checkpoint, "--int8", "--calib-data", synth_dataset)
    assert code == 0, output
    fp32 = folder / "fitted.onnx"
    assert run_cli("export", checkpoint)[0] == 0
    return {"folder": folder, "checkpoint": checkpoint, "onnx": folder / "fitted.int8.onnx", "fp32": fp32,
            "table": folder / "fitted.int8.calib.json", "output": output}


def test_every_precision_has_one_tolerance() -> None:
    assert set(TOLERANCES) == set(PRECISIONS) and TOLERANCES["int8"].max_abs == 1.0
    assert TOLERANCES["int8"].max_mean == 0.3


def test_int8_export_is_one_qdq_graph_for_every_engine(int8: dict) -> None:
    """Q/DQ pairs, no dynamic quantisation; the linear layers int8 but for out_proj and the head's output
    layer; scales finite and positive and every other TensorRT 10.x and 11.x parser rule kept."""
    assert f"wrote {int8['onnx']}: opset 17, int8, batch 1" in int8["output"]
    proto = onnx.load(str(int8["onnx"]))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert not {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul"} & set(ops)
    units = 6 * CFG.depth
    layers = quantized_layers(proto)
    # in/x/dt projections of every Mamba unit and the head's hidden layers; out_proj and the output layer float
    assert len(layers) == 3 * units + CFG.head_layers
    assert ops.count("QuantizeLinear") >= len({n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"})
    weights = {i.name for i in proto.graph.initializer}
    float_linears = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert len(float_linears) == units + 1  # out_proj of every unit, and the output layer
    for layer in layers:
        assert layer.weight.dtype == np.int8 and layer.weight_scale.shape == (layer.weight.shape[1],)  # per channel
        assert np.isfinite(layer.weight_scale).all() and (layer.weight_scale > 0).all()
        assert np.isfinite(layer.activation_scale) and layer.activation_scale > 0
    for generation in ("10", "11"):
        assert check_graph(proto, generation) == [], generation
    assert {o.domain for o in proto.opset_import} == {""}  # standard ONNX: no ONNX Runtime contrib op
    assert {p.key: p.value for p in proto.metadata_props}["evim3.precision"] == "int8"


def test_calibration_table_is_stored_and_rebuilds_without_data(int8: dict, synth_dataset: Path) -> None:
    """The table names its seeded TRAIN videos; a re-export reads it (no data) and writes the same graph; a
    table of another model is refused with one line; no table and no data is one line too."""
    table = json.loads(int8["table"].read_text())
    expected = calibration_videos(synth_dataset)
    assert table["split"] == CALIBRATION_SPLIT and table["videos"] == [Path(v).name for v in expected]
    train = {line.split(",")[0] for line in (synth_dataset / "FileList.csv").read_text().splitlines()
             if line.endswith(",TRAIN")}
    assert {Path(v).stem for v in table["videos"]} <= train and len(table["videos"]) == len(train)
    assert calibration_videos(synth_dataset, count=3) == calibration_videos(synth_dataset, count=3)  # seeded
    assert len(calibration_videos(synth_dataset, count=3)) == 3

    again = int8["folder"] / "again.onnx"
    code, output = run_cli("export", int8["checkpoint"], "--int8", "-o", again, "--calib-cache", int8["table"])
    assert code == 0, output
    first, second = onnx.load(str(int8["onnx"])), onnx.load(str(again))
    assert first.graph == second.graph

    torch.manual_seed(1)
    other = int8["folder"] / "other.safetensors"
    save_checkpoint(other, EViM3(CFG, ef_mean=55.0).state_dict(), META)
    code, output = run_cli("export", other, "--int8", "--calib-cache", int8["table"])
    assert code == 1 and "made for another model" in output and len(output.strip().splitlines()) == 1, output
    code, output = run_cli("export", other, "--int8")
    assert code == 1 and "no calibration table" in output and "--calib-data" in output, output


def test_weights_cannot_saturate_the_avx2_kernel(int8: dict) -> None:
    """Every int8 weight within +-WEIGHT_LEVELS: a pair of uint8 x int8 products stays inside int16."""
    layers = quantized_layers(onnx.load(str(int8["onnx"])))
    assert layers and all(np.abs(layer.weight.astype(int)).max() <= WEIGHT_LEVELS for layer in layers)
    assert 2 * 255 * WEIGHT_LEVELS <= INT16_MAX


def test_avx2_emulation_is_exact_without_saturation_and_sees_it() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 33), dtype=np.uint8)
    small = rng.integers(-WEIGHT_LEVELS, WEIGHT_LEVELS + 1, (33, 4)).astype(np.int8)
    product, saturated = avx2_u8s8_products(a, small)
    assert saturated == 0 and np.array_equal(product, a.astype(np.int64) @ small.astype(np.int64))
    big = np.full((33, 4), 127, np.int8)
    product, saturated = avx2_u8s8_products(np.full((5, 33), 255, np.uint8), big)
    assert saturated == 5 * 16 * 4 and product[0, 0] == 16 * INT16_MAX + 255 * 127  # 2*255*127 > int16


def full_range_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with each int8 weight doubled and its scale halved (the same float weight to the 8-bit
    range, as quantisation without reduce_range writes it)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[1]].dims:
            weight, scale = (onnx.numpy_helper.to_array(inits[name]) for name in node.input[:2])
            inits[node.input[0]].CopyFrom(onnx.numpy_helper.from_array(
                np.clip(weight.astype(int) * 2, -127, 127).astype(np.int8), node.input[0]))
            inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(scale / 2, node.input[1]))
    return proto


def test_int8_on_an_avx2_cpu_equals_vnni_and_stays_in_budget(int8: dict, synth_dataset: Path) -> None:
    """The int8 graph evaluated with the saturating AVX2 arithmetic: no pair saturates, the output equals the
    exact-integer evaluation and ONNX Runtime's (this machine's kernels), and it is within the int8 tolerance
    of fp32. With full-range weights the same clips saturate (the failure the 7-bit weights prevent)."""
    import onnxruntime as ort

    clips = np.concatenate([random_clips(SPEC, 3, seed=5)] +
                           [video_clip(v, SPEC)[None] for v in dataset_videos(synth_dataset, 2)])
    proto = onnx.load(str(int8["onnx"]))

    def evaluate(graph: onnx.ModelProto) -> np.ndarray:
        evaluator = avx2_evaluator(graph)
        return np.concatenate([evaluator.run(None, {"clip": c[None]})[0] for c in clips])

    avx2 = evaluate(proto)
    assert saturated_pairs() == 0 and emulated_products() == len(clips) * len(quantized_layers(proto))
    session = ort.InferenceSession(str(int8["onnx"]), providers=["CPUExecutionProvider"])
    native = np.concatenate([session.run(None, {"clip": c[None]})[0] for c in clips])
    reference = np.concatenate([ort.InferenceSession(str(int8["fp32"]), providers=["CPUExecutionProvider"])
                                .run(None, {"clip": c[None]})[0] for c in clips])
    # the emulation computes in float64 from exact integers; ONNX Runtime requantises between fused layers
    np.testing.assert_allclose(avx2, native, atol=0.05)
    assert compare(reference, avx2, "ef", "onnxruntime", "int8").passed

    evaluate(full_range_weights(proto))
    assert saturated_pairs() > 0


def test_check_passes_int8_within_its_tolerance(int8: dict, synth_dataset: Path) -> None:
    golden = int8["folder"] / "golden.npz"
    code, output = run_cli("check", int8["checkpoint"], "--onnx", int8["onnx"], "--data", synth_dataset,
                           "--save-golden", golden)
    assert code == 0, output
    rows = [line for line in output.splitlines() if line.startswith("onnxruntime")]
    assert rows and all(" int8 " in row and row.rstrip().endswith("pass") for row in rows), output
    assert "int8: max abs <= 1 EF pts, mean abs <= 0.3" in output and "parity: pass" in output
    assert load_golden(golden).reference.std() >= 1.0  # the model answers differently per clip


def test_check_int8_fails_a_wrong_model(int8: dict, synth_dataset: Path) -> None:
    """The random-init model (same config, other weights) exported int8, judged against the fitted model's
    reference; and the right file against a reference moved by 0.5 EF everywhere (the mean bound)."""
    golden = int8["folder"] / "golden-wrong.npz"
    assert run_cli("check", int8["checkpoint"], "--save-golden", golden, "--clips", "3")[0] == 0
    torch.manual_seed(0)
    wrong = int8["folder"] / "random.safetensors"
    save_checkpoint(wrong, EViM3(CFG, ef_mean=55.0).state_dict(), META)
    assert run_cli("export", wrong, "--int8", "--calib-data", synth_dataset)[0] == 0
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


def test_int8_usage_errors(int8: dict) -> None:
    code, output = run_cli("export", int8["checkpoint"], "--int8", "--fp16")
    assert code == 2 and "not both" in output
    code, output = run_cli("export", int8["checkpoint"], "--calib-data", int8["folder"])
    assert code == 2 and "--int8" in output
    code, output = run_cli("export", int8["checkpoint"], "--int8", "--calib-method", "kl")
    assert code == 2 and "minmax" in output


def tensorrt_and_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_and_gpu(), reason="needs TensorRT and a CUDA GPU")
def test_int8_engine_from_the_qdq_onnx_matches_pytorch(int8: dict, synth_dataset: Path) -> None:
    """`evim3 export --format engine --int8 --calib-data D` builds a strongly typed engine from the Q/DQ ONNX
    (on TensorRT 10 and 11 alike); it passes `evim3 check` at the int8 tolerance; a rebuild reads the stored
    calibration table and needs no data."""
    engine = int8["folder"] / "fitted-int8.engine"
    code, output = run_cli("export", int8["checkpoint"], "--format", "engine", "--int8", "-o", engine,
                           "--calib-data", synth_dataset)
    assert code == 0 and "(strongly typed)" in output, output
    assert (int8["folder"] / "fitted-int8.calib.json").is_file()
    code, output = run_cli("check", int8["checkpoint"], "--engine", engine, "--clips", "2")
    assert code == 0 and "parity: pass" in output, output
    code, output = run_cli("export", int8["checkpoint"], "--format", "engine", "--int8", "-o", engine)
    assert code == 0, output
