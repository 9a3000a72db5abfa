"""Sweep a PACS: ``filmgate sweep dicom://AET@host:port --query 'Modality=CR,DX' --since 2024-01-01``.

Instances are found by C-FIND in the Study Root model (studies, then each study's series, then each series'
instances), so every instance is known, counted and recorded before judging starts; a rerun retrieves only those
without a current result. They are retrieved by C-GET (default; the PACS must allow our AE title to get) or by C-MOVE
to our own AE title (``--retrieve move --move-port N``: the PACS must know our AE title at this host and port), one
series at a time (instance by instance where a series is partly judged already), and judged as they arrive: the
received bytes stay in memory, bounded by a small queue (the PACS waits while the workers catch up), and are written
only by ``--sort-into``.

Query keys: ``Key=value`` pairs separated by ``;``; a comma means "any of". Study-level keys (dates, accession
number, patient ID, descriptions) are asked at the study level, the rest at the series level; ``Modality`` is asked
as ModalitiesInStudy for studies and Modality for series. Values are checked again here, since not every PACS
honours every key.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.multival import MultiValue

from filmgate.sweep.store import Store
from filmgate.sweep.work import Item

log = logging.getLogger("filmgate.sweep.pacs")

STUDY_KEYS = {"StudyDate", "StudyTime", "AccessionNumber", "PatientID", "StudyDescription", "StudyID",
              "ReferringPhysicianName", "InstitutionName"}  # fmt: skip
QUEUE_FILMS = 64  # received instances waiting for the workers (the memory bound of a PACS sweep)
RETRIEVE_UIDS = 500  # at most this many SOP Instance UIDs in one instance-level retrieve
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE
)
# Storage classes asked for by C-GET (an association has at most 128 contexts): radiographs, and what a
# radiograph study also holds (so that a CT slice or a screenshot is judged, and quarantined, rather than missed).
STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # mammography for presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # mammography for processing
    "1.2.840.10008.5.1.4.1.1.1.3",  # intra-oral for presentation
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # multi-frame grayscale byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # multi-frame grayscale word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # multi-frame true colour SC
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA
    "1.2.840.10008.5.1.4.1.1.12.2",  # RF
    "1.2.840.10008.5.1.4.1.1.20",  # NM
    "1.2.840.10008.5.1.4.1.1.128",  # PET
)


class PacsError(Exception):
    """A PACS source that cannot be used: a bad URL or query, an association refused, a failed C-FIND."""


@dataclass(frozen=True)
class PacsQuery:
    url: str
    called_ae: str
    host: str
    port: int
    calling_ae: str
    study_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    series_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    since: str | None = None  # YYYYMMDD
    retrieve: str = "get"  # get | move
    move_port: int = 0
    timeout: float = 60.0


def parse_pacs(url: str, *, query: str | None, since: str | None, ae_title: str, retrieve: str = "get",
               move_port: int = 0) -> PacsQuery:  # fmt: skip
    m = re.fullmatch(r"dicom://([^@/]{1,16})@(\[[^\]]+\]|[^:/]+):(\d{1,5})/?", url)
    if not m:
        raise PacsError(f"{url}: a PACS source is dicom://AET@host:port")
    host = m.group(2).strip("[]")
    study: dict[str, tuple[str, ...]] = {}
    series: dict[str, tuple[str, ...]] = {}
    for part in filter(None, (p.strip() for p in re.split(r"[;&]", query or ""))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z]+", key):
            raise PacsError(f"--query: {part!r} is not Key=value (e.g. 'Modality=CR,DX;BodyPartExamined=CHEST')")
        from pydicom.datadict import tag_for_keyword

        if tag_for_keyword(key) is None:
            raise PacsError(f"--query: {key} is not a DICOM keyword")
        values = tuple(v.strip() for v in value.split(",") if v.strip())
        (study if key in STUDY_KEYS else series)[key] = values
    day = None
    if since:
        if not re.fullmatch(r"\d{4}-?\d{2}-?\d{2}", since):
            raise PacsError(f"--since: {since!r} is not a date (YYYY-MM-DD)")
        day = since.replace("-", "")
    if retrieve == "move" and not move_port:
        raise PacsError("--retrieve move needs --move-port (the port the PACS sends our C-MOVE results to)")
    return PacsQuery(url=url, called_ae=m.group(1), host=host, port=int(m.group(3)), calling_ae=ae_title,
                     study_keys=study, series_keys=series, since=day, retrieve=retrieve,
                     move_port=move_port)  # fmt: skip


def _ae(q: PacsQuery) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=q.calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30
    ae.dimse_timeout = q.timeout
    return ae


def _associate(ae: Any, q: PacsQuery, **kw: Any) -> Any:
    assoc = ae.associate(q.host, q.port, ae_title=q.called_ae, **kw)
    if not assoc.is_established:
        raise PacsError(f"{q.url}: association refused or failed (is our AE title {q.calling_ae} known to the PACS?)")
    return assoc


def _matches(ds: Any, keys: dict[str, tuple[str, ...]]) -> bool:
    for key, values in keys.items():
        if not values or any("*" in v or "?" in v for v in values):
            continue  # wildcards: the PACS matched them
        raw = ds.get(key)
        have = {str(v) for v in raw} if isinstance(raw, MultiValue) else {str(raw or "")}
        if not set(values) & have:
            return False
    return True


def _find(assoc: Any, identifier: Any, what: str) -> Iterator[Any]:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    for status, ds in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if status is None:
            raise PacsError(f"C-FIND of {what}: no answer (timed out or aborted)")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            if ds is not None:
                yield ds
        elif code != 0x0000:
            raise PacsError(f"C-FIND of {what} failed: status 0x{code:04X}")


def _query(level: str, **elements: Any) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in elements.items():
        setattr(ds, k, v)
    return ds


def find_instances(q: PacsQuery, store: Store) -> int:
    """C-FIND every matching instance and record it in ``store`` (results path ``study/series/instance``)."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = _ae(q)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, q)
    found = 0
    try:
        study_q: dict[str, Any] = {"StudyInstanceUID": "", "StudyDate": f"{q.since}-" if q.since else ""}
        for key, values in q.study_keys.items():
            study_q[key] = "\\".join(values)
        modalities = q.series_keys.get("Modality")
        if modalities:
            study_q["ModalitiesInStudy"] = "\\".join(modalities)
        studies = [ds.StudyInstanceUID for ds in _find(assoc, _query("STUDY", **study_q), "studies")
                   if "StudyInstanceUID" in ds and _matches(ds, q.study_keys)]  # fmt: skip
        for study in studies:
            series_q = {"StudyInstanceUID": study, "SeriesInstanceUID": "", "Modality": ""}
            for key, values in q.series_keys.items():
                series_q[key] = "\\".join(values)
            series = [ds.SeriesInstanceUID for ds in _find(assoc, _query("SERIES", **series_q), "series")
                      if "SeriesInstanceUID" in ds and _matches(ds, q.series_keys)]  # fmt: skip
            for uid in series:
                image_q = _query("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=uid, SOPInstanceUID="")
                for ds in _find(assoc, image_q, "instances"):
                    sop = str(ds.get("SOPInstanceUID", ""))
                    if sop:
                        store.add_remote(f"dicom:{sop}", f"{study}/{uid}/{sop}")
                        found += 1
    finally:
        assoc.release()
    store.forget_unseen()
    return found


def pacs_items(q: PacsQuery, store: Store, fingerprint: str, keep: Callable[[str], bool]) -> Iterator[Item]:
    """The pending instances as they arrive from the PACS. A thread reads the pending instances series by series
    (its own connection to the state file) and retrieves them; arrivals wait in a bounded queue. Memory stays
    bounded by one series' UIDs and the queue, however large the archive."""
    arrived: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_FILMS)
    done = object()
    counts = {"requested": 0, "received": 0}
    stop = threading.Event()
    retriever = threading.Thread(target=_retrieve, args=(q, store.path, fingerprint, arrived, done, counts, stop),
                                 daemon=True, name="pacs-retrieve")  # fmt: skip
    retriever.start()
    try:
        while True:
            got = arrived.get()
            if got is done:
                break
            if isinstance(got, Exception):
                raise got
            sop, path, data = got
            key = f"dicom:{sop}"
            if store.is_pending(key, fingerprint):  # not an instance the PACS gained since the C-FIND, nor a repeat
                yield Item(key, path, data=data, thumb=keep(key))
    finally:  # the end, or the driver stopped (Ctrl-C): the retrieve ends cleanly, its association released
        stop.set()
        while retriever.is_alive():
            with contextlib.suppress(queue.Empty):
                arrived.get(timeout=0.1)  # unblock a C-STORE handler waiting for room
        retriever.join()
    missing = counts["requested"] - counts["received"]
    if missing > 0:
        log.warning("%d of %d instances asked for did not arrive", missing, counts["requested"])


