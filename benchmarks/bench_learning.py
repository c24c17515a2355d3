"""Does the model learn, and how fast against the anchor? (issue 13)

evim3-tiny (with the paper's MSE loss and with evim3's default mse+corr) and torchvision's R(2+1)D-18
(EchoNet-Dynamic's network, evim3.models.r2plus1d) fine-tuned for EF from scratch on the same synthetic data, the same clips (16 frames, period 4, no padding crop), the same batch,
optimizer, learning rate and warm-up, and the same CPU budget (threads: all cores). Validation MAE (VAL, 50
videos, first clip) is recorded against optimizer step and against training wall time (validation excluded),
with the prediction spread; both curves go into one PNG. At the end, TEST MAE (50 videos) with a bootstrap
95 % interval against the mean predictor (the TRAIN mean EF).

Then the diagnosis: linear probes (ridge regression, penalty by 5-fold cross-validation on TRAIN) of EF on
frozen features of the randomly initialised evim3-tiny, TEST R^2: what the head reads (the LayerNorm'd global
tokens, averaged as `all_enclosure_mean`, and the 27 crossing tokens concatenated as `all_concat`), and the
temporal SD of the real tokens per patch location (a second-order statistic no linear head over tokens
sees), beside the same statistic on the pixels.

    python -m benchmarks learning                               # 10 minutes per arm, 3 arms
    EVIM3_BENCH_LEARNING_MIN=3 python -m benchmarks learning    # a shorter budget per arm

Environment: EVIM3_BENCH_LEARNING_MIN (training minutes per arm, default 10), EVIM3_BENCH_LEARNING_ARMS
(network:loss pairs, default ARMS), EVIM3_BENCH_TRAIN_VIDEOS / EVIM3_BENCH_TRAIN_DATA (the dataset, as
bench_train), EVIM3_BENCH_DEVICE (default: cuda when there is one, else cpu; float32 either way).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from evim3.runtime.meta import PreprocessSpec
from torch import Tensor, nn

from benchmarks.bench_train import dataset_folder
from evim3.config import get_preset
from evim3.data.echonet import EchoNetDataset
from evim3.data.stats import compute_mean_std
from evim3.models.evim3 import EViM3
from evim3.models.layout import global_positions, intersection_positions, real_positions
from evim3.models.r2plus1d import R2Plus1D18EF
from evim3.tasks.ef import ef_loss
from evim3.train.metrics import mae, regression_report
from evim3.train.recipe import TrainConfig, build_optimizer, build_scheduler

SEED = 0
CLIP = {"frames": 16, "period": 4}
BATCH = 8
# Learning rate and warm-up per network, at batch 8. evim3-tiny: the demo's recipe (cli/demo.py: 8e-3 at batch
# 32, a quarter-epoch warm-up), the rate that left the mean predictor earliest (BENCHMARKS.md "learning:
# tubelets"). R(2+1)D-18: 1e-3 with a one-epoch warm-up; with a 9-step warm-up (at 1e-3 or 2e-3) its batch-norm
# statistics had not caught up after ~15 CPU steps and its validation MAE was in the hundreds.
RECIPE = {"evim3-tiny": {"lr": 2e-3, "warmup_steps": 9}, "r2plus1d-18": {"lr": 1e-3, "warmup_steps": 37}}
EVALS = 6  # validations per arm, evenly spaced in training time
# network:EF loss (recipe.EF_LOSSES). evim3-tiny with the paper's MSE and with the default mse+corr; the anchor
# with the default.
ARMS = ("evim3-tiny:mse", "evim3-tiny:mse+corr", "r2plus1d-18:mse+corr")
LEFT_MEAN = 0.9  # "left the mean predictor": val MAE <= 0.9 x the mean predictor's, with a spread
MIN_SPREAD = 0.25  # ... of at least this share of the true EF spread
RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = torch.device(os.environ.get("EVIM3_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


class ClipSet:
    """One split's clips as tensors in memory: TRAIN draws random starts per item, VAL/TEST the first clip."""

    def __init__(self, data: Path, split: str, spec: PreprocessSpec, keep_ratio: float = 1.0):
        clips = "random" if split == "TRAIN" else "first"
        self.dataset = EchoNetDataset(data, split, spec, clips=clips, pad=0, cache=True, keep_ratio=keep_ratio)
        self.dataset.preload()
        self.ef = torch.tensor(self.dataset.ef)
        self.ef_mean, self.ef_std = self.dataset.ef_mean, self.dataset.ef_std
        self._fixed = None if split == "TRAIN" else torch.stack([self.dataset[i]["x"] for i in range(len(self))])

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        return torch.stack([self.dataset[i]["x"] for i in indices]), self.ef[indices]

    def all(self) -> Tensor:
        return self._fixed


