"""`evim3 convert`: import a checkpoint trained with the paper's public code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from evim3.cli.common import cli_errors


@cli_errors
def convert(
    official: Annotated[Path, typer.Argument(
        help="Checkpoint .pth saved by the paper's trainer (e.g. checkpoint_best_epoch_N.pth).")],
    preset: Annotated[str, typer.Option(
        help="Model geometry: evim3 (patch 1x16x16, D=384) or evim3-p4 (patch 2x4x4, D=192).")],
    out: Annotated[Path, typer.Option(help="evim3 checkpoint to write (.safetensors, with a .json beside it).")],
    ema: Annotated[bool, typer.Option(
        "--ema", help="Take the EMA weights (the official trainer picks its best checkpoint by them).")] = False,
    mean: Annotated[float | None, typer.Option(
        help="Input normalisation mean, 0..255 units [default: the official EchoNet-Dynamic MEAN_GRAY['train']]."
    )] = None,
    std: Annotated[float | None, typer.Option(
        help="Input normalisation std, 0..255 units [default: the official EchoNet-Dynamic STD_GRAY['train']]."
    )] = None,
) -> None:
    """Convert an official E-ViM3 checkpoint (fine-tuned EF or LV segmentation model, or pre-training MAE) into
    an evim3 checkpoint."""
    from evim3.convert import OFFICIAL_MEAN, OFFICIAL_STD, UNUSED, convert_checkpoint

    kind, meta, written = convert_checkpoint(
        official, out, preset, ema=ema,
        mean=OFFICIAL_MEAN if mean is None else mean, std=OFFICIAL_STD if std is None else std,
    )
    spec = meta.preprocess
    described = {"finetune": "fine-tuned EF", "seg": "LV segmentation", "pretrain": "pre-training"}[kind]
    typer.echo(
        f"{official} -> {written}: official {described} model, "
        f"{'EMA' if ema else 'raw'} weights, preset {preset}; input: {spec.frames} frames, every {spec.period}"
        f" at {spec.fps:g} fps, {spec.size}x{spec.size}, mean {spec.mean:g}, std {spec.std:g}"
    )
    if UNUSED[kind]:
        typer.echo(f"not imported (never used by the official model's outputs): {', '.join(UNUSED[kind])}")
