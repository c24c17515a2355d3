"""The parity machinery that needs no exported model (comparison, tolerances, golden files), the engine
file format, TensorRT's absence on CPU machines, and -- on a GPU with TensorRT -- engines built from
evim3-tiny checked against PyTorch."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from evim3.cli.main import app
from evim3.runtime.engine_file import (
    EngineHeader,
    check_engine_compatible,
    pack_engine,
    read_engine,
    read_engine_file,
    read_engine_header,
)
from evim3.runtime.errors import BackendUnavailableError, ModelFileError
from evim3.runtime.meta import ENGINE_MAGIC, ModelMeta, PreprocessSpec
from evim3.runtime.parity_check import (
    REAL_CLIP_NAME,
    TOLERANCES,
    Golden,
    compare,
    echo_clips,
    format_table,
    load_golden,
    random_clips,
    save_golden,
)
from typer.testing import CliRunner

from evim3.checkpoint import save_checkpoint
from evim3.config import get_preset
from evim3.models.evim3 import EViM3

runner = CliRunner()
META = ModelMeta("evim3-tiny", get_preset("evim3-tiny").to_dict(), PreprocessSpec(size=112, frames=32), ef_mean=55.0)


def trt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


# ------------------------------------------------------------------ comparison and tolerances

def test_identical_outputs_pass_and_offsets_fail() -> None:
    ref = np.array([[40.0], [55.0], [70.0]])
    same = compare(ref, ref.copy(), "ef", "x", "fp32")
    assert same.passed and same.max_abs == 0 and same.cosine == pytest.approx(1.0)
    just_inside = compare(ref, ref + 0.9 * TOLERANCES["fp32"].max_abs, "ef", "x", "fp32")
    assert just_inside.passed
    offset = 2 * TOLERANCES["fp32"].max_abs
    outside = compare(ref, ref + offset, "ef", "x", "fp32")
    assert not outside.passed and outside.max_abs == pytest.approx(offset, rel=1e-3)
    assert outside.ef_diff == pytest.approx(offset, rel=1e-3)
    assert compare(ref, ref + 0.3, "ef", "x", "fp16").passed  # looser bound for fp16
    assert not compare(ref, ref + 0.6, "ef", "x", "fp16").passed
    nan = ref.copy()
    nan[1] = np.nan
    assert not compare(ref, nan, "ef", "x", "fp16").passed


def test_means_are_judged_on_echo_clips_and_the_max_on_every_clip() -> None:
    # INT8 is calibrated on echo: its mean bound (0.3 EF) is judged on the echo clips, the seeded white-noise
    # clips count for the max (1.0) and the cosine.
    names = ["random 0", "random 1", REAL_CLIP_NAME, "a.avi", "b.avi"]
    echo = echo_clips(names)
    assert echo.tolist() == [False, False, True, True, True]
    assert echo_clips(["random 0", "random 1"]).all()  # no echo clip: every clip is judged
    ref = np.array([[80.0], [81.0], [50.0], [38.0], [67.0]])
    noisy_on_noise = ref + np.array([[0.7], [-0.7], [0.1], [-0.1], [0.1]])
    row = compare(ref, noisy_on_noise, "ef", "x", "int8", echo)
    assert row.passed and row.ef_diff == pytest.approx(0.1) and row.max_abs == pytest.approx(0.7)
    assert not compare(ref, noisy_on_noise, "ef", "x", "int8").passed  # all clips: mean 0.34 > 0.3
    off_on_echo = ref + np.array([[0.0], [0.0], [0.4], [-0.4], [0.4]])
    assert not compare(ref, off_on_echo, "ef", "x", "int8", echo).passed  # echo mean 0.4
    too_far_on_noise = ref + np.array([[1.2], [0.0], [0.0], [0.0], [0.0]])
    assert not compare(ref, too_far_on_noise, "ef", "x", "int8", echo).passed  # max 1.2 > 1.0


def test_classification_rows_use_logits_and_probabilities() -> None:
    ref = np.array([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]], np.float32)
    flipped = ref[:, ::-1].copy()
    row = compare(ref, flipped, "classification", "x", "fp32")
    assert not row.passed and row.cosine < 0.9 and row.ef_diff > 0.1
    with pytest.raises(ValueError, match="shape"):
        compare(ref, ref[:, :2], "classification", "x", "fp32")


def test_table_names_results_and_tolerances() -> None:
    ref = np.array([[50.0]], np.float32)
    table = format_table([compare(ref, ref, "ef", "onnxruntime CPU", "fp32"),
                          compare(ref, ref + 1, "ef", "TensorRT 10.3", "fp16")], "ef")
    lines = table.splitlines()
    assert "max abs (EF pts)" in lines[0] and "pass" in lines[1] and "FAIL" in lines[2]
    assert "fp32: max abs <= 0.001 EF pts" in lines[-1] and "fp16: max abs <= 0.5" in lines[-1]


def test_golden_file_round_trips(tmp_path: Path) -> None:
    clips = random_clips(META.preprocess, 2, seed=3)
    golden = Golden(clips, ["random 0", "random 1"], np.array([[51.0], [57.5]], np.float32), META)
    save_golden(tmp_path / "g.npz", golden)
    back = load_golden(tmp_path / "g.npz")
    np.testing.assert_array_equal(back.clips, clips)
    np.testing.assert_array_equal(back.reference, golden.reference)
    assert back.names == golden.names and back.meta.to_json() == META.to_json()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="junk.npz"):
        load_golden(tmp_path / "junk.npz")
    with pytest.raises(ModelFileError, match="not found"):
        load_golden(tmp_path / "absent.npz")


def test_random_clips_are_seeded_and_normalised_scale() -> None:
    a, b = random_clips(META.preprocess, 2, seed=1), random_clips(META.preprocess, 2, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 1, 32, 112, 112) and a.dtype == np.float32 and abs(a.std() - 1) < 0.01


# ------------------------------------------------------------------ engine files

HEADER = EngineHeader(meta=META, tensorrt="10.3.0", gpu="Orin", compute_capability="8.7", precision="fp16",
                      batch=(1, 2, 8))


def test_engine_file_round_trips(tmp_path: Path) -> None:
    plan = bytes(range(256)) * 4
    path = tmp_path / "m.engine"
    path.write_bytes(pack_engine(HEADER, plan))
    assert path.read_bytes()[:8] == ENGINE_MAGIC
    header, back = read_engine(path)
    assert header == HEADER and back == plan
    assert read_engine_header(path) == HEADER
    meta, back = read_engine_file(path)  # what the runtime's TensorRT backend reads
    assert meta.to_json() == META.to_json() and back == plan


@pytest.mark.parametrize("damage, problem", [
    (lambda b: b"NOTANENG" + b[8:], "not an evim3 engine"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b[:8] + struct.pack("<I", 1 << 30) + b[12:], "implausible"),
    (lambda b: b[:12] + b"X" + b[13:], "header is invalid"),
    (lambda b: b[: 12 + struct.unpack("<I", b[8:12])[0]], "no TensorRT plan"),
])
def test_damaged_engine_files_are_named(tmp_path: Path, damage, problem: str) -> None:
    path = tmp_path / "bad.engine"
    path.write_bytes(damage(pack_engine(HEADER, b"plan")))
    with pytest.raises(ModelFileError, match=problem) as info:
        read_engine(path)
    assert str(info.value).startswith(str(path))


def test_engine_for_another_tensorrt_or_gpu_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "m.engine")
    check_engine_compatible(path, HEADER, "10.3.0", "Orin", "8.7")  # same: fine
    with pytest.raises(ModelFileError, match="TensorRT 10.3.0 on Orin .* this machine has TensorRT 10.7.0"):
        check_engine_compatible(path, HEADER, "10.7.0", "Orin", "8.7")
    with pytest.raises(ModelFileError, match="built for .* NVIDIA H100 .* rebuild it on this GPU"):
        check_engine_compatible(path, HEADER, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0")


# ------------------------------------------------------------------ without TensorRT (CPU machines)

@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    torch.manual_seed(0)
    save_checkpoint(path, EViM3(get_preset("evim3-tiny")).state_dict(), META)
    return path


@pytest.mark.skipif(trt_available(), reason="TensorRT is installed here")
def test_engine_export_without_tensorrt_says_so(small_checkpoint: Path) -> None:
    from evim3.export.tensorrt import import_tensorrt

    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        import_tensorrt()
    result = runner.invoke(app, ["export", str(small_checkpoint), "--format", "engine"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "TensorRT is not installed" in lines[0]
    assert not small_checkpoint.with_suffix(".onnx").exists()  # failed before the slow ONNX export


@pytest.mark.skipif(trt_available(), reason="TensorRT is installed here")
def test_checking_an_engine_without_tensorrt_says_so(tmp_path: Path) -> None:
    golden = tmp_path / "g.npz"
    save_golden(golden, Golden(random_clips(META.preprocess, 1), ["random 0"], np.zeros((1, 1), np.float32), META))
    engine = tmp_path / "m.engine"
    engine.write_bytes(pack_engine(HEADER, b"plan"))
    result = runner.invoke(app, ["check", "--load-golden", str(golden), "--engine", str(engine)])
    assert result.exit_code == 1 and "TensorRT is not installed" in result.output
    engine.write_bytes(b"garbage")
    result = runner.invoke(app, ["check", "--load-golden", str(golden), "--engine", str(engine)])
    assert result.exit_code == 1 and "not an evim3 engine file" in result.output


# ------------------------------------------------------------------ with TensorRT and a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not trt_available(), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_pytorch(small_checkpoint: Path, precision: str) -> None:
    """Build an engine through `evim3 export --format engine`, then `evim3 check` it: the tolerance of
    its precision (fp32: 1e-4 EF points with TF32 off; fp16: 0.5 EF points, scan in float32)."""
    engine = small_checkpoint.parent / f"tiny-{precision}.engine"
    extra = ["--fp16"] if precision == "fp16" else []
    result = runner.invoke(app, ["export", str(small_checkpoint), "--format", "engine", "-o", str(engine), *extra])
    assert result.exit_code == 0, result.output
    assert read_engine_header(engine).precision == precision
    result = runner.invoke(app, ["check", str(small_checkpoint), "--engine", str(engine), "--clips", "2"])
    assert result.exit_code == 0, result.output
    assert "TensorRT" in result.output and "parity: pass" in result.output
