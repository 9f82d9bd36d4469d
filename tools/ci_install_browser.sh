#!/usr/bin/env bash
# Install Debian's Chromium and CJK fonts for tests/scenarios/test_http_browser.py (Playwright drives the
# system browser; its own browser download cannot run here). Idempotent: does nothing when
# /usr/bin/chromium exists. Needs root and apt-get; run by `make test` only when CI is set.
set -euo pipefail
log() { echo "ci_install_browser: $*" >&2; }

if [[ -x /usr/bin/chromium ]]; then
  log "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get on this machine; the browser test will skip (install chromium yourself)"
  exit 1
fi
SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { log "not root and no sudo; cannot install chromium"; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# fonts-noto-cjk: Korean glyphs in the page and its screenshot (otherwise they render as boxes).
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-noto-cjk >&2
log "installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
