"""Private storage SOP Classes a PACS forwards within studies: stored, judged, quarantined; never refused unasked.

A Siemens study carries CSA Non-Image objects (1.3.12.2.1107.5.9.1); pynetdicom knows only the standard storage
classes, so the node answered their presentation context with a rejection and the PACS's forwarding job failed for
every such study. Sent here by real peers (DCMTK's dcmsend, pynetdicom) to a real node.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.helpers import DCMTK_ENV, Gate, dataset_bytes

CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # in the default configuration
LISTED = "1.2.826.0.1.3680043.9.7433.1.1"  # a private class a site adds
UNLISTED = "1.2.826.0.1.3680043.9.7433.1.2"


def private_object(path: Path, sop_class: str) -> str:
    """A non-image object as vendors write them: header, private tags, no pixel data."""
    meta = FileMetaDataset()
    uid = generate_uid()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MR"
    ds.PatientName, ds.PatientID = "Test^Film", "TEST-0001"
    ds.add_new(0x00290010, "LO", "SIEMENS CSA NON-IMAGE")
    ds.add_new(0x00291010, "OB", b"SV10\x04\x03\x02\x01" + bytes(64))
    ds.save_as(path, enforce_file_format=True)
    return uid


def test_private_storage_classes_are_stored_and_quarantined_and_unlisted_ones_refused(tmp_path):
    gate = Gate.create(tmp_path / "gate", listener={"extra_storage_sop_classes": [CSA_NON_IMAGE, LISTED]}).start()
    csa = tmp_path / "csa.dcm"
    csa_uid = private_object(csa, CSA_NON_IMAGE)
    proc = subprocess.run(["dcmsend", "-aec", "FILMGATE", "127.0.0.1", str(gate.dicom_port), str(csa)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "No Acceptable Presentation Contexts" not in proc.stderr, proc.stderr

    ae = AE(ae_title="PACS")
    ae.add_requested_context(LISTED, ExplicitVRLittleEndian)
    ae.add_requested_context(UNLISTED, ExplicitVRLittleEndian)
    listed = tmp_path / "listed.dcm"
    listed_uid = private_object(listed, LISTED)
    assoc = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE")
    try:
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert LISTED in accepted and UNLISTED not in accepted  # only what the site listed
        status = assoc.send_c_store(listed)
        assert status.Status == 0x0000
    finally:
        assoc.release()

    cars = {c["sop_instance_uid"]: c for c in gate.wait_delivered(2)}
    for uid, path in ((csa_uid, csa), (listed_uid, listed)):
        car = cars[uid]
        assert car["decision"] == "quarantine" and "undecodable" in car["reasons"], car
        assert car["notes"]["error"] == "the dataset has no pixel data", car
        kept = next((gate.root / "quarantine").rglob(f"{uid}.dcm"))
        assert dataset_bytes(kept.read_bytes()) == dataset_bytes(path.read_bytes())  # stored as sent
    assert gate.stop() == 0
