"""scripts/bootstrap as a newcomer meets it: in either order (scripts/serve installs the `dev` extras, scripts/test
`dev,train,...`) the later call installs what the earlier one left out instead of trusting its stamp, a repeated call
only checks, and as a non-root user missing Debian packages it stops at once with one line naming them."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def _clone(tmp_path: Path) -> Path:
    dest = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(dest)], check=True, timeout=120)
    for rel in ("scripts/bootstrap", "pyproject.toml", "constraints/runtime.txt"):  # the working tree's, unsaved too
        shutil.copy(REPO / rel, dest / rel)
    return dest


def _venv_sharing_our_packages(repo: Path) -> None:
    """A real .venv whose interpreter also sees this test run's packages (so pip has nothing to download): what is
    tested is which installs bootstrap asks for, not PyPI."""
    subprocess.run([sys.executable, "-m", "venv", str(repo / ".venv")], check=True, timeout=120)
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (purelib,) = {p for p in (repo / ".venv" / "lib").glob("python3*/site-packages")}
    (purelib / "000-test-run.pth").write_text("\n".join([*ours, *site.getsitepackages()]) + "\n")


def _bootstrap(repo: Path, extras: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FILMGATE_EXTRAS", "FILMGATE_OPS", "VIRTUAL_ENV")}
    if extras:
        env["FILMGATE_EXTRAS"] = extras
    res = subprocess.run([str(repo / "scripts" / "bootstrap")], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_serve_then_test_installs_the_training_extras_and_a_rerun_only_checks(tmp_path):
    repo = _clone(tmp_path)
    _venv_sharing_our_packages(repo)
    stamp = repo / ".venv" / ".filmgate-installed"
    _bootstrap(repo, "dev")  # what scripts/serve asks for
    assert stamp.read_text().split() == ["dev"]
    _bootstrap(repo, None)  # what scripts/test asks for: the training extras are installed, not skipped
    assert set(stamp.read_text().strip().split(",")) >= {"dev", "train"}
    check = subprocess.run([str(repo / ".venv/bin/python"), "-c", "import torch, filmgate; print(filmgate.__file__)"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert check.returncode == 0 and check.stdout.strip().startswith(str(repo)), check.stdout + check.stderr
    before = stamp.stat().st_mtime_ns
    t0 = time.monotonic()
    _bootstrap(repo, "dev")  # serve after test: nothing to install, nothing narrowed
    assert stamp.stat().st_mtime_ns == before and time.monotonic() - t0 < 30
    assert set(stamp.read_text().strip().split(",")) >= {"dev", "train"}


def test_as_a_user_without_the_debian_packages_it_stops_with_one_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the script as another user")
    shared = Path(tempfile.mkdtemp(prefix="filmgate-bootstrap-"))  # pytest's own tmp is private to root
    try:
        os.chmod(shared, 0o755)
        bin_dir = shared / "bin"  # a PATH with the basics and python3, without DCMTK and the other packages
        bin_dir.mkdir()
        for name in ("dirname", "id", "python3", "ldconfig", "grep", "cat"):
            (bin_dir / name).symlink_to(shutil.which(name) or f"/sbin/{name}")
        repo = _clone(shared)
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        res = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/bash",
                              str(repo / "scripts" / "bootstrap")], capture_output=True, text=True, timeout=60,
                             env={"PATH": str(bin_dir), "HOME": str(shared)})  # fmt: skip
        made_venv = (repo / ".venv").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bootstrap: please install "), res.stderr
    assert "dcmtk" in lines[0] and "apt-get install" in lines[0], lines[0]
    assert not made_venv, "it stopped before making anything"
