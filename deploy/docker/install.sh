#!/bin/sh
# The image's install step, shared by the Dockerfile and by CI (tests/ops/test_image.py runs it in a clean virtual
# environment): one venv with filmgate and its pinned runtime dependencies (constraints/), no torch, no build tools.
# Usage: install.sh MODE SOURCE_DIR VENV_DIR [PYTHON]
#   deps     make the venv and install constraints/runtime.txt (the Dockerfile's cached dependency layer)
#   package  install the gate from SOURCE_DIR (a regular install, built as a wheel) without touching the pins
#   cuda     add NVIDIA's CUDA and cuDNN wheels matched to the pinned onnxruntime-gpu (constraints/cuda.txt)
#   all      deps, then package
# A CA bundle at /run/secrets/ca (the Docker build secret `ca`) is given to pip for networks that inspect TLS.
set -eu
mode=$1
src=$2
venv=$3
python=${4:-python3}
pip_flags="--no-cache-dir --disable-pip-version-check --quiet"
if [ -s /run/secrets/ca ]; then
    export PIP_CERT=/run/secrets/ca
fi

deps() {
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install $pip_flags -r "$src/constraints/runtime.txt"
}

package() {
    # --no-deps: the dependencies are the pinned ones above; `pip check` proves they satisfy pyproject.toml.
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install $pip_flags --no-deps "$src"
    "$venv/bin/python" -m pip check
    # The runtime image must stay slim: training's torch never belongs in it.
    if "$venv/bin/python" -c "import torch" 2>/dev/null; then
        echo "install.sh: torch is installed in the runtime environment; it belongs to the 'train' extra only" >&2
        exit 1
    fi
    "$venv/bin/python" -c "import onnxruntime, pydicom, pynetdicom, filmgate, filmgate.models"
    test -x "$venv/bin/filmgate"
    # pip itself is not needed at run time.
    "$venv/bin/python" -m pip uninstall $pip_flags --yes pip
}

cuda() {
    # shellcheck disable=SC2086
    "$venv/bin/python" -m ensurepip --default-pip >/dev/null
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install $pip_flags -r "$src/constraints/cuda.txt"
    "$venv/bin/python" -m pip check
    "$venv/bin/python" -m pip uninstall $pip_flags --yes pip
}

case $mode in
    deps) deps ;;
    package) package ;;
    cuda) cuda ;;
    all) deps; package ;;
    *) echo "install.sh: MODE must be deps, package, cuda or all, got '$mode'" >&2; exit 2 ;;
esac
