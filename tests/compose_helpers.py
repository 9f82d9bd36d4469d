"""Running deploy/docker-compose.yml as an operator runs it, for tests/scenarios/test_compose_*.py: podman-compose
with this machine's podman quirks, stand-ins for the upstream images no registry here serves, and a handle on a
running stack (its published ports, HAProxy's view of the replicas, container logs)."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from tests.container_helpers import BASE, LIMITS, podman, skip
from tests.deploy_helpers import REPO, free_port, http_get, say, train_tiny_bundles, wait_for

COMPOSE = REPO / "deploy" / "docker-compose.yml"
STANDIN_LABEL = "org.chatforge.standin"
# service -> (Debian package, the rest of a Containerfile on the base image that makes it run like the upstream
# image the compose file names: the same command, config path and user)
STANDINS = {
    # The official image's contract: POSTGRES_USER / _PASSWORD / _DB make the role and database on first start,
    # data in /var/lib/postgresql/data, password (scram) auth over the network, pg_isready on the PATH.
    "postgres": ("postgresql-15", "COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh\n"
                 "RUN chmod 755 /usr/local/bin/docker-entrypoint.sh && mkdir -p /var/lib/postgresql/data "
                 "/var/run/postgresql && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql "
                 "&& chmod 700 /var/lib/postgresql/data\nUSER postgres\nENV PGDATA=/var/lib/postgresql/data\n"
                 # the official image's: a fast shutdown, which does not wait for clients to disconnect
                 "STOPSIGNAL SIGINT\n"
                 'ENTRYPOINT ["docker-entrypoint.sh"]\nCMD ["postgres"]\n'),
    "haproxy": ("haproxy", 'USER haproxy\nCMD ["haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]\n'),
    "prometheus": ("prometheus", "RUN mkdir -p /prometheus && chown nobody:nogroup /prometheus\nUSER nobody\n"
                   'WORKDIR /prometheus\nENTRYPOINT ["/usr/bin/prometheus"]\n'
                   'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]\n'),
}
PUBLISHED = ("GRPC", "GRPC_H2", "HTTP", "STATS", "PROMETHEUS")
UP_TIMEOUT_S = 240


def _compose_tool() -> list[str]:
    exe = shutil.which("podman-compose") or str(Path(sys.executable).with_name("podman-compose"))
    if not Path(exe).exists():
        skip("podman-compose is not installed (the dev extra installs it)")
    return [exe]


def _standin(image: str, package: str, tail: str, work: Path) -> str:
    """Make ``image`` exist: keep an upstream image or a stand-in built from this very recipe, else build one
    (a stand-in of an older recipe is rebuilt: its label carries the recipe's hash); says which."""
    entrypoint = PG_ENTRYPOINT if package.startswith("postgresql") else ""
    recipe = f"{package}:{hashlib.sha256((tail + entrypoint).encode()).hexdigest()[:12]}"
    found = podman("image", "inspect", image, "--format", f'{{{{index .Labels "{STANDIN_LABEL}"}}}}', check=False)
    label = found.stdout.strip() if found.returncode == 0 else None
    if label == recipe:
        return "stand-in (cached)"
    if label is not None and label in ("", "<no value>"):
        return "upstream image"
    folder = work / package
    folder.mkdir()
    if entrypoint:
        (folder / "postgres-entrypoint.sh").write_text(entrypoint)
    (folder / "Containerfile").write_text(
        f"FROM {BASE}\nRUN apt-get update && apt-get install -y --no-install-recommends {package} "
        f"&& rm -rf /var/lib/apt/lists/*\n{tail}LABEL {STANDIN_LABEL}={recipe}\n")
    podman("build", "--network", "host", *LIMITS, "-t", image, str(folder), timeout=600)
    return "stand-in (built)"


def _containers_conf(path: Path) -> Path:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 1048576 if hard == resource.RLIM_INFINITY else hard
    path.write_text(f'[containers]\ndefault_ulimits = ["nofile=1024:{hard}", "nproc=4096:4096"]\n'
                    '[engine]\nruntime = "runc"\n')
    return path


class Stack:
    def __init__(self, project: str, env: dict[str, str], ports: dict[str, int], profiles: tuple[str, ...] = ()):
        self.project, self.env, self.ports = project, env, ports
        self.tool = [*_compose_tool(), *(a for p in profiles for a in ("--profile", p))]

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*self.tool, "-p", self.project, "-f", str(COMPOSE), *args], capture_output=True,
                           text=True, timeout=timeout, env=self.env, cwd=COMPOSE.parent)
        if check and r.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)} failed ({r.returncode}):\n"
                                 f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        return r

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def url(self, which: str) -> str:
        return f"http://127.0.0.1:{self.ports[which]}"

    def target(self, which: str) -> str:
        return f"127.0.0.1:{self.ports[which]}"

    def servers(self) -> dict[tuple[str, str], dict[str, str]]:
        """HAProxy's stats CSV: (proxy, server) -> row."""
        status, body = http_get(self.url("STATS") + "/stats;csv", timeout=2.0)
        if status != 200:
            return {}
        lines = body.lstrip("# ").splitlines()
        head = lines[0].split(",")
        rows = [dict(zip(head, ln.split(","), strict=False)) for ln in lines[1:] if ln]
        return {(r["pxname"], r["svname"]): r for r in rows}

    def backend_states(self, server: str) -> set[str]:
        return {row["status"] for (px, sv), row in self.servers().items()
                if sv == server and px in ("chatforge_l4", "chatforge_h2", "chatforge_http")}

    def logs(self, service: str) -> str:
        r = podman("logs", self.container(service), check=False)
        return (r.stdout + r.stderr)[-2500:]



