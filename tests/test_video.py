"""Readers: real decoding of video containers and DICOM cines, and one specific one-line error per bad input.

Every fixture file is written here, into tmp_path, with PyAV or pydicom; the one real echo is pydicom's
bundled apical cine (YBR_FULL_422 JPEG baseline).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import av
import numpy as np
import pytest
from evim3.runtime import errors
from evim3.runtime.video import DEFAULT_FPS, GRAY_WEIGHTS, iter_video_files, read_video
from pydicom import dcmwrite, examples
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import MPEG4HP41, ExplicitVRLittleEndian, generate_uid

ULTRASOUND_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # a structured report: no pixel data, by design


def moving_frames(num_frames: int = 30, height: int = 48, width: int = 64) -> np.ndarray:
    """A bright disc that grows and shrinks on a mid-gray field: every frame differs."""
    yy, xx = np.mgrid[:height, :width]
    radius = 8 + 6 * np.sin(2 * np.pi * np.arange(num_frames) / 15)
    inside = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < radius[:, None, None] ** 2
    return np.where(inside, 220, 60).astype(np.uint8)


def write_video(path: Path, frames: np.ndarray, fps: int = 50, codec: str = "mjpeg") -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())
    return path


def write_dicom(path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2", bits_stored: int = 8,
                transfer_syntax: str = ExplicitVRLittleEndian, bare: bool = False, **elements) -> Path:
    """An ultrasound multi-frame DICOM file; `pixels` (T, H, W) or (T, H, W, 3), uint8 or uint16.

    bare: the dataset alone, as old systems write it: no preamble, no 'DICM', no file meta.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ULTRASOUND_MULTIFRAME
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "US"
    if pixels is not None:
        ds.NumberOfFrames = len(pixels)
        ds.Rows, ds.Columns = pixels.shape[1:3]
        ds.SamplesPerPixel = 3 if pixels.ndim == 4 else 1
        if pixels.ndim == 4:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
        ds.PixelData = pixels.tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if bare:
        del ds.file_meta
        dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    else:
        ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def ultrasound_region_item(spatial_format: int, y0: int, y1: int, x0: int, x1: int) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat = spatial_format
    item.RegionLocationMinY0, item.RegionLocationMaxY1 = y0, y1
    item.RegionLocationMinX0, item.RegionLocationMaxX1 = x0, x1
    return item


# --- video containers ---

@pytest.mark.parametrize("name,codec", [("clip.avi", "mjpeg"), ("clip.mp4", "libx264"), ("clip.mkv", "mpeg4"),
                                        ("clip.mov", "mjpeg")])
def test_containers_decode_to_gray_frames(tmp_path: Path, name: str, codec: str) -> None:
    frames = moving_frames()
    video = read_video(write_video(tmp_path / name, frames, codec=codec))
    assert video.frames.shape == frames.shape and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(50)
    assert np.abs(video.frames.astype(int) - frames).mean() < 4  # lossy, but the same picture
    assert video.meta["original_size"] == (48, 64) and video.meta["num_frames"] == 30
    assert video.meta["region"] is None and video.source == str(tmp_path / name)


def test_one_decoder_thread_gives_the_same_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", moving_frames(), codec="libx264")
    np.testing.assert_array_equal(read_video(path, decode_threads=1).frames, read_video(path).frames)


