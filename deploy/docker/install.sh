#!/bin/sh
# The image's install step, shared by the Dockerfile and by CI (tests/ops/test_image.py runs it in a clean virtual
# environment, since no Docker engine runs there): one venv with filmgate and its runtime dependencies, no torch,
# no build tools. Usage: install.sh SOURCE_DIR VENV_DIR [PYTHON]
set -eu
src=$1
venv=$2
python=${3:-python3}

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet --upgrade pip
# A regular (not editable) install of the gate: the runtime dependencies of pyproject.toml only, no extras.
"$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet "$src"

# The runtime image must stay slim: training's torch never belongs in it.
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "install.sh: torch is installed in the runtime environment; it belongs to the 'train' extra only" >&2
    exit 1
fi
"$venv/bin/python" -c "import onnxruntime, pydicom, pynetdicom, filmgate"
test -x "$venv/bin/filmgate"
