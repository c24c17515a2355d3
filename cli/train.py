"""`evim3 train pretrain|finetune`: the paper's recipe (evim3.train.recipe) with resumable checkpoints,
multi-process training (--nproc, or torchrun directly) and a progress bar, CSV log and end summary.

Each option sets the TrainConfig field of its parameter's name. Its name, type, help and limits are written
once below (one Annotated type per option); its default is the recipe's, read from TrainConfig and
STAGE_DEFAULTS (flag_defaults), so the config stays the one source of defaults.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from evim3.cli.common import EXIT_FAILED, cli_errors

from evim3.train.recipe import STAGE_DEFAULTS, TrainConfig

app = typer.Typer(no_args_is_help=True)


@app.callback()
def _train() -> None:
    """Train E-ViM3: masked-autoencoder pre-training, then EF regression or classification fine-tuning."""


def flag_defaults(stage: str) -> dict[str, Any]:
    """What each TrainConfig field defaults to when its flag is not given: the stage's default, else the
    field's (None for a field without one: --out, whose default depends on the preset)."""
    defaults = {}
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        defaults[f.name] = STAGE_DEFAULTS[stage].get(f.name, None if default is dataclasses.MISSING else default)
    return defaults


PRETRAIN, FINETUNE = flag_defaults("pretrain"), flag_defaults("finetune")

# Options both stages take.
Data = Annotated[Path | None, typer.Option("--data", help="EchoNet-Dynamic-layout folder (FileList.csv, Videos/).")]
Csv = Annotated[Path | None, typer.Option("--csv", help="CSV of path,label,split (classification; pre-training too).")]
Preset = Annotated[str, typer.Option("--preset", help="Model preset: evim3, evim3-p4, evim3-small, evim3-tiny.")]
Out = Annotated[Path | None, typer.Option("--out", help="Run folder (default runs/<stage>-<preset>).")]
Epochs = Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs.")]
MaxSteps = Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop after this many optimizer steps.")]
Batch = Annotated[int, typer.Option("--batch", min=1, help="Clips per process per micro-batch.")]
Accum = Annotated[int, typer.Option("--accum", min=1, help="Micro-batches per optimizer step.")]
Lr = Annotated[float | None, typer.Option("--lr", help="Learning rate at a total batch of 32; scaled linearly.")]
WarmupEpochs = Annotated[float | None, typer.Option("--warmup-epochs", help="Warm-up epochs.")]
DecayFraction = Annotated[float, typer.Option(
    "--decay-fraction", min=0.0, max=1.0, help="Share of the post-warm-up steps in the cosine decay; below 1 the lr "
                                               "holds at its peak until then (1: the paper's cosine).")]