def clip_spec(data: Path) -> PreprocessSpec:
    base = PreprocessSpec(size=112, fps=50.0, frames=CLIP["frames"], period=CLIP["period"])
    train = EchoNetDataset(data, "TRAIN", base, clips="random", pad=0)
    mean, std = compute_mean_std(train.paths, base, num_videos=32, seed=SEED)
    return PreprocessSpec(size=112, fps=50.0, frames=CLIP["frames"], period=CLIP["period"], mean=mean, std=std)


def build(arm: str, train: ClipSet) -> nn.Module:
    torch.manual_seed(SEED)
    if arm == "evim3-tiny":
        model = EViM3(get_preset("evim3-tiny").replace(frames=CLIP["frames"]), ef_mean=train.ef_mean, ef_std=train.ef_std)
    elif arm == "r2plus1d-18":
        model = R2Plus1D18EF(train.ef_mean, train.ef_std)
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return model.to(DEVICE)


@torch.no_grad()
def predict(model: nn.Module, clips: Tensor, batch: int = 8) -> np.ndarray:
    model.eval()
    out = torch.cat([model(clips[i:i + batch].to(DEVICE))[:, 0] for i in range(0, len(clips), batch)])
    model.train()
    return out.double().cpu().numpy()


def finetune(model: nn.Module, train: ClipSet, val: ClipSet, *, lr: float, warmup_steps: int,
             budget_s: float | None = None, steps: int | None = None, evals: int = EVALS, seed: int = SEED,
             loss_kind: str = "mse+corr", keep_best: bool = False) -> list[dict[str, Any]]:
    """Train with the EF loss `loss_kind` (recipe.EF_LOSSES) until `budget_s` seconds of training (validation
    excluded) or `steps` optimizer steps; validate `evals` times, evenly spaced in training time (budget) or
    steps. Returns the curve. keep_best: end with the weights of the validation with the lowest MAE, as
    `evim3 train` keeps best.safetensors (the curve's point has "selected": True)."""
    cfg = TrainConfig(stage="finetune", out="unused")  # the recipe's AdamW groups, weight decay and eps
    # A time budget has no schedule length to know: the cosine then spans 10^9 steps, i.e. a constant lr after
    # the warm-up.
    total = steps or 10**9
    optimizer = build_optimizer(model, lr, cfg)
    scheduler = build_scheduler(optimizer, warmup_steps, total, cfg.min_lr_factor, cfg.decay_fraction)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)  # random clip starts
    order: list[int] = []
    true_val = val.ef.double().numpy()
    mean_predictor = mae(true_val, np.full_like(true_val, train.ef_mean))
    curve, trained_s, step, next_eval = [], 0.0, 0, 1
    best: dict[str, Tensor] | None = None
    while True:
        started = time.perf_counter()
        if len(order) < BATCH:
            order += torch.randperm(len(train), generator=generator).tolist()
        x, y = train.batch([order.pop() for _ in range(BATCH)])
        loss = ef_loss(model(x.to(DEVICE))[:, 0], y.to(DEVICE), train.ef_std, loss_kind)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        step += 1
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # the step's time, not its launch
        trained_s += time.perf_counter() - started
        progress = trained_s / budget_s if budget_s else step / total
        if progress >= next_eval / evals or progress >= 1:
            predicted = predict(model, val.all())
            report = regression_report(true_val, predicted, resamples=0)
            curve.append({"step": step, "train_s": round(trained_s, 1), "val_mae": report["mae"],
                          "mean_predictor_mae": mean_predictor, "pred_std": report["pred_std"],
                          "true_std": report["true_std"], "loss": loss.item()})
            print(f"   step {step:5d}  {trained_s / 60:5.1f} min  val MAE {report['mae']:.2f} (mean predictor "
                  f"{mean_predictor:.2f})  spread {report['pred_std']:.2f} / {report['true_std']:.2f}", flush=True)
            next_eval += 1
            if keep_best and report["mae"] <= min(point["val_mae"] for point in curve):
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
                for point in curve:
                    point["selected"] = point is curve[-1]
        if progress >= 1:
            if best is not None:
                model.load_state_dict(best)
            return curve


