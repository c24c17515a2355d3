"""The paper's claim at this machine's scale (issue 13): MAE pre-training with STC masking on all TRAIN videos,
then EF fine-tuning on 10 % of the labels, against the same fine-tuning from scratch.

1. Pre-train evim3-tiny (the real `evim3 train pretrain` loop: STC masks at 0.8, token-skipping encoder) on
   all 300 synthetic TRAIN videos for a fixed number of steps.
2. Fine-tune twice on the first 10 % of TRAIN (30 labelled videos), same steps, seed, clips and recipe
   (bench_learning's loop): from the pre-trained encoder, and from a random one; each arm ends with the
   weights of its best validation (50 VAL videos, 6 validations), as `evim3 train` keeps best.safetensors.
3. TEST (50 videos, first clip): each arm's MAE with a bootstrap 95 % interval, and the paired bootstrap 95 %
   interval of the difference (scratch MAE - pre-trained MAE: above zero means pre-training helped).
4. Linear probes (ridge, bench_learning.probe_rows) of EF on the frozen random and pre-trained encoders: did
   pre-training put EF, or anything a linear head could read, into the features at all?

    python -m benchmarks fewlabels                                # ~34 minutes on 2 cores
    EVIM3_BENCH_FEWLABELS_SCALE=0.1 python -m benchmarks fewlabels  # every step count x 0.1 (smoke run)

Environment: EVIM3_BENCH_FEWLABELS_SCALE (default 1), EVIM3_BENCH_TRAIN_VIDEOS / EVIM3_BENCH_TRAIN_DATA,
EVIM3_BENCH_DEVICE (bench_learning's: cuda when there is one; `scripts/gpu_check.sh fewlabels` runs it there),
EVIM3_BENCH_FEWLABELS_KEEP (a folder the pre-trained checkpoint is copied to; gpu_check.sh sets it to $OUT).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from benchmarks.bench_learning import DEVICE, RECIPE, SEED, ClipSet, build, finetune, probe_rows, test_report
from benchmarks.bench_train import PRETRAIN, dataset_folder
from evim3.checkpoint import read_meta
from evim3.train.loop import train
from evim3.train.recipe import TrainConfig
from evim3.train.tasks import init_checkpoint_file, load_encoder_weights

PRETRAIN_STEPS = 950  # ~19 min at ~1.2 s a step (bench_train's pre-training recipe)
FINETUNE_STEPS = 600  # ~7 min per arm at ~0.65 s a step
LABEL_SHARE = 0.1
RESAMPLES = 2000


def paired_difference(errors_a: np.ndarray, errors_b: np.ndarray) -> dict[str, float]:
    """MAE(a) - MAE(b) over the same videos, with a paired bootstrap 95 % interval (videos resampled)."""
    rng = np.random.default_rng(SEED)
    draws = rng.integers(0, len(errors_a), size=(RESAMPLES, len(errors_a)))
    differences = errors_a[draws].mean(1) - errors_b[draws].mean(1)
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"difference": float(errors_a.mean() - errors_b.mean()), "lo": float(low), "hi": float(high)}


def run() -> dict[str, Any]:
    scale = float(os.environ.get("EVIM3_BENCH_FEWLABELS_SCALE", "1"))
    pretrain_steps, finetune_steps = max(2, round(PRETRAIN_STEPS * scale)), max(2, round(FINETUNE_STEPS * scale))
    torch.set_num_threads(os.cpu_count() or 1)
    data = dataset_folder(int(os.environ.get("EVIM3_BENCH_TRAIN_VIDEOS", "400")))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        recipe = {**PRETRAIN, "device": DEVICE.type}
        pretrain_cfg = TrainConfig(stage="pretrain", data=str(data), out=tmp, seed=SEED, epochs=10**4,
                                   max_steps=pretrain_steps, **recipe)
        summary = train(pretrain_cfg)
        pretrain_min = (time.perf_counter() - started) / 60
        checkpoint = init_checkpoint_file(tmp)
        spec = read_meta(checkpoint).preprocess  # the normalisation the encoder learnt with
        labelled = ClipSet(data, "TRAIN", spec, keep_ratio=LABEL_SHARE)
        every_train, val, test = ClipSet(data, "TRAIN", spec), ClipSet(data, "VAL", spec), ClipSet(data, "TEST", spec)

        rows, errors, models = [], {}, {}
        for arm in ("scratch", "pre-trained"):
            model = build("evim3-tiny", labelled)
            if arm == "pre-trained":
                load_encoder_weights(model, checkpoint)
            print(f"== fine-tune {arm}: {finetune_steps} steps on {len(labelled)} labelled videos", flush=True)
            t0 = time.perf_counter()
            # TEST is judged on the weights of the best validation, as `evim3 train` keeps best.safetensors: with
            # 30 videos, 600 steps are 160 epochs, and the last step is the most over-fitted one.
            curve = finetune(model, labelled, val, **RECIPE["evim3-tiny"], steps=finetune_steps, keep_best=True)
            selected = next(point for point in curve if point.get("selected"))
            report = test_report(model, labelled, test)
            errors[arm] = report.pop("abs_errors")
            rows.append({"arm": f"10% labels, {arm}", "labelled_videos": len(labelled), "steps": finetune_steps,
                         "train_min": (time.perf_counter() - t0) / 60, "selected_step": selected["step"],
                         "selected_val_mae": selected["val_mae"], "final_val_mae": curve[-1]["val_mae"],
                         "final_val_spread": curve[-1]["pred_std"], **report})
            models[arm] = model
        difference = paired_difference(errors["scratch"], errors["pre-trained"])

        probes, few_label_probes = [], []
        for label, init in (("random init", None), ("MAE pre-trained", checkpoint)):
            model = build("evim3-tiny", every_train)
            if init:
                load_encoder_weights(model, init)
            probes += probe_rows(model, label, every_train, test)
            # The data-efficiency question for a frozen encoder: a linear head fit on the 30 labelled videos only.
            few_label_probes += probe_rows(model, label, labelled, test)
        keep = os.environ.get("EVIM3_BENCH_FEWLABELS_KEEP")
        if keep:  # the pre-trained checkpoint outlives the run (a GPU lease ends with its machine)
            os.makedirs(keep, exist_ok=True)
            shutil.copy(checkpoint, keep)

    return {
        "rows": rows,
        "test_mae_difference_scratch_minus_pretrained": difference,
        "pre-training helped (95 % interval above 0)": difference["lo"] > 0,
        "pretraining": {"steps": pretrain_steps, "minutes": pretrain_min, "val_loss": summary["best"].get("val_loss"),
                        "recipe": recipe},
        "probes (ridge on frozen evim3-tiny features, all 300 TRAIN labels -> TEST)": probes,
        "probes (the same, fit on the 30 labelled videos only)": few_label_probes,
        "scale": scale, "dataset": str(data), "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
    }
