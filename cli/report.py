"""What `evim3 infer` and `evim3 bench` show and write: a terminal table, the timing summary, JSON and CSV
(one row per video, per-clip values and, for a seg model, every beat and every frame's LV area included;
written atomically) and the --plot PNG (matplotlib, optional). Presentation is the CLI's: the runtime gives
results (evim3.runtime.api), this turns them into tables and files; the columns, live line and curve of a
clip model's values are its task's (TaskSpec in evim3.runtime.tasks).
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np
from evim3.runtime.atomic import atomic_path, write_atomic
from evim3.runtime.infer import STRIP_FRAMES, ClipResult, SourceResult
from evim3.runtime.seg import LVReport
from evim3.runtime.tasks import fmt, task_spec
from evim3.runtime.timing import Timings
from rich.table import Table

PLOT_MAX_SOURCES = 12  # a figure with more rows is unreadable


def _short(source: str, width: int = 30) -> str:
    """The end of a long path: the file name and its nearest folders are what tell videos apart."""
    return source if len(source) <= width else "…" + source[-(width - 1):]


def results_table(results: list[SourceResult], class_names: list[str], clip_task: str | None,
                  seg_model: bool = False) -> Table:
    """One row per source: the clip model's values, as its task shows them (EF: mean, min-max over clips;
    classification: class probabilities), and the beat-to-beat EF of a seg model (mean +- SD over beats),
    side by side; 'failed' for a source that could not be used (its reason is printed on its own line by
    `evim3 infer`); the clip count marked 'short' for a video shorter than the model's clip (the clip loops
    it). `clip_task`: the clip model's task (None: a seg model alone); `class_names`: its value names."""
    table = Table(title="evim3 infer", title_justify="left")
    table.add_column("source", no_wrap=True)
    table.add_column("seconds", justify="right", min_width=7)
    table.add_column("clips", justify="right", min_width=5)
    value_names = task_spec(clip_task).table_columns(class_names) if clip_task else []
    clip_columns = len(value_names)
    value_names += ["EF % (beats)", "beats"] if seg_model else []
    for name in value_names:
        table.add_column(name, justify="left" if name == "prediction" else "right", min_width=len(name))
    for r in results:
        if not r.ok:
            values = ["[red]failed[/red]"] + [""] * (len(value_names) - 1)
        else:
            values = (_clip_cells(r, class_names, clip_columns) if clip_task else []) + (
                _lv_cells(r) if seg_model else [])
        clips = f"[yellow]{len(r.clips)} short[/yellow]" if r.real_share < 1 else str(len(r.clips))
        table.add_row(_short(r.source), fmt(r.duration_s) if r.ok else "-", clips, *values)
    if any(r.real_share < 1 for r in results):
        table.caption = ("short: the video is shorter than the model's clip, which repeats its frames "
                         "(share of real frames: real_frame_share in --json/--csv)")
    return table


def _clip_cells(r: SourceResult, class_names: list[str], columns: int) -> list[str]:
    mean = r.mean_values()
    if mean is None:
        return ["-"] * columns
    return task_spec(r.task).table_cells(mean, [c.values for c in r.clips], class_names)


def _lv_cells(r: SourceResult) -> list[str]:
    """Mean EF +- beat-to-beat SD over the beats a seg model found, and how many."""
    if r.lv is None or not r.lv.beats:
        return ["-", "0"]
    spread = f" ± {r.lv.ef_sd:.1f}" if r.lv.ef_sd is not None else ""
    return [f"{r.lv.ef_mean:.1f}{spread}", str(len(r.lv.beats))]


def beats_tables(results: list[SourceResult]) -> list[Table]:
    """Per source with beats, every beat a seg model found: ED and ES (time, and frame # of the video at the
    model's fps), the LV area at both (cm^2 where the file states its pixel spacing, else pixels of the
    model's frame), EF."""
    tables = []
    for r in results:
        if not (r.lv and r.lv.beats):
            continue
        table = Table(title=f"beats of {_short(r.source, 50)} (frame # at {r.lv.fps:g} fps)", title_justify="left")
        for name in ("beat", "ED", "ES", "LV area ED → ES", "EF %"):
            table.add_column(name, justify="right", no_wrap=True)
        for k, b in enumerate(r.lv.beats, 1):
            if b.ed_area_cm2 is not None:
                area = f"{b.ed_area_cm2:.2f} → {b.es_area_cm2:.2f} cm²"
            else:
                area = f"{b.ed_area_px:.0f} → {b.es_area_px:.0f} px"
            table.add_row(str(k), f"{b.ed_s:.2f} s #{b.ed_frame}", f"{b.es_s:.2f} s #{b.es_frame}", area, fmt(b.ef))
        tables.append(table)
    return tables


