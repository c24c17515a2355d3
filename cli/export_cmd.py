"""`evim3 export`: a checkpoint -> an ONNX file, or a TensorRT engine built from one. torch is imported
only when the command runs."""

from __future__ import annotations

import enum
import os

import typer
from evim3.cli.common import EXIT_USAGE, cli_errors, fail
from evim3.export.calibration import (
    CALIBRATION_METHOD,
    CALIBRATION_METHODS,
    CALIBRATION_VIDEOS,
    Calibration,
    table_path_for,
)
from evim3.export.defaults import ENGINE_WORKSPACE_GIB, MIN_OPSET
from evim3.runtime.formats import FORMATS

# --format: the model formats of the one format table (runtime/formats.py), by name.
Format = enum.Enum("Format", {fmt.name: fmt.name for fmt in FORMATS.values()}, type=str)
SUFFIXES = {fmt.name: fmt.suffix for fmt in FORMATS.values()}


@cli_errors
def export(
    checkpoint: str = typer.Argument(..., help="evim3 checkpoint: X.safetensors, or a run folder."),
    output: str | None = typer.Option(
        None, "--output", "-o", help="File to write [default: beside the checkpoint, X.onnx / X.engine, "
                                     "X.fp16.* with --fp16, X.int8.* with --int8]."),
    fmt: Format = typer.Option(Format.onnx, "--format", case_sensitive=False, help="onnx, or a TensorRT engine."),
    opset: int = typer.Option(MIN_OPSET, "--opset", min=MIN_OPSET, help="ONNX opset."),
    batch: int = typer.Option(
        1, "--batch", min=1, help="Fixed batch size of the graph (with --dynamic-batch: the engine's optimal batch)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="A symbolic batch dimension instead."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Engine with --dynamic-batch: largest batch."),
    fp16: bool = typer.Option(False, "--fp16", help="float16 weights and compute; the scan stays float32."),
    int8: bool = typer.Option(
        False, "--int8", help="8-bit linear layers as QuantizeLinear/DequantizeLinear pairs: one file for ONNX "
                              "Runtime (CPU, CUDA) and TensorRT 10/11 engines. The scan stays float32."),
    calib_data: str | None = typer.Option(
        None, "--calib-data", help="With --int8: dataset folder whose TRAIN videos calibrate the activation scales "
                                   "(not needed when the calibration table exists)."),
    calib_cache: str | None = typer.Option(
        None, "--calib-cache", help="With --int8: calibration table, read if present, else written "
                                    "[default: beside the ONNX, X.int8.calib.json]."),
    calib_clips: int = typer.Option(
        CALIBRATION_VIDEOS, "--calib-clips", min=1, help="With --int8: TRAIN videos (a seeded sample) whose first "
                                                         "clip calibrates."),
    calib_method: str = typer.Option(
        CALIBRATION_METHOD, "--calib-method", help=f"With --int8: {', '.join(CALIBRATION_METHODS)}."),
    workspace: float = typer.Option(ENGINE_WORKSPACE_GIB, "--workspace", min=0.25,
                                    help="TensorRT builder workspace, GiB."),
    preset: str | None = typer.Option(None, "--preset", help="Refuse a checkpoint of any other preset."),
) -> None:
    """Export a checkpoint to ONNX (any machine) or to a TensorRT engine (on the GPU that will run it)."""
    if dynamic_batch and batch > max_batch:
        fail(f"--batch {batch} is above --max-batch {max_batch}", EXIT_USAGE)
    if fmt is Format.onnx and dynamic_batch and batch != 1:
        fail("choose --batch N or --dynamic-batch, not both", EXIT_USAGE)
    if fp16 and int8:
        fail("choose --fp16 or --int8, not both", EXIT_USAGE)
    if (calib_data or calib_cache) and not int8:
        fail("--calib-data and --calib-cache calibrate an --int8 export", EXIT_USAGE)
    if calib_method not in CALIBRATION_METHODS:
        fail(f"--calib-method {calib_method}: choose one of {', '.join(CALIBRATION_METHODS)}", EXIT_USAGE)

    from evim3.export.onnx import export_checkpoint

    from evim3.checkpoint import checkpoint_file

    checkpoint = checkpoint_file(checkpoint)
    suffix = (".fp16" if fp16 else ".int8" if int8 else "") + SUFFIXES[fmt.value]
    output = output or os.path.splitext(checkpoint)[0] + suffix
    # the ONNX an engine is built from sits beside it (for int8, the same Q/DQ file ONNX Runtime runs)
    onnx_path = output if fmt is Format.onnx else os.path.splitext(output)[0] + ".onnx"
    calibration = Calibration(calib_cache or table_path_for(onnx_path), calib_data, calib_clips,
                              calib_method) if int8 else None
    onnx_options = {"opset": opset, "batch": batch, "dynamic_batch": dynamic_batch, "preset": preset, "int8": calibration}

    if fmt is Format.onnx:
        _report_onnx(export_checkpoint(checkpoint, output, fp16=fp16, **onnx_options))
        return

    from evim3.export.tensorrt import build_engine, fp16_needs_fp16_onnx, import_tensorrt

    trt = import_tensorrt()  # before the slow ONNX export: fail fast where TensorRT is missing
    onnx_fp16 = fp16 and fp16_needs_fp16_onnx(trt)
    _report_onnx(export_checkpoint(checkpoint, onnx_path, fp16=onnx_fp16, **onnx_options))
    built = build_engine(onnx_path, output, workspace_gib=workspace, fp16=fp16,
                         batch=(1, batch, max_batch) if dynamic_batch else None)
    h = built.header
    typer.echo(f"wrote {built.path}: TensorRT {h.tensorrt}, {h.precision}"
               f"{' (strongly typed)' if built.strongly_typed else ''}, batch {h.batch[0]}..{h.batch[2]} "
               f"(opt {h.batch[1]}), for {h.gpu} (sm {h.compute_capability}), {built.seconds:.0f} s")


def _report_onnx(result) -> None:
    s = result.stats
    batch = "dynamic batch" if result.batch is None else f"batch {result.batch}"
    typer.echo(f"wrote {result.path}: opset {result.opset}, {result.precision}, {batch}, {s.nodes} nodes "
               f"({s.scans} selective scans as ONNX Scan loops, {s.nodes_per_scan:.0f} nodes each), "
               f"{result.seconds:.0f} s")
