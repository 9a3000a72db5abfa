"""The spool's atomic moves and recovery, and the sender allow-list."""

from __future__ import annotations

import time

import pytest

from filmgate.config import ListenerConfig, SenderRule
from filmgate.listener import HEALTHCHECK_AE, sender_allowed
from filmgate.record import Arrival
from filmgate.spool import Spool, safe_component
from tests.helpers import Gate, wait_for


def test_persist_claim_finish_and_recover(tmp_path):
    spool = Spool(tmp_path)
    a = spool.persist(b"first", Arrival(received_at=time.time(), calling_ae="PACS_1", sop_instance_uid="1.2.3"))
    arrival = spool.arrival(a)  # the record beside the instance, not its file name
    assert arrival.calling_ae == "PACS_1" and arrival.sop_instance_uid == "1.2.3" and arrival.received_at > 1.7e9
    b = spool.persist((b"sec", b"ond"), Arrival(received_at=time.time(), sop_instance_uid="1.2.3"))  # the same UID
    # twice: two files, both kept
    assert a != b and [p.name for p in spool.pending()] == [a.name, b.name]
    assert b.read_bytes() == b"second"
    claimed = spool.claim(a)
    assert claimed is not None and spool.claim(a) is None  # only one worker wins
    assert spool.arrival(claimed) == arrival  # the record stays put while the instance moves
    assert spool.depth() == {"incoming": 1, "claimed": 1}
    (spool.tmp / "partial.tmp").write_bytes(b"x")
    # A new process: what was claimed goes back to incoming, partial writes are dropped.
    again = Spool(tmp_path)
    assert again.recover() == 1
    assert again.depth() == {"incoming": 2, "claimed": 0} and not list(again.tmp.iterdir())
    c = again.claim(again.pending()[0])
    again.finish(c)
    assert again.depth() == {"incoming": 1, "claimed": 0}
    assert sorted(p.suffix for p in again.incoming.iterdir()) == [".dcm", ".json"], "a finished instance's record goes"


def test_an_instance_spooled_by_the_previous_version_keeps_its_arrival(tmp_path):
    """The previous version named spooled files <ns><seq>_<calling AE hex>_<UID>.dcm and kept no record: after an
    upgrade such files are still claimed, and their sender, UID and receive time are read from the name."""
    spool = Spool(tmp_path)
    old = spool.incoming / f"{1_760_000_000_123_456_789:020d}007_{b'OLDPACS'.hex()}_1.2.3.4.dcm"
    old.write_bytes(b"bytes of the previous version")
    orphan = spool.incoming / "00000000000000000001001.json"  # a record whose instance is gone
    orphan.write_text("{}")
    assert spool.recover() == 0 and not orphan.exists()
    claimed = spool.claim(spool.pending()[0])
    assert claimed is not None
    assert spool.arrival(claimed) == Arrival(
        received_at=1_760_000_000.123456789, calling_ae="OLDPACS", sop_instance_uid="1.2.3.4"
    )


def test_unsafe_uids_become_safe_path_components():
    assert safe_component("../../etc/passwd") == "_.._etc_passwd"
    assert safe_component("") == "unknown"
    assert safe_component("1.2.840.10008") == "1.2.840.10008"


def test_default_allow_list_is_loopback_only():
    rules = ListenerConfig().allow
    assert sender_allowed(rules, "ANY", "127.0.0.1")
    assert sender_allowed(rules, "ANY", "::1")
    assert sender_allowed(rules, "ANY", "::ffff:127.0.0.1")
    assert not sender_allowed(rules, "ANY", "10.1.2.3")


def test_allow_list_rules_match_title_and_host():
    rules = (SenderRule("PACS", ("10.0.0.0/8",)), SenderRule("MODALITY"))
    assert sender_allowed(rules, "PACS", "10.2.3.4")
    assert not sender_allowed(rules, "PACS", "192.168.1.1")
    assert sender_allowed(rules, "MODALITY", "192.168.1.1")
    assert not sender_allowed(rules, "OTHER", "10.2.3.4")
    assert sender_allowed(rules, HEALTHCHECK_AE, "127.0.0.1")
    assert not sender_allowed(rules, HEALTHCHECK_AE, "10.2.3.4")


def test_the_running_node_removes_what_aborted_transfers_left_in_tmp(tmp_path):
    """A partial file under spool/tmp that nobody writes to any more (an aborted transfer) goes while the node runs;
    one that is still being written to (a live, slow transfer) stays."""
    import os
    import threading
    import time

    gate = Gate.create(tmp_path, spool={"stale_tmp_seconds": 2.0}, listener={"network_timeout": 1.0}).start()
    tmp = tmp_path / "spool" / "tmp"
    stale, live = tmp / "aborted-transfer", tmp / "live-transfer"
    stale.write_bytes(b"half a dataset")
    os.utime(stale, (time.time() - 10, time.time() - 10))
    writing = threading.Event()

    def keep_writing() -> None:
        with open(live, "ab") as fh:
            while not writing.wait(0.2):
                fh.write(b"x")
                fh.flush()

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        wait_for(lambda: not stale.exists(), 30, "the stale partial file removed")
        # Another aborted transfer after that sweep: once it is gone too, later sweeps have run with the live one.
        later = tmp / "aborted-later"
        later.write_bytes(b"half a dataset")
        os.utime(later, (time.time() - 10, time.time() - 10))
        wait_for(lambda: not later.exists(), 30, "a later sweep")
        assert live.exists(), "a file still being written to must stay"
        assert "removed 1 partial file" in gate.log()
    finally:
        writing.set()
        writer.join(5)
        assert gate.stop() == 0


def test_stale_tmp_age_shorter_than_the_network_timeout_is_a_config_error():
    from filmgate.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="^spool.stale_tmp_seconds"):
        parse_config({"spool": {"stale_tmp_seconds": 30}, "listener": {"network_timeout": 60}})
