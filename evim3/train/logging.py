"""What a run shows and records: a progress bar (loss, lr, it/s, ETA), ``steps.csv`` (every log_every
optimizer steps) and ``epochs.csv`` (validation per epoch), TensorBoard scalars when `tensorboard` is
installed, and a one-screen summary at the end. Only the main process logs."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from typing import Any

from evim3.runtime.atomic import write_atomic

STEPS_CSV = "steps.csv"
EPOCHS_CSV = "epochs.csv"


class RunLogger:
    """Progress, CSV rows and TensorBoard scalars of one run. `enabled` False (ranks > 0) makes every
    method a no-op. A resumed run first drops the rows of steps past `start_step` (the lost interval)."""

    def __init__(self, out_dir: str, *, enabled: bool, total_steps: int, start_step: int, log_every: int):
        self.enabled = enabled
        self.out_dir = out_dir
        self.log_every = log_every
        self.started = time.perf_counter()
        self.start_step = start_step
        self.bar = None
        self.tensorboard = None
        if not enabled:
            return
        for name in (STEPS_CSV, EPOCHS_CSV):
            _drop_rows_after(os.path.join(out_dir, name), start_step)
        from tqdm.auto import tqdm

        # On a terminal, a live bar; in a log file, one line per epoch instead (see `epoch`).
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), smoothing=0.1)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            pass
        else:
            self.tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1)

    def step(self, step: int, epoch: int, loss: float, lr: float, grad_norm: float, samples: int) -> None:
        """After optimizer step `step`; `samples` clips went into it (all ranks)."""
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}", epoch=epoch, refresh=False)
        if step % self.log_every:
            return
        elapsed = time.perf_counter() - self.started
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "clips_per_s": samples * (step - self.start_step) / max(elapsed, 1e-9), "elapsed_s": elapsed}
        _append_row(os.path.join(self.out_dir, STEPS_CSV), row)
        if self.tensorboard:
            for name in ("loss", "lr", "grad_norm"):
                self.tensorboard.add_scalar(f"train/{name}", row[name], step)

    def epoch(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        _append_row(os.path.join(self.out_dir, EPOCHS_CSV), {"epoch": epoch, "step": step, **metrics})
        if self.tensorboard:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name.replace("_", "/", 1), value, step)
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        line = f"epoch {epoch}  step {step}  {shown}  ({time.perf_counter() - self.started:.0f} s)"
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is None or self.bar.disable:
            print(text, flush=True)  # a log file or pipe sees each message as it happens
        else:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _append_row(path: str, row: dict[str, Any]) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(v) for k, v in row.items()})


def _drop_rows_after(path: str, step: int) -> None:
    """Keep the rows up to optimizer step `step` (and none that a kill left cut short)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        os.remove(path)
        return
    header, column = rows[0], rows[0].index("step")
    kept = [r for r in rows[1:] if len(r) == len(header) and r[column].isdigit() and int(r[column]) <= step]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *kept])
    write_atomic(path, buffer.getvalue())


def summary_text(summary: dict[str, Any]) -> str:
    """The end-of-run summary: one screen of aligned `name: value` lines."""
    lines = ["", "=" * 60, f" evim3 {summary['stage']} finished: {summary['out']}", "=" * 60]
    for key, value in summary.items():
        if key in ("stage", "out") or isinstance(value, (dict, list)):
            continue
        if isinstance(value, float) and math.isfinite(value):
            value = f"{value:.4g}"
        lines.append(f" {key:<22} {value}")
    for key in ("best", "final"):
        if summary.get(key):
            lines.append(f" {key + ' (validation)':<22} " + "  ".join(f"{k} {_fmt(v)}" for k, v in summary[key].items()))
    lines.append(" files                  " + ", ".join(summary.get("files", [])))
    lines.append("=" * 60)
    return "\n".join(lines)
