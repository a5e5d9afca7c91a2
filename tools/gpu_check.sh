#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py): run from the repository root on the GPU host.
#   tools/gpu_check.sh --out runs/gpu-check [--authors .authors/dbot/models_mae.py] [--budget-s 660]
# About 11 minutes (the budget), so that with the machine's start-up it fits 15 minutes of GPU time.
# The host's own torch/torchvision are used; packages it lacks (timm, omegaconf, pytest, ...) are installed from
# wheels carried in .whl/ (no network: pip --no-index). See docs/BENCHMARKS.md, "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import timm, omegaconf, tqdm, pytest" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps .whl/*.whl
    else
        echo "gpu_check: timm/omegaconf/tqdm/pytest missing and no wheels in .whl/ (see docs/BENCHMARKS.md)" >&2
        exit 2
    fi
fi
exec "$PYTHON" -m tools.gpu_check "$@"
