"""``filmgate sweep --review``: the sweep's films appear in a running node's review API, with their
decisions, thumbnails, and a release that delivers the swept file to the node's accept route."""

from __future__ import annotations

import json

from filmgate.review.auth import hash_password
from tests.helpers import Gate, read_csv, run_sweep

USER, PASSWORD = "ann", "ann-reviews-films"


def test_review_loads_the_sweep_into_the_review_api(film_tree, tmp_path):
    gate = Gate.create(tmp_path / "node", review={"enabled": True, "users": [
        {"name": USER, "role": "reviewer", "password_hash": hash_password(PASSWORD)}]}).start()  # fmt: skip
    try:
        out = tmp_path / "out"
        proc = run_sweep(film_tree["root"], "--out", out, "--review", "--config", gate.config_path)
        rows = read_csv(out / "results.csv")
        assert f"{len(rows)} films recorded in the review console's index" in proc.stderr
        items, offset = [], 0
        while True:
            page = gate.api_json(f"/api/instances?calling_ae=FILMGATE-SWEEP&limit=100&offset={offset}", USER,
                                 PASSWORD)  # fmt: skip
            items += page["items"]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                break
        assert len(items) == len(rows)
        want = sorted((r["decision"], r["reasons"], r["sop_instance_uid"]) for r in rows)
        assert sorted((i["outcome"], ";".join(i["reasons"]), i["sop_instance_uid"]) for i in items) == want
        quarantined = [i for i in items if i["outcome"] == "quarantine"]
        assert quarantined and all(i["review_state"] == "pending" for i in quarantined)
        by_reason = gate.api_json("/api/instances?calling_ae=FILMGATE-SWEEP&reason=rotated&limit=100", USER, PASSWORD)
        assert by_reason["total"] == sum("rotated" in r["reasons"].split(";") for r in rows)

        # A rotated DICOM film: its thumbnail loads, and releasing it delivers the swept file to the accept route.
        uid = next(r["sop_instance_uid"] for r in rows if r["path"] == "made/ROT1")
        item = next(i for i in items if i["sop_instance_uid"] == uid)
        code, png, _ = gate.api(item["thumbnail"], user=USER, password=PASSWORD)
        assert code == 200 and png.startswith(b"\x89PNG")
        code, body, _ = gate.api(f"/api/instances/{item['id']}/release", user=USER, password=PASSWORD,
                                 method="POST", body=b"{}")  # fmt: skip
        assert code == 200 and json.loads(body)["review_state"] == "released", body[:300]
        released = gate.root / "accept" / f"{uid}.dcm"
        assert released.read_bytes() == (film_tree["root"] / "made" / "ROT1").read_bytes()

        # A rerun updates the rows and keeps what the reviewer did.
        run_sweep(film_tree["root"], "--out", out, "--review", "--config", gate.config_path)
        again = gate.api_json(f"/api/instances/{item['id']}", USER, PASSWORD)
        assert again["review_state"] == "released"
        total = gate.api_json("/api/instances?calling_ae=FILMGATE-SWEEP&limit=1", USER, PASSWORD)["total"]
        assert total == len(rows)
    finally:
        gate.stop()
