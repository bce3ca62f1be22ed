#!/usr/bin/env bash
# Installs what the observability CI steps need on a fresh Debian 12 machine
# (as root, or through sudo): promtool (Debian package `prometheus`), chromium,
# jq, curl. Nothing is installed when everything is already there, and no
# service is left running: the prometheus package would start a Prometheus
# server, so package scripts are told not to start services (policy-rc.d).
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: promtool, chromium, jq and curl are installed"
  exit 0
fi
# Chromium needs a font to draw text (screenshots); dump-dom does not.
dpkg -s fonts-dejavu-core >/dev/null 2>&1 || missing+=(fonts-dejavu-core)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi

policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# sdgate CI: do not start services while installing packages\nexit 101\n' |
    "${SUDO[@]}" tee "$policy" >/dev/null
  "${SUDO[@]}" chmod 755 "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# Belt and braces: if a Prometheus server was started anyway, stop it (we only
# want promtool).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  "${SUDO[@]}" systemctl stop prometheus.service 2>/dev/null || true
  "${SUDO[@]}" systemctl disable prometheus.service 2>/dev/null || true
elif [ -x /etc/init.d/prometheus ]; then
  "${SUDO[@]}" /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi
for pidfile in /run/prometheus/prometheus.pid /var/run/prometheus.pid; do
  if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile")
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = prometheus ]; then "${SUDO[@]}" kill "$pid" 2>/dev/null || true; fi
  fi
done

for tool in promtool chromium jq curl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "deps: $tool still missing after install" >&2; exit 1; }
done
echo "deps: ok ($(promtool --version 2>&1 | head -1); $(chromium --version 2>/dev/null))"
