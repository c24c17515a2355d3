"""Decode + preprocess throughput on one core: a 112x112 MJPEG AVI at 50 fps and the real DICOM echo cine.

Target: >= 1,000 frames/s for the AVI (decoding must never be what limits real time).
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import av  # noqa: E402
import numpy as np  # noqa: E402
from pydicom import examples  # noqa: E402

from evim3.runtime.meta import PreprocessSpec  # noqa: E402
from evim3.runtime.preprocess import preprocess  # noqa: E402
from evim3.runtime.video import read_video  # noqa: E402

SPEC = PreprocessSpec(size=112, fps=50.0, frames=32, period=2, mean=30.0, std=40.0)


def _write_avi(path: str, frames: int = 200) -> None:
    rng = np.random.default_rng(0)
    with av.open(path, "w") as container:
        stream = container.add_stream("mjpeg", rate=50)
        stream.width = stream.height = 112
        stream.pix_fmt = "yuvj420p"
        for t in range(frames):
            img = (rng.random((112, 112)) * 60 + 40 * np.sin(t / 8)).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _frames_per_second(path: str, repeats: int = 5) -> tuple[float, int]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        video = read_video(path)
        preprocess(video, SPEC)
        times.append(time.perf_counter() - t0)
    return len(video.frames) / float(np.median(times)), len(video.frames)


def run() -> dict:
    # One core: pin the process (FFmpeg's decoder threads included) to a single CPU.
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    rows = []
    try:
        rows = _measure()
    finally:
        os.sched_setaffinity(0, cpus)
    return {"rows": rows, "pinned": "one CPU (sched_setaffinity)"}


def _measure() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        avi = os.path.join(tmp, "echo112.avi")
        _write_avi(avi)
        for name, path in (("112x112 MJPEG AVI, 50 fps", avi), ("DICOM ybr_color cine 320x240 JPEG", examples.get_path("ybr_color"))):
            fps, n = _frames_per_second(path)
            rows.append({"input": name, "frames": n, "decode+preprocess frames/s": round(fps, 1),
                         "target": ">= 1000" if "AVI" in name else "-"})
    return rows


if __name__ == "__main__":
    for row in run()["rows"]:
        print(row)
