"""The training loop both stages run: `train(cfg)`.

Per optimizer step: `accum` micro-batches (DDP gradient sync on the last one only), gradient clipping,
AdamW, the warm-up + cosine schedule, and the weight EMA when due. At each epoch end the EMA model is
validated; the best by the task's metric is written (``best.safetensors``, or ``pretrain.safetensors``
for pre-training), and a resume checkpoint (``last.state.pt`` + ``last.safetensors``) every
`ckpt_every` steps and at each epoch end. The step count alone says where a run is (epoch = step //
steps per epoch), so a resumed run picks up mid-epoch at the same sample with the same random state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from evim3.checkpoint import save_checkpoint
from evim3.runtime.atomic import write_atomic
from evim3.runtime.errors import CheckpointError, DatasetError
from evim3.runtime.meta import PreprocessSpec
from evim3.train.allocator import keep_freed_memory
from evim3.train.distributed import (
    DistContext,
    all_gather_objects,
    barrier,
    broadcast_from_main,
    init_distributed,
    shutdown,
)
from evim3.train.logging import RunLogger, summary_text
from evim3.train.recipe import (
    RESUME_INVARIANTS,
    TrainConfig,
    build_ema,
    build_optimizer,
    build_scheduler,
    ema_due,
)
from evim3.train.sampling import UnreadableVideos, make_loader
from evim3.train.state import STATE_FILE, capture_rng, load_state, restore_rng, save_state
from evim3.train.tasks import init_checkpoint_file, load_encoder_weights, make_task

LAST_FILE = "last.safetensors"
SUMMARY_FILE = "summary.json"


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or, with cfg.resume, continue) one training run; returns the summary (summary.json).

    `stop_after` ends the run after that optimizer step with a checkpoint, as if it had been stopped
    there (tests compare it, resumed, with an uninterrupted run)."""
    ctx = init_distributed(cfg.device)
    try:
        return Trainer(cfg, ctx).fit(stop_after=stop_after)
    finally:
        shutdown(ctx)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter's bytes: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.task = make_task(cfg)
        state_path = os.path.join(cfg.out, STATE_FILE)
        if cfg.resume:
            resumed = load_state(state_path)
            self._check_resumable(resumed, state_path)
        else:
            if os.path.exists(state_path):
                raise CheckpointError(cfg.out, "holds a run already: add --resume to continue it, or choose another --out")
            resumed = None
        if cfg.init and cfg.stage != "finetune":
            raise ValueError("--init initialises a fine-tuning run from a pre-trained checkpoint; pre-training starts fresh")

        self.unreadable = UnreadableVideos(cfg.strict)
        self.spec = self._preprocess_spec(resumed)
        self.data = self.task.datasets(self.spec)

        seed_everything(cfg.seed)  # the same initial weights on every rank
        model = self.task.build_model()
        if cfg.init and resumed is None:
            load_encoder_weights(model, cfg.init)
        self.model = model.to(ctx.device)
        if ctx.device.type == "cpu":
            keep_freed_memory()
        self.ema = build_ema(self.model, cfg)
        self.net: nn.Module = self.model
        if ctx.distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # No running statistics in the model: its buffers are static index tables, nothing to broadcast.
            self.net = DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)

        loader_args = {"rank": ctx.rank, "world_size": ctx.world_size, "seed": cfg.seed, "workers": cfg.workers}
        self.train_loader = make_loader(self.data.train, batch=cfg.batch, shuffle=True, drop_last=True, **loader_args)
        self.val_loader = make_loader(self.data.val, batch=cfg.batch, shuffle=False, drop_last=False, **loader_args)
        self.steps_per_epoch = len(self.train_loader) // cfg.accum
        if self.steps_per_epoch == 0:
            raise DatasetError(self.data.source, f"TRAIN has {len(self.data.train)} videos, fewer than one optimizer step "
                               f"takes (batch {cfg.batch} x accum {cfg.accum} x {ctx.world_size} processes)")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * self.steps_per_epoch)
        self.warmup_steps = min(warmup, self.total_steps)
        self.lr = cfg.scaled_lr(ctx.world_size)
        self.optimizer = build_optimizer(self.model, self.lr, cfg)
        self.scheduler = build_scheduler(self.optimizer, self.warmup_steps, self.total_steps, cfg.min_lr_factor,
                                         cfg.decay_fraction)

        self.step = 0  # optimizer steps taken
        self.epochs_done = 0  # epochs whose end (validation, checkpoint) is done
        self.best: float | None = None
        self.best_record: dict[str, Any] = {}
        self.last_val: dict[str, float] = {}
        self.resumed_from: int | None = None
        torch.manual_seed(cfg.seed + 1000 * ctx.rank)  # per-rank stream from here on (masks differ per rank)
        if resumed is not None:
            self._restore(resumed, state_path)

    # --- set-up -------------------------------------------------------------------------------------

    def _check_resumable(self, state: dict, path: str) -> None:
        saved, now = state["config"], self.cfg.to_dict()
        changed = [name for name in RESUME_INVARIANTS if saved.get(name) != now[name]]
        if changed:
            name = changed[0]
            raise CheckpointError(path, f"cannot resume with another {name} ({saved.get(name)!r} before, "
                                        f"{now[name]!r} now); keep the run's settings or start a new --out")
        if state["world_size"] != self.ctx.world_size:
            raise CheckpointError(path, f"run used {state['world_size']} processes, this one {self.ctx.world_size}: "
                                        "resume with the same --nproc")

    def _preprocess_spec(self, resumed: dict | None) -> PreprocessSpec:
        """Clip geometry from the config; normalisation from the resumed run, from the --init checkpoint
        (its encoder learnt with it), or measured on the training videos (rank 0, shared with all)."""
        if resumed is not None:
            return PreprocessSpec(**resumed["spec"])
        if self.cfg.init:
            from evim3.checkpoint import read_meta

            init_spec = read_meta(init_checkpoint_file(self.cfg.init)).preprocess
            return self.cfg.preprocess_spec(init_spec.mean, init_spec.std)
        mean_std = None
        if self.ctx.is_main:
            from evim3.data.stats import compute_mean_std

            # The training videos as this run selects them (split, keep_ratio, tracings).
            provisional = self.task.datasets(self.cfg.preprocess_spec())
            mean_std = compute_mean_std(provisional.train.paths, self.cfg.preprocess_spec(),
                                        num_videos=self.cfg.stats_videos, seed=self.cfg.seed,
                                        on_unreadable=self.unreadable.note)
        mean, std = broadcast_from_main(mean_std, self.ctx)
        return self.cfg.preprocess_spec(mean, std)

    def _restore(self, state: dict, path: str) -> None:
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(path, f"the dataset changed: {state['steps_per_epoch']} steps per epoch before, "
                                        f"{self.steps_per_epoch} now")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epochs_done = state["step"], state["epochs_done"]
        self.best, self.best_record, self.last_val = state["best"], state["best_record"], state["last_val"]
        restore_rng(state["rng"][self.ctx.rank])
        self.resumed_from = self.step

    # --- the loop -----------------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        if self.ctx.is_main:
            os.makedirs(cfg.out, exist_ok=True)
        self.logger = RunLogger(cfg.out, enabled=self.ctx.is_main, total_steps=self.total_steps,
                                start_step=self.step, log_every=cfg.log_every)
        self.logger.message(self._banner())
        if cfg.cache_videos:
            self._preload_videos()
        try:
            if self.step and self._epoch_end_pending():  # stopped between an epoch's last step and its end
                self._end_epoch()
            while self.step < self.total_steps and (stop_after is None or self.step < stop_after):
                self._train_epoch(stop_after)
        finally:
            self.logger.close()
        return self._finish(time.perf_counter() - started)

    def _preload_videos(self) -> None:
        """Fill both datasets' caches in this process, so the loader workers it forks share them."""
        t0 = time.perf_counter()
        size = self.data.train.preload() + self.data.val.preload()
        for error in [*self.data.train.unreadable.values(), *self.data.val.unreadable.values()]:
            self.unreadable.note(str(error))
        videos = len(self.data.train) + len(self.data.val)
        self.logger.message(f"cached {videos} videos in memory: {size / 2**20:.0f} MiB in "
                            f"{time.perf_counter() - t0:.0f} s")

    def _train_epoch(self, stop_after: int | None) -> None:
        cfg = self.cfg
        epoch, done = divmod(self.step, self.steps_per_epoch)
        self.train_loader.sampler.set_epoch(epoch, skip=done * cfg.accum * cfg.batch)
        self.net.train()
        batches = iter(self.train_loader)
        epoch_end = min(self.total_steps, (epoch + 1) * self.steps_per_epoch)
        while self.step < epoch_end:
            lr = self.optimizer.param_groups[0]["lr"]
            loss, grad_norm = self._optimizer_step(batches)
            self.step += 1
            if ema_due(self.step, cfg):
                self.ema.update_parameters(self.model)
            self.logger.step(self.step, epoch + 1, loss, lr, grad_norm, cfg.total_batch(self.ctx.world_size))
            if self.step == epoch_end:
                self._end_epoch()
            elif (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == stop_after:
                self._save()
            if self.step == stop_after:
                return

    def _optimizer_step(self, batches) -> tuple[float, float]:
        cfg, ctx = self.cfg, self.ctx
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=ctx.device)
        for micro in range(cfg.accum):
            batch = next(batches)
            self.unreadable.note_batch(batch)
            last = micro == cfg.accum - 1
            # DDP all-reduces gradients on the last micro-batch only.
            sync = contextlib.nullcontext() if last or not ctx.distributed else self.net.no_sync()
            with sync:
                loss = self.task.loss(self.net, batch, ctx.device)
                (loss / cfg.accum).backward()
            total += loss.detach()
        if ctx.distributed:
            dist.all_reduce(total)
        mean_loss = total.item() / (cfg.accum * ctx.world_size)
        if not math.isfinite(mean_loss):
            raise ValueError(f"training loss became {mean_loss} at step {self.step + 1}: lower --lr, or --resume "
                             "from the last checkpoint")
        max_norm = cfg.clip_grad if cfg.clip_grad > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        self.scheduler.step()
        return mean_loss, grad_norm

    def _epoch_end_pending(self) -> bool:
        at_boundary = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
        return at_boundary and self.epochs_done <= (self.step - 1) // self.steps_per_epoch

    def _eval_model(self) -> nn.Module:
        """The EMA model once it has started; until then the EMA is the model itself (as ema_pytorch)."""
        return self.ema.module if int(self.ema.n_averaged) > 0 else self.model

    def _end_epoch(self) -> None:
        epoch = (self.step - 1) // self.steps_per_epoch + 1  # 1-based epoch just finished
        final = self.step >= self.total_steps
        if epoch % self.cfg.eval_every == 0 or final:
            model = self._eval_model().eval()
            metrics = self.task.validate(model, self.unreadable.watch(self.val_loader), self.ctx)
            self.last_val = metrics
            self.logger.epoch(epoch, self.step, metrics)
            if self.task.improved(metrics[self.task.monitor], self.best):
                self.best = metrics[self.task.monitor]
                self.best_record = {"epoch": epoch, "step": self.step, **metrics}
                if self.ctx.is_main:
                    meta = self.task.meta(self.spec, self._data_summary(self.best_record, weights="ema"))
                    save_checkpoint(os.path.join(self.cfg.out, self.task.checkpoint_name), model.state_dict(), meta)
        self.epochs_done = epoch
        self._save()

    def _data_summary(self, validation: dict[str, Any], weights: str) -> dict[str, Any]:
        return {
            "source": self.data.source, "train_videos": len(self.data.train), "val_videos": len(self.data.val),
            "keep_ratio": self.cfg.keep_ratio, "init": self.cfg.init, "world_size": self.ctx.world_size,
            "weights": weights, "step": self.step, "validation": validation, "train_config": self.cfg.to_dict(),
        }

    def _save(self) -> None:
        """Resume state and last weights; every rank contributes its random state, rank 0 writes."""
        rng = all_gather_objects(capture_rng(), self.ctx)
        if self.ctx.is_main:
            state = {
                "config": self.cfg.to_dict(), "world_size": self.ctx.world_size,
                "steps_per_epoch": self.steps_per_epoch, "spec": dataclasses.asdict(self.spec),
                "step": self.step, "epochs_done": self.epochs_done, "best": self.best,
                "best_record": self.best_record, "last_val": self.last_val,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng,
            }
            save_state(os.path.join(self.cfg.out, STATE_FILE), state)
            meta = self.task.meta(self.spec, self._data_summary(self.last_val, weights="raw"))
            save_checkpoint(os.path.join(self.cfg.out, LAST_FILE), self.model.state_dict(), meta)
        barrier(self.ctx)

    # --- reporting ----------------------------------------------------------------------------------

    def _banner(self) -> str:
        cfg, ctx = self.cfg, self.ctx
        start = f"resuming at step {self.step}" if self.resumed_from is not None else "starting"
        return (f"evim3 {cfg.stage} ({self.task.name}, {cfg.preset}): {start}; {len(self.data.train)} train / "
                f"{len(self.data.val)} val videos; {self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs -> "
                f"{self.total_steps} steps; batch {cfg.batch} x accum {cfg.accum} x {ctx.world_size} proc on "
                f"{ctx.device.type}; lr {self.lr:.3g} (warm-up {self.warmup_steps} steps); clip "
                f"{self.spec.frames} frames, period {self.spec.period}; mean/std {self.spec.mean:.2f}/{self.spec.std:.2f}")

    def _finish(self, seconds: float) -> dict[str, Any]:
        digests = all_gather_objects(weights_digest(self.model), self.ctx)
        unreadable = sorted(set().union(*all_gather_objects(self.unreadable.errors, self.ctx)))
        files = [name for name in (self.task.checkpoint_name, LAST_FILE, STATE_FILE, "steps.csv", "epochs.csv")
                 if os.path.exists(os.path.join(self.cfg.out, name))]
        summary = {
            "stage": self.cfg.stage, "out": os.path.abspath(self.cfg.out), "task": self.task.name,
            "preset": self.cfg.preset, "status": "finished" if self.step >= self.total_steps else "stopped",
            "train_videos": len(self.data.train), "val_videos": len(self.data.val),
            "unreadable_videos": len(unreadable), "unreadable": unreadable,
            "step": self.step, "total_steps": self.total_steps, "epochs_done": self.epochs_done,
            "steps_per_epoch": self.steps_per_epoch, "resumed_from": self.resumed_from,
            "world_size": self.ctx.world_size, "device": str(self.ctx.device), "lr": self.lr,
            "wall_s": seconds, "monitor": self.task.monitor, "best": self.best_record, "final": self.last_val,
            "rank_weight_digests": digests, "files": files,
        }
        if self.ctx.is_main:
            write_atomic(os.path.join(self.cfg.out, SUMMARY_FILE), json.dumps(summary, indent=2, default=str) + "\n")
            self.logger.message(summary_text(summary))
        return summary
