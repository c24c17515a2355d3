"""evim3-tiny -> ONNX -> ONNX Runtime, through the `evim3 export` and `evim3 check` commands.

The model is exported twice per module (fp32 opset 17 fixed batch; fp16 opset 18 dynamic batch), each
through the CLI, and every test below reads those files. The model is a random init made input-sensitive
(larger out_proj and head weights, random global tokens) so that EF moves by whole points between clips:
a parity bound of 1e-3 then means something.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from evim3.cli.main import app
from evim3.export.onnx import SCAN_TAG, downgrade_to_opset17, graph_stats, read_onnx_meta
from evim3.runtime import fused_scan
from evim3.runtime.backends import open_backend
from evim3.runtime.errors import BackendUnavailableError
from evim3.runtime.meta import INPUT_NAME, META_KEY, OUTPUT_NAME, PRECISION_PROP, ModelMeta, PreprocessSpec
from evim3.runtime.parity_check import TOLERANCES, load_golden, random_clips, real_clip, reference_spread
from typer.testing import CliRunner

from evim3.checkpoint import load_model, save_checkpoint
from evim3.config import get_preset
from evim3.models.evim3 import EViM3
from evim3.ops import selective_scan, selective_scan_exportable, selective_scan_ref

PRESET = "evim3-tiny"
FP32_TOL = TOLERANCES["fp32"].max_abs  # 1e-3 EF points
FP16_TOL = TOLERANCES["fp16"].max_abs  # 0.5 EF points

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """PyTorch references on one thread: on a busy 2-core CI machine its OpenMP barriers make a 2-thread
    evim3-tiny forward 10-20x slower (measured 11-25 s vs 1.2 s at load 7); results are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the exportable scan itself

@pytest.mark.parametrize("seqlen, chunk", [(50, 0), (49, 0), (37, 5), (1, 0), (2, 0)])
def test_exportable_scan_matches_reference(seqlen: int, chunk: int) -> None:
    """Same outputs and last state as the float64 reference, padding (L not a multiple of the chunk)
    included. Tolerance: float32 accumulation over <= 50 steps, 1e-5 relative to the output scale."""
    g = torch.Generator().manual_seed(seqlen)
    b, d, n = 2, 6, 4
    u, delta, z = (torch.randn(b, d, seqlen, generator=g) for _ in range(3))
    B, C = (torch.randn(b, n, seqlen, generator=g) for _ in range(2))
    A = -torch.rand(d, n, generator=g) * 4
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    args = (u, delta, A, B, C, D, z, bias, True, True)
    y, last = selective_scan_exportable(*args, chunk=chunk)
    y_ref, last_ref = selective_scan_ref(*args)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape and last.shape == last_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5 * float(y_ref.abs().max()))
    torch.testing.assert_close(last, last_ref, rtol=0, atol=1e-5 * float(last_ref.abs().max()))
    torch.testing.assert_close(selective_scan(*args[:-1], impl="exportable"), y)  # the dispatcher runs it by name


def split_model(length: int, parts: int) -> onnx.ModelProto:
    """An opset-18 graph with one Split in its opset-18 form (num_outputs), as torch's exporter writes it."""
    h = onnx.helper
    outputs = [f"y{i}" for i in range(parts)]
    graph = h.make_graph(
        [h.make_node("Split", ["x"], outputs, axis=1, num_outputs=parts)], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, length])],
        [h.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [2, None]) for o in outputs])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def test_opset17_rewrite_of_split() -> None:
    """An even Split becomes Split-13 (same result in ONNX Runtime); an uneven one is refused."""
    proto = split_model(6, 2)
    downgrade_to_opset17(proto)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17 and not proto.graph.node[0].attribute[1:]
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    y0, y1 = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(np.concatenate([y0, y1], axis=1), x)
    with pytest.raises(ValueError, match="--opset 18"):
        downgrade_to_opset17(split_model(7, 2))