def source_notes(results: list[SourceResult]) -> list[str]:
    """What happened to sources beyond their numbers: a clip that loops a short video, frames dropped by
    --realtime, Ctrl-C."""
    lines = []
    for r in results:
        looped = f"warning: shorter than the model's clip, which loops it ({100 * r.real_share:.0f} % real frames)"
        notes = [looped] if r.real_share < 1 else []
        notes += [f"dropped {r.dropped_frames} frames to keep up (--realtime)"] if r.dropped_frames else []
        notes += ["stopped by Ctrl-C"] if r.interrupted else []
        notes += ["no complete clip"] if r.ok and not r.clips else []
        notes += _lv_notes(r) if r.ok and r.lv else []
        if notes:
            lines.append(f"{r.source}: {', '.join(notes)}")
    return lines


def _lv_notes(r: SourceResult) -> list[str]:
    lv = r.lv
    notes = [lv.no_beat_reason] if lv.no_beat_reason else []
    notes += lv.notes
    notes += ["LV areas in pixels of the model's frame: the file states no pixel spacing"] if not lv.spacing_cm else []
    return notes


def timing_lines(timings: Timings, device: str) -> list[str]:
    """The summary every run prints: per-stage p50/p95 and the real-time factor."""
    lines = [f"timing ({device}):"]
    for key, stage in timings.stages.items():
        pct = stage.to_dict()
        lines.append(f"  {key:<24} p50 {fmt(pct['p50_ms'])} ms  p95 {fmt(pct['p95_ms'])} ms  "
                     f"total {stage.total_s:.2f} s ({len(stage.seconds)}x)")
    lines.append(f"  {timings.video_s:.1f} s of video in {timings.wall_s:.2f} s: real-time factor "
                 f"{fmt(timings.realtime_factor, 2)}x, decode+preprocess {fmt(100 * timings.input_share)} % "
                 f"of wall time, {timings.clips} clips")
    if any(key.startswith("decode") for key in timings.stages):
        lines.append("  (decoding and preprocessing run on a reader thread, alongside inference)")
    return lines


def clip_line(source: str, clip: ClipResult, task: str, class_names: list[str]) -> str:
    """One live update: the clip's time span and its result, as its task shows it (EF, the likeliest class)."""
    span = f"{clip.start_s:8.2f}-{clip.end_s:.2f} s"
    return f"{source}  {span}  {task_spec(task).clip_text(clip.values, class_names)}"


def run_document(results: list[SourceResult], timings: Timings, info: dict[str, Any],
                 class_names: list[str]) -> dict[str, Any]:
    """The JSON document: run info (model, device, stride...), every source with its clips, timings."""
    return {**info, "sources": [r.to_dict(class_names) for r in results],
            "failed": sum(not r.ok for r in results), "timings": timings.to_dict()}


def write_json(path: str, document: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(_json_safe(document), indent=2, allow_nan=False) + "\n")


