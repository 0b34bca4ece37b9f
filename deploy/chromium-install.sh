#!/usr/bin/env bash
# Headless Chromium (Debian's `chromium`) for the UI test (tests/cli/test_ecosystem.py) and
# scripts/ui_screenshots.py. A no-op when it is installed; else apt-get, refreshing the package lists
# only when the first try finds no candidate (a fresh machine's lists may be missing or stale).
set -euo pipefail
for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "chromium-install: $(command -v "$name") is installed"
        exit 0
    fi
done
command -v apt-get >/dev/null 2>&1 || { echo "chromium-install: no apt-get: install Chromium by hand" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends chromium; }
echo "chromium-install: installing Debian's chromium with apt-get"
install >/dev/null 2>&1 || { apt-get update -q >/dev/null && install >/dev/null; }
chromium --headless --no-sandbox --disable-gpu --dump-dom 'data:text/html,<p>ok</p>' 2>/dev/null | grep -q '<p>ok</p>' ||
    { echo "chromium-install: chromium does not run headless" >&2; exit 1; }
echo "chromium-install: $(chromium --version 2>/dev/null)"