def _series_groups(db_path: Any, fingerprint: str) -> Iterator[tuple[str, str, list[str], bool]]:
    """(study, series, pending SOP Instance UIDs, whether that is the whole series) in the order found, at most
    RETRIEVE_UIDS UIDs a group."""
    reader = Store.reader(db_path)
    try:
        group: list[str] = []
        current: tuple[str, str] | None = None
        for _key, path, _ in reader.pending(fingerprint):
            study, series, sop = path.split("/")
            if (study, series) != current or len(group) >= RETRIEVE_UIDS:
                if current and group:
                    yield (*current, group, len(group) == reader.count_series(*current))
                current, group = (study, series), []
            group.append(sop)
        if current and group:
            yield (*current, group, len(group) == reader.count_series(*current))
    finally:
        reader.close()


def _retrieve(q: PacsQuery, db_path: Any, fingerprint: str, arrived: queue.Queue[Any], done: object,
              counts: dict[str, int], stop: threading.Event) -> None:  # fmt: skip
    groups = (g for g in _series_groups(db_path, fingerprint) if not stop.is_set())
    try:
        (_by_move if q.retrieve == "move" else _by_get)(q, groups, arrived, counts, stop)
    except Exception as exc:  # handed to the driver, which stops the sweep with it
        arrived.put(exc if isinstance(exc, PacsError) else PacsError(f"retrieve: {exc}"))
    finally:
        arrived.put(done)


