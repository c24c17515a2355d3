"""What an evim3 network's output means: the one rule from the graph's `output` to EF or class probabilities.

    task "ef":              (N, 1) EF in points
    task "classification":  2 classes -> (N, 1) one logit, the evidence for class 1 (trained with BCE, as the
                            paper's classification head); K > 2 classes -> (N, K) logits (cross-entropy)
    task "seg":             (N, 2, frames, size, size) background and LV logits of every pixel of every frame

Every reader of model outputs (the inference pipeline, the backends' shape checks, parity, `evim3 eval` and
its metrics) and the model that writes them go through here. numpy only.
"""

from __future__ import annotations

import numpy as np
from evim3.runtime.meta import ModelMeta


def output_width(task: str, num_classes: int = 0) -> int:
    """Values the network gives per clip: 1 for EF, 1 logit for two classes, K logits for K > 2 classes."""
    if task == "ef":
        return 1
    if num_classes < 2:
        raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def meta_output_width(meta: ModelMeta) -> int:
    return output_width(meta.task, len(meta.class_names))


def output_shape(meta: ModelMeta) -> tuple[int, ...]:
    """One clip's output shape (the graph's output without its batch axis)."""
    if meta.task == "seg":
        spec = meta.preprocess
        return (SEG_CLASSES, spec.frames, spec.size, spec.size)
    return (meta_output_width(meta),)


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


def clip_values(outputs: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """Backend outputs (N, output width) -> what a clip reports: EF (N, 1), or class probabilities (N, K)."""
    expected = meta_output_width(meta)
    if outputs.ndim != 2 or outputs.shape[1] != expected:
        raise ValueError(f"model outputs have shape {outputs.shape}; task {meta.task!r} with "
                         f"{len(meta.class_names)} classes gives (N, {expected})")
    return class_probabilities(outputs) if meta.task == "classification" else outputs.astype(np.float64)


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
