"""`evim3 bench`: latency of an exported model on this machine and what it means in real time. Torch-free."""

from __future__ import annotations

import typer
from evim3.cli.common import cli_errors
from evim3.cli.infer import (
    MODEL_OPTION,
    PROVIDER_OPTION,
    SCAN_OPTION,
    STRIDE_OPTION,
    THREADS_OPTION,
    Provider,
    ScanForm,
)
from evim3.cli.report import bench_table, write_json
from evim3.runtime.api import load
from rich.console import Console


@cli_errors
def bench(
    model: str = MODEL_OPTION,
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed runs first."),
    runs: int = typer.Option(20, "--runs", min=1, help="Timed runs."),
    batch: int = typer.Option(1, "--batch", min=1, help="Clips per run."),
    stride: int | None = STRIDE_OPTION,
    json_path: str | None = typer.Option(None, "--json", help="Write the results as JSON."),
    threads: int | None = THREADS_OPTION,
    provider: Provider | None = PROVIDER_OPTION,
    scan: ScanForm = SCAN_OPTION,
) -> None:
    """Latency p50/p90/p99, clips/s and the real-time factor at the model's fps, period and a clip stride."""
    with load(model, provider=provider.value if provider else None, threads=threads, scan=scan.value,
              stride=stride) as loaded:
        result = loaded.benchmark(batch=batch, warmup=warmup, runs=runs)
    Console().print(bench_table(result))
    if json_path:
        write_json(json_path, result)