class _Target:
    """The series being retrieved (C-GET and C-MOVE retrieve one at a time), so an arrival knows its path."""

    study = series = ""


def _on_store(arrived: queue.Queue[Any], target: _Target, counts: dict[str, int],
              stop: threading.Event) -> Callable[[Any], int]:  # fmt: skip
    def handle(event: Any) -> int:
        if stop.is_set():
            return 0xA702  # out of resources: the sweep is stopping (the PACS ends the retrieve)
        data = bytes(event.encoded_dataset())  # preamble, file meta and the dataset exactly as received
        sop = str(event.request.AffectedSOPInstanceUID)
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                arrived.put((sop, f"{target.study}/{target.series}/{sop}", data), timeout=0.5)  # waits for workers
                counts["received"] += 1
                return 0x0000
        return 0xA702

    return handle


def _identifier(target: _Target, study: str, series: str, sops: list[str], whole: bool) -> Any:
    target.study, target.series = study, series
    if whole:
        return _query("SERIES", StudyInstanceUID=study, SeriesInstanceUID=series)
    return _query("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID="\\".join(sops))


def _check(status: Any, what: str) -> None:
    if status is None:
        raise PacsError(f"{what}: no answer (timed out or aborted)")
    code = int(status.Status)
    if code not in (0x0000, 0xFF00, 0xB000):  # success, pending, warning (some sub-operations failed: counted later)
        raise PacsError(f"{what} failed: status 0x{code:04X}")


def _by_get(q: PacsQuery, groups: Iterator[tuple[str, str, list[str], bool]], arrived: queue.Queue[Any],
            counts: dict[str, int], stop: threading.Event) -> None:  # fmt: skip
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    target = _Target()
    ae = _ae(q)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for uid in STORAGE_CLASSES:
        ae.add_requested_context(uid, list(TRANSFER_SYNTAXES))
    roles = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]
    assoc = _associate(ae, q, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, _on_store(arrived, target, counts, stop))])
    try:
        for study, series, sops, whole in groups:
            counts["requested"] += len(sops)
            ident = _identifier(target, study, series, sops, whole)
            for status, _ in assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet):
                _check(status, "C-GET")
    finally:
        assoc.release()


def _by_move(q: PacsQuery, groups: Iterator[tuple[str, str, list[str], bool]], arrived: queue.Queue[Any],
             counts: dict[str, int], stop: threading.Event) -> None:  # fmt: skip
    from pynetdicom import evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    target = _Target()
    ae = _ae(q)
    for uid in STORAGE_CLASSES:
        ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
    scp = ae.start_server(("", q.move_port), block=False,
                          evt_handlers=[(evt.EVT_C_STORE, _on_store(arrived, target, counts, stop))])  # fmt: skip
    try:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = _associate(ae, q)
        try:
            for study, series, sops, whole in groups:
                counts["requested"] += len(sops)
                ident = _identifier(target, study, series, sops, whole)
                for status, _ in assoc.send_c_move(ident, q.calling_ae, StudyRootQueryRetrieveInformationModelMove):
                    _check(status, "C-MOVE")
        finally:
            assoc.release()
    finally:
        scp.shutdown()