PG_ENTRYPOINT = r"""#!/bin/sh
# Stand-in for the official postgres image's entrypoint: a cluster made on first start from POSTGRES_USER,
# POSTGRES_PASSWORD and POSTGRES_DB, then the server in the foreground on every address.
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=$(mktemp); printf '%s' "$POSTGRES_PASSWORD" > "$pw"
  "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pw" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pw"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  [ "$POSTGRES_DB" = postgres ] || "$bin/createdb" -U "$POSTGRES_USER" "$POSTGRES_DB"
  "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
fi
[ "$1" = postgres ] && shift
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' "$@"
"""


@contextmanager
def running_stack(serving_image: str, work: Path, pytestconfig, *, profiles: tuple[str, ...] = (),
                  env: dict[str, str] | None = None, services: tuple[str, ...] = ("haproxy", "prometheus"),
                  ) -> Iterator[Stack]:
    """``podman-compose up`` of the shipped file with ``profiles``, the serving image under the file's own image
    name, stand-ins for ``services``' upstream images (every service the profiles start: `up` would otherwise
    try to pull a missing one from a registry), a tiny bundle to serve and free host ports; yields once
    both replicas are UP in all three HAProxy backends, and takes the stack down (volumes too) after."""
    if not Path("/usr/lib/cni/dnsname").exists() and shutil.which("aardvark-dns") is None:
        skip("podman's networks have no DNS here (the dnsname CNI plugin or aardvark-dns; "
             "tools/ci_install_containers.sh installs it): compose's service names would not resolve")
    spec = yaml.safe_load(COMPOSE.read_text())
    # The file's own image name for the replicas: what `up` would otherwise build from deploy/Dockerfile.
    podman("tag", serving_image, spec["x-chatbot"]["image"])
    made = {svc: _standin(spec["services"][svc]["image"], *STANDINS[svc], work) for svc in services}
    say(pytestconfig, "\ncompose images: " + ", ".join(f"{s}: {spec['services'][s]['image']} ({how})"
                                                      for s, how in made.items()))
    chat, _ = train_tiny_bundles(work)
    ports = {p: free_port() for p in PUBLISHED}
    full_env = {**os.environ, "CONTAINERS_CONF": str(_containers_conf(work / "containers.conf")),
                "CHATFORGE_BUNDLE": str(chat), "CHATFORGE_PUBLISH_ADDR": "127.0.0.1",
                **{f"CHATFORGE_PUBLISH_{p}": str(port) for p, port in ports.items()}, **(env or {})}
    st = Stack(f"chatforge-ci-{uuid.uuid4().hex[:6]}", full_env, ports, profiles)
    try:
        start = time.monotonic()
        st.compose("up", "-d")
        wait_for(lambda: all(st.backend_states(s) == {"UP"} for s in "ab"), UP_TIMEOUT_S,
                 "both replicas UP in all three HAProxy backends", interval=0.5)
        say(pytestconfig, f"\ncompose stack up (both replicas UP behind HAProxy) in {time.monotonic() - start:.0f} s")
        yield st
    finally:
        for svc in ("chatbot-a", "chatbot-b", *services):
            print(f"--- {svc}\n{st.logs(svc)}")
        st.compose("down", "-v", "-t", "5", check=False, timeout=180)
