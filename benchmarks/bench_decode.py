"""Decode + preprocess throughput on one CPU core: what feeding the model costs per frame.

Inputs: (a) a 112x112 MJPEG AVI at 50 fps, 200 frames, EchoNet-like (written here with PyAV), and (b) pydicom's
real echo cine (30 frames of 240x320, YBR_FULL_422 JPEG baseline at 30 fps, cropped, resized and resampled to
50 fps). frames/s counts source frames, decoded and preprocessed, per second of one core. Target: >= 1,000
frames/s for (a), so decoding never limits real-time inference.

    python -m benchmarks.bench_decode        # print the table
    python -m benchmarks decode              # the suite: also records it in BENCHMARKS.md
"""

from __future__ import annotations

import os

# One core: no OpenMP pool (set before numpy loads), one FFmpeg decoder thread, and the process pinned to one
# CPU while measuring.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import av
import numpy as np
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.preprocess import video_to_input
from evim3.runtime.video import read_video
from pydicom import examples

SPEC = PreprocessSpec(size=112, fps=50.0, frames=32, period=2, mean=30.0, std=45.0)
AVI_FRAMES = 200
AVI_FPS = 50
AVI_SIZE = 112
TARGET_AVI_FPS = 1000.0
REPEATS = 7  # timed runs per input, after one warm-up; the median is reported


def write_echonet_like_avi(path: str) -> str:
    """A speckled sector filling the frame whose dark cavity beats: real work for the JPEG codec."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:AVI_SIZE, :AVI_SIZE] / AVI_SIZE
    sector = np.abs(xx - 0.5) <= 0.9 * yy + 0.05
    with av.open(path, "w") as container:
        stream = container.add_stream("mjpeg", rate=AVI_FPS)
        stream.width = stream.height = AVI_SIZE
        stream.pix_fmt = "yuvj420p"
        for index in range(AVI_FRAMES):
            beat = 1 + 0.2 * np.sin(2 * np.pi * 1.2 * index / AVI_FPS)
            cavity = ((xx - 0.5) / (0.12 * beat)) ** 2 + ((yy - 0.5) / (0.25 * beat)) ** 2 < 1
            tissue = rng.integers(60, 200, (AVI_SIZE, AVI_SIZE))
            image = np.where(sector & ~cavity, tissue, np.where(sector, 15, 0)).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="gray")))
        container.mux(stream.encode())
    return path


@contextmanager
def one_cpu() -> Iterator[None]:
    """Pin this process to one CPU (Linux); elsewhere, FFmpeg's single thread is the only limit."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def median_seconds(step: Callable[[], Any]) -> float:
    step()  # warm-up: file cache, codec tables
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(label: str, path: str) -> dict[str, Any]:
    video = read_video(path, decode_threads=1)
    decode_s = median_seconds(lambda: read_video(path, decode_threads=1))
    preprocess_s = median_seconds(lambda: video_to_input(video, SPEC))
    frames = len(video.frames)
    return {"input": label, "frames": frames, "decode ms": 1e3 * decode_s, "preprocess ms": 1e3 * preprocess_s,
            "frames/s": frames / (decode_s + preprocess_s)}


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder, one_cpu():
        avi = write_echonet_like_avi(os.path.join(folder, "echonet_like.avi"))
        rows = [measure(f"{AVI_SIZE}x{AVI_SIZE} MJPEG AVI, {AVI_FPS} fps", avi),
                measure("pydicom ybr_color cine, 240x320 JPEG, 30 fps", examples.get_path("ybr_color"))]
    avi_rate = rows[0]["frames/s"]
    return {"rows": rows, "avi_frames_per_s": avi_rate, "avi_target_frames_per_s": TARGET_AVI_FPS,
            "avi_meets_target": avi_rate >= TARGET_AVI_FPS, "cpu": "one core (pinned), 1 decoder thread"}


def print_table(result: dict[str, Any]) -> None:
    print(f"{'input':<48} {'frames':>6} {'decode ms':>10} {'prep ms':>8} {'frames/s':>9}")
    for row in result["rows"]:
        print(f"{row['input']:<48} {row['frames']:>6} {row['decode ms']:>10.1f} {row['preprocess ms']:>8.1f} "
              f"{row['frames/s']:>9.0f}")
    verdict = "meets" if result["avi_meets_target"] else "MISSES"
    print(f"AVI: {result['avi_frames_per_s']:.0f} frames/s, {verdict} the {TARGET_AVI_FPS:.0f} frames/s target")


if __name__ == "__main__":
    print_table(run())
