"""The fault and fuzz harness in CI (issue 9, item 9): the real node, in its own process group with a memory limit and
its spool on a small tmpfs in a mount namespace, takes PDU-length bombs, garbage PDUs, idle connections, an
association flood, a few hundred mutated and hostile datasets, a full spool, a destination that refuses and goes
down, and one that is down throughout; afterwards it answers C-ECHO, stayed under its memory limit, holds nothing in
its spool, and every acknowledged instance is, byte for byte, exactly once at each destination of its route or in
that destination's dead letter. The metrics count what happened. ``bench/fault_soak.py`` is the long run."""

from __future__ import annotations

import random

import pytest

from tests.fault_harness import Harness, echo, idle_connections

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]


def test_the_node_survives_the_fault_and_fuzz_harness(tmp_path, val_films):
    rng = random.Random(9)
    h = Harness(tmp_path, films=val_films["adult"], memory_limit=2 << 30)
    try:
        with h.phase("start"):
            h.start()
        port = h.node.dicom_port
        idle = idle_connections(port, 24)  # more than listener.max_associations, never saying a word
        try:
            with h.phase("valid"):
                h.valid(5, seed=1)
            assert h.ledger.answers[0] == 5, f"legitimate senders store while idle connections hang: {h.ledger.answers}"
            with h.phase("network"):
                h.network_attacks(rng)
            assert h.events["accepted"] >= 1
            with h.phase("datasets"):
                h.datasets(300, seed=1)
            with h.phase("full-spool"):
                answer = h.full_spool()
            assert answer == 0xA700, f"a full spool answers 0xA700 (out of resources), got {answer}"
            before = h.ledger.answers[0]
            h.valid(3, seed=2)
            assert h.ledger.answers[0] == before + 3, "storing works again once the spool has room"
            with h.phase("outage"):
                h.pacs_outage(2.0)
        finally:
            for s in idle:
                s.close()
        with h.phase("drain"):
            h.drain()
        print(h.seconds, dict(h.events), dict(h.ledger.answers), h.ledger.silent)
        # Every C-STORE gets an answer (the sender is pynetdicom with filmgate's patches: unpatched, pynetdicom's own
        # requestor race loses about 1 answer in 250-500 under load; docs/OPERATIONS.md).
        assert h.ledger.silent == [], f"C-STOREs the node never answered: {h.ledger.silent}"
        assert echo(port), "C-ECHO answers after all that"
        figures = h.account()
        assert h.node.peak_rss < h.memory_limit, f"the node's memory peaked at {h.node.peak_rss >> 20} MiB"
        print(figures, h.node.peak_rss >> 20, "MiB")
        assert figures["acknowledged"] >= 100 and figures["quarantined"] >= 50, figures
        assert figures["pacs_dead"] >= 1, "RLE/J2K films the PACS refuses are dead letters"
        m = h.node.metrics()
        received = sum(v for k, v in m.items() if k.startswith("filmgate_instances_received_total"))
        acked = sum(h.ledger.acked.values())
        unsure = h.ledger.answers[None] + h.ledger.answers["unsendable"]  # stored, maybe, but not confirmed to us
        assert acked <= received <= acked + unsure
        for status in (0xC210, 0xA700):  # an answer the sender never got was still counted by the node
            counted = m[f'filmgate_store_failures_total{{status="0x{status:04X}"}}']
            assert h.ledger.answers[status] <= counted <= h.ledger.answers[status] + unsure, status
        assert h.ledger.answers[0xA700] >= 1
        decided = sum(v for k, v in m.items() if k.startswith("filmgate_decisions_total"))
        assert decided == received, "each instance received is decided once"
        assert m['filmgate_dead_letters_total{destination="pacs"}'] == figures["pacs_dead"]
        assert m['filmgate_dead_letters_total{destination="archive"}'] == figures["archive_dead"]
        reasons = {k: v for k, v in m.items() if k.startswith("filmgate_quarantine_reasons_total{")}
        undecodable = sum(v for k, v in reasons.items() if 'reason="undecodable"' in k)
        # A folder keeps identical bytes once: a metric counts each instance received, a sidecar each file.
        again = acked - len(h.ledger.acked) + unsure
        sidecars = h.sidecars()
        quarantined_undecodable = sum(1 for r in sidecars if "undecodable" in r["reasons"])
        assert quarantined_undecodable <= undecodable <= quarantined_undecodable + again
        crashed = sum(1 for r in sidecars if r.get("notes", {}).get("error", "").startswith("the decoder crashed"))
        restarted = m.get('filmgate_decode_restarts_total{cause="crash"}', 0)
        assert crashed <= restarted <= crashed + again
        assert h.node.stop() == 0
    finally:
        h.close()
