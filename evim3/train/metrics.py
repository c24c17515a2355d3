"""Evaluation metrics on numpy arrays: EF regression (MAE, RMSE, R^2 with bootstrap 95 % intervals),
classification (ROC AUC, accuracy) and LV segmentation (ED, ES and overall Dice with bootstrap intervals)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from evim3.runtime.outputs import class_probabilities

Metric = Callable[[np.ndarray, np.ndarray], float]


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y_pred, np.float64) - y_true)))


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(y_pred, np.float64) - y_true))))


def r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination, 1 - SS_res / SS_tot; nan when the truth is constant."""
    y_true = np.asarray(y_true, np.float64)
    total = np.sum(np.square(y_true - y_true.mean()))
    if total == 0:
        return float("nan")
    return float(1 - np.sum(np.square(y_true - y_pred)) / total)


REGRESSION_METRICS: dict[str, Metric] = {"mae": mae, "rmse": rmse, "r2": r2}


def bootstrap_ci(metric: Metric, y_true: np.ndarray, y_pred: np.ndarray, *, resamples: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric`: videos resampled with replacement `resamples` times."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(y_true), size=(resamples, len(y_true)))
    values = np.array([metric(y_true[d], y_pred[d]) for d in draws])
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


# Predicted spread below this share of the true spread: the model barely responds to its input (a collapse
# towards the mean predictor), whatever its MAE says.
COLLAPSED_SPREAD_RATIO = 0.25


def regression_report(y_true: np.ndarray, y_pred: np.ndarray, *, resamples: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """{mae, mae_lo, mae_hi, rmse, ..., r2, ..., n, pred_std, true_std}: point values, 95 % bootstrap bounds,
    and the standard deviations of the predictions and of the truth over the videos (a model that answers
    the same EF for every input has pred_std ~ 0: its MAE alone does not show that)."""
    report: dict[str, float] = {"n": len(y_true), "pred_std": float(np.std(y_pred)), "true_std": float(np.std(y_true))}
    for name, metric in REGRESSION_METRICS.items():
        report[name] = metric(y_true, y_pred)
        if resamples:
            report[f"{name}_lo"], report[f"{name}_hi"] = bootstrap_ci(
                metric, y_true, y_pred, resamples=resamples, seed=seed)
    return report


def is_collapsed(report: dict[str, float]) -> bool:
    """Whether a regression report's predictions spread less than COLLAPSED_SPREAD_RATIO of the truth's."""
    return report["pred_std"] < COLLAPSED_SPREAD_RATIO * report["true_std"]


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties counting one half
    (the Mann-Whitney statistic from average ranks); nan when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), np.float64)
    # Average 1-based rank within each run of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def classification_report(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Accuracy and AUC from the network's logits: (N,) or (N, 1) for a binary model (one logit), (N, K)
    otherwise, read by the rule `evim3 infer` reports with (evim3.runtime.outputs.class_probabilities).

    The prediction is the most probable class. Binary AUC ranks the logit (the order of its probability,
    without the ties sigmoid's rounding to 1.0 makes of large logits); several classes: macro one-vs-rest
    AUC of each class's probability over the classes present both ways."""
    labels = np.asarray(labels)
    logits = np.asarray(logits, np.float64)
    logits = logits.reshape(-1, 1) if logits.ndim == 1 else logits
    probabilities = class_probabilities(logits)
    predicted = probabilities.argmax(1)
    if logits.shape[1] == 1:
        auc = binary_auc(labels == 1, logits[:, 0])
    else:
        per_class = [binary_auc(labels == k, probabilities[:, k]) for k in range(probabilities.shape[1])]
        auc = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return {"accuracy": float(np.mean(predicted == labels)), "auc": auc, "n": len(labels)}


def overlap_counts(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(true positives, false positives, false negatives) of the LV pixels of masks (..., H, W) bool:
    (..., 3) int64."""
    predicted, true = np.asarray(predicted, bool), np.asarray(true, bool)
    return np.stack([(predicted & true).sum((-2, -1)), (predicted & ~true).sum((-2, -1)),
                     (~predicted & true).sum((-2, -1))], axis=-1).astype(np.int64)


def pooled_dice(counts: np.ndarray) -> float:
    """Foreground Dice 2 TP / (2 TP + FP + FN) of the pixels of every frame in `counts` (..., 3) together:
    the paper's "global" Dice (its criterion sums TP, FP, FN over the epoch); nan without any LV pixel."""
    tp, fp, fn = np.asarray(counts, np.float64).reshape(-1, 3).sum(0)
    return float(2 * tp / (2 * tp + fp + fn)) if 2 * tp + fp + fn > 0 else float("nan")


SEG_FRAMES = {"dice_ed": 0, "dice_es": 1}  # column of a video's (ED, ES) counts


def segmentation_report(counts: np.ndarray, *, resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """{dice, dice_ed, dice_es, each with _lo/_hi 95 % bootstrap bounds when resamples > 0, n}: pooled Dice
    over the videos' traced frames, `counts` (videos, 2, 3) = per video, (ED, ES) x (TP, FP, FN); a frame not
    judged has zero counts. Videos are resampled whole, as for EF."""
    counts = np.asarray(counts, np.int64)
    metrics: dict[str, Metric] = {"dice": lambda c, _: pooled_dice(c)}
    for name, column in SEG_FRAMES.items():
        metrics[name] = lambda c, _, column=column: pooled_dice(c[:, column])
    report: dict[str, float] = {"n": len(counts)}
    unused = np.zeros(len(counts))  # bootstrap_ci resamples (truth, prediction) pairs: the counts hold both
    for name, metric in metrics.items():
        report[name] = metric(counts, unused)
        if resamples:
            report[f"{name}_lo"], report[f"{name}_hi"] = bootstrap_ci(metric, counts, unused, resamples=resamples,
                                                                      seed=seed)
    return report
