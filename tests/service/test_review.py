"""Quarantine as a workflow, end to end on a real node: a real Chromium (Debian's, driven by Playwright) logs in, sees
the thumbnails, filters by reason and releases a film with the keyboard; the film reaches a real DICOM receiver
byte-identical, and the index, the sidecar and the audit log say who released it. The API refuses what it must (401,
403 for a viewer, a POST without the CSRF token, throttled logins); labels set in the console are read by a short
training run; shadow mode delivers everything to the accept route and records the would-be decisions (over HTTPS,
with the audit trail also sent as RFC 5424 syslog)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from filmgate.review.auth import hash_password, verify_password
from tests.helpers import (
    REPO,
    Gate,
    Receiver,
    dataset_bytes,
    free_port,
    self_signed,
    sha,
    storescu,
    wait_for,
)  # fmt: skip

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PASSWORDS = {"ann": "ann-reviews-films", "vic": "vic-only-looks"}
PATIENT = ("Test^Film", "TEST-0001")  # what make_dicom writes: must never reach the audit log


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {name: hash_password(pw) for name, pw in PASSWORDS.items()}


def review_cfg(hashes, **extra) -> dict:
    return {
        "enabled": True,
        "max_failed_logins": 3,
        "users": [
            {"name": "ann", "role": "reviewer", "password_hash": hashes["ann"]},
            {"name": "vic", "role": "viewer", "password_hash": hashes["vic"]},
        ],
        **extra,
    }


def films(made_films, *notes):
    by_note = {f.note: f for f in made_films}
    return [by_note[n] for n in notes]


def audit(gate: Gate) -> list[dict]:
    path = gate.root / "spool" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def decided(gate: Gate, n: int) -> list[dict]:
    def ready():
        items = gate.api_json("/api/instances?limit=100", "ann", PASSWORDS["ann"])["items"]
        return items if len(items) >= n and all(i["outcome"] for i in items) else None

    return wait_for(ready, 120, f"{n} decided instances in the index")


@pytest.fixture(scope="module")
def node(tmp_path_factory, made_films, models_dir, hashes):
    """A node whose accept route is a real DICOM receiver and whose quarantine is a folder, with films sent."""
    root = tmp_path_factory.mktemp("review")
    pacs = Receiver(free_port(), "PACS")
    pacs.start()
    gate = Gate.create(
        root,
        workers={"processes": 1, "drain_timeout": 10.0},
        destinations={
            "pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "retries": 3,
                     "backoff_initial": 0.2},  # fmt: skip
            "quarantine": {"type": "folder", "path": str(root / "quarantine"),
                           "layout": "{reason}/{SOPInstanceUID}.dcm"},  # fmt: skip
        },
        routes={"accept": ["pacs"], "quarantine": ["quarantine"]},
        review=review_cfg(hashes, show_patient=True),
        http={"public": {"metrics": False}},
        listener={"allow": [{"ae_title": "TESTSCU", "hosts": ["127.0.0.1"]}]},
    ).start()
    sent = films(made_films, "normal-0", "rot90-0", "rot180-0", "inverted-0")
    assert not storescu([f.path for f in sent], gate.dicom_port)
    decided(gate, len(sent))
    yield gate, pacs, {f.uid: f for f in sent}
    gate.stop()
    pacs.stop()


def until(page, js: str, what: str, timeout: float = 30.0):
    """Poll a condition in the page (page.wait_for_function would need 'unsafe-eval', which the console's CSP
    forbids, as it should)."""
    return wait_for(lambda: page.evaluate(js), timeout, what, interval=0.05)


def test_browser_logs_in_filters_and_releases_by_keyboard(node):
    from playwright.sync_api import sync_playwright

    gate, pacs, sent = node
    rotated = {uid for uid, f in sent.items() if f.reason == "rotated"}
    base = f"http://127.0.0.1:{gate.http_port}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto(base + "/")
        assert "/login" in page.url  # no session: the console sends the browser to the login page
        page.fill("input[name=user]", "ann")
        page.fill("input[name=password]", PASSWORDS["ann"])
        page.click("button[type=submit]")
        page.wait_for_selector(".tile")
        assert page.locator(".tile").count() == len(sent)
        until(page, "Array.from(document.querySelectorAll('.tile img')).every(i => i.complete && i.naturalWidth > 0)",
              "every thumbnail loaded")
        page.select_option("#filter-reason", "rotated")
        page.click(".filters button[type=submit]")
        page.wait_for_url("**reason=rotated**")
        tiles = page.locator(".tile")
        assert tiles.count() == len(rotated)
        target = tiles.first.get_attribute("data-id")
        page.keyboard.press("ArrowRight")  # the first tile has focus; move and back, as a person would
        page.keyboard.press("ArrowLeft")
        assert page.evaluate("document.activeElement.dataset.id") == target
        page.keyboard.press("r")
        until(page, "document.getElementById('status').textContent.startsWith('Released 1 of 1')", "the release")
        assert page.locator(f".tile[data-id='{target}']").get_attribute("data-review") == "released"
        # the detail view opens by keyboard and shows the scores and the reviewer
        page.locator(f".tile[data-id='{target}']").focus()
        page.keyboard.press("Enter")
        page.wait_for_selector("#detail[open] table")
        assert "released by ann" in page.text_content("#detail h2")
        assert "orientation" in page.text_content("#detail")
        assert PATIENT[1] in page.text_content("#detail")  # review.show_patient: true on this node
        page.keyboard.press("1")  # the true class of the detector that flagged it: orientation's first, "upright"
        until(page, "document.getElementById('status').textContent.startsWith('Labels saved')", "the relabel")
        page.keyboard.press("Escape")
        # a selection: every film still awaiting review, confirmed at once
        page.goto(base + "/?review_state=pending")
        pending = page.locator(".tile").count()
        assert pending == len(sent) - 2  # not the accepted film, not the released one
        for i in range(pending):  # every film's details open (one carries the decision's notes) and close
            page.locator(".tile").nth(i).focus()
            page.keyboard.press("Enter")
            page.wait_for_selector("#detail[open] table")
            page.keyboard.press("Escape")
            page.wait_for_selector("#detail:not([open])", state="attached")
        page.select_option("#bulk-detector", "pediatric")  # a selection relabelled at once: "1" = adult
        page.locator(".tile").first.focus()
        page.keyboard.press("a")
        page.keyboard.press("1")
        until(page, f"document.getElementById('status').textContent.startsWith('Relabelled {pending} of {pending}')",
              "the relabel of the selection")  # fmt: skip
        page.keyboard.press("c")
        until(page, f"document.getElementById('status').textContent.startsWith('Confirmed {pending} of {pending}')",
              "the confirmation of the selection")  # fmt: skip
        page.click("a[href='/studies']")
        page.wait_for_selector("#studies")
        assert page.locator("#studies tr").count() == 1 + len(sent)  # every film is its own study here
        browser.close()
    assert errors == [], errors  # no script error, no failed request (CSP included) on any page
    item = gate.api_json(f"/api/instances/{target}", "ann", PASSWORDS["ann"])
    uid = item["sop_instance_uid"]
    assert uid in rotated and item["review_state"] == "released" and item["reviewed_by"] == "ann"
    assert item["labels"]["orientation"]["label"] == "upright" and item["labels"]["orientation"]["user"] == "ann"
    assert item["patient"] == {"name": PATIENT[0], "id": PATIENT[1]}
    # the original bytes at a real DICOM receiver, byte for byte
    wait_for(lambda: uid in pacs.uids(), 60, "the released film at the receiver")
    got = dict(pacs.received)[uid]
    assert got == sha(dataset_bytes(sent[uid].path.read_bytes()))
    wait_for(lambda: any(d["destination"] == "pacs" and d["state"] == "delivered" for d in
                         gate.api_json(f"/api/instances/{target}", "ann", PASSWORDS["ann"])["deliveries"]),
             30, "the index records the delivery to the receiver")  # fmt: skip
    events = audit(gate)
    assert any(e["event"] == "released" and e["user"] == "ann" and e["sop_instance_uid"] == uid for e in events)
    assert any(e["event"] == "login" and e["user"] == "ann" for e in events)
    sidecar = next((gate.root / "quarantine").rglob(f"{uid}.json"))
    assert json.loads(sidecar.read_text())["released_by"] == "ann"
    # only the released film of the quarantined ones reached the receiver; the accepted one went there directly
    normal = next(u for u, f in sent.items() if f.expect == "accept")
    assert set(pacs.uids()) == {uid, normal}
    text = (gate.root / "spool" / "audit.jsonl").read_text()
    assert PATIENT[0] not in text and PATIENT[1] not in text
    for db in (gate.root / "spool" / "state").glob("index.sqlite*"):  # nor in the index (read from the kept bytes)
        assert PATIENT[0].encode() not in db.read_bytes() and PATIENT[1].encode() not in db.read_bytes()
    assert any(e["event"] == "confirmed" and e["user"] == "ann" for e in events)
    for kind in ("association-accepted", "stored", "decided", "delivered"):
        assert any(e["event"] == kind for e in events), kind


def test_api_refuses_without_login_viewer_release_and_missing_csrf(node):
    gate, _, _ = node
    assert gate.api("/api/instances")[0] == 401
    assert gate.api("/")[0] == 303  # the page redirects to the login
    items = gate.api_json("/api/instances?outcome=quarantine&review_state=confirmed", "vic", PASSWORDS["vic"])["items"]
    assert items and all(i["outcome"] == "quarantine" for i in items)
    iid = items[0]["id"]
    code, body, _ = gate.api(f"/api/instances/{iid}/release", user="vic", password=PASSWORDS["vic"], method="POST",
                             body=b"")  # fmt: skip
    assert code == 403 and b"viewer" in body
    # a page session: POST without the CSRF token is refused, with it the reviewer's action passes
    form = f"user=ann&password={PASSWORDS['ann']}".encode()
    code, _, headers = gate.api("/login", method="POST", body=form,
                                headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert code == 303
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    code, page, _ = gate.api("/", headers={"Cookie": cookie})
    assert code == 200
    csrf = page.decode().split('name="csrf-token" content="')[1].split('"')[0]
    url = f"/api/instances/{iid}/confirm"
    assert gate.api(url, method="POST", body=b"", headers={"Cookie": cookie})[0] == 403
    assert gate.api(url, method="POST", body=b"", headers={"Cookie": cookie, "X-CSRF-Token": "forged"})[0] == 403
    code, body, _ = gate.api(url, method="POST", body=b"", headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert code == 200 and json.loads(body)["review_state"] == "confirmed"
    # another site's page cannot use a script's Basic credentials either
    code, _, _ = gate.api(url, user="ann", password=PASSWORDS["ann"], method="POST", body=b"",
                          headers={"Origin": "http://evil.example"})  # fmt: skip
    assert code == 403
    # the operational endpoints: /metrics needs a login here (http.public.metrics: false), /healthz does not
    assert gate.api("/metrics")[0] == 401 and gate.api("/healthz")[0] == 200
    code, body, _ = gate.api("/metrics", user="vic", password=PASSWORDS["vic"])
    assert code == 200 and b"filmgate_review_pending" in body
    # a sender the allow-list refuses: in the audit trail with its AE title and address
    assert storescu([sent_film(node)], gate.dicom_port, aet="EVIL")
    assert any(e["event"] == "association-refused" and e["calling_ae"] == "EVIL" and e["address"] == "127.0.0.1"
               for e in audit(gate))  # fmt: skip
    # a thumbnail lost from the index is made again from the kept bytes by the judge's decode
    import sqlite3

    with sqlite3.connect(gate.root / "spool" / "state" / "index.sqlite") as db:
        db.execute("DELETE FROM thumbnails WHERE instance_id = ?", (iid,))
    code, png, headers = gate.api(f"/api/instances/{iid}/thumbnail.png", user="vic", password=PASSWORDS["vic"])
    assert code == 200 and png.startswith(b"\x89PNG") and headers["Content-Type"] == "image/png"
    studies = gate.api_json("/api/studies", "vic", PASSWORDS["vic"])
    assert studies["total"] == 4 and {s["instances"] for s in studies["items"]} == {1}


def sent_film(node):
    return next(iter(node[2].values())).path


def login_cookie(gate: Gate, user: str) -> str:
    form = f"user={user}&password={PASSWORDS[user]}".encode()
    code, _, headers = gate.api("/login", method="POST", body=form,
                                headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert code == 303, code
    return headers["Set-Cookie"].split(";")[0]


def test_console_labels_are_read_by_a_short_training_run(node, tmp_path, monkeypatch):
    from filmgate_training.config import config_from_dict
    from filmgate_training.data import split_train
    from filmgate_training.tasks import get_task
    from filmgate_training.train import fit

    gate, _, sent = node
    quarantined = gate.api_json("/api/instances?outcome=quarantine", "ann", PASSWORDS["ann"])["items"]
    ids = [i["id"] for i in quarantined]
    for iid in ids:  # "this film is an adult's" (the console's relabel, as the page posts it)
        body = json.dumps({"pediatric": "adult"}).encode()
        assert gate.api(f"/api/instances/{iid}/labels", user="ann", password=PASSWORDS["ann"], method="POST",
                        body=body)[0] == 200  # fmt: skip
    code, body, _ = gate.api(f"/api/instances/{ids[0]}/labels", user="ann", password=PASSWORDS["ann"],
                             method="POST", body=b'{"pediatric": "elderly"}')  # fmt: skip
    assert code == 400 and b"unknown label" in body
    code, body, headers = gate.api("/api/labels.csv", user="vic", password=PASSWORDS["vic"])
    assert code == 200 and headers["Content-Type"].startswith("text/csv")
    rows = body.decode().splitlines()
    assert rows[0].startswith("file,sop_instance_uid,detector,label")
    adult = {r.rsplit(",", 1)[1] for r in rows[1:] if ",pediatric,adult," in r}  # ids: the browser's and these
    assert {str(i) for i in ids} <= adult and len(adult) == len(sent) - 1  # every quarantined film, once each
    assert any(e["event"] == "relabelled" and e["user"] == "ann" for e in audit(gate))
    # the training package reads the node's export directly (HTTP Basic from the environment)
    monkeypatch.setenv("FILMGATE_REVIEW_AUTH", f"vic:{PASSWORDS['vic']}")
    url = f"http://127.0.0.1:{gate.http_port}/api/labels.csv"
    config = config_from_dict({
        "task": "pediatric", "preprocessing": {"size": 64, "resize": "letterbox", "normalize": "zscore"},
        "data": {"cache_dir": str(tmp_path / "cache"), "max_train_films": 6, "max_val_films": 2, "workers": 1,
                 "calibration_fraction": 0.0, "review": [{"labels": url, "source": "site-review"}]},
        "model": {"widths": [8, 16], "dropout": 0.0},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "progress": False},
        "run_dir": str(tmp_path / "run"), "models_dir": str(tmp_path / "models"),
    })  # fmt: skip
    train, _ = split_train(config, get_task("pediatric"))
    site = [f for f in train if f.source == "site-review"]
    assert len(site) == len(adult) and all(Path(f.path).is_file() for f in site)
    run = fit(config)
    import torch

    blob = torch.load(run, weights_only=False)
    assert blob["steps"] == 2 and blob["train_films"]["site-review"] == len(adult)  # what the model card lists


def test_failed_logins_are_counted_and_throttled(node):
    gate, _, _ = node
    cookie = login_cookie(gate, "vic")  # a session opened before the attack keeps working
    codes = [gate.api("/api/instances", user="mallory", password=f"guess{i}")[0] for i in range(5)]
    assert codes[:3] == [401, 401, 401] and codes[3:] == [429, 429]
    # the address is refused for the window, even with the right password (the check is not even made)
    assert gate.api("/api/instances", user="ann", password=PASSWORDS["ann"])[0] == 429
    failed = [e for e in audit(gate) if e["event"] == "login-failed"]
    assert any(e["user"] is None and e["known_user"] is False for e in failed)  # not a user: the name is not kept
    assert not any("mallory" in json.dumps(e) for e in failed)
    code, body, _ = gate.api("/metrics", headers={"Cookie": cookie})
    text = body.decode()
    assert code == 200 and 'filmgate_logins_total{method="basic",result="failed"} 3.0' in text
    assert 'filmgate_logins_total{method="basic",result="throttled"} 3.0' in text
    assert 'filmgate_reviewed{reason="rotated",state="released"} 1.0' in text


def test_hash_password_reads_stdin_and_config_checks_users(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "filmgate.cli", "hash-password"], input="a long passphrase\n",
                          capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stored = proc.stdout.strip()
    assert stored.startswith("scrypt$") and verify_password("a long passphrase", stored)
    assert not verify_password("a long passphrasf", stored)
    assert stored != hash_password("a long passphrase")  # salted
    short = subprocess.run([sys.executable, "-m", "filmgate.cli", "hash-password"], input="short\n",
                           capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert short.returncode == 2
    from filmgate.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"review\.users\[0\]\.role"):
        parse_config({"review": {"users": [{"name": "a", "role": "admin", "password_hash": stored}]}})
    with pytest.raises(ConfigError, match=r"review\.users\[0\]\.password_hash"):
        parse_config({"review": {"users": [{"name": "a", "role": "viewer", "password_hash": "secret"}]}})
    with pytest.raises(ConfigError, match=r"review\.users: the console is on but nobody can log in"):
        parse_config({"review": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"index\.retention_days: 7 is shorter than review\.retention_days"):
        parse_config({"index": {"retention_days": 7}})
    with pytest.raises(ConfigError, match=r"policy\.mode"):
        parse_config({"policy": {"mode": "dry-run"}})


def test_shadow_mode_delivers_everything_and_records_would_be_decisions(tmp_path, made_films, models_dir, hashes):
    """Shadow mode over HTTPS, with the audit trail also sent as RFC 5424 syslog over UDP."""
    cert, key = self_signed(tmp_path)
    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", 0))
    syslog.settimeout(0.2)
    gate = Gate.create(
        tmp_path,
        workers={"processes": 0},
        policy={"mode": "shadow"},
        review=review_cfg(hashes),
        http={"tls": {"enabled": True, "cert_file": str(cert), "key_file": str(key)}},
        audit={"syslog": {"enabled": True, "address": f"127.0.0.1:{syslog.getsockname()[1]}", "protocol": "udp"}},
    ).start()
    try:
        sent = films(made_films, "normal-1", "rot90-1", "inverted-1", "ct")
        assert not storescu([f.path for f in sent], gate.dicom_port)
        delivered = gate.wait_delivered(len(sent))
        assert {r["_folder"] for r in delivered} == {"accept"}, "shadow mode routes every film to accept"
        assert not list((tmp_path / "quarantine").rglob("*.dcm"))
        would = {r["sop_instance_uid"]: r for r in delivered if r["decision"] == "quarantine"}
        expected = {f.uid for f in sent if f.expect == "quarantine"}
        assert set(would) == expected and all(r["shadow"] and r["routed"] == "accept" for r in would.values())
        items = decided(gate, len(sent))
        flagged = [i for i in items if i["outcome"] == "quarantine"]
        assert {i["sop_instance_uid"] for i in flagged} == expected
        assert all(i["shadow"] and i["routed"] == "accept" and i["review_state"] == "pending" for i in flagged)
        detail = gate.api_json(f"/api/instances/{flagged[0]['id']}", "vic", PASSWORDS["vic"])
        assert "patient" not in detail and not detail["kept"]  # show_patient off; delivered, so nothing kept
        code, body, _ = gate.api(f"/api/instances/{flagged[0]['id']}/release", user="ann",
                                 password=PASSWORDS["ann"], method="POST", body=b"")  # fmt: skip
        assert code == 409 and b"shadow mode" in body
        text = gate.api("/metrics")[1].decode()  # public here (the default)
        assert "filmgate_shadow_mode 1.0" in text
        for reason in {r for i in flagged for r in i["reasons"]}:
            n = sum(reason in i["reasons"] for i in flagged)
            assert f'filmgate_shadow_would_quarantine_total{{reason="{reason}"}} {n:.1f}' in text
        assert 'filmgate_routed_total{route="accept"} 4.0' in text
        # the port speaks TLS only, and the container's health check speaks it too
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{gate.http_port}/healthz", timeout=5)
        hc = subprocess.run([sys.executable, "-m", "filmgate.cli", "healthcheck", "--config", str(gate.config_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
        assert hc.returncode == 0 and "healthz ok" in hc.stdout, hc.stdout + hc.stderr
        messages = []
        while True:
            try:
                messages.append(syslog.recv(65536).decode())
            except TimeoutError:
                break
        decided_msgs = [m for m in messages if " decided - " in m]
        assert len(decided_msgs) == len(sent) and all(m.startswith("<109>1 ") for m in decided_msgs)
        assert json.loads(decided_msgs[0].split(" - ", 1)[1])["event"] == "decided"
    finally:
        syslog.close()
        assert gate.stop() == 0


def test_index_reconcile_adds_what_the_spool_holds_and_keeps_foreign_rows(tmp_path):
    """What the spool holds and the index lacks is added (with its arrival); a row the spool no longer holds and that
    was never recorded delivered is marked unknown; rows other parts keyed themselves (a sweep) are left alone;
    queued deliveries resolve against the outbox and the dead letters."""
    from filmgate.index import DecisionIndex
    from filmgate.record import Arrival
    from filmgate.spool import Spool

    spool = Spool(tmp_path / "spool", fsync=False)
    kept = spool.persist(b"DICM-ish", Arrival(received_at=1.0e9, calling_ae="CR01", peer_address="10.1.2.3",
                                               sop_instance_uid="1.2.3"))  # fmt: skip
    index = DecisionIndex(tmp_path / "spool" / "state" / "index.sqlite")
    index.record_received("0000gone.dcm", sop_instance_uid="9.9", calling_ae="X", received_at=1.0e9)
    index.record_instance("sweep:/data/a.dcm", {"decision": "quarantine", "reasons": ["rotated"]}, received_at=2.0e9)
    index.record_instance("0000sent.dcm", {"decision": "accept"}, received_at=3.0e9)
    index.record_delivery("0000sent.dcm", "pacs", "queued")
    index.record_delivered("0000sent.dcm")
    fixed = index.reconcile(spool, [("pacs", spool.outbox("pacs"), spool.dead_letter("pacs"))])
    assert fixed == {"added": 1, "lost": 1, "queued": 0, "sent": 1, "dead": 0}
    row = index.get_by_name(kept.name)
    assert (row["sop_instance_uid"], row["calling_ae"], row["peer_address"]) == ("1.2.3", "CR01", "10.1.2.3")
    assert index.get_by_name("0000gone.dcm")["state"] == "unknown"
    assert index.get_by_name("sweep:/data/a.dcm")["state"] == "decided"
    assert index.get_by_name("0000sent.dcm")["deliveries"][0]["state"] == "delivered"
    assert index.reconcile(spool, []) == {"added": 0, "lost": 0, "queued": 0, "sent": 0, "dead": 0}
    # retention: kept bytes are forgotten after their days, rows after theirs; rows still in the spool stay
    film = tmp_path / "kept.dcm"
    film.write_bytes(b"x")
    index.record_instance("0000old.dcm", {"decision": "quarantine", "kept_path": str(film)}, received_at=1000.0)
    assert index.expire_kept(older_than=2000.0) == [str(film)]
    assert index.get_by_name("0000old.dcm")["kept_path"] == ""
    assert index.prune(retention_days=1, now=2.0e9 + 86400 * 2) == 3  # old, gone, sweep; not sent (3e9)
    assert index.get_by_name(kept.name) is not None and index.get_by_name("0000sent.dcm") is not None
    assert index.prune(retention_days=0) == 0
