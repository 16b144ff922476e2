#!/usr/bin/env bash
# The web UI's browser tests drive Debian's Chromium through ChromeDriver. Install
# both when they are missing and we may (root with apt); otherwise say what to do.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  apt-get update -q && apt-get install -y -q chromium chromium-driver
else
  echo "note: chromium and chromedriver are missing; the browser tests will be skipped." >&2
  echo "      install them with: sudo apt-get install chromium chromium-driver" >&2
fi
