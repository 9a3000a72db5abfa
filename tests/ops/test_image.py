"""The container image, tested without a Docker engine: hadolint, the Dockerfile's promises (multi-stage, non-root,
volume, health check, CUDA target), the build context that .dockerignore leaves, and the image's own install step
(deploy/docker/install.sh) run for real in a clean virtual environment, which then validates the deploy
configurations and decides on a real film with the shipped models and no torch."""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from filmgate.datasets import select
from tests.ops.conftest import DEPLOY, REPO, tool

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


def test_hadolint_finds_nothing():
    res = subprocess.run(
        [tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
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
    assert any(src == ["models/"] and dst.rstrip("/") == container["detectors"]["models_dir"] for src, dst, _ in copies)
    assert any(frm for _, _, frm in copies), "the runtime copies the venv from a build stage"
    assert _json_or_words(_one(stage, "ENTRYPOINT")) == ["filmgate"]
    assert _json_or_words(_one(stage, "CMD")) == ["serve"]


def test_cuda_target_uses_a_cuda_base():
    text = DOCKERFILE.read_text()
    arg = next(line for line in text.splitlines() if line.startswith("ARG CUDA_IMAGE="))
    assert "cudnn" in arg and "runtime" in arg, arg
    assert _stages()["runtime-cuda"] and "FROM ${CUDA_IMAGE} AS runtime-cuda" in text


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
    """deploy/docker/install.sh, as the image's build stage runs it, on the image's build context: then the venv
    (no torch) validates every deploy configuration and decides on a real film with the shipped models."""
    context = tmp_path / "context"
    _build_context(context)
    venv = tmp_path / "venv"
    res = subprocess.run(
        ["sh", str(context / "deploy/docker/install.sh"), str(context), str(venv), sys.executable],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    probe = subprocess.run([venv / "bin/python", "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "torch must not be in the runtime environment"

    filmgate = str(venv / "bin/filmgate")
    for cfg in _deploy_configs(tmp_path):
        res = subprocess.run([filmgate, "check-config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "OK" in res.stdout, f"{cfg}: {res.stdout}{res.stderr}"

    # The image's configuration with the models where this context holds them (the image: /opt/filmgate/models).
    container = yaml.safe_load((DEPLOY / "filmgate" / "container.yaml").read_text())
    container["detectors"]["models_dir"] = str(context / "models")
    cfg = tmp_path / "container-here.yaml"
    cfg.write_text(yaml.safe_dump(container))
    film = select(split="val", kind="frontal-chest", source="nih-cxr14")[0].path
    res = subprocess.run(
        [filmgate, "inspect", "--config", str(cfg), str(film)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[0])
    shipped = {json.loads(m.read_text())["name"] for m in (context / "models").glob("*/manifest.json")}
    assert shipped, "the image context holds no models: the node would decide on metadata rules only"
    assert set(line["scores"]) == shipped, f"every shipped detector runs in the image's environment: {line}"
    assert line["decision"] in ("accept", "quarantine"), line
