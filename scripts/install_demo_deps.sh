#!/usr/bin/env bash
# Install what `python -m d2f.demo` and its end-to-end test need, into the active Python environment:
# the `demo` extra (Gradio), the `demo-test` extra (playwright, the Python driver the test uses; no
# browser download) and, for the test's screenshot, a headless Chromium from the system's package
# manager (Debian / Ubuntu: the `chromium` package; needs root or sudo).
#
#   bash scripts/install_demo_deps.sh            (the extra and Chromium)
#   NO_BROWSER=1 bash scripts/install_demo_deps.sh   (the extra only: the e2e test then skips the
#                                                  screenshot, and says so)
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -e ".[demo,demo-test]"
if [ "${NO_BROWSER:-0}" = 1 ]; then
  exit 0
fi
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  echo "install_demo_deps.sh: keeping the installed $(chromium --version 2>/dev/null || chromium-browser --version)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_demo_deps.sh: no apt-get: install Chromium with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
chromium --version
