"""The container image, tested without a Docker engine: hadolint, the Dockerfile's promises (multi-stage, non-root,
volume, health check, CUDA target), the build context that .dockerignore leaves, and the image's own install step
(deploy/docker/install.sh) run for real in a clean virtual environment, which then validates the deploy
configurations and decides on a real film with the shipped models and no torch."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from importlib.metadata import requires, version
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from filmgate_training.datasets import select
from tests.helpers import DEPLOY, REPO, free_port, http, tool, wait_until

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for ins, args in _instructions():
        if ins == "FROM":
            parts = args.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"every stage is named: FROM {args}"
            current = parts[2]
            stages[current] = []
        elif current:
            stages[current].append((ins, args))
    return stages


def _one(stage: list[tuple[str, str]], ins: str) -> str:
    found = [a for i, a in stage if i == ins]
    assert len(found) == 1, f"expected one {ins}, got {found}"
    return found[0]


def _json_or_words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str, str | None]]:
    """(sources, destination, --from stage) of each COPY."""
    out = []
    for ins, args in stage:
        if ins != "COPY":
            continue
        words = shlex.split(args)
        frm = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
        paths = [w for w in words if not w.startswith("--")]
        out.append((paths[:-1], paths[-1], frm))
    return out


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for ins, args in stage:
        if ins == "ENV":
            for word in shlex.split(args):
                k, _, v = word.partition("=")
                env[k] = v
    return env


# ------------------------------------------------------------------------------------------------ hadolint


@pytest.mark.parametrize("path", [DOCKERFILE, *sorted((DEPLOY / "docker").glob("*.Dockerfile"))], ids=lambda p: p.name)
def test_hadolint_finds_nothing(path):
    res = subprocess.run(
        [tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_hadolint_is_not_blind():
    """The linter really runs on our file: a classic mistake added to it is reported."""
    bad = DOCKERFILE.read_text() + "\nRUN cd /tmp && pip install requests\n"
    res = subprocess.run(
        [tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "DL3013" in res.stdout, res.stdout


# ------------------------------------------------------------------------------------------------ the Dockerfile


def test_stages_and_default_target():
    stages = _stages()
    assert list(stages)[-1] == "runtime", "the default target (last stage) must be the CPU runtime"
    assert {"build", "build-cuda", "runtime", "runtime-cuda"} <= set(stages)
    assert not any("torch" in args.lower() for _, args in _instructions()), "the runtime image never installs torch"


@pytest.mark.parametrize("name", ["runtime", "runtime-cuda"])
def test_runtime_stage_promises(name):
    stage = _stages()[name]
    container = yaml.safe_load((DEPLOY / "filmgate" / "container.yaml").read_text())
    user = _one(stage, "USER").split(":")[0]
    assert user not in ("0", "root"), "non-root user"
    health = _json_or_words(_one(stage, "HEALTHCHECK").split("CMD", 1)[1].strip())
    assert health[:2] == ["filmgate", "healthcheck"], health
    volume = _json_or_words(_one(stage, "VOLUME"))
    assert volume == ["/var/lib/filmgate"]
    assert PurePosixPath(container["spool"]["path"]).is_relative_to(volume[0]), "the spool lives on the volume"
    exposed = {int(p) for p in _one(stage, "EXPOSE").split()}
    assert exposed == {container["listener"]["port"], container["http"]["port"]}
    env = _env(stage)
    copies = _copies(stage)
    assert any(src == ["deploy/filmgate/container.yaml"] and dst == env["FILMGATE_CONFIG"] for src, dst, _ in copies)
    # The models are package data of the installed gate (in the venv); the configuration asks for exactly those.
    assert container["detectors"]["models_dir"] == "", "the image uses the models installed with filmgate"
    assert any(frm for _, _, frm in copies), "the runtime copies the venv from a build stage"
    assert _json_or_words(_one(stage, "ENTRYPOINT")) == ["filmgate"]
    assert _json_or_words(_one(stage, "CMD")) == ["serve"]


def _pins(name: str) -> dict[str, str]:
    """``constraints/<name>``: {normalised project name: pinned version}."""
    out = {}
    for line in (REPO / "constraints" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            project, _, version = line.partition("==")
            assert version, f"constraints/{name}: {line!r} is not pinned with =="
            out[canonicalize_name(project)] = version
    return out


def test_cuda_target_is_the_debian_base_with_cuda_wheels_matched_to_onnxruntime():
    """No CUDA base image: the CUDA stage adds NVIDIA's wheels pinned in constraints/cuda.txt, and those pins are
    what the pinned onnxruntime-gpu's own `cuda` and `cudnn` extras ask for (same CUDA major, same cuDNN)."""
    stages = _stages()
    text = DOCKERFILE.read_text()
    assert "FROM ${BASE_IMAGE} AS runtime-cuda" in text and "FROM build AS build-cuda" in text
    assert any("filmgate-install cuda" in args for ins, args in stages["build-cuda"] if ins == "RUN")
    assert any(frm == "build-cuda" for _, _, frm in _copies(stages["runtime-cuda"]))
    runtime, cuda = _pins("runtime.txt"), _pins("cuda.txt")
    ort = runtime["onnxruntime-gpu"]
    assert version("onnxruntime-gpu") == ort, "the tests run the onnxruntime-gpu the image ships"
    wanted = [Requirement(r) for r in requires("onnxruntime-gpu") or []]
    extras = [r for r in wanted if r.marker and any(r.marker.evaluate({"extra": e}) for e in ("cuda", "cudnn"))]
    assert extras, "onnxruntime-gpu declares no cuda/cudnn extras: pick the CUDA wheels by hand and test them"
    for req in extras:
        name = canonicalize_name(req.name)
        assert name in cuda, f"constraints/cuda.txt lacks {req} (asked for by onnxruntime-gpu {ort})"
        assert req.specifier.contains(cuda[name]), f"constraints/cuda.txt pins {name}=={cuda[name]}; ort wants {req}"


