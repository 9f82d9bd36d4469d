#!/usr/bin/env bash
# Failover demo: two chatforge replicas behind HAProxy with the shipped deploy/haproxy/haproxy.cfg,
# 8 callers sending 1,000 Classify + 200 Reply calls, and at the halfway mark one replica drained
# (SIGTERM), killed (SIGKILL + restart) or hung (SIGSTOP/SIGCONT), over gRPC in TCP and HTTP/2 mode and
# over the HTTP API (--modes tcp,h2,http). Prints the failed calls, detach and re-attach times per
# scenario (README "Failover behind HAProxy" explains them).
#
#   scripts/failover-demo.sh                                  # trains two tiny bundles first (seconds)
#   scripts/failover-demo.sh --chat runs/demo/bundle --intent runs/demo-intent/bundle
#   scripts/failover-demo.sh --modes h2 --scenarios kill --loopback
#
# Needs haproxy (Debian: apt-get install haproxy). As root the replicas get their own network
# namespaces; otherwise they listen on 127.0.0.2 and 127.0.0.3.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v haproxy >/dev/null || { echo "failover-demo: haproxy is not installed (apt-get install haproxy)" >&2; exit 1; }
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
exec "$PY" scripts/failover_demo.py "$@"
