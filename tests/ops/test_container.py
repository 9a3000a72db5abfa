"""The container image, built and run for real (scripts/build-image, Docker's engine from Debian's docker.io).

One container of filmgate:local as its non-root user with the spool on a named volume, its DICOM and HTTP ports
published on loopback: films sent from the host by DCMTK's storescu are decided as the gate decides them (a normal
adult chest accepted, the same film upside down quarantined as rotated, a CT slice as modality), the sidecars and
files on the volume belong to the image's user, `docker inspect` reports the image's own health check healthy, the
metrics count the decisions, and SIGTERM (`docker stop`) ends it cleanly (exit 0, drained) inside the grace.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from filmgate_training.datasets import select
from tests.helpers import CT_STORAGE, docker, film_pixels, http, make_dicom, normalise, wait_until

pytestmark = pytest.mark.slow

IMAGE_UID = "10001"


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """(path, expected decision, expected first reason) made from fixed val films."""
    out = tmp_path_factory.mktemp("container-films")
    frontal = select(split="val", kind="frontal-chest")
    adult = next(f for f in frontal if f.pediatric == "no" and f.source == "nih-cxr14")
    ct = next(f for f in select(split="val", kind="not-radiograph") if f.modality.upper() == "CT")
    px = film_pixels(adult.path)
    made = []
    for name, pixels, kw, expect, reason in (
        ("normal", px, {}, "accept", None),
        ("upside-down", px[::-1, ::-1].copy(), {}, "quarantine", "rotated"),
        ("ct", film_pixels(ct.path), {"modality": "CT", "sop_class": CT_STORAGE}, "quarantine", "modality"),
    ):
        raw = out / f"{name}.raw.dcm"
        uid = make_dicom(pixels, raw, **kw)
        made.append((normalise(raw, out / f"{name}.dcm"), uid, expect, reason))
    return made


def _host_port(name: str, port: int) -> int:
    line = docker("port", name, f"{port}/tcp").stdout.strip().splitlines()[0]
    return int(line.rsplit(":", 1)[1])


def _state(name: str) -> dict:
    return json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)


def _sidecars(name: str) -> list[dict]:
    script = ("import glob, json; print(json.dumps([dict(json.load(open(p)), _path=p) for p in "
              "glob.glob('/var/lib/filmgate/out/**/*.json', recursive=True)]))")  # fmt: skip
    return json.loads(docker("exec", name, "python3", "-c", script).stdout)


def test_the_image_serves_decides_is_healthy_and_stops_cleanly(filmgate_image, films):
    name = f"filmgate-test-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-data"
    docker("volume", "create", volume)
    try:
        # The image's own health check command and user; only its timing is shortened so the test need not wait
        # the production 30 s interval.
        docker("run", "-d", "--name", name, "-v", f"{volume}:/var/lib/filmgate",
               "-p", "127.0.0.1::11112", "-p", "127.0.0.1::9108",
               "--health-interval", "2s", "--health-timeout", "10s", "--health-start-period", "120s",
               filmgate_image)  # fmt: skip
        config = json.loads(docker("inspect", "--format", "{{json .Config}}", name).stdout)
        assert config["User"].split(":")[0] == IMAGE_UID and config["Healthcheck"]["Test"][-2:] == [
            "filmgate", "healthcheck"]  # fmt: skip

        def healthy() -> bool:
            state = _state(name)
            assert state["Running"], f"the container stopped: {state}\n{docker('logs', name).stderr[-3000:]}"
            return state.get("Health", {}).get("Status") == "healthy"

        wait_until(healthy, 180, "docker inspect to report the container healthy")
        assert docker("exec", name, "id", "-u").stdout.strip() == IMAGE_UID
        dicom_port, http_port = _host_port(name, 11112), _host_port(name, 9108)

        proc = subprocess.run(["storescu", "-nh", "-aet", "HOSTSCU", "-aec", "FILMGATE", "127.0.0.1", str(dicom_port),
                               *(str(p) for p, *_ in films)], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0 and "E:" not in proc.stderr, proc.stderr
        records = wait_until(lambda: (r := _sidecars(name)) and len(r) >= len(films) and r, 180,
                             "a sidecar for every film on the volume")  # fmt: skip
        by_uid = {r["sop_instance_uid"]: r for r in records}
        for path, uid, expect, reason in films:
            rec = by_uid[uid]
            assert rec["decision"] == expect, (path.name, rec["decision"], rec["reasons"], rec["scores"])
            if reason:
                assert rec["reasons"][0] == reason, (path.name, rec["reasons"])
        owners = docker("exec", name, "sh", "-c", "find /var/lib/filmgate/out -type f -printf '%u\\n' | sort -u")
        assert owners.stdout.split() == ["filmgate"], owners.stdout

        status, body = http("GET", f"http://127.0.0.1:{http_port}/metrics", timeout=10)
        assert status == 200
        decided = sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                      if line.startswith("filmgate_decisions_total{"))  # fmt: skip
        assert decided == len(films), decided

        docker("stop", "-t", "60", name, timeout=90)  # SIGTERM, then SIGKILL (exit 137) only after 60 s
        state = _state(name)
        logs = docker("logs", name).stderr
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, logs[-3000:])
        assert "stopped in" in logs and "(drained)" in logs, logs[-2000:]
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)
