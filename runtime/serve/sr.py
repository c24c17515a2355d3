"""The answer: a Comprehensive SR following TID 1500 (Measurement Report), built with highdicom.

Content: the video's EF (LOINC 18043-0 "Left ventricular Ejection fraction", UCUM %) in a TID 1501
measurement group referencing the source cine; with a seg model, one group per beat with its EF, and a
TID 1410 planar ROI group for the LV at each beat's ED and ES frame (a closed SCOORD POLYLINE in the source
image's pixel coordinates, referencing that frame). Every measurement names the algorithm (evim3, its
version, the model files' SHA-256); the observer is the node (a device); VerificationFlag UNVERIFIED (no
person has checked it, and the model cannot tell an echo from other ultrasound). Patient and study come
from the source, so the reading software files the SR under the right study.

UIDs are derived from the source SOP Instance UID and the model hash (``derived_uid``): the same cine
analysed again by the same model gives the same SR UIDs, so a destination keeps one copy.
"""

from __future__ import annotations

import hashlib

import highdicom as hd
import numpy as np
import pydicom
from evim3.runtime.serve.analyse import Analysis
from evim3.runtime.version import __version__
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

LVEF = CodedConcept("18043-0", "LN", "Left ventricular Ejection fraction")
LV_AREA = codes.SCT.Area
ALGORITHM_NAME = "evim3"
MANUFACTURER = "evim3"
SR_SERIES_NUMBER = 9701
SC_SERIES_NUMBER = 9702
SR_TITLE = codes.DCM.ImagingMeasurementReport


def derived_uid(*parts: str) -> str:
    """A UID that depends only on its inputs: 2.25 followed by 128 bits of their SHA-256 as a decimal number
    (a UUID-derived UID, PS3.5 B.2). Called with the source SOP Instance UID, the model hash and what the
    UID is for: the same source, models and purpose give the same UID."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return f"2.25.{int(digest[:32], 16)}"


def algorithm(model_hash: str, presets: list[str]) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=__version__,
        parameters=[f"model_sha256={model_hash}", f"model={', '.join(presets)}"])


def observer(device_uid: str, aet: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid, name=aet, manufacturer_name=MANUFACTURER, model_name="evim3 serve")
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device))


def build_sr(source: pydicom.Dataset, analysis: Analysis, model_hash: str, presets: list[str], aet: str,
             device_uid: str) -> hd.sr.ComprehensiveSR:
    """The SR answering `source` (its header is enough: no pixel data is read)."""
    source_uid = str(source.SOPInstanceUID)
    algo = algorithm(model_hash, presets)
    image = hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source_uid)
    groups: list = []
    if analysis.ef is not None:
        ef = hd.sr.Measurement(name=LVEF, value=float(analysis.ef), unit=codes.UCUM.Percent, algorithm_id=algo,
                               finding_sites=[hd.sr.FindingSite(codes.SCT.LeftVentricle)])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(source_uid, model_hash, "group ef"),
                identifier=f"EF ({analysis.ef_method})"),
            algorithm_id=algo, measurements=[ef], source_images=[image]))
    for k, beat in enumerate(analysis.beats, 1):
        ef = hd.sr.Measurement(name=LVEF, value=float(beat.ef), unit=codes.UCUM.Percent, algorithm_id=algo,
                               finding_sites=[hd.sr.FindingSite(codes.SCT.LeftVentricle)])
        frames = hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source_uid,
                                                      referenced_frame_numbers=[beat.ed_frame + 1, beat.es_frame + 1])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(source_uid, model_hash, f"beat {k}"),
                                                         identifier=f"beat {k} EF (area-length)"),
            algorithm_id=algo, measurements=[ef], source_images=[frames]))
        for phase, frame, contour, area in (("ED", beat.ed_frame, beat.ed_contour, beat.ed_area_cm2),
                                            ("ES", beat.es_frame, beat.es_contour, beat.es_area_cm2)):
            if contour is None or len(contour) < 4:
                continue
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=_scoord(contour, source),
                source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, source_uid,
                                                        referenced_frame_numbers=[frame + 1]))
            measurements = [] if area is None else [hd.sr.Measurement(
                name=LV_AREA, value=float(area), unit=codes.UCUM.SquareCentimeter, algorithm_id=algo)]
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(source_uid, model_hash, f"beat {k} {phase}"),
                    identifier=f"beat {k} LV at {phase}"),
                referenced_region=region, finding_type=codes.SCT.LeftVentricle, algorithm_id=algo,
                measurements=measurements or None))
    report = hd.sr.MeasurementReport(
        observation_context=observer(device_uid, aet),
        procedure_reported=codes.SCT.Echocardiography,
        imaging_measurements=groups, title=SR_TITLE)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=report,
        series_instance_uid=derived_uid(source_uid, model_hash, "sr series"), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source_uid, model_hash, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
    )
    sr.SeriesDescription = "evim3 LV ejection fraction (unverified)"
    return sr


def _scoord(contour: np.ndarray, source: pydicom.Dataset) -> np.ndarray:
    """Pixel-centre coordinates (centres at integers) -> SCOORD image coordinates (0,0 = the top-left corner
    of the top-left pixel), kept inside the image."""
    points = np.asarray(contour, np.float64) + 0.5
    points[:, 0] = np.clip(points[:, 0], 0, float(source.Columns))
    points[:, 1] = np.clip(points[:, 1], 0, float(source.Rows))
    points[-1] = points[0]
    return points.astype(np.float32)

