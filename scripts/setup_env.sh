#!/usr/bin/env bash
# Create or complete .venv (Python 3.11) with the pinned stack. Idempotent: a finished venv is left
# alone (a stamp file records the hash of the requirement files it was built from).
# CPU machines get torch's CPU build and SGLang without its CUDA dependencies; machines where
# nvidia-smi sees a GPU get SGLang's full CUDA dependency set. Set TANDEM_DEVICE=cpu|cuda to override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv
DEVICE=${TANDEM_DEVICE:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)}
if [ "$DEVICE" = cuda ]; then EXTRA=requirements/gpu.txt; else EXTRA=requirements/cpu.txt; fi
STAMP="$VENV/.tandem-stamp"
WANT="$DEVICE $(cat requirements/common.txt "$EXTRA" requirements/no-deps.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then exit 0; fi
echo "[setup_env] building $VENV for $DEVICE (a few minutes on first run)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null
if [ "$DEVICE" = cuda ]; then
  $PIP install -r requirements/gpu.txt -r requirements/common.txt
else
  # torch first, so nothing later resolves a CUDA build.
  $PIP install "$(grep -E '^torch==' requirements/cpu.txt)"
  $PIP install -r requirements/cpu.txt -r requirements/common.txt
  $PIP install --no-deps "sglang==$(grep -E '^sglang==' requirements/gpu.txt | cut -d= -f3)"
fi
$PIP install --no-deps -r requirements/no-deps.txt
$PIP install --no-deps -e .
echo "$WANT" > "$STAMP"
echo "[setup_env] done" >&2