def test_cut_stream_without_a_declared_length_keeps_what_decodes(tmp_path: Path) -> None:
    """A raw H.264 stream says nothing about its length: a cut one is not detectably truncated."""
    whole = write_video(tmp_path / "whole.h264", moving_frames(60), codec="libx264").read_bytes()
    (tmp_path / "cut.h264").write_bytes(whole[: len(whole) // 2])
    assert 2 <= len(read_video(tmp_path / "cut.h264").frames) < 60


# --- DICOM ---

def test_real_echo_cine_from_pydicom() -> None:
    """pydicom's apical echo: 30 frames, YBR_FULL_422 JPEG baseline, 240x320, FrameTime 33.333 ms."""
    path = examples.get_path("ybr_color")
    video = read_video(path)
    assert video.frames.shape == (30, 240, 320) and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(30.0, abs=0.01)
    assert video.meta["num_frames"] == 30 and video.meta["original_size"] == (240, 320)
    # Its ultrasound region gives 640x480 coordinates: the file was resized afterwards, so the box is dropped.
    assert video.meta["region"] is None and "outside the 240x320 image" in video.meta["notes"][0]
    # Gray is the BT.601 luma of the colour picture.
    luma = pixel_array(path) @ GRAY_WEIGHTS
    assert np.abs(video.frames - luma).mean() < 0.5
    # Sensible content: black around the sector, a bright sector that changes from frame to frame.
    assert video.frames[:, 100:140, 20:60].mean() < 5
    assert video.frames[:, 60:180, 110:230].mean() > 15
    assert np.abs(np.diff(video.frames[:, 60:180, 110:230].astype(int), axis=0)).mean() > 2


def test_dicom_rgb_becomes_bt601_gray_as_the_paper_rounds_it(tmp_path: Path) -> None:
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 160, 30]], np.uint8)
    pixels = np.broadcast_to(colours[None, :, None, None, :], (2, 4, 16, 16, 3)).reshape(2, 64, 16, 3)
    video = read_video(write_dicom(tmp_path / "rgb.dcm", np.ascontiguousarray(pixels), "RGB", FrameTime=20))
    expected = np.rint(colours @ GRAY_WEIGHTS).astype(np.uint8)  # 76, 150, 29, 124
    np.testing.assert_array_equal(video.frames[0, ::16, 0], expected)
    assert video.fps == pytest.approx(50)


def test_dicom_monochrome1_is_inverted_and_12_bit_scaled(tmp_path: Path) -> None:
    pixels = np.array([0, 1365, 2730, 4095], np.uint16).repeat(16 * 16).reshape(1, 64, 16).repeat(3, axis=0)
    video = read_video(write_dicom(tmp_path / "mono1.dcm", pixels, "MONOCHROME1", bits_stored=12, CineRate=25))
    np.testing.assert_array_equal(video.frames[1, ::16, 0], [255, 170, 85, 0])
    assert video.fps == 25


@pytest.mark.parametrize("timing,fps", [({"FrameTime": 40.0}, 25.0), ({"CineRate": 60}, 60.0),
                                        ({"RecommendedDisplayFrameRate": 48}, 48.0), ({}, DEFAULT_FPS)])
def test_dicom_frame_rate(tmp_path: Path, timing: dict, fps: float) -> None:
    video = read_video(write_dicom(tmp_path / "cine.dcm", moving_frames(4), **timing))
    assert video.fps == pytest.approx(fps)
    assert any("assumed 30 fps" in note for note in video.meta["notes"]) == (not timing)


def test_dicom_ultrasound_region_is_the_first_2d_one(tmp_path: Path) -> None:
    regions = [ultrasound_region_item(3, 0, 9, 0, 9),  # spectral Doppler strip: not the picture
               ultrasound_region_item(1, 5, 40, 10, 50),  # 2D: inclusive corners
               ultrasound_region_item(1, 0, 47, 0, 63)]
    video = read_video(write_dicom(tmp_path / "cine.dcm", moving_frames(4), SequenceOfUltrasoundRegions=regions))
    assert video.meta["region"] == (5, 41, 10, 51)


def test_dicom_found_by_magic_without_extension(tmp_path: Path) -> None:
    write_dicom(tmp_path / "IM0001", moving_frames(4), FrameTime=20)
    assert read_video(tmp_path / "IM0001").frames.shape == (4, 48, 64)


def test_bare_dicom_dataset_named_dcm(tmp_path: Path) -> None:
    frames = moving_frames(4)
    video = read_video(write_dicom(tmp_path / "old.dcm", frames, bare=True, FrameTime=20))
    np.testing.assert_array_equal(video.frames, frames)
    assert video.meta["transfer_syntax"] == "Implicit VR Little Endian"


