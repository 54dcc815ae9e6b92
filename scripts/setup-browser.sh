#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver for the browser tests (tests/ui) when either is missing.
# Idempotent: when both are on PATH it only prints their versions (well under a second).
# Needs root (or sudo) and an apt mirror the first time; on a fresh Debian 12 it takes a few minutes.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  chromium --version 2>/dev/null || true
  chromedriver --version 2>/dev/null | head -1 || true
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-browser: chromium/chromedriver missing and no apt-get here; install Chromium and its driver," >&2
  echo "  then point CKPT_CHROMIUM and CKPT_CHROMEDRIVER at them" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
chromium --version
chromedriver --version | head -1
