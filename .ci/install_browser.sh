#!/usr/bin/env bash
# What tests/test_browser.py needs from the system: Debian's headless Chromium and its matching
# chromedriver (Selenium drives it; nothing is downloaded by the test). Run as root with apt access.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "::: chromium and chromedriver already installed: $(chromium --version 2>/dev/null)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
echo "::: installed $(chromium --version 2>/dev/null); $(chromedriver --version)"