def _json_safe(value: Any) -> Any:
    """NaN (a stage with no samples, a run with no video) becomes null: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --csv columns of a seg model's results (LVReport): per video, then per beat and per frame as ';' lists
LV_COLUMNS = ("lv_ef_mean", "lv_ef_sd", "lv_num_beats", "lv_no_beat_reason", "lv_pixel_spacing_cm",
              "beat_ed_frame", "beat_es_frame", "beat_ed_s", "beat_es_s", "beat_ed_area_px", "beat_es_area_px",
              "beat_ed_area_cm2", "beat_es_area_cm2", "beat_edv_ml", "beat_esv_ml", "beat_ef",
              "frame_lv_area_px")


def write_csv(path: str, results: list[SourceResult], class_names: list[str], clip_task: str | None,
              seg_model: bool = False) -> None:
    """One row per source; per-clip start times and values (the columns of the clip model's task, None: a
    seg model alone) as ';'-separated lists in their own columns, and with a seg model its LV_COLUMNS (every
    beat, every frame's LV area)."""
    value_columns, clip_column = task_spec(clip_task).csv_columns(class_names) if clip_task else ([], None)
    header = ["source", "status", "error", "duration_s", "num_clips", "real_frame_share", *value_columns,
              "clip_start_s", *([clip_column] if clip_task else []), "clip_real_frame_share",
              *(LV_COLUMNS if seg_model else [])]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in results:
        values, per_clip = _clip_csv(r, class_names, len(value_columns)) if clip_task else ([], [])
        writer.writerow([r.source, "ok" if r.ok else "failed", r.error or "", f"{r.duration_s:.3f}", len(r.clips),
                         f"{r.real_share:.3f}", *values, ";".join(f"{c.start_s:.3f}" for c in r.clips), *per_clip,
                         ";".join(f"{c.real_share:.3f}" for c in r.clips), *(_lv_row(r) if seg_model else [])])
    write_atomic(path, buffer.getvalue())


def _clip_csv(r: SourceResult, class_names: list[str], columns: int) -> tuple[list[str], list[str]]:
    """The clip model's cells of one source: its per-video values, and its per-clip values as one list."""
    mean = r.mean_values()
    if mean is None:
        return [""] * columns, [""]
    values, per_clip = task_spec(r.task).csv_cells(mean, [c.values for c in r.clips], class_names)
    return values, [per_clip]


def _lv_row(r: SourceResult) -> list[str]:
    """The LV_COLUMNS of one source: empty cells where there is no value (no beat, no spacing, frames no clip
    covered)."""
    if r.lv is None:
        return [""] * len(LV_COLUMNS)
    lv = r.lv

    def cell(value: float | None, digits: int = 4) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    def per_beat(name: str, digits: int = 4) -> str:
        return ";".join(cell(getattr(b, name), digits) for b in lv.beats)

    spacing = "" if lv.spacing_cm is None else f"{lv.spacing_cm[0]:.6f};{lv.spacing_cm[1]:.6f}"
    return [cell(lv.ef_mean), cell(lv.ef_sd), str(len(lv.beats)), lv.no_beat_reason or "", spacing,
            ";".join(str(b.ed_frame) for b in lv.beats), ";".join(str(b.es_frame) for b in lv.beats),
            per_beat("ed_s", 3), per_beat("es_s", 3), per_beat("ed_area_px", 1), per_beat("es_area_px", 1),
            per_beat("ed_area_cm2"), per_beat("es_area_cm2"), per_beat("edv_ml"), per_beat("esv_ml"),
            per_beat("ef"), ";".join(cell(a, 1) for a in lv.area_px)]


def check_plot_available() -> None:
    """Raise ModuleNotFoundError (one line in the CLI) before any work when --plot cannot be honoured."""
    import matplotlib  # noqa: F401


def write_plot(path: str, results: list[SourceResult], class_names: list[str]) -> int:
    """EF (or class probabilities) per clip over time and a seg model's LV area curve with its ED and ES
    marked (on a second axis when both ran), above a strip of the source's frames; one row per source with
    clips, up to PLOT_MAX_SOURCES. Returns how many sources were drawn."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    shown = [r for r in results if r.clips][:PLOT_MAX_SOURCES]
    fig = Figure(figsize=(10, 3.2 * max(1, len(shown))), layout="constrained")
    rows = fig.subfigures(max(1, len(shown)), 1, squeeze=False)[:, 0]
    for sub, r in zip(rows, shown):
        curve, strip = sub.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        times = [(c.start_s + c.end_s) / 2 for c in r.clips]
        if not r.clips[0].values:
            _draw_lv_curve(curve, r.lv)
        else:
            task_spec(r.task).draw_clips(curve, times, [c.values for c in r.clips], r.mean_values(), class_names)
        if r.lv is not None and r.clips[0].values:
            _draw_lv_curve(curve.twinx(), r.lv, legend="lower right")
        curve.set_title(r.source, fontsize="small", loc="left")
        _draw_strip(strip, r, end=max(r.clips[-1].end_s, r.duration_s))
        strip.set_xlabel("time (s)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return len(shown)


def _draw_lv_curve(ax: Any, lv: LVReport, legend: str = "upper right") -> None:
    """LV area over time (frames no clip covered left out), ED and ES of every beat marked."""
    frames = [i for i, a in enumerate(lv.area_px) if a is not None]
    pixel = lv.spacing_cm[0] * lv.spacing_cm[1] if lv.spacing_cm else 1.0
    ax.plot([i / lv.fps for i in frames], [lv.area_px[i] * pixel for i in frames], color="gray", label="LV area")
    # The overlay's colours (red ED, blue ES), as triangles: EF per clip draws blue circles on the same axes.
    for marks, colour, shape, name in (("ed", "tab:red", "v", "ED"), ("es", "tab:blue", "^", "ES")):
        ax.scatter([getattr(b, f"{marks}_s") for b in lv.beats], [getattr(b, f"{marks}_area_px") * pixel
                                                                  for b in lv.beats],
                   color=colour, marker=shape, label=name, zorder=3)
    ax.set_ylabel("LV area (cm²)" if lv.spacing_cm else "LV area (px)")
    ef = f"EF {lv.ef_mean:.1f} %" if lv.beats else "no beat"
    ax.legend(loc=legend, fontsize="small", title=ef, title_fontsize="small")


def _draw_strip(ax: Any, result: SourceResult, end: float) -> None:
    """The kept frames side by side, spread over the time axis."""
    ax.set_yticks([])
    if not result.strip:
        return
    picks = np.linspace(0, len(result.strip) - 1, min(STRIP_FRAMES, len(result.strip))).round().astype(int)
    frames = [result.strip[i][1] for i in picks]
    ax.imshow(np.concatenate(frames, axis=1), cmap="gray", aspect="auto", extent=(0, end, 0, 1))


def bench_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"evim3 bench: {result['model']} ({result['device']})", title_justify="left")
    for name in ("batch", "p50 ms", "p90 ms", "p99 ms", "clips/s", "real-time factor"):
        table.add_column(name, justify="right")
    lat = result["latency_ms"]
    table.add_row(str(result["batch"]), fmt(lat["p50"], 2), fmt(lat["p90"], 2), fmt(lat["p99"], 2),
                  fmt(result["clips_per_s"], 2), fmt(result["realtime_factor"], 2))
    table.caption = (f"clip {'x'.join(map(str, result['clip']))} at {result['fps']:g} fps, period "
                     f"{result['period']}, stride {result['stride']} frames; {result['runs']} runs after "
                     f"{result['warmup']} warm-up")
    return table
