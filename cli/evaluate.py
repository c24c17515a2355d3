"""`evim3 eval CKPT --data DIR --split test`: metrics with bootstrap intervals, a predictions CSV and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from evim3.cli.common import cli_errors


@cli_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint .safetensors, or a run folder (uses best.safetensors).")],
    data: Annotated[Path | None, typer.Option("--data", help="EchoNet-Dynamic-layout folder (EF and seg models).")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="CSV of path,label,split (classification models).")] = None,
    split: Annotated[str, typer.Option("--split", help="train, val, test or all.")] = "test",
    clips: Annotated[str, typer.Option(
        "--clips", help="first (one clip per video), all (sliding clips, averaged) or k evenly spaced clips.")] = "first",
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: beside the checkpoint).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Videos per forward pass.")] = 4,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes.")] = 2,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    resamples: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the 95 % intervals.")] = 1000,
) -> None:
    """Evaluate a checkpoint on one split: EF MAE/RMSE/R² (or AUC/accuracy, or LV Dice at ED, ES and overall)
    with bootstrap 95 % intervals, predictions.csv (per-video and per-clip values), metrics.json, scatter and
    Bland-Altman plots (seg: overlays of the worst and best videos; --clips does not apply: one clip holding
    the traced frames per video)."""
    from evim3.train.evaluate import evaluate_checkpoint, parse_clips
    from evim3.train.metrics import is_collapsed

    report = evaluate_checkpoint(
        checkpoint, data=str(data) if data else None, csv_path=str(csv) if csv else None, split=split,
        clips=parse_clips(clips), out=str(out) if out else None, batch=batch, workers=workers, device=device,
        resamples=resamples,
    )
    typer.echo(f"{report['checkpoint']}: {report['split']} split, {report['n']} videos, clips={report['clips']}")
    if "mae" in report:
        for name, label in (("mae", "MAE"), ("rmse", "RMSE"), ("r2", "R²")):
            interval = f"  (95% CI {report[name + '_lo']:.3f} to {report[name + '_hi']:.3f})" if resamples else ""
            typer.echo(f"  {label:<5} {report[name]:.3f}{interval}")
        typer.echo(f"  (a mean predictor: MAE {report['mean_predictor_mae']:.3f})")
        typer.echo(f"  spread of predicted EF {report['pred_std']:.2f} vs true {report['true_std']:.2f} (SD over videos)"
                   + ("  -- collapsed: the model barely responds to its input" if is_collapsed(report) else ""))
    elif "dice" in report:
        typer.echo(f"  {report['frames_judged']} traced frames (ED and ES) judged")
        for name, label in (("dice", "Dice (overall)"), ("dice_ed", "Dice ED"), ("dice_es", "Dice ES")):
            interval = f"  (95% CI {report[name + '_lo']:.4f} to {report[name + '_hi']:.4f})" if resamples else ""
            typer.echo(f"  {label:<15} {report[name]:.4f}{interval}")
    else:
        typer.echo(f"  AUC {report['auc']:.4f}  accuracy {report['accuracy']:.4f}")
    typer.echo(f"  wrote {', '.join(report['files'])} to {report['out']}")
