"""The lock (constraints.txt): it fits pyproject.toml's ranges, pins the key packages, and is this venv's tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import lock  # noqa: E402


def test_lock_fits_pyproject_and_pins_the_key_packages():
    pins = lock.read_lock()
    assert lock.disagreements(pins, lock.project_requirements(ROOT / "pyproject.toml")) == []
    assert all(name in pins for name in lock.MUST_PIN)
    assert "+" not in pins["torch"]  # no local label: the CUDA wheel of the index satisfies it too


def test_lock_is_the_tree_installed_here():
    """The venv the tests run in was installed from the lock (or the lock regenerated from it): a dependency
    added to pyproject.toml without `make lock` fails here."""
    roots = lock.project_requirements(ROOT / "pyproject.toml")
    assert lock.installed_tree(roots) == lock.read_lock(), "constraints.txt is stale: run `make lock`"


def test_check_fails_on_a_range_the_lock_violates(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.4"' in text
    (tmp_path / "pyproject.toml").write_text(text.replace('"torch>=2.4"', '"torch>=99"'))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "lock.py"), "--check",
                           "--pyproject", str(tmp_path / "pyproject.toml")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"torch: locked at {lock.read_lock()['torch']}, outside pyproject.toml's range >=99" in proc.stderr
    (tmp_path / "pyproject.toml").write_text(text.replace('"boto3",', '"boto3", "a-package-nobody-locked",'))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "lock.py"), "--check",
                           "--pyproject", str(tmp_path / "pyproject.toml")], capture_output=True, text=True)
    assert proc.returncode == 1 and "a-package-nobody-locked: required by pyproject.toml" in proc.stderr
