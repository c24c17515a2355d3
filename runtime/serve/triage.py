"""Whether a received instance is a cine the model can read; when not, the reason it is skipped.

Analysed: an ultrasound image with at least two frames, a frame time (FrameTime, CineRate or
RecommendedDisplayFrameRate: without one the pipeline would assume 30 fps and measure time wrongly),
at least the shortest duration the models analyse, and a usable 2D ultrasound region or a pixel spacing
(the scanner's geometry: without either the picture may be a screenshot or a resized export).

The model cannot tell an echo from other ultrasound (an abdominal cine passes triage): the SR is marked
UNVERIFIED for that reason too, and the docs say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom
from evim3.runtime.errors import EchoInputError, SingleFrameError
from evim3.runtime.video import open_video

RETIRED_ULTRASOUND_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.3", "1.2.840.10008.5.1.4.1.1.6")
ULTRASOUND_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    RETIRED_ULTRASOUND_SOP_CLASSES[0]: "Ultrasound Multi-frame Image Storage (Retired)",
    RETIRED_ULTRASOUND_SOP_CLASSES[1]: "Ultrasound Image Storage (Retired)",
}
TIMING_KEYWORDS = ("FrameTime", "CineRate", "RecommendedDisplayFrameRate")
# Item, item delimitation and sequence delimitation tags: they belong inside sequences; some vendors' files
# carry one at the top level, which pydicom reads as an element of unknown VR.
DELIMITER_TAGS = (0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD)


def drop_stray_delimiters(ds: pydicom.Dataset) -> pydicom.Dataset:
    for tag in DELIMITER_TAGS:
        if tag in ds:
            del ds[tag]
    return ds


def read_header(path: str) -> pydicom.Dataset:
    """The dataset without its pixel data, stray delimiters dropped."""
    return drop_stray_delimiters(pydicom.dcmread(path, stop_before_pixels=True, force=True))


@dataclass
class Verdict:
    analyse: bool
    reason: str | None = None  # why not, for the queue and the audit log
    failed: bool = False  # unreadable (the job fails) rather than not applicable (skipped)


def triage(path: str, min_seconds: float) -> Verdict:
    try:
        header = read_header(path)
    except Exception as e:  # noqa: BLE001 -- any parse error is the job's reason
        return Verdict(False, f"unreadable dataset: {e}", failed=True)
    sop_class = str(header.get("SOPClassUID", ""))
    if sop_class not in ULTRASOUND_SOP_CLASSES:
        return Verdict(False, f"not an ultrasound image (SOP class {sop_class or 'missing'})")
    frames = int(header.get("NumberOfFrames") or 1)
    if frames < 2:
        return Verdict(False, "single frame: a still image, not a cine")
    if not any(float(header.get(k) or 0) > 0 for k in TIMING_KEYWORDS):
        return Verdict(False, "no frame time (FrameTime, CineRate or RecommendedDisplayFrameRate)")
    try:
        with open_video(path) as reader:
            fps, meta = reader.fps, reader.meta
    except SingleFrameError as e:
        return Verdict(False, _reason(e))
    except EchoInputError as e:
        return Verdict(False, _reason(e), failed=True)
    seconds = frames / fps
    if seconds < min_seconds:
        return Verdict(False, f"too short: {frames} frames at {fps:.3g} fps = {seconds:.2f} s, the model needs "
                              f"at least {min_seconds:.2f} s")
    if meta.get("region") is None and meta.get("spacing_cm") is None:
        return Verdict(False, "no usable 2D ultrasound region (SequenceOfUltrasoundRegions) and no PixelSpacing")
    return Verdict(True)


def _reason(error: EchoInputError) -> str:
    """The error's message without the file name (a spool path says nothing to the reader)."""
    return error.problem
