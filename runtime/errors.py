"""User-facing errors. Each carries a one-line message naming the file and the problem; the CLI prints
that line (no traceback) and exits non-zero. Pure Python: shared by every layer."""

from __future__ import annotations

import os


class Evim3Error(Exception):
    """Base of every error the CLI reports as one line."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


# --- input videos (evim3.runtime.video) ---
class EchoInputError(Evim3Error):
    """A source video/DICOM that cannot be used."""


class SourceNotFoundError(EchoInputError):
    pass


class EmptyFileError(EchoInputError):
    pass


class NotAVideoError(EchoInputError):
    pass


class TruncatedVideoError(EchoInputError):
    pass


class NoFramesError(EchoInputError):
    pass


class NoPixelDataError(EchoInputError):
    pass


class SingleFrameError(EchoInputError):
    pass


class UnsupportedCodecError(EchoInputError):
    pass


class AbsurdSizeError(EchoInputError):
    pass


class TooShortError(EchoInputError):
    """A video too short for the model's clip to measure anything (see evim3.runtime.infer.MIN_VIDEO_SECONDS)."""


# --- model files, checkpoints, datasets ---
class ModelFileError(Evim3Error):
    """An ONNX/engine file that is missing, corrupt, or does not match its metadata / this machine."""


class CheckpointError(Evim3Error):
    """An evim3 checkpoint that is missing, corrupt, or of another preset than asked."""


class DatasetError(Evim3Error):
    """A dataset folder that does not have the expected layout or files."""


class BackendUnavailableError(Evim3Error):
    """A backend (TensorRT, CUDA, onnxruntime) that is not installed or has no device; says what is missing."""
