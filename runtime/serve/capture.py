"""``--secondary-capture``: an image of the result for viewers that do not render SRs: the EF of every clip
over time (and each beat's EF with a seg model), drawn with Pillow, as a Secondary Capture (highdicom) in the
source's study, UIDs derived as the SR's. Not for diagnosis: it says the result is unverified."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from evim3.runtime.serve.analyse import Analysis
from evim3.runtime.serve.sr import MANUFACTURER, SC_SERIES_NUMBER, derived_uid
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 512, 320
PLOT = (56, 60, WIDTH - 16, HEIGHT - 40)  # left, top, right, bottom of the plot area


def render(analysis: Analysis) -> np.ndarray:
    """(HEIGHT, WIDTH, 3) uint8: title line, EF per clip as points joined by a line, beats as squares."""
    image = Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    ef = "n/a" if analysis.ef is None else f"{analysis.ef:.1f} %"
    draw.text((8, 6), f"evim3 LV ejection fraction {ef} ({analysis.ef_method})", fill=(255, 255, 255))
    draw.text((8, 22), f"{len(analysis.clip_efs)} clips, {len(analysis.beats)} beats. UNVERIFIED: not for diagnosis "
                       "without review", fill=(255, 200, 0))
    left, top, right, bottom = PLOT
    draw.rectangle(PLOT, outline=(128, 128, 128))
    for level in (0, 25, 50, 75, 100):
        y = bottom - (bottom - top) * level / 100
        draw.line((left - 4, y, left, y), fill=(128, 128, 128))
        draw.text((8, y - 6), f"{level}%", fill=(160, 160, 160))
    end = max([t for _, t in analysis.clip_times] + [1e-6])

    def at(t: float, value: float) -> tuple[float, float]:
        v = min(100.0, max(0.0, value))
        return left + (right - left) * t / end, bottom - (bottom - top) * v / 100

    points = [at((a + b) / 2, v) for (a, b), v in zip(analysis.clip_times, analysis.clip_efs)]
    if len(points) > 1:
        draw.line(points, fill=(80, 160, 255), width=2)
    for x, y in points:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(80, 160, 255))
    for k, beat in enumerate(analysis.beats):
        x, y = left + 12 + k * 14, bottom - (bottom - top) * min(100.0, max(0.0, beat.ef)) / 100
        draw.rectangle((x - 4, y - 4, x + 4, y + 4), outline=(255, 80, 80))
    draw.text((left, bottom + 6), "0 s", fill=(160, 160, 160))
    draw.text(((left + right) / 2 - 40, bottom + 6), "clip centre time", fill=(160, 160, 160))
    draw.text((right - 40, bottom + 6), f"{end:.1f} s", fill=(160, 160, 160))
    return np.asarray(image)


def build_capture(source: pydicom.Dataset, analysis: Analysis, model_hash: str, presets: list[str]) -> hd.sc.SCImage:
    uid = str(source.SOPInstanceUID)
    patient = {k: source.get(k) for k in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")}
    study = {"accession_number": source.get("AccessionNumber"), "study_id": source.get("StudyID"),
             "study_date": source.get("StudyDate") or None, "study_time": source.get("StudyTime") or None,
             "referring_physician_name": source.get("ReferringPhysicianName")}
    sc = hd.sc.SCImage(
        pixel_array=render(analysis), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=derived_uid(uid, model_hash, "sc series"), series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(uid, model_hash, "sc"), instance_number=1, manufacturer=MANUFACTURER,
        patient_id=patient["PatientID"], patient_name=patient["PatientName"],
        patient_birth_date=patient["PatientBirthDate"] or None, patient_sex=patient["PatientSex"] or None,
        patient_orientation=("L", "F"), **{k: v for k, v in study.items() if v is not None})
    sc.PatientOrientation = None  # a chart has no patient orientation (type 2: present, empty); highdicom asks one
    sc.SeriesDescription = f"evim3 EF per clip ({', '.join(presets)}; unverified)"
    sc.BurnedInAnnotation = "YES"
    return sc