def test_dicom_h264_cine_decodes_through_pyav(tmp_path: Path) -> None:
    frames = moving_frames(24)
    bitstream = write_video(tmp_path / "cine.h264", frames, codec="libx264").read_bytes()
    path = write_dicom(tmp_path / "mpeg.dcm", None, transfer_syntax=MPEG4HP41, NumberOfFrames=24, Rows=48,
                       Columns=64, SamplesPerPixel=3, PhotometricInterpretation="YBR_PARTIAL_420",
                       BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0, FrameTime=20.0,
                       PixelData=encapsulate([bitstream]))
    video = read_video(path)
    assert video.frames.shape == frames.shape and video.fps == pytest.approx(50)
    assert np.abs(video.frames.astype(int) - frames).mean() < 4


# --- bad input: one specific error each, one line naming the file ---

def cut_avi(tmp_path: Path) -> Path:
    whole = write_video(tmp_path / "whole.avi", moving_frames(40)).read_bytes()
    (tmp_path / "cut.avi").write_bytes(whole[: len(whole) // 2])
    return tmp_path / "cut.avi"


def cut_mkv(tmp_path: Path) -> Path:
    """Matroska declares no frame count: the header's duration tells how many frames are missing."""
    whole = write_video(tmp_path / "whole.mkv", moving_frames(40), codec="mpeg4").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(whole[: len(whole) // 2])
    return tmp_path / "cut.mkv"


def cut_dicom(tmp_path: Path) -> Path:
    whole = write_dicom(tmp_path / "whole.dcm", moving_frames(10)).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[: len(whole) - 5000])
    return tmp_path / "cut.dcm"


def cut_real_dicom(share: float):
    """pydicom's JPEG echo cine cut: at 2 % before its pixel data, at 60 % inside the encapsulated frames."""
    def make(tmp_path: Path) -> Path:
        whole = Path(examples.get_path("ybr_color")).read_bytes()
        (tmp_path / "cut.dcm").write_bytes(whole[: int(len(whole) * share)])
        return tmp_path / "cut.dcm"
    return make


def avi_header_only(tmp_path: Path) -> Path:
    """An AVI cut right where the frames start: a valid header, zero frames."""
    whole = write_video(tmp_path / "whole.avi", moving_frames(10)).read_bytes()
    (tmp_path / "header.avi").write_bytes(whole[: whole.index(b"movi") + 4])
    return tmp_path / "header.avi"


def avi_of_unknown_codec(tmp_path: Path) -> Path:
    """An MJPEG AVI whose FourCC names a codec no FFmpeg decodes."""
    whole = write_video(tmp_path / "whole.avi", moving_frames(10)).read_bytes()
    (tmp_path / "zzzz.avi").write_bytes(whole.replace(b"MJPG", b"ZZZZ"))
    return tmp_path / "zzzz.avi"


def empty_file(tmp_path: Path) -> Path:
    (tmp_path / "empty.mp4").touch()
    return tmp_path / "empty.mp4"


def text_file(name: str):
    def make(tmp_path: Path) -> Path:
        (tmp_path / name).write_text("PatientName,EF\nAnon,55\n" * 20)
        return tmp_path / name
    return make


BAD_INPUTS = {
    "missing": (lambda tmp_path: tmp_path / "nowhere.avi", errors.SourceNotFoundError, "no such file"),
    "folder": (lambda tmp_path: tmp_path, errors.NotAVideoError, "is a folder"),
    "empty": (empty_file, errors.EmptyFileError, "empty"),
    "text as avi": (text_file("report.avi"), errors.NotAVideoError, "not a video"),
    "text as dcm": (text_file("report.dcm"), errors.NotAVideoError, "not a DICOM file"),
    "cut avi": (cut_avi, errors.TruncatedVideoError, r"decoded \d+ of the 40 frames"),
    "cut mkv": (cut_mkv, errors.TruncatedVideoError, r"decoded \d+ of the 40 frames"),
    "cut dicom": (cut_dicom, errors.TruncatedVideoError, "cut or corrupt"),
    "dicom cut before its pixel data": (cut_real_dicom(0.02), errors.TruncatedVideoError,
                                        "it holds a Ultrasound Multi-frame Image Storage object but ends before"),
    "dicom cut inside its frames": (cut_real_dicom(0.6), errors.TruncatedVideoError,
                                    r"DICOM file is cut short: end of file reached before delimiter \(FFFE,E0DD\)"),
    "no frames": (avi_header_only, errors.NoFramesError, "no frame could be decoded"),
    "dicom without pixels": (lambda tmp_path: write_dicom(tmp_path / "sr.dcm", None, SOPClassUID=COMPREHENSIVE_SR),
                             errors.NoPixelDataError, "no pixel data"),
    "single-frame dicom": (lambda tmp_path: write_dicom(tmp_path / "still.dcm", moving_frames(1)),
                           errors.SingleFrameError, "still image"),
    "single-frame video": (lambda tmp_path: write_video(tmp_path / "still.avi", moving_frames(1)),
                           errors.SingleFrameError, "still image"),
    "unknown codec": (avi_of_unknown_codec, errors.UnsupportedCodecError, "no decoder"),
    "unknown transfer syntax": (lambda tmp_path: write_dicom(tmp_path / "odd.dcm", moving_frames(4),
                                                             transfer_syntax="1.2.826.0.1.3680043.10.999.1"),
                                errors.UnsupportedCodecError, "no decoder for transfer syntax"),
    "tiny frames": (lambda tmp_path: write_video(tmp_path / "tiny.avi", moving_frames(10, 8, 8)),
                    errors.AbsurdSizeError, "under 16 pixels"),
    "huge frames": (lambda tmp_path: write_dicom(tmp_path / "huge.dcm", moving_frames(2),
                                                 Rows=5000, Columns=5000),
                    errors.AbsurdSizeError, "exceed 4096 pixels"),
    "too many frames": (lambda tmp_path: write_dicom(tmp_path / "long.dcm", moving_frames(2),
                                                     NumberOfFrames=30_000),
                        errors.AbsurdSizeError, "30000 frames exceed"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_its_own_one_line_error(tmp_path: Path, case: str) -> None:
    make, error, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    # Library warnings (pydicom's UserWarning on a cut file) would print above the one line: none escapes.
    with warnings.catch_warnings(), pytest.raises(error, match=problem) as raised:
        warnings.simplefilter("error")
        read_video(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


# --- finding files ---

def test_iter_video_files_walks_folders_and_keeps_given_files(tmp_path: Path) -> None:
    root = tmp_path / "study"
    (root / "b" / "nested").mkdir(parents=True)
    (root / ".cache").mkdir()
    for name in ("b/2.avi", "a.MP4", "b/nested/3.dcm", "notes.txt", ".hidden.avi", ".cache/x.avi", "b/1.mkv"):
        (root / name).write_bytes(b"x")
    write_dicom(root / "b" / "IM0001", moving_frames(2))  # no extension: found by its DICM marker
    write_dicom(root / "DICOMDIR", None)  # the index of a DICOM media folder, not an image
    (root / "README").write_text("no extension, no marker")
    given = tmp_path / "extra.bin"
    given.write_bytes(b"x")

    found = iter_video_files([given, root, root / "a.MP4"])
    expected = ["a.MP4", "b/1.mkv", "b/2.avi", "b/IM0001", "b/nested/3.dcm"]
    assert found == [str(given)] + [str(root / name) for name in expected]
    assert iter_video_files(root / "b" / "2.avi") == [str(root / "b" / "2.avi")]  # one path, not a list
    with pytest.raises(errors.SourceNotFoundError, match="no such file or folder"):
        iter_video_files([tmp_path / "missing"])
