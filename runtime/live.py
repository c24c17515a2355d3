"""Live sources (RTSP/HTTP streams, V4L2 cameras): a reader thread decodes frames into a bounded queue.

Without ``realtime`` the reader waits when the queue is full, so every frame is analysed (a network
stream then buffers upstream). With ``realtime`` it drops the oldest queued frame instead, so the
analysis stays close to now when inference is slower than the stream; each frame carries its sequence
number, so the consumer sees where frames went missing and never builds a clip across a gap.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from evim3.runtime.errors import EchoInputError
from evim3.runtime.timing import Stage, Stopwatch
from evim3.runtime.video import gray_frame

if TYPE_CHECKING:
    from typing_extensions import Self

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


def is_live_source(source: str) -> bool:
    """Streams by URL scheme and V4L2 camera devices; everything else is a file or folder."""
    return source.lower().startswith(STREAM_SCHEMES) or source.startswith("/dev/video")


@dataclass(frozen=True)
class LiveFrame:
    index: int  # position in the stream; consecutive frames differ by one unless frames were dropped
    time: float  # seconds since the first frame
    image: np.ndarray  # uint8 (H, W) grayscale


_END = object()


class LiveReader:
    """Open a live source (or anything PyAV can open) and decode it on a thread into a bounded queue."""

    def __init__(self, source: str, queue_seconds: float = 5.0, realtime: bool = False,
                 open_timeout: float = 10.0):
        self.source = source
        self.realtime = realtime
        self.dropped = 0
        self.decode = Stage("frame")  # decoding time per frame, measured on the reader thread
        self._stop = threading.Event()
        self._error: BaseException | None = None
        options = {"rtsp_transport": "tcp"} if source.lower().startswith("rtsp") else {}
        try:
            self._container = av.open(source, format="v4l2" if source.startswith("/dev/video") else None,
                                      options=options, timeout=(open_timeout, open_timeout))
            self._stream = self._container.streams.video[0]
        except (av.FFmpegError, OSError, IndexError) as e:
            raise EchoInputError(source, f"cannot open live source ({_reason(e)})") from None
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        if not rate:
            self._container.close()
            raise EchoInputError(source, "stream does not report its frame rate")
        self.fps = float(rate)
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, math.ceil(queue_seconds * self.fps)))
        self._thread = threading.Thread(target=self._read, name=f"evim3-reader {source}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self) -> None:
        first_time = None
        # One reformatter for the stream: frame.to_ndarray(format=...) builds one per frame (slow).
        reformatter = VideoReformatter()
        try:
            decoded = self._container.decode(self._stream)
            for index in range(2**62):
                watch = Stopwatch()
                with watch:
                    frame = next(decoded, None)
                if frame is None or self._stop.is_set():
                    break
                with watch:
                    image = gray_frame(reformatter, frame)
                self.decode.seconds.append(watch.seconds)
                stamp = frame.time if frame.time is not None else index / self.fps
                first_time = stamp if first_time is None else first_time
                self._put(LiveFrame(index, stamp - first_time, image))
        except (av.FFmpegError, OSError) as e:  # a stream that breaks off mid-way
            self._error = EchoInputError(self.source, f"stream failed after {len(self.decode.seconds)} frames "
                                                      f"({_reason(e)})")
        finally:
            self._container.close()
            self._put(_END, droppable=False)

    def _put(self, item: object, droppable: bool = True) -> None:
        while not self._stop.is_set():
            if self.realtime and droppable:
                try:
                    self._queue.put_nowait(item)
                    return
                except queue.Full:
                    self._drop_oldest()
            else:
                try:
                    self._queue.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

    def _drop_oldest(self) -> None:
        try:
            if self._queue.get_nowait() is not _END:
                self.dropped += 1
        except queue.Empty:  # the consumer took it meanwhile
            pass

    def frames(self) -> Iterator[LiveFrame]:
        """Frames in stream order until the end of the stream or stop(); raises the reader's error, if any."""
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() or not self._thread.is_alive() and self._queue.empty():
                    break
                continue
            if item is _END:
                break
            yield item
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Ask the reader to finish and wait for it (it closes the container itself)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
