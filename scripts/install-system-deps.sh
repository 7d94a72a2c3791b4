#!/usr/bin/env bash
# Debian packages the integration tests need: mosquitto (MQTT broker), mosquitto-clients (mosquitto_sub /
# mosquitto_pub, for the README's MQTT example) and GStreamer's RTSP server
# (run with the system Python, /usr/bin/python3, which can import Debian's `gi`), and `prometheus`
# for promtool (tests/ops/test_deploy.py checks and unit-tests the alert rules and the Prometheus
# configs with it; the package's own Prometheus service is not needed and not started in containers).
# Installs only what is missing; needs root (or sudo) and apt-get.
set -euo pipefail

pkgs=(mosquitto mosquitto-clients python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
      gstreamer1.0-plugins-ugly chromium prometheus)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "missing system packages (${missing[*]}) and no apt-get: install them by hand" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
# Debian starts a system-wide mosquitto on port 1883; the tests start their own on free ports.
