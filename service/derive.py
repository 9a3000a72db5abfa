"""Corrected derived films: a film that is only rotated, mirrored or grey-inverted is put right as a new instance.

The original is never changed (it stays in quarantine, byte for byte). The derived instance is a new SOP Instance in
a new series of the same study, marked as what it is (PS3.3 C.7.6.1.1.2 Image Type ``DERIVED\\SECONDARY``, the
General Image module's Derivation Description and Derivation Code Sequence, and a Source Image Sequence that points at
the original with the purpose "Source image for image processing operation", 121322 DCM). Every other attribute is
copied. Pixels are rewritten uncompressed (Explicit VR Little Endian), so a compressed original loses nothing.

What each fix does to the film:

* rotation: the orientation detector's class ``rotN`` means the upright film was turned N degrees counter-clockwise
  (``numpy.rot90(k=N/90)``); the derived film is turned back N degrees clockwise. Rows and Columns swap with the
  pixel spacings, and Patient Orientation / Image Orientation (Patient) are turned with the pixels.
* mirror: left-right flip of the pixels; the row direction of Patient Orientation is reversed.
* inversion: the stored values are kept and the Photometric Interpretation (with a Presentation LUT Shape, when
  present) is switched between MONOCHROME1 and MONOCHROME2, so that the film displays with normal grey levels.

Which findings allow a fix is decided by :func:`correction_for` from the decision alone; whether the fix worked is
decided by judging the derived film again with the same judge (the pipeline does that).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from filmgate.policy import Decision

CORRECTABLE = ("rotated", "inverted", "flipped")
# The detector whose predicted class says how to undo each reason.
REASON_DETECTOR = {"rotated": "orientation", "inverted": "inversion", "flipped": "flip"}
_ROTATIONS = {"rot90": 1, "rot180": 2, "rot270": 3}
SERIES_NUMBER_OFFSET = 9000
LOCAL_SCHEME = "99FILMGATE"  # CID 7203 has no code for an inversion of grey levels; the context group is extensible
SERIES_DESCRIPTION = "filmgate corrected"


@dataclass(frozen=True)
class Correction:
    """How to put a film right: undo a counter-clockwise turn of ``quarter_turns`` x 90 degrees, a mirror, an
    inversion. ``reasons`` are the quarantine reasons it answers."""

    quarter_turns: int = 0
    mirror: bool = False
    invert: bool = False
    reasons: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = []
        if self.quarter_turns:
            parts.append(f"turned {90 * self.quarter_turns} degrees clockwise (the film was stored rotated)")
        if self.mirror:
            parts.append("mirrored left-right (the film was stored mirrored)")
        if self.invert:
            parts.append("grey levels inverted back (Photometric Interpretation switched)")
        return "filmgate: " + "; ".join(parts)


def correction_for(decision: Decision, allowed: Iterable[str], also_when: Iterable[str] = ()) -> Correction | None:
    """The correction that answers the correctable reasons of ``decision``, or None.

    At least one reason must be in ``allowed`` (and correctable), and every other reason in ``also_when``: detector
    reasons that the fault itself raises (a turned or grey-inverted chest film is often not recognised as a chest
    film: ``not-frontal-chest``). The derived film is judged again, so it passes only when those go away with the
    fault. A header rule (modality, an age in the header, undecodable) or any other reason means no correction, and
    so does a rotation whose class the orientation detector does not give."""
    fixable = set(allowed) & set(CORRECTABLE)
    reasons = tuple(decision.reasons)
    to_fix = tuple(r for r in reasons if r in fixable)
    if decision.accepted or not to_fix or not set(reasons) <= fixable | set(also_when):
        return None
    predicted = {f.detector: f.predicted for f in decision.findings}
    turns, mirror, invert = 0, False, False
    for reason in to_fix:
        cls = predicted.get(REASON_DETECTOR[reason])
        if reason == "rotated":
            if cls not in _ROTATIONS:
                return None
            turns = _ROTATIONS[cls]
        elif reason == "flipped":
            mirror = True
        elif reason == "inverted":
            invert = True
    return Correction(quarter_turns=turns, mirror=mirror, invert=invert, reasons=to_fix)


class NotCorrectable(ValueError):
    """The film's form does not allow the fix (several frames, colour, no pixel data)."""


def derived_film(original: Dataset, fix: Correction, *, uid_prefix: str | None = None,
                 series_uid: str | None = None) -> Dataset:  # fmt: skip
    """A new dataset: ``original`` with ``fix`` applied (the original is not modified)."""
    if "PixelData" not in original:
        raise NotCorrectable("no pixel data")
    if int(original.get("NumberOfFrames", 1) or 1) != 1:
        raise NotCorrectable("several frames")
    if int(original.get("SamplesPerPixel", 1) or 1) != 1:
        raise NotCorrectable("not a grey film")
    pixels = original.pixel_array
    ds = copy.deepcopy(original)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "IconImageSequence",
                    "DigitalSignaturesSequence", "MACParametersSequence", "EncryptedAttributesSequence"):  # fmt: skip
        if keyword in ds:
            delattr(ds, keyword)
    k = fix.quarter_turns % 4
    if fix.mirror:
        pixels = pixels[:, ::-1]
        _turn_orientation(ds, mirror=True)
    if k:
        pixels = np.rot90(pixels, -k)  # clockwise
        for _ in range((4 - k) % 4):  # a clockwise quarter turn is three counter-clockwise ones
            _turn_orientation(ds, mirror=False)
        if k % 2:
            _swap_pairs(ds)
    if fix.invert:
        _switch_photometric(ds)
    pixels = np.ascontiguousarray(pixels)
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8 if pixels.dtype.itemsize == 1 else 16
    if int(ds.get("BitsStored", ds.BitsAllocated)) > ds.BitsAllocated:
        ds.BitsStored, ds.HighBit = ds.BitsAllocated, ds.BitsAllocated - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"

    _mark_derived(ds, original, fix, uid_prefix=uid_prefix, series_uid=series_uid)
    return ds


