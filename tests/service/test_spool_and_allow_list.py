"""The spool's atomic moves and recovery, and the sender allow-list."""

from __future__ import annotations

from service.config import ListenerConfig, SenderRule
from service.listener import HEALTHCHECK_AE, sender_allowed
from service.spool import Spool, calling_ae_of, received_at, safe_component, uid_of


def test_persist_claim_finish_and_recover(tmp_path):
    spool = Spool(tmp_path)
    a = spool.persist(b"first", "1.2.3", "PACS_1")
    assert calling_ae_of(a.name) == "PACS_1" and uid_of(a.name) == "1.2.3" and received_at(a.name) > 1.7e9
    b = spool.persist((b"sec", b"ond"), "1.2.3")  # the same UID twice: two files, both kept
    assert a != b and [p.name for p in spool.pending()] == [a.name, b.name]
    assert b.read_bytes() == b"second"
    claimed = spool.claim(a)
    assert claimed is not None and spool.claim(a) is None  # only one worker wins
    assert spool.depth() == {"incoming": 1, "claimed": 1}
    (spool.tmp / "partial.tmp").write_bytes(b"x")
    # A new process: what was claimed goes back to incoming, partial writes are dropped.
    again = Spool(tmp_path)
    assert again.recover() == 1
    assert again.depth() == {"incoming": 2, "claimed": 0} and not list(again.tmp.iterdir())
    c = again.claim(again.pending()[0])
    again.finish(c)
    assert again.depth() == {"incoming": 1, "claimed": 0}


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
