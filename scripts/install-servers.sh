#!/usr/bin/env bash
# Installs the real Prometheus server and Pushgateway (Debian packages) that the integration
# tests run against. Needs root (or passwordless sudo); without it the tests that need the
# servers skip and say why.
set -euo pipefail
if command -v prometheus >/dev/null && command -v prometheus-pushgateway >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-servers: not root; Prometheus integration tests will skip" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq prometheus prometheus-pushgateway >/dev/null
