"""A seg model through `evim3 export` and `evim3 check`: ONNX Runtime against PyTorch (logits and LV masks),
the graph's form (Scan loops, metadata), fp16, and the inconclusive rule for flat references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from evim3.cli.main import app
from evim3.export.onnx import graph_stats, read_onnx_meta
from evim3.runtime.backends import open_backend
from evim3.runtime.meta import ModelMeta, PreprocessSpec
from evim3.runtime.outputs import lv_masks
from evim3.runtime.parity_check import SEG_TOLERANCES, compare, random_clips, real_clip
from typer.testing import CliRunner

from evim3.checkpoint import load_model, save_checkpoint
from evim3.config import get_preset
from evim3.models.evim3 import EViM3

# evim3-tiny's architecture, shrunk: 16 frames of 32 x 32, tubelets 2 x 8 x 8, one Mamba-3D block.
CFG = get_preset("evim3-tiny").replace(frames=16, img_size=32, time_patch=2, patch=8, dim=16, depth=1, d_state=4)
SPEC = PreprocessSpec(size=32, fps=50.0, frames=16, period=2, mean=32.5, std=48.0)
META = ModelMeta("evim3-tiny", CFG.to_dict(), SPEC, task="seg")
FP32 = SEG_TOLERANCES["fp32"]
FP16 = SEG_TOLERANCES["fp16"]

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def seg_model() -> EViM3:
    """A random seg model whose masks change with the clip: larger head weights spread the LV logit over the
    clips (measured SD 2.0 logits, four times the flat bound)."""
    torch.manual_seed(0)
    model = EViM3(CFG, task="seg")
    with torch.no_grad():
        model.head.proj.weight.mul_(3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("seg-export")
    checkpoint = folder / "seg.safetensors"
    save_checkpoint(checkpoint, seg_model().state_dict(), META)
    code, output = run_cli("export", checkpoint, "-o", folder / "seg.onnx")
    assert code == 0, output
    code, output = run_cli("export", checkpoint, "--fp16", "--dynamic-batch", "--opset", "18",
                           "-o", folder / "seg-fp16.onnx")
    assert code == 0, output
    return {"folder": folder, "checkpoint": checkpoint, "onnx": folder / "seg.onnx",
            "fp16": folder / "seg-fp16.onnx", "model": load_model(checkpoint)[0]}


def test_graph_has_the_seg_output_scan_loops_and_metadata(exported: dict):
    proto = onnx.load(str(exported["onnx"]))
    meta, props = read_onnx_meta(exported["onnx"])
    assert meta.task == "seg" and props["evim3.task"] == "seg"
    assert "background/LV logits" in props["evim3.output"]
    dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 2, SPEC.frames, SPEC.size, SPEC.size]
    stats = graph_stats(proto)
    assert stats.scans == 6 * CFG.depth  # one exportable scan (three ONNX Scan loops) per Mamba unit
    # Static gathers: no data-dependent indexing (the real-token selection is a constant Gather too).
    assert not {"NonZero", "Where", "ScatterND"} & set(stats.op_counts)


def test_onnxruntime_matches_pytorch(exported: dict):
    clips = np.concatenate([random_clips(SPEC, 3, seed=4), real_clip(SPEC)[None]])
    with torch.no_grad():
        reference = exported["model"](torch.from_numpy(clips)).numpy()
    with open_backend(str(exported["onnx"])) as backend:
        outputs = backend.run(clips)
    assert outputs.shape == reference.shape == (4, 2, SPEC.frames, SPEC.size, SPEC.size)
    row = compare(reference, outputs, "seg", "onnxruntime", "fp32")
    assert row.max_abs <= FP32.max_abs and row.dice >= FP32.min_dice and row.passed
    masks = lv_masks(reference)
    assert 0.05 < masks.mean() < 0.95  # the masks are not trivially all one class


def test_check_seg_fp32_and_fp16(exported: dict, synth_dataset: Path):
    for model_file in (exported["onnx"], exported["fp16"]):
        code, output = run_cli("check", exported["checkpoint"], "--onnx", model_file, "--clips", "2",
                               "--data", synth_dataset)
        assert code == 0, output
        assert "mask Dice" in output and "parity: pass" in output and "INCONCLUSIVE" not in output
        assert "LV logits, mean over pixels" in output


def test_check_seg_int8_qdq(exported: dict, synth_dataset: Path):
    """The Q/DQ INT8 seg file (calibrated on the synthetic TRAIN clips) passes the seg int8 bounds, Dice
    included, with both ONNX Runtime forms; the head's output layer stays float32."""
    path = exported["folder"] / "seg.int8.onnx"
    code, output = run_cli("export", exported["checkpoint"], "--int8", "--calib-data", synth_dataset, "-o", path)
    assert code == 0, output
    proto = onnx.load(str(path))
    assert "QuantizeLinear" in {n.op_type for n in proto.graph.node}
    code, output = run_cli("check", exported["checkpoint"], "--onnx", path, "--clips", "2", "--data", synth_dataset)
    assert code == 0 and "parity: pass" in output and "mask Dice" in output, output
    assert sum(" int8 " in line and line.rstrip().endswith("pass") for line in output.splitlines()) >= 1, output


def test_mask_dice_decides_when_logits_are_close(exported: dict):
    """Logits within the fp32 bound that still flip many masks fail on Dice."""
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1e-4, (2, 2, 4, 8, 8)).astype(np.float32)  # margins of ~1e-4 logits
    flipped = reference[:, ::-1].copy()  # every pixel's classes exchanged: max difference ~5e-4
    row = compare(reference, flipped, "seg", "x", "fp32")
    assert row.max_abs <= FP32.max_abs and row.dice < 0.5 and not row.passed


@pytest.mark.parametrize("bias, reason", [("random", "answers nearly the same for every clip"),
                                          ("background", "masks are all background")])
def test_flat_seg_reference_is_inconclusive(exported: dict, bias: str, reason: str):
    model = seg_model()
    with torch.no_grad():
        model.head.proj.weight.zero_()  # logits = the bias: one mask whatever the clip
        if bias == "background":
            model.head.proj.bias.copy_(torch.tensor([5.0, -5.0]).repeat_interleave(len(model.head.proj.bias) // 2))
    folder = exported["folder"]
    save_checkpoint(folder / f"flat-{bias}.safetensors", model.state_dict(), META)
    assert run_cli("export", folder / f"flat-{bias}.safetensors", "-o", folder / f"flat-{bias}.onnx")[0] == 0
    code, output = run_cli("check", folder / f"flat-{bias}.safetensors", "--onnx", folder / f"flat-{bias}.onnx",
                           "--clips", "2")
    assert code == 3 and "parity INCONCLUSIVE" in output and reason in output, output
