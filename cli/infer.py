"""`evim3 infer`: EF (or class probabilities) for videos, DICOM cines, folders, streams and cameras.

Runs on the edge runtime only (evim3.runtime: numpy, PyAV, pydicom, ONNX Runtime or TensorRT): never
imports torch, so it works on a device without a training stack.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time

import typer
from evim3.cli.common import EXIT_FAILED, cli_errors, echo_err
from evim3.runtime.backends import open_backend
from evim3.runtime.infer import ClipResult, InferencePipeline, SourceResult, expand_sources
from evim3.runtime.live import is_live_source
from evim3.runtime.report import (
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
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Provider(str, enum.Enum):
    tensorrt = "tensorrt"
    cuda = "cuda"
    cpu = "cpu"


SOURCES_ARGUMENT = typer.Argument(
    ..., metavar="SOURCE",
    help="Video or DICOM files, folders (searched recursively), rtsp:// URLs, cameras (/dev/video0).")
# Shared with `evim3 bench`, which opens the model the same way.
MODEL_OPTION = typer.Option(..., "--model", "-m", help="Model file from `evim3 export`: .onnx or .engine.")
THREADS_OPTION = typer.Option(None, "--threads", min=1, help="CPU threads for ONNX Runtime [default: all CPUs].")
PROVIDER_OPTION = typer.Option(
    None, "--provider", case_sensitive=False,
    help="ONNX Runtime execution provider [default: best available, tensorrt > cuda > cpu].")
STRIDE_OPTION = typer.Option(
    None, "--stride", min=1,
    help="Frames (after resampling to the model's fps) between clip starts [default: half a clip's span].")


@cli_errors
def infer(
    sources: list[str] = SOURCES_ARGUMENT,
    model: str = MODEL_OPTION,
    stride: int | None = STRIDE_OPTION,
    batch: int = typer.Option(1, "--batch", min=1, help="Clips per inference call (files)."),
    json_path: str | None = typer.Option(None, "--json", help="Write every result, clips included, as JSON."),
    csv_path: str | None = typer.Option(None, "--csv", help="Write one CSV row per video (clip values included)."),
    plot: str | None = typer.Option(None, "--plot", help="Write a PNG of EF per clip over time (needs matplotlib)."),
    realtime: bool = typer.Option(
        False, "--realtime", help="Live sources: drop the oldest frames when inference falls behind."),
    threads: int | None = THREADS_OPTION,
    provider: Provider | None = PROVIDER_OPTION,
) -> None:
    """Estimate EF per clip and per video with an exported model; a table, a timing summary, optional files."""
    if plot:
        check_plot_available()  # fail before the work, not after it
    t0 = time.perf_counter()
    backend = open_backend(model, provider=provider.value if provider else None, threads=threads)
    load_s = time.perf_counter() - t0
    with backend:
        pipeline = InferencePipeline(backend, stride=stride, batch=batch, keep_strip=bool(plot))
        results = _run_sources(pipeline, sources, realtime)
        device = backend.device
    class_names = pipeline.class_names
    Console().print(results_table(results, class_names))
    typer.echo("\n".join(source_notes(results) + timing_lines(pipeline.timings, device)))
    info = {"model": model, "preset": backend.meta.preset, "task": backend.meta.task, "device": device,
            "stride": pipeline.stride, "batch": batch, "realtime": realtime,
            "preprocess": dataclasses.asdict(pipeline.spec),
            "model_load_s": load_s}
    if json_path:
        write_json(json_path, run_document(results, pipeline.timings, info, class_names))
    if csv_path:
        write_csv(csv_path, results, class_names)
    if plot:
        shown = write_plot(plot, results, class_names)
        if shown < sum(bool(r.clips) for r in results):
            echo_err(f"note: {plot} shows the first {shown} sources only")
    if any(not r.ok for r in results):
        raise typer.Exit(EXIT_FAILED)


def _run_sources(pipeline: InferencePipeline, sources: list[str], realtime: bool) -> list[SourceResult]:
    """Every source in order; a failing one is reported on one line and the others still run."""
    items = list(expand_sources(sources))
    files = sum(not is_live_source(s) and e is None for s, e in items)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True, disable=files < 2)
    results = []
    with progress:
        task = progress.add_task("videos", total=files)
        for source, error in items:
            if error is not None:
                result = SourceResult(source, error=str(error))
            elif is_live_source(source):
                show = functools.partial(_print_clip, source, pipeline.class_names)
                result = pipeline.run_live(source, realtime=realtime, on_clip=show)
            else:
                progress.update(task, description=source[-40:])
                result = pipeline.run_file(source)
                progress.advance(task)
            if not result.ok:
                echo_err(f"error: {result.error}")
            results.append(result)
    return results


def _print_clip(source: str, class_names: list[str], clip: ClipResult) -> None:
    typer.echo(clip_line(source, clip, class_names))  # stdout, as each clip of a stream is ready