@pytest.mark.parametrize("max_step", [1e-6, 70.0, 2e4])
def test_exportable_scan_at_long_length_and_extreme_steps(max_step: float) -> None:
    """L = 5,000 (71 chunks of ~sqrt(L)), dt log-normal (test_scan's heavy-tailed inputs) scaled so that the
    largest per-step |delta * A| is 1e-6 (no decay: the state integrates all 5,000 steps), 70, or 2e4 (exp
    underflows to 0). float32 against the float64 reference: relative L2 <= 1e-5, outputs and last state."""
    from test_scan import F32_REL_TOL, rel_l2, scan_args

    args64 = scan_args(batch=1, d=4, n=4, seqlen=5000, seed=5, max_step=max_step, dtype=torch.float64)
    args32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in args64.items()}
    y, last = selective_scan_exportable(**args32, return_last_state=True)
    y_ref, last_ref = selective_scan_ref(**args64, return_last_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert rel_l2(y, y_ref) <= F32_REL_TOL and rel_l2(last, last_ref) <= F32_REL_TOL


# ------------------------------------------------------------------ fixtures: one checkpoint, two exports

def input_sensitive_model(cfg) -> EViM3:
    torch.manual_seed(0)
    model = EViM3(cfg, ef_mean=55.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("out_proj.weight"):
                p.mul_(4)
        model.head.mlp[-1].weight.mul_(300)
        model.head.proj[0].weight.mul_(30)  # the enclosure mean (evim3-tiny) averages the variation away
        for name in ("faces", "edges", "corners", "reg"):
            getattr(model.encoder, f"global_{name}_token").normal_(0, 0.02)
    return model.eval()


def run_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("export")
    cfg = get_preset(PRESET)
    spec = PreprocessSpec(size=cfg.img_size, fps=50.0, frames=cfg.frames, period=2, mean=32.5, std=48.0)
    meta = ModelMeta(PRESET, cfg.to_dict(), spec, task="ef", ef_mean=55.0)
    checkpoint = folder / "tiny.safetensors"
    save_checkpoint(checkpoint, input_sensitive_model(cfg).state_dict(), meta)
    code, output = run_cli("export", checkpoint, "--preset", PRESET)
    assert code == 0, output
    model, _ = load_model(checkpoint)
    return {"folder": folder, "checkpoint": checkpoint, "onnx": folder / "tiny.onnx", "model": model,
            "meta": meta, "export_output": output}


@pytest.fixture(scope="module")
def tiny_fp16(tiny: dict) -> Path:
    path = tiny["folder"] / "tiny-fp16.onnx"
    code, output = run_cli("export", tiny["checkpoint"], "--fp16", "--dynamic-batch", "--opset", "18", "-o", path)
    assert code == 0, output
    return path


def ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    # spinning worker threads starve everything else on a shared 2-core CI machine
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_outputs(path: Path, clips: np.ndarray) -> np.ndarray:
    session = ort_session(path)
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: clip[None]})[0] for clip in clips])


def torch_outputs(model: EViM3, clips: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(clips)).numpy()


# ------------------------------------------------------------------ the fp32 graph

def test_export_command_reports_the_graph(tiny: dict) -> None:
    assert f"wrote {tiny['onnx']}: opset 17, fp32, batch 1" in tiny["export_output"]
    assert tiny["onnx"].is_file() and not list(tiny["folder"].glob("*.tmp-*"))


def test_graph_is_valid_and_bounded(tiny: dict) -> None:
    """checker (full), opset 17, clip -> output, and the scan as Scan loops: a fixed, small number of nodes
    per scan, not an unrolled loop (unrolled, evim3-tiny has ~20,000 nodes)."""
    proto = onnx.load(str(tiny["onnx"]))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert proto.graph.input[0].name == INPUT_NAME and shape == [1, 1, 32, 112, 112]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    stats = graph_stats(proto)
    cfg = get_preset(PRESET)
    assert stats.scans == 6 * cfg.depth and stats.op_counts["Scan"] == 3 * stats.scans
    assert 20 <= stats.nodes_per_scan <= 60, stats
    assert stats.nodes < 1500, stats.nodes
    # no source locations of the exporting machine leak into the file
    assert not any(n.metadata_props for n in proto.graph.node)
    assert all(n.name.startswith(SCAN_TAG) for n in proto.graph.node if n.op_type == "Scan")


def test_metadata_round_trips(tiny: dict) -> None:
    meta, props = read_onnx_meta(tiny["onnx"])
    assert meta.to_json() == tiny["meta"].to_json()
    assert meta.preprocess.mean == 32.5 and meta.preprocess.std == 48.0 and meta.ef_mean == 55.0
    assert meta.precision == props[PRECISION_PROP] == "fp32" and props[f"{META_KEY}.preset"] == PRESET


