"""The training recipe: one config dataclass with the paper's defaults, and the optimizer, learning-rate
schedule and weight EMA it implies.

Paper (configs/{pretrain,finetune}_echo_mamba_3d*.yaml in github.com/HenryZhou19/E-ViM3): AdamW with
weight decay 0.1 and eps 1e-15, no decay for biases, norms, A_log/D, tokens and positional embeddings;
lr 1e-4 (fine-tune) or 1e-3 (pre-train) scaled by total batch / 32; linear warm-up from 1 % of lr over
1 (fine-tune) or 5 (pre-train) epochs, then cosine down to 1 % of lr; gradient clipping 1.0 / 0.1;
4 clips per rank x 4 accumulated micro-batches; EMA of the weights (beta 0.9999, warm-up power 0.75,
every 5 steps from step 100); 64-frame clips at period 2; 50 / 100 epochs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evim3.config import ModelConfig, get_preset
from evim3.data import CROP_PAD
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.tasks import task_spec

# torch is imported inside the functions that use it: `evim3 train` builds its flags and their defaults from
# TrainConfig when the CLI starts, and the CLI must start without torch (`evim3 infer` on an edge box).
if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.optim.lr_scheduler import LambdaLR
    from torch.optim.swa_utils import AveragedModel

STAGES = ("pretrain", "finetune")
# Fine-tuning tasks: the ones registered in evim3.runtime.tasks (ef, classification, seg).
MASK_STRATEGIES = ("stc", "random", "tube")
# EF fine-tuning losses: "mse" is the paper's; "mse+corr" adds 1 - r, the batch's Pearson correlation between
# predicted and true EF. MSE alone rewards answering the mean while the features do not yet carry EF: the head
# shrinks its last layer, the gradient to the encoder dies with it, and the model sits at the mean predictor
# (evim3-tiny from scratch, batch 8: prediction SD 0.000 EF after 50 steps at lr 3e-3, still flat after 300).
# The correlation term cannot be lowered by shrinking the output, and its pull on a near-constant output is
# strong, so the readout stays alive: the same run left the mean by step 200 (BENCHMARKS.md, learning).
EF_LOSSES = ("mse", "mse+corr")

# What differs between the stages in the paper's configs; every other default is shared.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"epochs": 100, "lr": 1e-3, "warmup_epochs": 5.0, "clip_grad": 0.1},
    "finetune": {"epochs": 50, "lr": 1e-4, "warmup_epochs": 1.0, "clip_grad": 1.0},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Fields left None take their stage's default (STAGE_DEFAULTS)."""

    stage: str  # "pretrain" | "finetune"
    out: str  # run folder: checkpoints, logs, summary
    data: str | None = None  # EchoNet-Dynamic-layout folder (EF, seg, pre-training)
    csv: str | None = None  # CSV of path,label,split (classification; pre-training may use it too)
    task: str = "ef"  # a registered task (evim3.runtime.tasks): "ef" | "classification" | "seg" (fine-tuning)
    ef_loss: str = "mse+corr"  # EF_LOSSES
    preset: str = "evim3"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (tests, experiments)
    frames: int | None = None  # clip length; None = the preset's
    period: int = 2
    fps: float = 50.0
    pad: int = CROP_PAD  # random-crop padding of TRAIN clips, pixels
    keep_ratio: float = 1.0  # share of the TRAIN split used (reduced-label runs)
    max_videos: int | None = None  # cap per split (quick runs)
    stats_videos: int = 128  # videos sampled for the normalisation mean/std
    cache_videos: bool = False  # decode each video once and keep it in memory (uint8, T x size^2 bytes)
    strict: bool = False  # stop at a video that cannot be decoded, instead of skipping it with a warning

    epochs: int | None = None
    max_steps: int | None = None  # optimizer steps; ends the run early and sets the schedule's length
    batch: int = 4  # clips per rank per micro-batch
    accum: int = 4  # micro-batches per optimizer step
    lr: float | None = None  # at a total batch of lr_batch; scaled linearly to the real total batch
    lr_batch: int = 32
    weight_decay: float = 0.1
    adam_eps: float = 1e-15
    warmup_epochs: float | None = None
    warmup_steps: int | None = None  # overrides warmup_epochs
    min_lr_factor: float = 0.01  # warm-up starts and cosine ends at this share of lr
    # Share of the post-warm-up steps the cosine takes; below 1 the lr first holds at its peak (warm-up, stable,
    # decay). 1 is the paper's schedule.
    decay_fraction: float = 1.0
    clip_grad: float | None = None  # max gradient norm; 0 = no clipping
    ema_beta: float = 0.9999
    ema_power: float = 0.75  # decay warms up as 1 - (steps since EMA start)^-power, capped at beta; 0 = beta
    ema_every: int = 5
    ema_start: int = 100

    mask_ratio: float = 0.8
    mask_strategy: str = "stc"
    time_chain: int | None = None  # STC cell size; None = the mask module's default for the geometry
    chain: int | None = None
    shared_mask: bool = False  # one mask for the whole batch, as the paper's code
    norm_pix_loss: bool = False

    init: str | None = None  # fine-tuning: checkpoint whose encoder.* weights initialise the encoder
    resume: bool = False
    ckpt_every: int = 0  # optimizer steps between resume checkpoints; 0 = at the end of each epoch only
    eval_every: int = 1  # epochs
    log_every: int = 10  # optimizer steps between CSV rows
    workers: int = 2
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r} (expected one of {', '.join(STAGES)})")
        task_spec(self.task)  # ValueError naming the registered tasks
        if self.ef_loss not in EF_LOSSES:
            raise ValueError(f"unknown EF loss {self.ef_loss!r} (expected one of {', '.join(EF_LOSSES)})")
        if self.mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"unknown mask strategy {self.mask_strategy!r} (expected {', '.join(MASK_STRATEGIES)})")
        for name, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        positive = {"batch": self.batch, "accum": self.accum, "epochs": self.epochs, "period": self.period,
                    "lr_batch": self.lr_batch, "ema_every": self.ema_every, "eval_every": self.eval_every,
                    "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.ckpt_every < 0 or self.workers < 0:
            raise ValueError("ckpt_every and workers must be >= 0")
        self.model_config()  # unknown presets and override keys fail here, before any data is read

    def model_config(self) -> ModelConfig:
        overrides = dict(self.model_overrides)
        if self.frames is not None:
            overrides["frames"] = self.frames
        return get_preset(self.preset).replace(**overrides)

    def preprocess_spec(self, mean: float = 0.0, std: float = 1.0) -> PreprocessSpec:
        cfg = self.model_config()
        return PreprocessSpec(size=cfg.img_size, fps=self.fps, frames=cfg.frames, period=self.period,
                              mean=mean, std=std)

    def total_batch(self, world_size: int) -> int:
        return self.batch * self.accum * world_size

    def scaled_lr(self, world_size: int) -> float:
        """The paper's linear scaling: lr x total batch / lr_batch."""
        return self.lr * self.total_batch(world_size) / self.lr_batch

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The demo's CPU recipe (`evim3 demo` passes it as flags to both stages; benchmarks/bench_step.py times its steps):
# 12-frame clips every 5th frame (1.2 s: a heartbeat at 50-120 bpm), batch 8, no padding crop, videos decoded once
# and kept in memory, the EMA updated every step (it follows a run this short closely); lr 8e-3 at a batch of 32 is
# 2e-3 at 8 (BENCHMARKS.md "learning: tubelets": 2e-3 left the mean predictor earliest; 4e-3 stayed at it in one of
# two seeds). The lr holds at that peak for the first half of the steps after the warm-up, then takes a cosine: the
# seeds leave the mean predictor anywhere from step 150 to 300, where the paper's cosine had already cut the lr by
# up to half (BENCHMARKS.md "demo recipe: the peak lr held").
# No register planes (reg=0): the enclosure's two faces per axis stay, the planes between them go. With 12 frames
# that is 8x9x9 = 648 tokens instead of 16 frames' 11x10x10 = 1100 (the register planes alone were 26 % of them):
# a step ~0.6x as long, which brings the demo under 10 minutes on a slow 2-core machine; six seeds learn as well as
# before (BENCHMARKS.md "issue 26, session 5").
DEMO_RECIPE: dict[str, Any] = {
    "preset": "evim3-tiny", "model_overrides": {"reg": 0}, "frames": 12, "period": 5, "batch": 8, "accum": 1,
    "pad": 0, "cache_videos": True, "workers": 0, "lr": 8e-3, "decay_fraction": 0.5, "ema_start": 0, "ema_every": 1,
    "ema_beta": 0.9,
}


# Fields a resumed run must share with the run it continues: they change what a step computes or the
# schedule's length. The rest (workers, device, ckpt_every, ...) may differ.
RESUME_INVARIANTS = (
    "stage", "task", "ef_loss", "preset", "model_overrides", "frames", "period", "fps", "pad", "keep_ratio", "max_videos",
    "epochs", "max_steps", "batch", "accum", "lr", "lr_batch", "weight_decay", "adam_eps", "warmup_epochs",
    "warmup_steps", "min_lr_factor", "decay_fraction", "clip_grad",
    "ema_beta", "ema_power", "ema_every", "ema_start", "mask_ratio", "mask_strategy", "time_chain", "chain",
    "shared_mask", "norm_pix_loss", "seed",
)


def build_optimizer(model: nn.Module, lr: float, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: decayed weights, and the parameters `no_weight_decay_names` lists."""
    import torch

    from evim3.models.evim3 import no_weight_decay_names

    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On CUDA one fused kernel for the whole update instead of torch's multi-tensor (foreach) launches; on the
    # CPU the update is ~1 % of a step and stays as it was.
    fused = all(p.is_cuda for p in decay + no_decay) or None
    return torch.optim.AdamW(groups, lr=lr, eps=cfg.adam_eps, fused=fused)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float, decay_fraction: float = 1.0) -> float:
    """Share of the peak lr at optimizer step `step`: linear from min_factor to 1 over the warm-up, then 1
    until the last `decay_fraction` of the remaining steps, which take half a cosine down to min_factor at
    total_steps. decay_fraction 1 is the paper's WarmUpCosineAnnealingLR."""
    if step < warmup_steps:
        return min_factor + (1 - min_factor) * step / warmup_steps
    decay_steps = max(1, round(decay_fraction * (total_steps - warmup_steps)))
    progress = min(1.0, max(0.0, (step - (total_steps - decay_steps)) / decay_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_factor: float, decay_fraction: float) -> LambdaLR:
    """Stepped once per optimizer step. A closed-form factor, so a resumed schedule is exact."""
    from torch.optim.lr_scheduler import LambdaLR

    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_factor=min_factor,
                               decay_fraction=decay_fraction)
    return LambdaLR(optimizer, factor)


def ema_decay(num_averaged: int, beta: float, power: float, every: int) -> float:
    """Decay of an EMA update after `num_averaged` earlier ones (the first of which copied the weights).

    As ema_pytorch, which the paper's code uses: 1 - (training steps since the copy)^-power, capped at
    beta, so the average forgets its starting point within a run. power <= 0 means a constant beta.
    """
    if power <= 0:
        return beta
    return min(beta, 1 - (num_averaged * every) ** -power)


def build_ema(model: nn.Module, cfg: TrainConfig) -> AveragedModel:
    """An AveragedModel whose parameters follow `model` by a warmed-up exponential moving average.

    Buffers are copied, not averaged (use_buffers=False): the model's buffers are integer index tables.
    """
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    @torch.no_grad()
    def update(ema_params: list, model_params: list, num_averaged: torch.Tensor) -> None:
        decay = ema_decay(int(num_averaged), cfg.ema_beta, cfg.ema_power, cfg.ema_every)
        get_ema_multi_avg_fn(decay)(ema_params, model_params, num_averaged)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=False)


def ema_due(step: int, cfg: TrainConfig) -> bool:
    """Whether the EMA takes the weights after optimizer step `step` (counted from 1)."""
    return step >= cfg.ema_start and step % cfg.ema_every == 0
