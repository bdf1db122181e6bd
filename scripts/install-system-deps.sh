#!/usr/bin/env bash
# Installs the Debian packages the integration tests run against: a real Prometheus server,
# the Pushgateway, promtool, Alertmanager (with amtool), and Chromium (renders the HTML report
# headless). Needs root (or passwordless sudo); without it the tests that need them skip and say why.
set -euo pipefail
if command -v prometheus >/dev/null && command -v prometheus-pushgateway >/dev/null \
    && command -v prometheus-alertmanager >/dev/null && command -v chromium >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-system-deps: not root; Prometheus and Chromium tests will skip" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq prometheus prometheus-pushgateway prometheus-alertmanager \
  chromium >/dev/null
