"""What an evim3 network's raw outputs mean, as numpy rules shared by every reader (the inference pipeline,
parity, `evim3 eval` and its metrics): class probabilities from logits, the LV evidence and masks of a seg
model's per-pixel logits. Which rule applies to a model is its task's (evim3.runtime.tasks). numpy only.
"""

from __future__ import annotations

import numpy as np


def class_probabilities(logits: np.ndarray) -> np.ndarray:
    """Logits (N, 1) of a binary head or (N, K) -> probabilities (N, 2) or (N, K), rows summing to one.

    One logit x: [1 - sigmoid(x), sigmoid(x)], both computed as exp(-log(1 + e^-+x)) so that neither
    overflows nor rounds to 1 - 1 for large |x|. Several: softmax over the last axis.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"expected logits of shape (N, K), got {logits.shape}")
    if logits.shape[1] == 1:
        x = logits[:, 0]
        return np.stack([np.exp(-np.logaddexp(0.0, x)), np.exp(-np.logaddexp(0.0, -x))], axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


SEG_CLASSES = 2  # task "seg": background and left ventricle, as the paper's segmentation head


def lv_masks(outputs: np.ndarray) -> np.ndarray:
    """Backend outputs (N, 2, T, H, W) of a seg model -> LV masks (N, T, H, W) bool: where the LV logit wins."""
    return lv_evidence(outputs) > 0


def lv_evidence(outputs: np.ndarray) -> np.ndarray:
    """Backend outputs (N, 2, T, H, W) of a seg model -> (N, T, H, W) float32: LV minus background logit, the
    log-odds of LV under the two-class softmax; positive where the LV wins. What overlapping clips average
    (evim3.runtime.seg)."""
    if outputs.ndim != 5 or outputs.shape[1] != SEG_CLASSES:
        raise ValueError(f"seg model outputs have shape {outputs.shape}; expected (N, {SEG_CLASSES}, T, H, W)")
    return (outputs[:, 1] - outputs[:, 0]).astype(np.float32)
