"""IOCM rejection notes: tell the PACS that sent a study which of its instances the gate rejected.

IHE Imaging Object Change Management (IOCM) signals a rejection with a Key Object Selection Document whose title is
"Rejected for Quality Reasons" (113001, DCM; PS3.16 CID 7011) and whose content and Current Requested Procedure
Evidence Sequence reference the rejected instances. An archive that implements IOCM hides those instances from
clinical use and later exports (dcm4chee-arc, for example, marks them rejected and can delete them after a time);
an archive that does not simply stores the note as one more instance of the study.

The note is built by highdicom (a well-kept implementation of the Key Object Selection IOD), from the headers of the
rejected instances, which carry the patient and study attributes the note must repeat. IOCM defines no way to take a
rejection back: releasing a film from review re-delivers it and logs a line that names the note, and restoring the
instance in the archive is the archive's own operation (docs/OPERATIONS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

REJECTED_FOR_QUALITY = Code("113001", "DCM", "Rejected for Quality Reasons")
NOTE_SERIES_NUMBER = 9100
MANUFACTURER = "filmgate"


def rejection_note(rejected: Sequence[Dataset], *, description: str, instance_number: int = 1,
                   series_uid: str | None = None, uid_prefix: str | None = None) -> Dataset:  # fmt: skip
    """A KOS "Rejected for Quality Reasons" referencing ``rejected`` (headers of instances of ONE study; pixel data
    not needed). ``description`` (e.g. "filmgate: rotated") goes into the note's Key Object Description."""
    if not rejected:
        raise ValueError("a rejection note needs at least one rejected instance")
    studies = {str(ds.StudyInstanceUID) for ds in rejected}
    if len(studies) != 1:
        raise ValueError(f"a rejection note covers one study, got {len(studies)}")
    evidence = [_evidence(ds) for ds in rejected]
    content = KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY,
        referenced_objects=evidence,
        description=description[:1024] or None,
    )
    doc = KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=series_uid or generate_uid(prefix=uid_prefix),
        series_number=NOTE_SERIES_NUMBER,
        sop_instance_uid=generate_uid(prefix=uid_prefix),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
    )
    doc.SeriesDescription = "filmgate rejection notes"
    return doc


# Attributes the note inherits or references (patient and study modules, and what identifies each instance).
_KEEP = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "Modality", "Rows", "Columns", "NumberOfFrames",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
)  # fmt: skip


def _evidence(ds: Dataset) -> Dataset:
    """A header-only copy of what highdicom reads from a referenced instance (Type 2 study attributes default to
    empty, as the IOD allows)."""
    out = Dataset()
    for keyword in _KEEP:
        if keyword in ds:
            setattr(out, keyword, ds[keyword].value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # fmt: skip
        if keyword not in out:
            setattr(out, keyword, "")
    return out
