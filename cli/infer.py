"""`evim3 infer`: EF (or class probabilities) for videos, DICOM cines, folders, streams and cameras; with a
seg model, the LV of every frame, every beat and its EF (evim3.runtime.seg), beside an EF model's if both are
given.

Runs on the edge runtime only (evim3.runtime: numpy, PyAV, pydicom, ONNX Runtime or TensorRT): never
imports torch, so it works on a device without a training stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import time

import typer
from evim3.cli.common import EXIT_FAILED, EXIT_USAGE, cli_errors, echo_err, fail
from evim3.cli.report import (
    beats_tables,
    check_plot_available,
    clip_line,
    results_table,
    run_document,
    source_notes,
    timing_lines,
    write_csv,
    write_json,
    write_plot,
)
from evim3.runtime.api import Model, load
from evim3.runtime.backend_ort import SCAN_FORMS
from evim3.runtime.infer import ClipResult, InferencePipeline, SourceResult, expand_sources
from evim3.runtime.live import is_live_source
from evim3.runtime.overlay import check_overlay_path, write_overlay
from evim3.runtime.tasks import task_spec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Provider(str, enum.Enum):
    tensorrt = "tensorrt"
    cuda = "cuda"
    cpu = "cpu"


ScanForm = enum.Enum("ScanForm", {name: name for name in SCAN_FORMS}, type=str)  # typer's choice type

SOURCES_ARGUMENT = typer.Argument(
    ..., metavar="SOURCE",
    help="Video or DICOM files, folders (searched recursively), rtsp:// URLs, cameras (/dev/video0).")
# Shared with `evim3 bench`, which opens the model the same way.
MODEL_OPTION = typer.Option(..., "--model", "-m", help="Model file from `evim3 export`: .onnx or .engine.")
THREADS_OPTION = typer.Option(None, "--threads", min=1, help="CPU threads for ONNX Runtime [default: all CPUs].")
PROVIDER_OPTION = typer.Option(
    None, "--provider", case_sensitive=False,
    help="ONNX Runtime execution provider [default: best available, tensorrt > cuda > cpu].")
SCAN_OPTION = typer.Option(
    "auto", "--scan", case_sensitive=False,
    help="How ONNX Runtime on CPU runs the selective scans: fused (one op per scan, the [fast-cpu] extra; ~2x "
         "faster), graph (the file's standard Scan loops), auto (fused when it can run here).")
MODELS_OPTION = typer.Option(
    ..., "--model", "-m",
    help="Model file from `evim3 export`: .onnx or .engine. Give it twice, an EF (or classification) model "
         "and a seg model, to report both EFs side by side.")
STRIDE_OPTION = typer.Option(
    None, "--stride", min=1,
    help="Frames (after resampling to the model's fps) between clip starts [default: half a clip's span].")


@cli_errors
def infer(
    sources: list[str] = SOURCES_ARGUMENT,
    models: list[str] = MODELS_OPTION,
    stride: int | None = STRIDE_OPTION,
    batch: int = typer.Option(1, "--batch", min=1, help="Clips per inference call (files)."),
    json_path: str | None = typer.Option(None, "--json", help="Write every result, clips included, as JSON."),
    csv_path: str | None = typer.Option(None, "--csv", help="Write one CSV row per video (clip values included)."),
    plot: str | None = typer.Option(None, "--plot", help="Write a PNG of EF per clip over time (needs matplotlib)."),
    overlay: str | None = typer.Option(
        None, "--overlay",
        help="Seg model, one video: write it (as the model saw it) with the LV contour drawn, e.g. out.mp4."),
    realtime: bool = typer.Option(
        False, "--realtime", help="Live sources: drop the oldest frames when inference falls behind."),
    threads: int | None = THREADS_OPTION,
    provider: Provider | None = PROVIDER_OPTION,
    scan: ScanForm = SCAN_OPTION,
) -> None:
    """Estimate EF per clip and per video with an exported model (with a seg model: the LV area of every
    frame, every beat and its EF); a table, a timing summary, optional files."""
    if plot:
        check_plot_available()  # fail before the work, not after it
    items = list(expand_sources(sources))
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        loaded = [stack.enter_context(load(m, provider=provider.value if provider else None, threads=threads,
                                           scan=scan.value, stride=stride, batch=batch)) for m in models]
        load_s = time.perf_counter() - t0
        clip_model, seg_model = _split_models(loaded)
        _check_outputs(seg_model, overlay, items)
        first = clip_model or seg_model  # its results carry the other's (_merge), the --plot strip too
        runs = [(m, m.pipeline(keep_strip=bool(plot) and m is first, keep_frames=bool(overlay) and m is seg_model,
                               keep_masks=False)) for m in (clip_model, seg_model) if m is not None]
        results = _run_sources(runs, items, realtime)
        devices = [m.device for m in loaded]
    pipelines = [pipeline for _, pipeline in runs]
    class_names = pipelines[0].class_names
    clip_task, has_seg_model = clip_model.task if clip_model else None, seg_model is not None
    Console().print(results_table(results, class_names, clip_task, has_seg_model))
    for table in beats_tables(results):
        Console().print(table)
    lines = source_notes(results)
    for pipeline, device in zip(pipelines, devices):
        lines += timing_lines(pipeline.timings, f"{device}, {pipeline.task} model" if has_seg_model else device)
    typer.echo("\n".join(lines))
    described = [_model_info(p, models[loaded.index(m)], devices[loaded.index(m)], load_s) for m, p in runs]
    info = {**described[0], "models": described, "batch": batch, "realtime": realtime}
    if json_path:
        write_json(json_path, run_document(results, pipelines[0].timings, info, class_names))
    if csv_path:
        write_csv(csv_path, results, class_names, clip_task, has_seg_model)
    if plot:
        shown = write_plot(plot, results, class_names)
        if shown < sum(bool(r.clips) for r in results):
            echo_err(f"note: {plot} shows the first {shown} sources only")
    if overlay and results[0].lv is not None:
        write_overlay(overlay, results[0].frames, results[0].lv_masks, results[0].lv)
    if any(not r.ok for r in results):
        raise typer.Exit(EXIT_FAILED)


def _split_models(loaded: list[Model]) -> tuple[Model | None, Model | None]:
    """(the EF or classification model, the seg model): at most one of each."""
    seg = [m for m in loaded if task_spec(m.task).per_frame]
    clip = [m for m in loaded if not task_spec(m.task).per_frame]
    if len(seg) > 1 or len(clip) > 1:
        fail(f"--model takes at most one seg model and one EF or classification model; got tasks "
             f"{', '.join(m.task for m in loaded)}", EXIT_USAGE)
    return (clip or [None])[0], (seg or [None])[0]


def _check_outputs(seg_model: Model | None, overlay: str | None, items: list[tuple[str, object]]) -> None:
    """Refuse, before any work, an overlay the models or sources cannot give."""
    if overlay and seg_model is None:
        fail("--overlay draws a seg model's LV: give a seg model with --model", EXIT_USAGE)
    if overlay and len(items) != 1:
        fail(f"--overlay takes one video file; got {len(items)} sources", EXIT_USAGE)
    if overlay and is_live_source(items[0][0]):
        fail(f"--overlay takes one video file, not a live source ({items[0][0]})", EXIT_USAGE)
    if overlay:
        try:
            check_overlay_path(overlay)
        except ValueError as e:
            fail(str(e), EXIT_USAGE)


def _model_info(pipeline: InferencePipeline, path: str, device: str, load_s: float) -> dict:
    """The JSON's description of one model's run: file, preset, task, device, stride, preprocessing, timings."""
    return {"model": path, "preset": pipeline.backend.meta.preset, "task": pipeline.task, "device": device,
            "stride": pipeline.stride, "preprocess": dataclasses.asdict(pipeline.spec), "model_load_s": load_s,
            "timings": pipeline.timings.to_dict()}


def _run_sources(runs: list[tuple[Model, InferencePipeline]], items: list[tuple[str, object]],
                 realtime: bool) -> list[SourceResult]:
    """Every source in order, through every pipeline (a clip model's, then a seg model's, merged into one
    result); a failing one is reported on one line and the others still run."""
    files = sum(not is_live_source(s) and e is None for s, e in items)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True, disable=files < 2)
    results = []
    with progress:
        task = progress.add_task("videos", total=files)
        for source, error in items:
            if error is not None:
                result = SourceResult(source, task=runs[0][1].task, error=str(error))
            else:
                if not is_live_source(source):
                    progress.update(task, description=source[-40:])
                result = _merge([_run_source(m, p, source, realtime) for m, p in runs])
                if not is_live_source(source):
                    progress.advance(task)
            if not result.ok:
                echo_err(f"error: {result.error}")
            results.append(result)
    return results


def _run_source(model: Model, pipeline: InferencePipeline, source: str, realtime: bool) -> SourceResult:
    show = functools.partial(_print_clip, source, pipeline.task, pipeline.class_names)
    return model.analyse(source, pipeline=pipeline, realtime=realtime, on_clip=show).raw


def _merge(results: list[SourceResult]) -> SourceResult:
    """One source's results from a clip model and a seg model as one: the clip model's, with the seg model's
    LV report, frames and masks; the first error of either."""
    merged = results[0]
    for other in results[1:]:
        merged.lv, merged.lv_masks, merged.frames = other.lv, other.lv_masks, other.frames
        merged.error = merged.error or other.error
    return merged


def _print_clip(source: str, task: str, class_names: list[str], clip: ClipResult) -> None:
    typer.echo(clip_line(source, clip, task, class_names))  # stdout, as each clip of a stream is ready