def test_cuda_runtime_finds_the_wheels_libraries():
    """onnxruntime's CUDA provider loads libcudart/libcublas/libcudnn through LD_LIBRARY_PATH: the runtime-cuda stage
    names the wheels' folders for the CUDA major that constraints/cuda.txt pins, under the venv's Python (the base's
    python3; `ldd` in the built image leaves only the driver's libcuda.so.1, checked when the CUDA image was made)."""
    env = _env(_stages()["runtime-cuda"])
    major = _pins("cuda.txt")["nvidia-cuda-runtime"].split(".")[0]
    paths = env["LD_LIBRARY_PATH"].split(":")
    site = "/opt/filmgate/venv/lib/python3.11/site-packages"  # Debian 12's python3, the base image's
    assert f"{site}/nvidia/cu{major}/lib" in paths and f"{site}/nvidia/cudnn/lib" in paths, paths


def test_runtime_pins_satisfy_pyproject_and_are_what_the_tests_run():
    """constraints/runtime.txt pins every runtime dependency of pyproject.toml (within its range), and the test
    environment has exactly those versions: CI tests what the image ships."""
    pins = _pins("runtime.txt")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        if req.marker and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints/runtime.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside pyproject's {req.specifier}"
    for name, pinned in pins.items():
        assert version(name) == pinned, f"the tests run {name} {version(name)}, the pins say {pinned}"


# ------------------------------------------------------------------------------------------------ build context


