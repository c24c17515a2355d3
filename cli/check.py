"""`evim3 check`: prove an exported model (ONNX and/or engine) gives PyTorch's outputs.

With a checkpoint, the reference is computed here with PyTorch (imported only then); with --load-golden
it comes from a golden file, and no torch is needed: the GPU box checks its engine against the file the
CPU box wrote.
"""

from __future__ import annotations

import typer
from evim3.cli.common import EXIT_FAILED, EXIT_INCONCLUSIVE, EXIT_USAGE, cli_errors, fail
from evim3.runtime.parity_check import (
    check_files,
    dataset_videos,
    echo_clips,
    flat_reason,
    format_table,
    load_golden,
    reference_spread,
    save_golden,
)
from evim3.runtime.tasks import task_spec


@cli_errors
def check(
    checkpoint: str | None = typer.Argument(
        None, help="evim3 checkpoint the reference is computed from (omit with --load-golden)."),
    onnx: str | None = typer.Option(None, "--onnx", help="ONNX file to check (ONNX Runtime CPU: the standard graph and, with the [fast-cpu] extra, the fused scan op; CUDA if present)."),
    engine: str | None = typer.Option(None, "--engine", help="TensorRT engine file to check."),
    save_golden_path: str | None = typer.Option(
        None, "--save-golden", help="Write the clips and PyTorch outputs here (.npz) for a machine without torch."),
    load_golden_path: str | None = typer.Option(
        None, "--load-golden", help="Take clips and reference outputs from this file instead of a checkpoint."),
    clips: int = typer.Option(4, "--clips", min=1, help="Seeded random clips; the real echo clip is always added."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random clips."),
    preset: str | None = typer.Option(None, "--preset", help="Refuse a checkpoint of any other preset."),
    data: str | None = typer.Option(
        None, "--data", help="Add the first clips of a few videos of this dataset (TEST split) or folder."),
    allow_flat: bool = typer.Option(
        False, "--allow-flat", help="Judge parity even when the reference answers the same for every clip."),
) -> None:
    """Run the same clips through PyTorch, ONNX Runtime and TensorRT; a table of errors, pass/fail per precision."""
    if (checkpoint is None) == (load_golden_path is None):
        fail("give a checkpoint or --load-golden FILE (exactly one)", EXIT_USAGE)
    if not (onnx or engine or save_golden_path):
        fail("nothing to check: give --onnx FILE and/or --engine FILE (or --save-golden FILE)", EXIT_USAGE)

    if load_golden_path:
        golden = load_golden(load_golden_path)
        source = f"golden file {load_golden_path}"
        if preset is not None and golden.meta.preset != preset:
            fail(f"{load_golden_path}: golden file is preset {golden.meta.preset!r}, not {preset!r} as asked")
    else:
        from evim3.export.parity import make_golden

        videos = dataset_videos(data) if data else []
        golden = make_golden(checkpoint, preset=preset, clips=clips, seed=seed, videos=videos)
        source = f"PyTorch fp32 CPU, checkpoint {checkpoint}"
    if save_golden_path:
        save_golden(save_golden_path, golden)
        typer.echo(f"wrote {save_golden_path}: {len(golden.names)} clips and their PyTorch outputs")

    rows = check_files(golden, onnx=onnx, engine=engine)
    if not rows:
        return
    typer.echo(f"reference: {source} ({golden.meta.preset}, task {golden.meta.task}); "
               f"clips: {', '.join(golden.names)}")
    typer.echo(format_table(rows, golden.meta.task))
    echo = int(echo_clips(golden.names).sum())
    if echo < len(golden.names):
        typer.echo(f"means over the {echo} echo clips, every other measure over all {len(golden.names)} (the random "
                   "clips are white noise, outside what an INT8 file's scales were calibrated on)")
    spec = task_spec(golden.meta.task)
    typer.echo(f"reference spread over the {len(golden.names)} clips: SD {reference_spread(golden):.3g} "
               f"{spec.spread_unit} (flat below {spec.flat_spread:g})")
    reason = flat_reason(golden)
    if reason:
        message = (f"parity INCONCLUSIVE: {reason}, so agreement proves nothing about the exported graph; check a "
                   "model that responds to its input, or pass --allow-flat")
        if not allow_flat:
            typer.secho(message, fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_INCONCLUSIVE)
        typer.secho(message.replace(", or pass --allow-flat", " (--allow-flat: judged anyway)"),
                    fg=typer.colors.YELLOW, err=True)
    failed = [r.backend for r in rows if not r.passed]
    if failed:
        typer.secho(f"parity FAILED: {', '.join(failed)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo("parity: pass")
