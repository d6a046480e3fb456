"""DICOM RT Structure Set output for a label volume segmented from a DICOM series (pydicom + highdicom's base class).

Why not rt-utils (1.2.7, its newest release): it places contours with the row and column pixel spacings swapped
(wrong for non-square pixels; fixed upstream after that release, never published), traces contours through the
centres of the boundary pixels (a reader filling the polygon's inside loses half the boundary), writes decimal
strings longer than DICOM's 16 characters and leaves Type 2 attributes out (dciodvfy errors), copies blank source
UIDs into the references, re-reads and decodes the series from a folder itself, and needs OpenCV. Its handling of
oblique series is right (it works in the slices' own row/column/normal frame); the rest is not fixable from outside.

Here the label is resampled onto each source instance's pixel grid exactly as for the DICOM SEG
(:func:`diffseg.dicomseg.label_on_dicom_grid`), each class's pixels are outlined by marching squares at 0.5
(contourpy, matplotlib's contouring engine: every vertex lies on a pixel-edge midpoint, so a pixel centre lies inside
an odd number of a slice's polygons exactly when the pixel belongs to the class — holes are polygons of their own, the
even-odd rule), and the vertices are mapped to patient coordinates with that instance's own geometry, so every
contour lies in the plane of the instance it references, oblique or not.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from diffseg.dicomseg import equipment, label_on_dicom_grid, pixel_to_patient, property_codes, read_sources

__all__ = ["RTSTRUCT_SOP_CLASS", "mask_contours", "write_rtstruct"]

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"  # what RT Referenced Study Sequence items name (PS3.3 C.8.8.5)


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (N, 2) of (row, column) pixel coordinates outlining the True pixels of a 2D ``mask``.

    Marching squares at 0.5 on the mask with a background border; collinear vertices removed. A pixel centre is
    inside an odd number of the polygons exactly when the pixel is True (holes and islands in holes are polygons).
    """
    import contourpy

    rows, columns = np.nonzero(mask)
    if rows.size == 0:
        return []
    r0, c0 = rows.min() - 1, columns.min() - 1
    crop = np.zeros((rows.max() - r0 + 2, columns.max() - c0 + 2), np.float64)
    crop[rows - r0, columns - c0] = 1.0
    lines = contourpy.contour_generator(z=crop, line_type=contourpy.LineType.Separate).lines(0.5)
    polygons = []
    for line in lines:  # closed lines repeat their first vertex at the end; contourpy's (x, y) = (column, row)
        points = np.asarray(line, np.float64)[:-1, ::-1] + (r0, c0)
        before, after = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
        turns = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9
        polygons.append(points[turns])
    return polygons


def write_rtstruct(
    label: np.ndarray,
    affine: np.ndarray,
    source_files: Sequence[str | os.PathLike[str]],
    classes: Mapping[int, str],
    path: str | os.PathLike[str],
    algorithm: str,
    version: str,
    colors: Mapping[int, Sequence[int]],
) -> list[str]:
    """Write ``label`` (I, J, K) as an RT Structure Set at ``path`` referencing ``source_files``; returns notes.

    One ROI per class of ``classes`` (0 = background) present on the source slices, named by the class, displayed in
    ``colors[class]`` (RGB 0–255), with closed planar contours on the instances it covers. Raises ValueError when no
    class is present (an RT Structure Set needs at least one ROI).

    Args:
        label, affine, source_files, classes, algorithm, version: as for :func:`diffseg.dicomseg.write_dicom_seg`.
        path: output file (written as is; the caller handles atomic renaming).
        colors: class index → (r, g, b), e.g. the overlay's colours.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import ImplicitVRLittleEndian

    datasets, notes = read_sources(source_files)
    frames = label_on_dicom_grid(np.asarray(label), affine, datasets)
    present = [k for k in sorted(classes) if int(k) > 0 and (frames == k).any()]
    if not present:
        raise ValueError("no class of the label is present on the source slices: nothing to write as an RTSTRUCT")
    ref = datasets[0]
    now = datetime.datetime.now()
    rt = hd.SOPClass(
        study_instance_uid=ref.StudyInstanceUID,
        series_instance_uid=hd.UID(),
        series_number=901,
        sop_instance_uid=hd.UID(),
        sop_class_uid=RTSTRUCT_SOP_CLASS,
        instance_number=1,
        modality="RTSTRUCT",
        transfer_syntax_uid=ImplicitVRLittleEndian,  # 4-byte lengths: a long contour's ContourData exceeds 64 kB
        series_date=now.date(),
        series_time=now.time(),
        **equipment(algorithm, version),
    )
    rt.copy_patient_and_study_information(ref)
    rt.OperatorsName = ""
    rt.FrameOfReferenceUID = ref.FrameOfReferenceUID
    rt.PositionReferenceIndicator = ref.get("PositionReferenceIndicator", "")
    rt.StructureSetLabel = algorithm[:16]
    rt.StructureSetName = f"{algorithm} {version}"[:64]
    rt.StructureSetDate, rt.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    rt.ApprovalStatus = "UNAPPROVED"
    rt.ReferencedFrameOfReferenceSequence = [_frame_of_reference(datasets)]
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=version
    )
    rois, contours, observations = [], [], []
    for number in present:
        name = classes[number]
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = ref.FrameOfReferenceUID
        roi.ROIName = name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm} {version}"[:64]
        roi.ROIDerivationAlgorithmIdentificationSequence = identification
        rois.append(roi)
        contour = Dataset()
        contour.ReferencedROINumber = number
        contour.ROIDisplayColor = [int(c) for c in colors[number]]
        contour.ContourSequence = _contours(frames == number, datasets)
        contours.append(contour)
        _, kind, standard = property_codes(name)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN" if standard else ""
        observation.ROIInterpreter = ""
        observation.RTROIIdentificationCodeSequence = [hd.sr.CodedConcept.from_code(kind)]
        observations.append(observation)
    rt.StructureSetROISequence, rt.ROIContourSequence, rt.RTROIObservationsSequence = rois, contours, observations
    rt.save_as(str(Path(path)))
    return notes


def _reference(ds) -> object:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _frame_of_reference(datasets: Sequence) -> object:
    """Referenced Frame of Reference item: the frame, the study, the series and every source instance."""
    from pydicom.dataset import Dataset

    series = Dataset()
    series.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    series.ContourImageSequence = [_reference(ds) for ds in datasets]
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_REFERENCE_CLASS
    study.ReferencedSOPInstanceUID = datasets[0].StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = datasets[0].FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    return frame


def _contours(masks: np.ndarray, datasets: Sequence) -> list:
    """Contour Sequence items of one ROI: ``masks`` (frames, rows, columns) on the instances ``datasets``."""
    from pydicom.dataset import Dataset

    items = []
    for mask, ds in zip(masks, datasets, strict=True):
        for polygon in mask_contours(mask):
            item = Dataset()
            item.ContourNumber = len(items) + 1
            item.ContourImageSequence = [_reference(ds)]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(polygon)
            item.ContourData = np.round(pixel_to_patient(ds, *polygon.T), 3).ravel().tolist()  # DS: ≤ 16 characters
            items.append(item)
    return items