Period = Annotated[int, typer.Option("--period", min=1, help="Take every period-th frame (at 50 fps) into a clip.")]
Frames = Annotated[int | None, typer.Option("--frames", min=1, help="Clip length (default: the preset's).")]
KeepRatio = Annotated[float, typer.Option("--keep-ratio", min=0.0, max=1.0, help="Share of TRAIN videos used.")]
MaxVideos = Annotated[int | None, typer.Option("--max-videos", min=1, help="At most this many videos per split.")]
Pad = Annotated[int, typer.Option("--pad", min=0, help="Random-crop padding of training clips, pixels.")]
EmaStart = Annotated[int, typer.Option("--ema-start", min=0, help="Optimizer step the weight EMA starts at.")]
EmaBeta = Annotated[float, typer.Option("--ema-beta", min=0.0, max=1.0, help="Largest EMA decay.")]
EmaEvery = Annotated[int, typer.Option("--ema-every", min=1, help="Optimizer steps between EMA updates.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
CkptEvery = Annotated[int, typer.Option(
    "--ckpt-every", min=0, help="Optimizer steps between checkpoints (0: at epoch ends only).")]
EvalEvery = Annotated[int, typer.Option("--eval-every", min=1, help="Epochs between validations.")]
LogEvery = Annotated[int, typer.Option("--log-every", min=1, help="Optimizer steps between steps.csv rows.")]
Workers = Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes per training process.")]
CacheVideos = Annotated[bool, typer.Option(
    "--cache-videos", help="Decode each video once and keep it in memory (uint8: ~2 MB per 112x112 video).")]
Strict = Annotated[bool, typer.Option(
    "--strict", help="Stop at a video that cannot be decoded (default: skip it with a warning, count it).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for weights, order, augmentation and masks.")]
# Options that set no TrainConfig field.
Nproc = Annotated[int, typer.Option("--nproc", min=1, help="Training processes on this machine (torchrun).")]
ModelSet = Annotated[list[str] | None, typer.Option(
    "--model-set", help="Override an integer field of the preset's ModelConfig, KEY=VALUE; repeatable (the demo: "
                        "reg=0, no register planes).")]

# Pre-training only.
MaskRatio = Annotated[float, typer.Option("--mask-ratio", help="Share of patches masked.")]
MaskStrategy = Annotated[str, typer.Option("--mask", help="Mask strategy: stc, random or tube.")]
TimeChain = Annotated[int | None, typer.Option("--time-chain", help="STC cell length in patches.")]
Chain = Annotated[int | None, typer.Option("--chain", help="STC cell width in patches.")]
SharedMask = Annotated[bool, typer.Option("--shared-mask", help="One mask per batch (the paper's code).")]
NormPixLoss = Annotated[bool, typer.Option("--norm-pix-loss", help="Per-patch normalised targets.")]

# Fine-tuning only.
TaskName = Annotated[str, typer.Option("--task", help="ef (regression, --data), classification (--csv) or seg (LV "
                                                  "segmentation, --data: Dice + CE on the traced ED and ES frames).")]
EfLoss = Annotated[str, typer.Option("--ef-loss", help="EF loss: mse+corr (MSE plus 1 - batch correlation: does not "
                                                       "collapse to the mean) or mse (the paper's).")]
Init = Annotated[Path | None, typer.Option(
    "--init", help="Checkpoint (or pre-training run folder) whose encoder weights start the encoder.")]


@app.command("pretrain")
@cli_errors
def pretrain(
    ctx: typer.Context,
    data: Data = PRETRAIN["data"], csv: Csv = PRETRAIN["csv"], preset: Preset = PRETRAIN["preset"],
    out: Out = PRETRAIN["out"], epochs: Epochs = PRETRAIN["epochs"], max_steps: MaxSteps = PRETRAIN["max_steps"],
    batch: Batch = PRETRAIN["batch"], accum: Accum = PRETRAIN["accum"], lr: Lr = PRETRAIN["lr"],
    warmup_epochs: WarmupEpochs = PRETRAIN["warmup_epochs"], decay_fraction: DecayFraction = PRETRAIN["decay_fraction"],
    period: Period = PRETRAIN["period"],
    frames: Frames = PRETRAIN["frames"], keep_ratio: KeepRatio = PRETRAIN["keep_ratio"],
    max_videos: MaxVideos = PRETRAIN["max_videos"], pad: Pad = PRETRAIN["pad"],
    ema_start: EmaStart = PRETRAIN["ema_start"], ema_beta: EmaBeta = PRETRAIN["ema_beta"],
    ema_every: EmaEvery = PRETRAIN["ema_every"], resume: Resume = PRETRAIN["resume"],
    ckpt_every: CkptEvery = PRETRAIN["ckpt_every"], eval_every: EvalEvery = PRETRAIN["eval_every"],
    log_every: LogEvery = PRETRAIN["log_every"], workers: Workers = PRETRAIN["workers"],
    cache_videos: CacheVideos = PRETRAIN["cache_videos"], strict: Strict = PRETRAIN["strict"],
    device: Device = PRETRAIN["device"], seed: Seed = PRETRAIN["seed"],
    mask_ratio: MaskRatio = PRETRAIN["mask_ratio"], mask_strategy: MaskStrategy = PRETRAIN["mask_strategy"],
    time_chain: TimeChain = PRETRAIN["time_chain"], chain: Chain = PRETRAIN["chain"],
    shared_mask: SharedMask = PRETRAIN["shared_mask"], norm_pix_loss: NormPixLoss = PRETRAIN["norm_pix_loss"],
    nproc: Nproc = 1, model_set: ModelSet = None,
) -> None:
    """Masked-video-modelling pre-training
    (STC masking, token-skipping encoder). Writes pretrain.safetensors (EMA weights, best validation loss) for
    `evim3 train finetune --init`."""
    _run("pretrain", ctx, locals())


@app.command("finetune")
@cli_errors
def finetune(
    ctx: typer.Context,
    data: Data = FINETUNE["data"], csv: Csv = FINETUNE["csv"], preset: Preset = FINETUNE["preset"],
    out: Out = FINETUNE["out"], epochs: Epochs = FINETUNE["epochs"], max_steps: MaxSteps = FINETUNE["max_steps"],
    batch: Batch = FINETUNE["batch"], accum: Accum = FINETUNE["accum"], lr: Lr = FINETUNE["lr"],
    warmup_epochs: WarmupEpochs = FINETUNE["warmup_epochs"], decay_fraction: DecayFraction = FINETUNE["decay_fraction"],
    period: Period = FINETUNE["period"],
    frames: Frames = FINETUNE["frames"], keep_ratio: KeepRatio = FINETUNE["keep_ratio"],
    max_videos: MaxVideos = FINETUNE["max_videos"], pad: Pad = FINETUNE["pad"],
    ema_start: EmaStart = FINETUNE["ema_start"], ema_beta: EmaBeta = FINETUNE["ema_beta"],
    ema_every: EmaEvery = FINETUNE["ema_every"], resume: Resume = FINETUNE["resume"],
    ckpt_every: CkptEvery = FINETUNE["ckpt_every"], eval_every: EvalEvery = FINETUNE["eval_every"],
    log_every: LogEvery = FINETUNE["log_every"], workers: Workers = FINETUNE["workers"],
    cache_videos: CacheVideos = FINETUNE["cache_videos"], strict: Strict = FINETUNE["strict"],
    device: Device = FINETUNE["device"], seed: Seed = FINETUNE["seed"],
    task: TaskName = FINETUNE["task"], ef_loss: EfLoss = FINETUNE["ef_loss"], init: Init = FINETUNE["init"],
    nproc: Nproc = 1, model_set: ModelSet = None,
) -> None:
    """Fine-tune for EF regression (--ef-loss;
    MAE/RMSE/R² and the prediction spread on validation), video classification (AUC) or LV segmentation
    (--task seg: ED, ES and overall Dice). Writes best.safetensors (EMA weights of the best
    validation epoch) and last.safetensors."""
    _run("finetune", ctx, locals())


def _run(stage: str, ctx: typer.Context, parameters: dict[str, Any]) -> None:
    """Train `stage` with a command's parameters (its locals() on entry: ctx and one entry per option)."""
    import os

    options = {name: value for name, value in parameters.items() if name != "ctx"}
    nproc = options.pop("nproc")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(ctx, nproc)
        return

    from evim3.train.loop import train

    overrides = parse_model_set(options.pop("model_set") or [])
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    options["out"] = options["out"] or os.path.join("runs", f"{stage}-{options['preset']}")
    train(TrainConfig(stage=stage, model_overrides=overrides, **options))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank whose run has finished (process group destroyed, files written) leaves without the
        # interpreter's teardown: there, a finished rank sometimes aborted ("terminate called without an active
        # exception": a C++ thread destroyed while still joinable), and torchrun reported a complete run as
        # failed (tests/test_ddp.py, about half its runs on 2 cores).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def parse_model_set(pairs: list[str]) -> dict[str, int]:
    """TrainConfig.model_overrides from --model-set KEY=VALUE pairs (model_set_flags is the inverse)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise ValueError(f"--model-set takes KEY=INTEGER, got {pair!r}")
        overrides[key] = int(value)
    return overrides


def model_set_flags(overrides: dict[str, int]) -> list[str]:
    """The --model-set flags that give TrainConfig.model_overrides `overrides`."""
    return [arg for key, value in overrides.items() for arg in ("--model-set", f"{key}={value}")]


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
    returncode = subprocess.call(torchrun_argv(nproc, "evim3.cli.main", args))
    if returncode:
        raise typer.Exit(EXIT_FAILED)