def _mark_derived(ds: Dataset, original: Dataset, fix: Correction, *, uid_prefix: str | None,
                  series_uid: str | None) -> None:  # fmt: skip
    image_type = list(original.get("ImageType", []) or [])
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    ds.DerivationDescription = fix.describe()[:1024]
    codes = []
    if fix.quarter_turns or fix.mirror:
        codes.append(_code("113085", "DCM", "Spatial resampling"))
    if fix.invert:
        codes.append(_code("FG0001", LOCAL_SCHEME, "Grey levels inverted back"))
        scheme = Dataset()  # declare the local coding scheme (PS3.3 C.12.1.1.3: private schemes start with 99)
        scheme.CodingSchemeDesignator = LOCAL_SCHEME
        scheme.CodingSchemeName = "filmgate local codes"
        scheme.CodingSchemeResponsibleOrganization = "filmgate"
        declared = ds.get("CodingSchemeIdentificationSequence", [])
        known = [i for i in declared if i.get("CodingSchemeDesignator") != LOCAL_SCHEME]
        ds.CodingSchemeIdentificationSequence = Sequence([*known, scheme])
    ds.DerivationCodeSequence = Sequence(codes)
    src = Dataset()
    src.ReferencedSOPClassUID = original.SOPClassUID
    src.ReferencedSOPInstanceUID = original.SOPInstanceUID
    purpose = _code("121322", "DCM", "Source image for image processing operation")
    src.PurposeOfReferenceCodeSequence = Sequence([purpose])
    ds.SourceImageSequence = Sequence([src])
    ds.SOPInstanceUID = generate_uid(prefix=uid_prefix)
    ds.SeriesInstanceUID = series_uid or generate_uid(prefix=uid_prefix)
    ds.SeriesNumber = SERIES_NUMBER_OFFSET + int(original.get("SeriesNumber", 0) or 0) % 1000
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.BurnedInAnnotation = original.get("BurnedInAnnotation", "NO") or "NO"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "FILMGATE"
    ds.file_meta = meta
    ds.preamble = b"\0" * 128


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


_OPPOSITE = {"A": "P", "P": "A", "L": "R", "R": "L", "H": "F", "F": "H"}


def _opposite(direction: str) -> str:
    return "".join(_OPPOSITE.get(c, c) for c in direction)


def _turn_orientation(ds: Dataset, *, mirror: bool) -> None:
    """Turn the patient directions with the pixels: a counter-clockwise quarter turn maps (row direction, column
    direction) to (column direction, opposite of row direction); a mirror reverses the row direction."""
    po = list(ds.get("PatientOrientation", []) or [])
    if len(po) == 2:
        r, c = str(po[0]), str(po[1])
        ds.PatientOrientation = [_opposite(r), c] if mirror else [c, _opposite(r)]
    iop = list(ds.get("ImageOrientationPatient", []) or [])
    if len(iop) == 6:
        row, col = [float(v) for v in iop[:3]], [float(v) for v in iop[3:]]
        new = [-v for v in row] + col if mirror else col + [-v for v in row]
        ds.ImageOrientationPatient = [round(v, 6) for v in new]


def _swap_pairs(ds: Dataset) -> None:
    """Row/column pairs swap when the film turns a quarter (spacings are given as row spacing, column spacing)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing", "PixelAspectRatio"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            setattr(ds, keyword, [value[1], value[0]])


def _switch_photometric(ds: Dataset) -> None:
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    ds.PhotometricInterpretation = "MONOCHROME2" if pi == "MONOCHROME1" else "MONOCHROME1"
    shape = ds.get("PresentationLUTShape")
    if shape in ("IDENTITY", "INVERSE"):
        ds.PresentationLUTShape = "INVERSE" if shape == "IDENTITY" else "IDENTITY"


def links(original: Mapping[str, str], derived: Dataset) -> dict[str, dict[str, str]]:
    """What the sidecars and the index record about the pair (UIDs only)."""
    return {
        "derived": {"sop_instance_uid": str(derived.SOPInstanceUID),
                    "series_instance_uid": str(derived.SeriesInstanceUID)},
        "derived_from": {"sop_instance_uid": original.get("SOPInstanceUID", ""),
                         "series_instance_uid": original.get("SeriesInstanceUID", "")},  # fmt: skip
    }
