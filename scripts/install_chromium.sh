#!/usr/bin/env bash
# Debian's Chromium for the tests that look at pages in a real browser (retrieval galleries):
# installed once, idempotent; without apt (or root) it says so and the tests skip.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -n "${CHROMIUM:-}" ]; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    echo "install_chromium.sh: no apt-get or not root: install Chromium yourself (the browser tests skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get install -y -q chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; then
    echo "install_chromium.sh: $(chromium --version)"
else
    echo "install_chromium.sh: apt-get could not install chromium (the browser tests skip)" >&2
fi
