"""`evim3 train pretrain|finetune`: the paper's recipe (evim3.train.recipe) with resumable checkpoints,
multi-process training (--nproc, or torchrun directly) and a progress bar, CSV log and end summary.

The flags are built from TrainConfig: each sets the field it names, with the field's type and default
(the stage's, for the fields STAGE_DEFAULTS fills), so the config stays the one source of defaults. This
module adds only the flag names and help texts.
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from evim3.cli.common import EXIT_FAILED, cli_errors

from evim3.train.recipe import STAGE_DEFAULTS, TrainConfig

app = typer.Typer(no_args_is_help=True)


@app.callback()
def _train() -> None:
    """Train E-ViM3: masked-autoencoder pre-training, then EF regression or classification fine-tuning."""


@dataclass(frozen=True)
class Flag:
    """A command-line option for the TrainConfig field `field`."""

    field: str
    help: str
    name: str | None = None  # the flag, when not --field-with-dashes
    type: Any = None  # the option's type, when not the field's (paths)
    limits: dict[str, float] = dataclasses.field(default_factory=dict)  # click's min / max


# Options both stages take.
SHARED = (
    Flag("data", "EchoNet-Dynamic-layout folder (FileList.csv, Videos/).", type=Path | None),
    Flag("csv", "CSV of path,label,split (classification; pre-training too).", type=Path | None),
    Flag("preset", "Model preset: evim3, evim3-p4, evim3-small, evim3-tiny."),
    Flag("out", "Run folder (default runs/<stage>-<preset>).", type=Path | None),
    Flag("epochs", "Epochs.", limits={"min": 1}),
    Flag("max_steps", "Stop after this many optimizer steps.", limits={"min": 1}),
    Flag("batch", "Clips per process per micro-batch.", limits={"min": 1}),
    Flag("accum", "Micro-batches per optimizer step.", limits={"min": 1}),
    Flag("lr", "Learning rate at a total batch of 32; scaled linearly."),
    Flag("warmup_epochs", "Warm-up epochs."),
    Flag("period", "Take every period-th frame (at 50 fps) into a clip.", limits={"min": 1}),
    Flag("frames", "Clip length (default: the preset's).", limits={"min": 1}),
    Flag("keep_ratio", "Share of TRAIN videos used.", limits={"min": 0.0, "max": 1.0}),
    Flag("max_videos", "At most this many videos per split.", limits={"min": 1}),
    Flag("pad", "Random-crop padding of training clips, pixels.", limits={"min": 0}),
    Flag("ema_start", "Optimizer step the weight EMA starts at.", limits={"min": 0}),
    Flag("ema_beta", "Largest EMA decay.", limits={"min": 0.0, "max": 1.0}),
    Flag("ema_every", "Optimizer steps between EMA updates.", limits={"min": 1}),
    Flag("resume", "Continue the run in --out from its last checkpoint."),
    Flag("ckpt_every", "Optimizer steps between checkpoints (0: at epoch ends only).", limits={"min": 0}),
    Flag("eval_every", "Epochs between validations.", limits={"min": 1}),
    Flag("log_every", "Optimizer steps between steps.csv rows.", limits={"min": 1}),
    Flag("workers", "Data-loading processes per training process.", limits={"min": 0}),
    Flag("cache_videos", "Decode each video once and keep it in memory (uint8: ~2 MB per 112x112 video)."),
    Flag("strict", "Stop at a video that cannot be decoded (default: skip it with a warning, count it)."),
    Flag("device", "auto, cpu, cuda or cuda:N."),
    Flag("seed", "Seed for weights, order, augmentation and masks."),
)
PRETRAIN = (
    Flag("mask_ratio", "Share of patches masked."),
    Flag("mask_strategy", "Mask strategy: stc, random or tube.", name="--mask"),
    Flag("time_chain", "STC cell length in patches."),
    Flag("chain", "STC cell width in patches."),
    Flag("shared_mask", "One mask per batch (the paper's code)."),
    Flag("norm_pix_loss", "Per-patch normalised targets."),
)
FINETUNE = (
    Flag("task", "ef (regression, --data), classification (--csv) or seg (LV segmentation, --data: Dice + CE "
                 "on the traced ED and ES frames)."),
    Flag("ef_loss", "EF loss: mse+corr (MSE plus 1 - batch correlation: does not collapse to the mean) or mse "
                    "(the paper's)."),
    Flag("init", "Checkpoint (or pre-training run folder) whose encoder weights start the encoder.",
         type=Path | None),
)

# Options that set no TrainConfig field.
Nproc = Annotated[int, typer.Option("--nproc", min=1, help="Training processes on this machine (torchrun).")]
ModelSet = Annotated[list[str] | None, typer.Option(
    "--model-set", hidden=True, help="Override a ModelConfig field, KEY=VALUE (tests, experiments).")]


def flag_defaults(stage: str) -> dict[str, Any]:
    """What each TrainConfig field defaults to when its flag is not given: the stage's default, else the
    field's (None for a field without one: --out, whose default depends on the preset)."""
    defaults = {}
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        defaults[f.name] = STAGE_DEFAULTS[stage].get(f.name, None if default is dataclasses.MISSING else default)
    return defaults


def _parameter(flag: Flag, stage: str) -> inspect.Parameter:
    field_type = typing.get_type_hints(TrainConfig)[flag.field]
    name = flag.name or "--" + flag.field.replace("_", "-")
    option = typer.Option(name, help=flag.help, **flag.limits)
    return inspect.Parameter(flag.field, inspect.Parameter.KEYWORD_ONLY, default=flag_defaults(stage)[flag.field],
                             annotation=Annotated[flag.type or field_type, option])


def _command(stage: str, flags: tuple[Flag, ...], doc: str) -> Callable[..., None]:
    """A Typer command for `stage` whose options are `flags` (plus --nproc, --model-set)."""

    def command(ctx: typer.Context, **options: Any) -> None:
        _run(stage, ctx, options)

    command = cli_errors(command)
    extra = {"nproc": (Nproc, 1), "model_set": (ModelSet, None)}
    command.__signature__ = inspect.Signature([
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *(_parameter(flag, stage) for flag in flags),
        *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
          for name, (annotation, default) in extra.items()),
    ])
    command.__annotations__ = {"ctx": typer.Context}  # Typer reads the others from the signature
    command.__doc__ = doc
    return command


pretrain = app.command("pretrain")(_command("pretrain", SHARED + PRETRAIN, """Masked-video-modelling pre-training
    (STC masking, token-skipping encoder). Writes pretrain.safetensors (EMA weights, best validation loss) for
    `evim3 train finetune --init`."""))
finetune = app.command("finetune")(_command("finetune", SHARED + FINETUNE, """Fine-tune for EF regression (--ef-loss;
    MAE/RMSE/R² and the prediction spread on validation), video classification (AUC) or LV segmentation
    (--task seg: ED, ES and overall Dice). Writes best.safetensors (EMA weights of the best
    validation epoch) and last.safetensors."""))


def _run(stage: str, ctx: typer.Context, options: dict[str, Any]) -> None:
    import os

    nproc = options.pop("nproc")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(ctx, nproc)
        return

    from evim3.train.loop import train

    overrides = _model_overrides(options.pop("model_set") or [])
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
    returncode = subprocess.call(torchrun_argv(nproc, "evim3.cli.main", args))
    if returncode:
        raise typer.Exit(EXIT_FAILED)
