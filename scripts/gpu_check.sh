#!/usr/bin/env bash
# The checks only a CUDA machine can run (tests/gpu): NCCL weight pushes into every rollout engine,
# each engine's workers seeing exactly their bundles' GPUs, rollout memory released and resumed
# around training. Needs the CUDA environment (torch with CUDA, sglang with its kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
exec "$PY" -m pytest -q -m gpu tests/gpu "$@"
