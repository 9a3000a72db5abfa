"""The Compose stack, up for real: deploy/compose.yaml with deploy/compose.local.yaml (every image built here from
Debian's packages by scripts/build-image --stack) under Debian's docker-compose. A study uploaded to the hospital
Orthanc and sent to the modality "filmgate" goes through filmgate's container: the clean frontal film arrives in the
research Orthanc, the upside-down one does not (it is quarantined on filmgate's volume), and Prometheus, scraping
filmgate inside the stack, answers one accept and one quarantine. Only the published host ports are changed from the
files (loopback, chosen by the engine) so the test never collides with anything on the machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import uuid
from pathlib import Path

import pytest
import yaml

from filmgate_training.datasets import select
from tests.helpers import DEPLOY, REPO, docker, film_pixels, http, make_dicom, normalise, wait_until

pytestmark = pytest.mark.slow
AUTH = ("demo", "demo")


def _compose_cli() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if docker("compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor docker compose is installed: run deploy/ci-install.sh", pytrace=False)


def _copy_of_our_files(dest: Path) -> list[Path]:
    """deploy/compose.yaml and compose.local.yaml with paths made absolute and host ports left to the engine."""
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for svc in base["services"].values():
        svc["ports"] = [f"127.0.0.1::{str(p).rsplit(':', 1)[-1]}" for p in svc.get("ports", [])]
        svc["volumes"] = [str(DEPLOY / v[2:]) if v.startswith("./") else v for v in svc.get("volumes", [])]
        if "build" in svc:
            svc["build"]["context"] = str(REPO)
    (dest / "compose.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    shutil.copy(DEPLOY / "compose.local.yaml", dest / "compose.local.yaml")
    return [dest / "compose.yaml", dest / "compose.local.yaml"]


@pytest.fixture()
def stack(filmgate_image, tmp_path):
    project = f"fgstack{uuid.uuid4().hex[:8]}"
    files = _copy_of_our_files(tmp_path)
    cmd = [*_compose_cli(), "-p", project, *(x for f in files for x in ("-f", str(f)))]

    def compose(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        res = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{' '.join(args)}: {res.stdout[-2000:]}{res.stderr[-3000:]}"
        return res

    def url(service: str, port: int) -> str:
        host_port = compose("port", service, str(port)).stdout.strip().rsplit(":", 1)[1]
        return f"http://127.0.0.1:{host_port}"

    compose("up", "-d", "--no-build")
    try:
        yield compose, url
    finally:
        logs = subprocess.run([*cmd, "logs", "--no-color", "--tail", "40"], capture_output=True, text=True,
                              timeout=120).stdout  # fmt: skip
        print(logs[-6000:])
        subprocess.run([*cmd, "down", "-v", "--remove-orphans", "-t", "30"], capture_output=True, timeout=300)


def test_a_study_goes_from_the_hospital_through_filmgate_to_research_and_prometheus_counts_it(stack, tmp_path):
    compose, url = stack
    hospital, research, prometheus = url("orthanc-hospital", 8042), url("orthanc-research", 8042), url("prometheus",
                                                                                                     9090)  # fmt: skip
    for base in (hospital, research):
        wait_until(lambda b=base: http("GET", b + "/system", auth=AUTH, timeout=3)[0] == 200, 120, f"Orthanc {base}")
    container = compose("ps", "-q", "filmgate").stdout.strip()
    wait_until(lambda: json.loads(docker("inspect", "--format", "{{json .State.Health}}", container).stdout)
               ["Status"] == "healthy", 240, "the filmgate container to be healthy")  # fmt: skip

    frontal = select(split="val", kind="frontal-chest")
    px = film_pixels(next(f for f in frontal if f.pediatric == "no" and f.source == "chexpert").path)
    study = "1.2.826.0.1.3680043.8.498.4242." + str(uuid.uuid4().int % 10**12)
    uids = {}
    for name, pixels in (("normal", px), ("upside-down", px[::-1, ::-1].copy())):
        raw = tmp_path / f"{name}.raw.dcm"
        uids[name] = make_dicom(pixels, raw, study_uid=study)
        status, body = http("POST", hospital + "/instances", normalise(raw, tmp_path / f"{name}.dcm").read_bytes(),
                            auth=AUTH)  # fmt: skip
        assert status == 200, body[:300]
    studies = json.loads(http("GET", hospital + "/studies", auth=AUTH)[1])
    assert len(studies) == 1
    status, body = http("POST", hospital + "/modalities/filmgate/store",
                        {"Resources": studies, "Synchronous": True}, auth=AUTH, timeout=180)  # fmt: skip
    assert status == 200, body[:500]

    def research_uids() -> list[str]:
        ids = json.loads(http("GET", research + "/instances", auth=AUTH)[1])
        return [json.loads(http("GET", f"{research}/instances/{i}/simplified-tags", auth=AUTH)[1])["SOPInstanceUID"]
                for i in ids]  # fmt: skip

    assert wait_until(research_uids, 180, "the accepted film in the research Orthanc") == [uids["normal"]]

    query = urllib.parse.quote('sum by (outcome) (filmgate_decisions_total{job="filmgate"})')

    def counted() -> dict[str, float] | None:
        status, body = http("GET", f"{prometheus}/api/v1/query?query={query}", timeout=5)
        result = json.loads(body)["data"]["result"] if status == 200 else []
        got = {r["metric"]["outcome"]: float(r["value"][1]) for r in result}
        return got if got.get("accept") == 1 and got.get("quarantine") == 1 else None

    wait_until(counted, 120, "Prometheus to count one accept and one quarantine from filmgate")
    # The quarantined film stayed on filmgate's volume, with its reason; it never reached research.
    found = docker("exec", container, "sh", "-c", "ls /var/lib/filmgate/out/quarantine/").stdout.split()
    assert found == ["rotated"], found
    assert uids["upside-down"] not in research_uids()