def test_onnxruntime_matches_pytorch_on_random_clips(tiny: dict) -> None:
    """Fresh seeded clips at the scale of normalised echo input; fp32 bound 1e-3 EF points."""
    clips = random_clips(tiny["meta"].preprocess, 3, seed=123)
    expected = torch_outputs(tiny["model"], clips)
    assert expected.std() > 0.3, "model output does not depend on its input: the test would prove nothing"
    np.testing.assert_allclose(ort_outputs(tiny["onnx"], clips), expected, rtol=0, atol=FP32_TOL)


def test_onnxruntime_matches_pytorch_on_a_real_echo(tiny: dict) -> None:
    clip = real_clip(tiny["meta"].preprocess)[None]
    assert clip.shape == (1, 1, 32, 112, 112) and np.isfinite(clip).all() and clip.std() > 0.1
    np.testing.assert_allclose(ort_outputs(tiny["onnx"], clip), torch_outputs(tiny["model"], clip),
                               rtol=0, atol=FP32_TOL)


# ------------------------------------------------------------------ fp16, dynamic batch, opset 18

def test_fp16_keeps_the_scan_in_float32(tiny_fp16: Path) -> None:
    proto = onnx.load(str(tiny_fp16))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    weights = [i for i in proto.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    half = [i for i in weights if i.data_type == onnx.TensorProto.FLOAT16]
    assert sum(onnx.numpy_helper.to_array(i).size for i in half) > 0.9 * sum(
        onnx.numpy_helper.to_array(i).size for i in weights)
    for node in (n for n in proto.graph.node if n.op_type == "Scan"):
        body = node.attribute[0].g
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in (*body.input, *body.output))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta, props = read_onnx_meta(tiny_fp16)
    assert meta.precision == props[PRECISION_PROP] == "fp16"


def test_fp16_matches_pytorch_within_its_tolerance(tiny: dict, tiny_fp16: Path) -> None:
    """A batch of 3 through the dynamic batch; fp16 bound 0.5 EF points against the fp32 model."""
    clips = random_clips(tiny["meta"].preprocess, 3, seed=7)
    session = ort_session(tiny_fp16)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: clips})[0]
    assert got.shape == (3, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_outputs(tiny["model"], clips), rtol=0, atol=FP16_TOL)


# ------------------------------------------------------------------ `evim3 check` end to end

@pytest.fixture(scope="module")
def checked(tiny: dict, synth_dataset: Path) -> dict:
    """`evim3 check CKPT --onnx F --data D --save-golden G`, once: its exit code, output and golden file."""
    golden = tiny["folder"] / "golden.npz"
    code, output = run_cli("check", tiny["checkpoint"], "--onnx", tiny["onnx"], "--clips", "2",
                           "--data", synth_dataset, "--save-golden", golden)
    return {"code": code, "output": output, "golden": golden}


def test_check_passes_and_writes_a_golden_file(checked: dict) -> None:
    output = checked["output"]
    assert checked["code"] == 0, output
    assert "onnxruntime CPUExecutionProvider" in output and "parity: pass" in output and "FAIL" not in output
    assert "random 0, random 1, pydicom ybr_color echo, " in output and checked["golden"].is_file()
    golden = load_golden(checked["golden"])
    assert len(golden.names) == 5 and all(name.endswith(".avi") for name in golden.names[3:])  # the 2 TEST videos
    assert f"SD {reference_spread(golden):.3g} EF points" in output and reference_spread(golden) >= 1.0
    assert "INCONCLUSIVE" not in output


def test_check_of_a_flat_model_is_inconclusive(tiny: dict) -> None:
    """A model that answers the same EF for every clip agrees with its export trivially: exit 3 (inconclusive),
    said plainly, unless --allow-flat."""
    model = input_sensitive_model(get_preset(PRESET))
    with torch.no_grad():
        model.head.mlp[-1].weight.zero_()  # the output is the bias: 55 EF for every input
    flat = tiny["folder"] / "flat.safetensors"
    save_checkpoint(flat, model.state_dict(), tiny["meta"])
    assert run_cli("export", flat, "-o", tiny["folder"] / "flat.onnx")[0] == 0
    code, output = run_cli("check", flat, "--onnx", tiny["folder"] / "flat.onnx", "--clips", "2")
    assert code == 3 and "parity INCONCLUSIVE" in output and "SD 0 EF points" in output, output
    code, output = run_cli("check", flat, "--onnx", tiny["folder"] / "flat.onnx", "--clips", "2", "--allow-flat")
    assert code == 0 and "INCONCLUSIVE" in output and "parity: pass" in output, output


