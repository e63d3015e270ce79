#!/usr/bin/env bash
# Debian packages the test suite needs beyond Python: Chromium and its driver,
# for the admin's browser test; tmux and npm, to drive the real Codex TUI.
# Does nothing when they are already there.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v tmux >/dev/null && command -v npm >/dev/null; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver tmux $(command -v npm >/dev/null || echo npm) >/dev/null
