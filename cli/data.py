"""`evim3 data`: datasets. `evim3 data synth` writes the built-in synthetic dataset and `evim3 data check`
checks a dataset before training, both without importing torch."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Annotated

import typer
from evim3.cli.common import EXIT_FAILED, cli_errors

app = typer.Typer(no_args_is_help=True)


@app.callback()
def _data() -> None:
    """Datasets: make the built-in synthetic echo dataset; check a dataset before training."""


@app.command()
@cli_errors
def synth(
    out: Annotated[Path, typer.Argument(help="New (or empty) folder to write the dataset into.")],
    videos: Annotated[int, typer.Option("--videos", min=1, help="Number of videos.")] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same dataset (CSVs and frames).")] = 0,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes rendering videos in parallel.")
    ] = min(os.cpu_count() or 1, 8),
) -> None:
    """Write synthetic apical-four-chamber echo videos in the EchoNet-Dynamic layout (FileList.csv,
    VolumeTracings.csv, Videos/*.avi), with EF measured from the drawn left ventricle."""
    from evim3.runtime.echonet_layout import SPLITS
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from evim3.data.synth import DEFAULT_FPS, generate_dataset

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress_bar:
        task = progress_bar.add_task("synthesizing", total=videos)
        records = generate_dataset(
            out, videos, seed, workers=min(workers, videos), progress=lambda: progress_bar.advance(task)
        )

    per_split = collections.Counter(record.split for record in records)
    sizes = collections.Counter(f"{record.height}x{record.width}" for record in records)
    other_rates = sorted(record.fps for record in records if record.fps != DEFAULT_FPS)
    ef = [record.ef for record in records]
    typer.echo(f"wrote {len(records)} video{'s' * (len(records) != 1)} to {out}")
    typer.echo("  splits: " + ", ".join(f"{split} {per_split[split]}" for split in SPLITS))
    typer.echo(f"  EF: {min(ef):.1f} to {max(ef):.1f} % (mean {sum(ef) / len(ef):.1f})")
    typer.echo("  frame sizes: " + ", ".join(f"{size} ({count})" for size, count in sizes.most_common()))
    rates = f"{DEFAULT_FPS} fps ({len(records) - len(other_rates)})"
    if other_rates:
        low, high = other_rates[0], other_rates[-1]
        rates += f", {low if low == high else f'{low} to {high}'} fps ({len(other_rates)})"
    typer.echo(f"  frame rates: {rates}")


@app.command()
@cli_errors
def check(
    root: Annotated[Path, typer.Argument(help="EchoNet-Dynamic-layout folder (FileList.csv, VolumeTracings.csv, Videos/).")],
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes decoding videos in parallel.")
    ] = min(os.cpu_count() or 1, 8),
) -> None:
    """Decode every listed video and check every label (EF from 0 to 100, ESV and EDV positive, ESV < EDV,
    split) and that each video has at least 2 traced frames. Prints a table of problems and exits 1 if there
    are any."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from evim3.data.check import check_dataset

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress_bar:
        task = progress_bar.add_task("decoding", total=None)
        report = check_dataset(root, workers=workers, progress=lambda: progress_bar.advance(task))

    if not report.problems:
        typer.echo(f"{root}: {report.videos} video{'s' * (report.videos != 1)} decoded; labels in range; "
                   "every video traced: no problems")
        return
    width = max(len("file"), *(len(p.file) for p in report.problems))
    typer.echo(f"{'file':<{width}}  problem")
    for problem in report.problems:
        typer.echo(f"{problem.file:<{width}}  {problem.problem}")
    files = len({p.file for p in report.problems})
    typer.echo(f"{root}: {len(report.problems)} problem{'s' * (len(report.problems) != 1)} in {files} "
               f"file{'s' * (files != 1)} ({report.videos} videos listed)")
    raise typer.Exit(EXIT_FAILED)
