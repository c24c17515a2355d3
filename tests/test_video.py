"""Readers: real decoding of AVI/MP4 and DICOM, and one specific one-line error per kind of bad input."""

from __future__ import annotations

import av
import numpy as np
import pydicom
import pytest
from pydicom import examples
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from evim3.runtime import errors
from evim3.runtime.video import iter_video_files, read_video


def write_video(path, frames: np.ndarray, fps: int = 50, codec: str = "mjpeg", fmt: str | None = None) -> None:
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def moving_frames(T: int = 40, H: int = 112, W: int = 112) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    frames = []
    for t in range(T):
        r = 20 + 10 * np.sin(2 * np.pi * t / 25)
        frames.append(np.where((yy - H / 2) ** 2 + (xx - W / 2) ** 2 < r**2, 200, 40).astype(np.uint8))
    return np.stack(frames)


def write_dicom(path, frames: np.ndarray | None, frame_time_ms: float | None = 20.0) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    if frames is not None:
        ds.Rows, ds.Columns = frames.shape[1:]
        ds.NumberOfFrames = frames.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = frames.tobytes()
    if frame_time_ms is not None:
        ds.FrameTime = frame_time_ms
    ds.save_as(str(path), enforce_file_format=True)


@pytest.mark.parametrize("ext,codec,fmt", [(".avi", "mjpeg", None), (".mp4", "libx264", None), (".mkv", "mjpeg", None)])
def test_container_round_trip(tmp_path, ext, codec, fmt):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this FFmpeg build")
    frames = moving_frames()
    path = tmp_path / f"clip{ext}"
    write_video(path, frames, codec=codec, fmt=fmt)
    video = read_video(path)
    assert video.frames.shape == frames.shape and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(50, abs=0.01)
    assert np.abs(video.frames.astype(int) - frames).mean() < 6  # lossy codecs: close, not equal
    assert video.meta["original_size"] == (112, 112) and video.meta["num_frames"] == len(frames)


def test_real_echo_dicom_cine():
    """pydicom's real apical echo cine (YBR_FULL_422 JPEG baseline, 30 frames)."""
    video = read_video(examples.get_path("ybr_color"))
    assert video.frames.shape == (30, 240, 320) and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(1000 / 33.333, rel=1e-3)  # FrameTime 33.333 ms
    assert video.meta["photometric"] == "YBR_FULL_422"
    # The file's ultrasound region describes the unscaled 640x480 acquisition: it is not used.
    assert video.meta["region"] is None
    assert 5 < video.frames.mean() < 100 and video.frames.max() > 150  # dark blood pool, bright walls and text


def test_dicom_region_and_fps(tmp_path):
    frames = moving_frames(T=12, H=64, W=80)
    path = tmp_path / "cine"  # no extension: found by the DICM magic
    write_dicom(path, frames, frame_time_ms=25.0)
    ds = pydicom.dcmread(path)
    region = pydicom.Dataset()
    region.RegionSpatialFormat = 1
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 5, 4
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 70, 60
    ds.SequenceOfUltrasoundRegions = [region]
    ds.save_as(path)
    video = read_video(path)
    assert video.fps == pytest.approx(40.0)
    assert video.meta["region"] == (4, 61, 5, 71)
    np.testing.assert_array_equal(video.frames, frames)


def test_missing(tmp_path):
    with pytest.raises(errors.SourceNotFoundError, match="file not found"):
        read_video(tmp_path / "nope.avi")


def test_empty(tmp_path):
    (tmp_path / "e.avi").write_bytes(b"")
    with pytest.raises(errors.EmptyFileError, match=r"e\.avi: file is empty"):
        read_video(tmp_path / "e.avi")


def test_not_a_video(tmp_path):
    path = tmp_path / "notes.avi"
    path.write_text("these are not frames\n" * 50)
    with pytest.raises(errors.NotAVideoError) as e:
        read_video(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated(tmp_path):
    path = tmp_path / "cut.avi"
    write_video(path, moving_frames(T=100))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises((errors.TruncatedVideoError, errors.NoFramesError)) as e:
        read_video(path)
    assert str(path) in str(e.value)


def test_zero_decodable_frames(tmp_path):
    path = tmp_path / "header_only.avi"
    write_video(path, moving_frames(T=30))
    data = bytearray(path.read_bytes())
    start = data.find(b"movi") + 4
    data[start:] = bytes(len(data) - start)  # keep the header, zero every frame
    path.write_bytes(bytes(data))
    with pytest.raises((errors.NoFramesError, errors.TruncatedVideoError, errors.NotAVideoError)):
        read_video(path)


def test_dicom_without_pixel_data(tmp_path):
    write_dicom(tmp_path / "sr.dcm", None)
    with pytest.raises(errors.NoPixelDataError, match="no pixel data"):
        read_video(tmp_path / "sr.dcm")


def test_single_frame_dicom(tmp_path):
    write_dicom(tmp_path / "still.dcm", moving_frames(T=1, H=64, W=64))
    with pytest.raises(errors.SingleFrameError, match="single-frame"):
        read_video(tmp_path / "still.dcm")


def test_unsupported_transfer_syntax(tmp_path):
    path = tmp_path / "jp2.dcm"
    write_dicom(path, moving_frames(T=3, H=64, W=64))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pydicom decoder
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64] * 3)
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    with pytest.raises(errors.UnsupportedCodecError, match="transfer syntax"):
        read_video(path)


def test_absurd_size(tmp_path):
    path = tmp_path / "tiny.avi"
    write_video(path, np.zeros((20, 8, 8), np.uint8) + np.arange(20, dtype=np.uint8)[:, None, None])
    with pytest.raises(errors.AbsurdSizeError, match="frame size"):
        read_video(path)


def test_iter_video_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_video(tmp_path / "a" / "x.avi", moving_frames(T=5))
    write_dicom(tmp_path / "a" / "b" / "noext", moving_frames(T=3, H=32, W=32))
    (tmp_path / "a" / "readme.txt").write_text("x")
    found = iter_video_files([tmp_path])
    assert [p.split("/")[-1] for p in found] == ["x.avi", "noext"]
