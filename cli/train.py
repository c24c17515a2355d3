"""`evim3 train pretrain|finetune`: the paper's recipe (evim3.train.recipe) with resumable checkpoints,
multi-process training (--nproc, or torchrun directly) and a progress bar, CSV log and end summary."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer
from evim3.cli.common import EXIT_FAILED, cli_errors

app = typer.Typer(no_args_is_help=True)


@app.callback()
def _train() -> None:
    """Train E-ViM3: masked-autoencoder pre-training, then EF regression or classification fine-tuning."""


# Options both stages take. None = the stage's default (see evim3.train.recipe.STAGE_DEFAULTS).
Data = Annotated[Path | None, typer.Option("--data", help="EchoNet-Dynamic-layout folder (FileList.csv, Videos/).")]
Csv = Annotated[Path | None, typer.Option("--csv", help="CSV of path,label,split (classification; pre-training too).")]
Preset = Annotated[str, typer.Option("--preset", help="Model preset: evim3, evim3-p4, evim3-small, evim3-tiny.")]
Out = Annotated[Path | None, typer.Option("--out", help="Run folder (default runs/<stage>-<preset>).")]
Epochs = Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (default 50 fine-tune, 100 pre-train).")]
MaxSteps = Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop after this many optimizer steps.")]
Batch = Annotated[int, typer.Option("--batch", min=1, help="Clips per process per micro-batch.")]
Accum = Annotated[int, typer.Option("--accum", min=1, help="Micro-batches per optimizer step.")]
Lr = Annotated[float | None, typer.Option(
    "--lr", help="Learning rate at a total batch of 32 (default 1e-4 fine-tune, 1e-3 pre-train); scaled linearly.")]
WarmupEpochs = Annotated[float | None, typer.Option("--warmup-epochs", help="Warm-up (default 1 / 5 epochs).")]
Period = Annotated[int, typer.Option("--period", min=1, help="Take every period-th frame (at 50 fps) into a clip.")]
Frames = Annotated[int | None, typer.Option("--frames", min=1, help="Clip length (default: the preset's).")]
KeepRatio = Annotated[float, typer.Option("--keep-ratio", min=0.0, max=1.0, help="Share of TRAIN videos used.")]
MaxVideos = Annotated[int | None, typer.Option("--max-videos", min=1, help="At most this many videos per split.")]
Pad = Annotated[int, typer.Option("--pad", min=0, help="Random-crop padding of training clips, pixels.")]
EmaStart = Annotated[int, typer.Option("--ema-start", min=0, help="Optimizer step the weight EMA starts at.")]
EmaBeta = Annotated[float, typer.Option("--ema-beta", min=0.0, max=1.0, help="Largest EMA decay.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
CkptEvery = Annotated[int, typer.Option(
    "--ckpt-every", min=0, help="Optimizer steps between checkpoints (0: at epoch ends only).")]
EvalEvery = Annotated[int, typer.Option("--eval-every", min=1, help="Epochs between validations.")]
LogEvery = Annotated[int, typer.Option("--log-every", min=1, help="Optimizer steps between steps.csv rows.")]
Workers = Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes per training process.")]
CacheVideos = Annotated[bool, typer.Option(
    "--cache-videos", help="Decode each video once and keep it in memory (uint8: ~2 MB per 112x112 video).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Nproc = Annotated[int, typer.Option("--nproc", min=1, help="Training processes on this machine (torchrun).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for weights, order, augmentation and masks.")]
ModelSet = Annotated[list[str] | None, typer.Option(
    "--model-set", hidden=True, help="Override a ModelConfig field, KEY=VALUE (tests, experiments).")]


@app.command()
@cli_errors
def pretrain(
    ctx: typer.Context,
    data: Data = None, csv: Csv = None, preset: Preset = "evim3", out: Out = None,
    epochs: Epochs = None, max_steps: MaxSteps = None, batch: Batch = 4, accum: Accum = 4, lr: Lr = None,
    warmup_epochs: WarmupEpochs = None, period: Period = 2, frames: Frames = None, keep_ratio: KeepRatio = 1.0,
    max_videos: MaxVideos = None, pad: Pad = 12, ema_start: EmaStart = 100, ema_beta: EmaBeta = 0.9999,
    resume: Resume = False, ckpt_every: CkptEvery = 0, eval_every: EvalEvery = 1, log_every: LogEvery = 10,
    workers: Workers = 2, cache_videos: CacheVideos = False,
    device: Device = "auto", nproc: Nproc = 1, seed: Seed = 0, model_set: ModelSet = None,
    mask_ratio: Annotated[float, typer.Option("--mask-ratio", help="Share of patches masked.")] = 0.8,
    mask: Annotated[str, typer.Option("--mask", help="Mask strategy: stc, random or tube.")] = "stc",
    time_chain: Annotated[int | None, typer.Option("--time-chain", help="STC cell length in patches.")] = None,
    chain: Annotated[int | None, typer.Option("--chain", help="STC cell width in patches.")] = None,
    shared_mask: Annotated[bool, typer.Option("--shared-mask", help="One mask per batch (the paper's code).")] = False,
    norm_pix_loss: Annotated[bool, typer.Option("--norm-pix-loss", help="Per-patch normalised targets.")] = False,
) -> None:
    """Masked-video-modelling pre-training (STC masking, token-skipping encoder). Writes
    pretrain.safetensors (EMA weights, best validation loss) for `evim3 train finetune --init`."""
    options = dict(locals())
    options.update(mask_strategy=options.pop("mask"))
    _run("pretrain", options)


@app.command()
@cli_errors
def finetune(
    ctx: typer.Context,
    data: Data = None, csv: Csv = None, preset: Preset = "evim3", out: Out = None,
    epochs: Epochs = None, max_steps: MaxSteps = None, batch: Batch = 4, accum: Accum = 4, lr: Lr = None,
    warmup_epochs: WarmupEpochs = None, period: Period = 2, frames: Frames = None, keep_ratio: KeepRatio = 1.0,
    max_videos: MaxVideos = None, pad: Pad = 12, ema_start: EmaStart = 100, ema_beta: EmaBeta = 0.9999,
    resume: Resume = False, ckpt_every: CkptEvery = 0, eval_every: EvalEvery = 1, log_every: LogEvery = 10,
    workers: Workers = 2, cache_videos: CacheVideos = False,
    device: Device = "auto", nproc: Nproc = 1, seed: Seed = 0, model_set: ModelSet = None,
    task: Annotated[str, typer.Option("--task", help="ef (regression, --data) or classification (--csv).")] = "ef",
    init: Annotated[Path | None, typer.Option(
        "--init", help="Checkpoint (or pre-training run folder) whose encoder weights start the encoder.")] = None,
) -> None:
    """Fine-tune for EF regression (MSE; MAE/RMSE/R² on validation) or video classification (AUC).
    Writes best.safetensors (EMA weights of the best validation epoch) and last.safetensors."""
    _run("finetune", dict(locals()))


def _run(stage: str, options: dict[str, Any]) -> None:
    import os

    ctx: typer.Context = options.pop("ctx")
    nproc = options.pop("nproc")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(ctx, nproc)
        return

    from evim3.train.loop import train
    from evim3.train.recipe import TrainConfig

    overrides = _model_overrides(options.pop("model_set") or [])
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    options["out"] = options["out"] or os.path.join("runs", f"{stage}-{options['preset']}")
    train(TrainConfig(stage=stage, model_overrides=overrides, **options))


def _model_overrides(pairs: list[str]) -> dict[str, int]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise ValueError(f"--model-set takes KEY=INTEGER, got {pair!r}")
        overrides[key] = int(value)
    return overrides


def _relaunch(ctx: typer.Context, nproc: int) -> None:
    """Run this same command as `nproc` processes under torchrun, from the options as parsed."""
    from evim3.train.distributed import torchrun_argv

    args = ["train", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "nproc" or value is None or value is False or value == param.default:
            continue
        flag = param.opts[0]
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    returncode = subprocess.call(torchrun_argv(nproc, args))
    if returncode:
        raise typer.Exit(EXIT_FAILED)
