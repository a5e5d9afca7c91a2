#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py): run from the repository root on the GPU host.
#   tools/gpu_check.sh --out runs/gpu-check [--authors .authors/dbot/models_mae.py] [--budget-s 480]
# The host's own torch/torchvision are used; packages it lacks (timm, omegaconf, ...) are installed from
# wheels carried in .whl/ (no network: pip --no-index). See docs/BENCHMARKS.md, "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import timm, omegaconf, tqdm" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps .whl/*.whl
    else
        echo "gpu_check: timm/omegaconf/... missing and no wheels in .whl/ (see docs/BENCHMARKS.md)" >&2
        exit 2
    fi
fi
exec "$PYTHON" -m tools.gpu_check "$@"
