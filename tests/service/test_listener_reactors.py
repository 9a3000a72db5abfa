"""The listener's event-driven reactors (filmgate.patches.make_reactors_event_driven) behave like pynetdicom's polling
ones: an association that idles longer than the reactors' longest wait still answers, stores and releases; aborts
and many short associations in a row are handled; the wake-ups come from the socket, sends, and queued messages.
CPU and latency are measured by bench/idle_cpu, not here."""

from __future__ import annotations

import time

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from filmgate.patches import REACTOR_IDLE_CAP
from filmgate_training.datasets import select
from tests.helpers import Gate, film_pixels, make_dicom


def test_idle_association_then_store_release_abort_and_short_associations(tmp_path):
    gate = Gate.create(tmp_path / "gate").start()
    try:
        film = select(split="val", kind="frontal-chest", source="hannover")[0]
        path = tmp_path / "film.dcm"
        make_dicom(film_pixels(film.path), path)
        ds = pydicom.dcmread(path)

        ae = AE(ae_title="REACTORS")
        ae.add_requested_context(Verification)
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        assoc = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE")
        assert assoc.is_established
        # The scenario is an association left idle (not a wait for an event): longer than any reactor waits at once.
        time.sleep(5 * REACTOR_IDLE_CAP)
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert assoc.is_released
        assert len(gate.wait_delivered(1)) == 1

        aborted = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE")
        assert aborted.is_established
        aborted.abort()
        assert aborted.is_aborted

        for _ in range(20):  # each one's release must be noticed by the node's association thread
            short = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE")
            assert short.is_established
            assert short.send_c_echo().Status == 0x0000
            short.release()
            assert short.is_released
    finally:
        assert gate.stop() == 0