def test_check_from_a_golden_file_needs_no_torch(tiny: dict, checked: dict) -> None:
    """The GPU-box path: a golden file and a model file, in a process where importing torch fails."""
    script = ("import sys; sys.modules['torch'] = None\n"
              "from evim3.cli.main import app\n"
              f"app(['check', '--load-golden', {str(checked['golden'])!r}, '--onnx', {str(tiny['onnx'])!r}])\n")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "parity: pass" in done.stdout and "golden file" in done.stdout


def test_check_fails_when_outputs_differ(tiny: dict, checked: dict) -> None:
    """A golden file whose reference is off by 0.01 EF points -> FAIL and exit 1."""
    shifted = tiny["folder"] / "golden-shifted.npz"
    with np.load(checked["golden"]) as data:
        arrays = dict(data)
    arrays["reference"] = arrays["reference"] + 0.01
    np.savez(shifted, **arrays)
    code, output = run_cli("check", "--load-golden", shifted, "--onnx", tiny["onnx"])
    assert code == 1 and "FAIL" in output and "parity FAILED" in output


# ------------------------------------------------------------------ the fused scan op (runtime/fused_scan.py)

# Installed with the [fast-cpu] extra (CI installs it): then the op must run, not be skipped.
needs_fused = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_extensions") is None,
                                 reason="the [fast-cpu] extra (onnxruntime-extensions) is not installed")


@needs_fused
def test_fused_op_kernel_matches_the_float64_reference() -> None:
    """The op's C kernel, on the layouts the exported graph hands it, against the float64 reference on fresh
    heavy-tailed inputs (|delta A| up to 70, L = 1031, odd sizes): relative L2 <= F32_REL_TOL (1e-5); one and two
    threads give the same bits (rows are independent)."""
    from test_scan import F32_REL_TOL, rel_l2, scan_args

    assert fused_scan.unavailable_reason() is None
    args = scan_args(batch=2, d=7, n=5, seqlen=1031, seed=21, dtype=torch.float64)
    expected = selective_scan_ref(**args)
    op_inputs = {"u": args["u"], "delta": args["delta"], "A_t": args["A"].T, "B": args["B"].transpose(1, 2),
                 "C": args["C"].transpose(1, 2), "D": args["D"][:, None], "z": args["z"],
                 "delta_bias": args["delta_bias"][:, None]}
    arrays = [op_inputs[role].float().numpy() for role in fused_scan.SCAN_INPUTS]
    one, two = (fused_scan.selective_scan_op(*arrays, threads=t) for t in (1, 2))
    assert rel_l2(torch.from_numpy(two), expected) <= F32_REL_TOL
    np.testing.assert_array_equal(one, two)
    short_C = [a[:, :-1] if role == "C" else a for role, a in zip(fused_scan.SCAN_INPUTS, arrays)]
    with pytest.raises(ValueError, match=r"C \(2, 1030, 5\) \(expected \(2, 1031, 5\)\)"):
        fused_scan.selective_scan_op(*short_C)  # the C kernel trusts its sizes: the wrapper must not


def test_export_records_every_scan_boundary(tiny: dict) -> None:
    """Each of the 6 x depth scans has all its op inputs and its output named, every name is in the graph, and
    the markers that found them left nothing behind (standard opset only)."""
    proto = onnx.load(str(tiny["onnx"]))
    scans = fused_scan.scan_boundaries({p.key: p.value for p in proto.metadata_props})
    assert len(scans) == 6 * get_preset(PRESET).depth
    names = {o for n in proto.graph.node for o in n.output} | {t.name for t in proto.graph.initializer}
    assert all(name in names for scan in scans for name in scan.values())
    assert len({scan["out"] for scan in scans}) == len(scans)
    assert [o.domain for o in proto.opset_import] == [""]