def _ignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _excluded(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics: the last matching pattern wins; a pattern matching a parent folder matches
    everything below it; '!' re-includes; '**' matches any number of folders."""
    parts = PurePosixPath(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        p = pat[1:] if negate else pat
        p = p.rstrip("/")
        candidates = [p, p.replace("**/", "")] if p.startswith("**/") else [p]
        hit = any(
            fnmatch.fnmatchcase(pre, c) and pre.count("/") == c.count("/") for pre in prefixes for c in candidates
        )
        if p.startswith("**/"):
            hit = hit or any(fnmatch.fnmatchcase(part, p[3:]) for part in parts)
        if hit:
            excluded = not negate
    return excluded


def _build_context(dest: Path) -> list[str]:
    """Copies what the Docker build context would hold into ``dest`` (files on disk, .dockerignore applied)."""
    patterns = _ignore_patterns()
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    kept = [f for f in files if (REPO / f).is_file() and not _excluded(f, patterns)]
    for f in kept:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    return kept


def test_dockerignore_semantics():
    pats = ["*", "!service", "!deploy/docker/install.sh", "**/__pycache__"]
    assert _excluded("tests/ops/conftest.py", pats)
    assert not _excluded("service/cli.py", pats)
    assert _excluded("service/__pycache__/cli.cpython-311.pyc", pats)
    assert not _excluded("deploy/docker/install.sh", pats)
    assert _excluded("deploy/compose.yaml", pats)


def test_build_context_holds_every_copied_source(tmp_path):
    kept = _build_context(tmp_path)
    assert not any(f.startswith(("tests/", "runs/", "cache/", ".venv/")) for f in kept), "context must stay small"
    for stage in _stages().values():
        for sources, _, frm in _copies(stage):
            if frm:
                continue
            for src in sources:
                path = tmp_path / src
                assert path.exists() and (path.is_file() or any(path.rglob("*"))), f"COPY {src}: not in context"


# ------------------------------------------------------------------------------------------------ install step


def _deploy_configs(tmp_path: Path) -> list[Path]:
    configs = sorted((DEPLOY / "filmgate").glob("*.yaml"))
    cm = yaml.safe_load((DEPLOY / "k8s" / "base" / "configmap.yaml").read_text())
    k8s = tmp_path / "k8s-configmap-filmgate.yaml"
    k8s.write_text(cm["data"]["filmgate.yaml"])
    return [*configs, k8s]


def test_image_install_step_in_a_clean_venv(tmp_path):
    """deploy/docker/install.sh, as the image's build stage runs it, on the image's build context: a regular (wheel,
    not editable) install in a fresh venv with no torch. Run from an empty folder, as a user meets it: --version
    names the installed models, every deploy configuration passes check-config, inspect decides on a real film with
    the installed models (no models_dir anywhere), serve refuses a configuration whose models are missing (exit 2,
    naming the key and the way out) and starts with --metadata-only."""
    context = tmp_path / "context"
    _build_context(context)
    venv = tmp_path / "venv"
    res = subprocess.run(
        ["sh", str(context / "deploy/docker/install.sh"), "all", str(context), str(venv), sys.executable],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    probe = subprocess.run([venv / "bin/python", "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "torch must not be in the runtime environment"
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FILMGATE_CONFIG", "PYTHONPATH")}

    def filmgate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin/filmgate"), *args], capture_output=True, text=True, timeout=timeout,
                              cwd=empty, env=env)  # fmt: skip

    where = subprocess.run([venv / "bin/python", "-c", "import filmgate; print(filmgate.__file__)"], cwd=empty,
                           capture_output=True, text=True, env=env).stdout  # fmt: skip
    assert where.startswith(str(venv)), f"filmgate imported from {where}, not the fresh venv"
    shipped = {json.loads(m.read_text())["name"]: json.loads(m.read_text())["version"]
               for m in (context / "models").glob("*/manifest.json")}  # fmt: skip
    assert shipped, "the image context holds no models: the node would decide on metadata rules only"
    res = filmgate("--version")
    assert res.returncode == 0 and res.stdout.startswith("filmgate "), res.stdout + res.stderr
    for name, ver in shipped.items():
        assert f"  model {name} {ver} " in res.stdout, res.stdout

    res = filmgate("serve", "--help")  # the full list of keys is where an installed user finds it
    assert res.returncode == 0 and f"{venv}/lib/" in res.stdout and "default.yaml" in res.stdout, res.stdout
    res = subprocess.run([venv / "bin/python", "-m", "filmgate_training", "--help"], capture_output=True, text=True,
                         cwd=empty, env=env, timeout=60)  # fmt: skip
    assert res.returncode == 0 and "examples:" in res.stdout, res.stdout + res.stderr  # help needs no torch

    for cfg in _deploy_configs(tmp_path):
        res = filmgate("check-config", str(cfg), timeout=60)
        assert res.returncode == 0 and "OK" in res.stdout, f"{cfg}: {res.stdout}{res.stderr}"

    film = select(split="val", kind="frontal-chest", source="nih-cxr14")[0].path
    res = filmgate("inspect", str(film), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[0])
    assert set(line["scores"]) == set(shipped), f"every shipped detector runs in the image's environment: {line}"
    assert line["decision"] in ("accept", "quarantine"), line

    # serve: a models folder that is not there stops it before it listens; --metadata-only runs without.
    port, http_port = free_port(), free_port()
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({
        "listener": {"host": "127.0.0.1", "port": port}, "http": {"host": "127.0.0.1", "port": http_port},
        "spool": {"path": str(tmp_path / "spool")}, "detectors": {"models_dir": str(tmp_path / "no-models")},
        "destinations": {"accept": {"type": "folder", "path": str(tmp_path / "out/a")},
                         "quarantine": {"type": "folder", "path": str(tmp_path / "out/q")}},
    }))  # fmt: skip
    res = filmgate("serve", "--config", str(cfg))
    assert res.returncode == 2, res.stderr
    assert "detectors.models_dir: folder" in res.stderr and "detectors.require: false" in res.stderr, res.stderr
    proc = subprocess.Popen([str(venv / "bin/filmgate"), "serve", "--config", str(cfg), "--metadata-only"],
                            cwd=empty, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{http_port}/readyz", timeout=2)[0] == 200, 60,
                   "filmgate serve --metadata-only to get ready")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    assert "header rules" in out or "no detectors" in out.lower(), out[-3000:]
