"""Container helpers shared by the image and compose-stack tests (tests/scenarios): the podman command line
this machine needs, image builds on the local base image, and the engine check that skips with a reason."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.deploy_helpers import REPO, ready, wait_for

BASE = os.environ.get("CHATFORGE_BASE_IMAGE", "localhost/chatforge-base:bookworm")
# runc: crun fails on these machines; explicit ulimits: the defaults podman asks for are refused here.
ENGINE = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_TIMEOUT = 1500


def skip(reason: str):
    print(f"\nSKIP (container tests): {reason}", file=sys.stderr)
    pytest.skip(reason)


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def torch_wheel() -> Path | None:
    """A local CPU torch wheel (pip's find-links here), so the build needs no PyTorch index."""
    for pattern in (os.environ.get("CHATFORGE_TORCH_WHEEL", ""), "/opt/wheels/torch-*+cpu-*.whl"):
        hits = sorted(glob.glob(pattern)) if pattern else []
        if hits:
            return Path(hits[-1])
    return None


def build(dockerfile: str, tag: str, **build_args: str) -> float:
    """Build ``dockerfile`` as ``tag`` on :data:`BASE` (``build_args``: more ``--build-arg``s, e.g. ``EXTRAS``);
    returns the seconds it took."""
    wheels = REPO / "deploy" / "wheels"
    wheel = torch_wheel()
    if wheel is not None and not (wheels / wheel.name).exists():
        shutil.copy2(wheel, wheels / wheel.name)  # git-ignored; the build context's WHEELS folder
    args = ["build", "--format", "docker", "--network", "host", *LIMITS, "-f", dockerfile,
            "--build-arg", f"BASE_IMAGE={BASE}", "-t", tag]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    if HOST_CA.is_file():  # pip behind this network's TLS-intercepting proxy needs the host's CA bundle
        args += ["-v", f"{HOST_CA}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    start = time.monotonic()
    r = subprocess.run([*ENGINE, *args, str(REPO)], capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert r.returncode == 0, f"building {dockerfile} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return time.monotonic() - start


def size_mb(tag: str) -> float:
    return int(podman("image", "inspect", tag, "--format", "{{.Size}}").stdout.strip()) / 1e6


def check_engine() -> None:
    if shutil.which("podman") is None:
        skip("podman is not installed (tools/ci_install_containers.sh installs it; make test does under CI)")
    if subprocess.run(["podman", "image", "exists", BASE]).returncode != 0:
        r = subprocess.run(["bash", str(REPO / "tools" / "ci_install_containers.sh")], capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, f"could not build the base image {BASE}:\n{r.stderr[-3000:]}"
    probe = podman("run", "--rm", *LIMITS, "--network", "none", BASE, "python3", "-c", "print('ok')",
                   check=False)
    if probe.returncode != 0 or probe.stdout.strip() != "ok":
        skip(f"the container engine cannot start a container here: {probe.stderr.strip()[-500:]}")


def exited(name: str) -> bool:
    """Whether the container ``name`` has stopped running."""
    return podman("inspect", name, "--format", "{{.State.Running}}", check=False).stdout.strip() == "false"


@contextlib.contextmanager
def running(name: str, readyz: str, volume: str | None = None, timeout: float = 180):
    """For a container started with ``podman run -d --name NAME``: wait until ``readyz`` answers (failing with its
    logs if it exits first), and at the end print its last log lines and remove it (and ``volume``)."""
    try:
        wait_for(lambda: ready(readyz) or exited(name), timeout, "the container's /readyz")
        if exited(name):
            raise AssertionError(f"the container exited:\n{podman('logs', name, check=False).stderr[-3000:]}")
        yield
    finally:
        print(podman("logs", name, check=False).stderr[-1500:])
        podman("rm", "-f", "-t", "0", name, check=False)
        if volume is not None:
            podman("volume", "rm", "-f", volume, check=False)