@needs_fused
def test_fused_scan_backend_matches_pytorch(tiny: dict) -> None:
    """`evim3 infer`'s default on CPU: every scan one SelectiveScan node, no Scan loop left; EF within the fp32
    bound (1e-3 points) of PyTorch on clips whose EFs differ by whole points."""
    graph = onnx.load_from_string(fused_scan.fused_model_bytes(str(tiny["onnx"]), threads=2))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("SelectiveScan") == 6 * get_preset(PRESET).depth and "Scan" not in ops
    clips = random_clips(tiny["meta"].preprocess, 3, seed=321)
    expected = torch_outputs(tiny["model"], clips)
    assert expected.std() > 0.3, "model output does not depend on its input: the test would prove nothing"
    with open_backend(tiny["onnx"], provider="cpu", threads=2) as backend:
        assert "fused scan" in backend.device
        np.testing.assert_allclose(backend.run(clips), expected, rtol=0, atol=FP32_TOL)


@needs_fused
def test_check_runs_both_scan_forms(checked: dict) -> None:
    lines = checked["output"].splitlines()
    fused = [line for line in lines if "fused scan" in line]
    graph = [line for line in lines if "CPUExecutionProvider, 2 threads" in line and "fused" not in line]
    assert len(fused) == 1 and "pass" in fused[0] and len(graph) == 1 and "pass" in graph[0], checked["output"]


@needs_fused
def test_a_file_without_scan_boundaries_runs_the_standard_graph(tiny: dict, capsys) -> None:
    """Files exported before the boundaries were recorded: 'auto' runs their graph and says why; 'fused' is a
    one-line error naming the file."""
    proto = onnx.load(str(tiny["onnx"]))
    kept = [p for p in proto.metadata_props if p.key != fused_scan.SCANS_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    old = tiny["folder"] / "old.onnx"
    onnx.save(proto, str(old))
    with open_backend(old, provider="cpu", threads=2) as backend:
        assert "fused" not in backend.device
    assert "running the standard scan graph" in capsys.readouterr().err
    with pytest.raises(BackendUnavailableError, match="old.onnx: cannot run the fused scan op: the file does"):
        open_backend(old, provider="cpu", scan="fused")


# ------------------------------------------------------------------ errors: one line, non-zero exit

def one_line_error(code: int, output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def test_corrupt_checkpoint_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert "broken.safetensors" in one_line_error(*run_cli("export", bad))
    assert "checkpoint not found" in one_line_error(*run_cli("export", tmp_path / "missing.safetensors"))
    assert "broken.safetensors" in one_line_error(*run_cli("check", bad, "--onnx", bad))


def test_preset_mismatch_is_one_line(tiny: dict) -> None:
    line = one_line_error(*run_cli("export", tiny["checkpoint"], "--preset", "evim3", "-o",
                                   tiny["folder"] / "never.onnx"))
    assert "'evim3-tiny', not 'evim3'" in line and not (tiny["folder"] / "never.onnx").exists()


def test_onnx_whose_input_contradicts_its_metadata_is_one_line(tiny: dict, checked: dict) -> None:
    proto = onnx.load(str(tiny["onnx"]))
    meta = ModelMeta.from_json(next(p.value for p in proto.metadata_props if p.key == META_KEY))
    meta.preprocess = PreprocessSpec(size=112, frames=16)
    next(p for p in proto.metadata_props if p.key == META_KEY).value = meta.to_json()
    lying = tiny["folder"] / "lying.onnx"
    onnx.save(proto, str(lying))
    line = one_line_error(*run_cli("check", "--load-golden", checked["golden"], "--onnx", lying))
    assert "lying.onnx" in line and "metadata" in line


def test_usage_errors(tiny: dict) -> None:
    code, output = run_cli("check", tiny["checkpoint"])
    assert code == 2 and "nothing to check" in output
    code, output = run_cli("check", "--onnx", tiny["onnx"])
    assert code == 2 and "exactly one" in output
    code, output = run_cli("export", tiny["checkpoint"], "--opset", "16")
    assert code == 2


def test_torch_is_not_imported_by_the_cli_until_a_command_needs_it() -> None:
    script = "import sys, evim3.cli.main; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.stdout.strip() == "False", done.stderr
