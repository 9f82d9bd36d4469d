#!/usr/bin/env bash
# Prepare a machine for the deployment tests (tests/scenarios/test_image.py, test_compose_stack.py, test_k8s_play.py,
# test_failover_haproxy.py,
# tests/docs/test_diagrams.py): install Debian's podman, runc, debootstrap, haproxy, plantuml and graphviz when they
# are missing, and build a local Python base image from Debian packages, because no image registry is
# reachable on these machines. Called by `make test` under CI; safe to run again (each step is skipped
# when its result exists: the base image stays in podman's storage between runs).
#
#   bash tools/ci_install_containers.sh            # install + base image
#   bash tools/ci_install_containers.sh --no-base  # install only
#
# Prints the base image's name on stdout (everything else goes to stderr). Exits non-zero when a step
# fails; the tests then skip with the reason they find (the engine does not start, no base image...).
set -euo pipefail

BASE_IMAGE="${CHATFORGE_BASE_IMAGE:-localhost/chatforge-base:bookworm}"
SUITE="${CHATFORGE_BASE_SUITE:-bookworm}"
MIRROR="${CHATFORGE_BASE_MIRROR:-http://deb.debian.org/debian}"
log() { echo "ci_install_containers: $*" >&2; }

need=()
# dot (graphviz): plantuml lays out component diagrams with it, and --no-install-recommends leaves it out.
for pair in podman:podman runc:runc debootstrap:debootstrap haproxy:haproxy plantuml:plantuml dot:graphviz; do
  cmd="${pair%%:*}"; pkg="${pair##*:}"
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# DNS on podman's CNI networks (compose's service names: tests/scenarios/test_compose_stack.py).
[[ -e /usr/lib/cni/dnsname ]] || need+=(golang-github-containernetworking-plugin-dnsname)
# The pause process of `podman kube play`'s pods (tests/scenarios/test_k8s_play.py).
command -v catatonit >/dev/null 2>&1 || need+=(catatonit)
if ((${#need[@]})); then
  command -v apt-get >/dev/null || { log "missing ${need[*]} and no apt-get to install them"; exit 1; }
  log "installing ${need[*]} from Debian's packages..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # uidmap/slirp4netns/fuse-overlayfs: what podman needs for its default storage and networking.
  apt-get install -y -qq --no-install-recommends "${need[@]}" uidmap slirp4netns fuse-overlayfs \
    ca-certificates >&2
fi

[[ "${1:-}" == "--no-base" ]] && exit 0

if podman image exists "$BASE_IMAGE" 2>/dev/null; then
  log "base image $BASE_IMAGE exists (cached in podman's storage)"
  echo "$BASE_IMAGE"
  exit 0
fi

# A bookworm minbase root file system with Python 3.11, pip and venv: what the Dockerfile needs from
# its base (the official python:3.11-slim image provides the same commands).
root="$(mktemp -d /tmp/chatforge-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
start=$(date +%s)
log "debootstrap $SUITE (minbase + python3) into $root ..."
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  "$SUITE" "$root" "$MIRROR" >&2
# The image needs no package cache, docs or apt lists.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
  "$root"/usr/share/locale/* "$root"/var/cache/debconf/*-old
# `python` as in the official image.
ln -sf python3 "$root/usr/bin/python"
tar -C "$root" -c . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$BASE_IMAGE" >&2
log "base image $BASE_IMAGE built in $(( $(date +%s) - start )) s"
echo "$BASE_IMAGE"
