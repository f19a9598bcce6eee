#!/usr/bin/env bash
# System packages some tests need: Debian's Chromium for the browser tests (they skip without it).
# Installs only where it can (root and apt-get); elsewhere it says what is missing and carries on.
set -u
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser tests (apt-get)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: browser tests will be skipped"
else
  echo "chromium not found (install Debian's 'chromium' package): browser tests will be skipped"
fi
exit 0
