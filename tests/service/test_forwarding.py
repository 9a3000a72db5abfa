"""Forwarding to another DICOM node that is down for part of the run: nothing lost, nothing duplicated, the bytes
forwarded are the bytes received; a node that never answers ends in the dead-letter folder, never dropped."""

from __future__ import annotations

from tests.helpers import Gate, Receiver, dataset_bytes, free_port, sha, storescu, wait_for


def test_forwarding_with_a_peer_down_part_of_the_time(tmp_path, made_films, models_dir):
    pacs = Receiver(free_port(), "PACS")
    dead_port = free_port()  # nobody listens here
    gate = Gate.create(
        tmp_path,
        destinations={
            "pacs": {
                "type": "dicom",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "retries": 60,
                "backoff_initial": 0.2,
                "backoff_factor": 1.5,
                "backoff_max": 0.8,
                "timeout": 10,
            },
            "nowhere": {
                "type": "dicom",
                "ae_title": "NOWHERE",
                "host": "127.0.0.1",
                "port": dead_port,
                "retries": 2,
                "backoff_initial": 0.1,
                "backoff_max": 0.2,
                "timeout": 5,
            },
        },  # fmt: skip
        routes={"accept": ["pacs", "nowhere"], "quarantine": ["pacs", "nowhere"]},
    ).start()
    try:
        m = gate.metrics()  # declared at start: 0, not absent, before anything happens
        assert m['filmgate_dead_letters_total{destination="nowhere"}'] == 0
        assert m['filmgate_delivery_failures_total{destination="pacs"}'] == 0
        first, second = made_films[:5], made_films[5:10]
        expected = {f.uid: sha(dataset_bytes(f.path.read_bytes())) for f in first + second}

        def retries() -> float:  # attempts of an instance that failed before (its first failure is no retry)
            return gate.metrics().get('filmgate_delivery_retries_total{destination="pacs"}', 0)

        # Phase 1: the peer is down when the films arrive.
        assert storescu([f.path for f in first], gate.dicom_port) == []
        wait_for(lambda: retries() >= 3, 60, "retried attempts while the peer is down")
        pacs.start()
        wait_for(lambda: {f.uid for f in first} <= set(pacs.uids()), 60, "first films forwarded")
        # Phase 2: the peer goes down again, more films arrive, and it comes back.
        pacs.stop()
        before = retries()
        assert storescu([f.path for f in second], gate.dicom_port) == []
        wait_for(lambda: retries() >= before + 2, 60, "retried attempts during the second outage")
        pacs.start()
        wait_for(lambda: set(expected) <= set(pacs.uids()), 60, "every film forwarded")
        wait_for(lambda: not list((tmp_path / "spool" / "outbox" / "pacs").glob("*.dcm")), 30, "empty outbox")
        assert sorted(pacs.uids()) == sorted(expected), "nothing lost, nothing duplicated"
        for uid, digest in pacs.received:
            assert digest == expected[uid], "forwarded bytes must be the received bytes"
        # The node that never answers: every instance in its dead-letter folder with a note, none dropped.
        dead = tmp_path / "spool" / "dead-letter" / "nowhere"
        wait_for(lambda: len(list(dead.glob("*.dcm"))) == len(expected), 60, "dead letters")
        assert len(list(dead.glob("*.json"))) == len(expected)
        m = gate.metrics()
        assert m['filmgate_dead_letters_total{destination="nowhere"}'] == len(expected)
        assert m['filmgate_delivery_retries_total{destination="pacs"}'] >= 5
        assert m.get('filmgate_dead_letters_total{destination="pacs"}', 0) == 0
        assert m['filmgate_delivery_attempts_total{destination="nowhere"}'] == 3 * len(expected)
    finally:
        pacs.stop()
        assert gate.stop() == 0


def test_a_restart_continues_the_retry_count_from_the_outbox_sidecar(tmp_path, made_films):
    """The retry count of an instance waiting for a DICOM node survives a restart (the spool's JSON sidecar): with
    one retry allowed, an instance that failed once before the restart goes to the dead-letter folder after one more
    failed attempt, instead of starting the count (and its back-off) again."""
    import json
    import shutil
    import time

    from filmgate.config import DicomDestinationConfig
    from filmgate.destinations import DicomDestination
    from filmgate.spool import Spool

    cfg = DicomDestinationConfig(name="nowhere", ae_title="NOWHERE", host="127.0.0.1", port=free_port(), retries=1,
                                 backoff_initial=60.0, timeout=5)  # fmt: skip
    spool = Spool(tmp_path / "spool")
    first = DicomDestination(cfg, spool)
    film = tmp_path / "film.dcm"
    shutil.copyfile(made_films[0].path, film)
    queued = first.outbox / "film.dcm"
    shutil.copyfile(film, queued)
    sidecar = first.outbox / "film.retry.json"
    first.start()
    wait_for(sidecar.exists, 30, "the first failed attempt recorded")
    first.stop(10)
    state = json.loads(sidecar.read_text())
    assert state["attempts"] == 1 and state["destination"] == "nowhere" and "last_error" in state
    assert queued.exists(), "a failed instance stays in the outbox"

    second = DicomDestination(cfg, Spool(tmp_path / "spool"))
    started = time.monotonic()
    second.start()
    try:
        dead = second.dead / "film.dcm"
        wait_for(dead.exists, 30, "dead letter after the one retry left")
        assert time.monotonic() - started < 30, "the restart must not wait out the 60 s back-off again"
        note = json.loads((second.dead / "film.json").read_text())
        assert note["attempts"] == 2
        assert not queued.exists() and not sidecar.exists()
        assert sha(dead.read_bytes()) == sha(film.read_bytes())
    finally:
        second.stop(10)