def left_mean_at(curve: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first validation at which the model is clearly better than the mean predictor and not flat."""
    for point in curve:
        if point["val_mae"] <= LEFT_MEAN * point["mean_predictor_mae"] and point["pred_std"] >= MIN_SPREAD * point["true_std"]:
            return point
    return None


def test_report(model: nn.Module, train: ClipSet, test: ClipSet) -> dict[str, Any]:
    true = test.ef.double().numpy()
    predicted = predict(model, test.all())
    report = regression_report(true, predicted, resamples=1000, seed=SEED)
    return {"test_mae": report["mae"], "test_mae_95ci": f"{report['mae_lo']:.2f} to {report['mae_hi']:.2f}",
            "test_r2": report["r2"], "test_mean_predictor_mae": mae(true, np.full_like(true, train.ef_mean)),
            "test_pred_std": report["pred_std"], "test_true_std": report["true_std"], "abs_errors": np.abs(predicted - true)}


# ------------------------------------------------------------------ linear probes of frozen features

@torch.no_grad()
def probe_features(model: EViM3, clips: Tensor, batch: int = 16) -> dict[str, Tensor]:
    """Per clip: what the head reads (global-token mean, 27 crossing tokens), and the temporal SD of the real
    tokens per patch location (averaged over channels), all after the head's LayerNorm."""
    cfg = model.cfg
    L, H, W = cfg.grid
    where = {"global": torch.as_tensor(global_positions(cfg)), "cross": torch.as_tensor(intersection_positions(cfg)),
             "real": torch.as_tensor(real_positions(cfg))}
    model.eval()
    rows: dict[str, list[Tensor]] = {"head input (enclosure mean)": [], "27 crossing tokens (concat)": [],
                                     "real tokens: temporal SD per patch": [], "pixels: temporal SD per patch": []}
    for i in range(0, len(clips), batch):
        x = clips[i:i + batch].to(DEVICE)
        tokens = model.head.norm(model.encoder(x).float())
        rows["head input (enclosure mean)"].append(tokens[:, where["global"]].mean(1))
        rows["27 crossing tokens (concat)"].append(tokens[:, where["cross"]].flatten(1))
        real = tokens[:, where["real"]].reshape(len(x), L, H * W, -1)  # real positions are in LHW order
        rows["real tokens: temporal SD per patch"].append(real.std(1).mean(2))
        pixels = x[:, 0].std(1)  # (N, size, size): temporal SD per pixel
        p = cfg.patch
        rows["pixels: temporal SD per patch"].append(pixels.reshape(len(x), H, p, W, p).mean((2, 4)).flatten(1))
    return {k: torch.cat(v).double().cpu() for k, v in rows.items()}


def ridge_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> dict[str, float]:
    """Ridge regression (dual form: features may outnumber videos), the penalty by 5-fold CV on TRAIN."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-8
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    train_y, test_y = train_y.double(), test_y.double()
    y_mean = train_y.mean()

    def fit(x: Tensor, y: Tensor, penalty: float) -> Tensor:
        return x.T @ torch.linalg.solve(x @ x.T + penalty * torch.eye(len(x), dtype=x.dtype), y - y_mean)

    folds = np.array_split(np.random.default_rng(SEED).permutation(len(train_x)), 5)
    best = None
    for penalty in 10.0 ** np.arange(-1, 6):
        error = 0.0
        for fold in folds:
            keep = np.ones(len(train_x), bool)
            keep[fold] = False
            w = fit(train_x[keep], train_y[keep], penalty)
            error += float(((train_x[fold] @ w + y_mean - train_y[fold]) ** 2).sum())
        if best is None or error < best[0]:
            best = (error, penalty)
    predicted = (test_x @ fit(train_x, train_y, best[1]) + y_mean).numpy()
    report = regression_report(test_y.numpy(), predicted, resamples=0)
    return {"r2": report["r2"], "mae": report["mae"], "penalty": best[1]}


def probe_rows(model: EViM3, label: str, train: ClipSet, test: ClipSet) -> list[dict[str, Any]]:
    features_train, features_test = probe_features(model, first_clips(train)), probe_features(model, test.all())
    rows = []
    for name in features_train:
        result = ridge_probe(features_train[name], train.ef, features_test[name], test.ef)
        rows.append({"encoder": label, "features": name, "dims": features_train[name].shape[1],
                     "test_r2": result["r2"], "test_mae": result["mae"]})
    return rows


def first_clips(train: ClipSet) -> Tensor:
    """The first clip of every TRAIN video (probes fit on fixed clips)."""
    dataset = train.dataset
    saved = dataset.clips
    dataset.clips = "first"
    try:
        return torch.stack([dataset[i]["x"] for i in range(len(dataset))])
    finally:
        dataset.clips = saved


# ------------------------------------------------------------------ the run

def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for arm, curve in curves.items():
        axes[0].plot([p["step"] for p in curve], [p["val_mae"] for p in curve], "o-", label=arm)
        axes[1].plot([p["train_s"] / 60 for p in curve], [p["val_mae"] for p in curve], "o-", label=arm)
    mean_predictor = next(iter(curves.values()))[0]["mean_predictor_mae"]
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"{os.cpu_count()} CPU cores"
    for ax, xlabel in zip(axes, ("optimizer step (batch 8)", f"training wall time, minutes ({where})")):
        ax.axhline(mean_predictor, color="grey", ls="--", label="mean predictor")
        ax.axhline(LEFT_MEAN * mean_predictor, color="grey", ls=":", label=f"{LEFT_MEAN} x mean predictor")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("VAL MAE (EF points, 50 videos)")
    axes[1].legend()
    fig.suptitle(f"EF fine-tuning from scratch on synthetic echo, same clips and {DEVICE.type} budget (arm = network:loss)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run() -> dict[str, Any]:
    budget_s = float(os.environ.get("EVIM3_BENCH_LEARNING_MIN", "10")) * 60
    arms = os.environ.get("EVIM3_BENCH_LEARNING_ARMS", ",".join(ARMS)).split(",")
    torch.set_num_threads(os.cpu_count() or 1)
    data = dataset_folder(int(os.environ.get("EVIM3_BENCH_TRAIN_VIDEOS", "400")))
    spec = clip_spec(data)
    train, val, test = ClipSet(data, "TRAIN", spec), ClipSet(data, "VAL", spec), ClipSet(data, "TEST", spec)
    rows, curves = [], {}
    for arm in arms:
        network, loss_kind = arm.split(":")
        print(f"== {arm}: {budget_s / 60:.1f} min of training", flush=True)
        model = build(network, train)
        curve = finetune(model, train, val, **RECIPE[network], budget_s=budget_s, loss_kind=loss_kind)
        curves[arm] = curve
        left = left_mean_at(curve)
        report = test_report(model, train, test)
        report.pop("abs_errors")
        rows.append({"arm": arm, "parameters": sum(p.numel() for p in model.parameters()), "steps": curve[-1]["step"],
                     "s_per_step": curve[-1]["train_s"] / curve[-1]["step"], "train_min": curve[-1]["train_s"] / 60,
                     "left_mean_at_step": left["step"] if left else "never",
                     "left_mean_at_min": round(left["train_s"] / 60, 1) if left else "never",
                     "final_val_mae": curve[-1]["val_mae"], **report})
    png = RESULTS / "learning_curves.png"
    plot_curves(curves, png)
    (RESULTS / "learning_curves.json").write_text(json.dumps(curves, indent=1) + "\n")
    torch.manual_seed(SEED)
    probes = probe_rows(build("evim3-tiny", train), "random init", train, test)
    return {"rows": rows, "probes (ridge on frozen evim3-tiny features, TEST)": probes,
            "curves": "benchmarks/results/learning_curves.json", "png": "benchmarks/results/learning_curves.png", "dataset": str(data),
            "recipe": {**CLIP, "batch": BATCH, "per_network": RECIPE, "pad": 0,
                       "threads": torch.get_num_threads(), "device": str(DEVICE)},
            "left_mean_rule": f"val MAE <= {LEFT_MEAN} x mean predictor and spread >= {MIN_SPREAD} x true spread",
            "mean_predictor": "the TRAIN mean EF", "budget_min_per_arm": budget_s / 60}
