#!/usr/bin/env bash
# The real inference servers of the remote-backend tests (tests/remote/) and benchmarks/remote.py,
# each in its own virtual environment beside the project's (they pin packages segstream does not):
#
#   .venv-kserve    NVIDIA Triton bundled by PyTriton + ONNX Runtime (KServe v2)   ~450 MB, ~3 min
#   .venv-roboflow  the Roboflow inference server, inference-cpu[http] (its HTTP API) ~7 GB, ~13 min
#                   (inference-cpu pulls PyPI's torch, whose Linux wheels bring the CUDA libraries)
#
# Usage: scripts/install-remote-servers.sh [kserve] [roboflow]   (default: both)
# Installs only what is missing (a stamp per environment, keyed by the pinned versions).
# PYTHON (default python3) makes the environments; Triton's Python-backend stub loads that
# interpreter's libpython (tests/support/kserve_server.py puts its LIBDIR first on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

KSERVE_PKGS=("nvidia-pytriton==0.7.0" "onnxruntime==1.32.0")
ROBOFLOW_PKGS=("inference-cpu[http]==1.8.3")

install_env() {  # name, packages...
  local venv=".venv-$1"; shift
  local stamp="$venv/.stamp-$(echo "$*" | md5sum | cut -c1-12)"
  if [ -f "$stamp" ]; then
    return 0
  fi
  echo "installing $venv: $*"
  test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$@"
  touch "$stamp"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(kserve roboflow)
for target in "${targets[@]}"; do
  case "$target" in
    kserve) install_env kserve "${KSERVE_PKGS[@]}" ;;
    roboflow) install_env roboflow "${ROBOFLOW_PKGS[@]}" ;;
    *) echo "unknown server environment: $target (kserve, roboflow)" >&2; exit 2 ;;
  esac
done
