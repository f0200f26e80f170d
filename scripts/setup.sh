#!/usr/bin/env bash
# Install latent-vae from this checkout with the extras named in $1 (default: demo; dev for the tests).
#
# torch: an already installed torch (a CUDA build on a GPU machine) is kept, since pyproject.toml
# asks only for a range. Where none is installed, a bare `torch` requirement would pull a multi-GB
# CUDA build, so a CPU build is installed first: `torch==2.13.0` (a CPU build on this project's
# machines). Elsewhere, point TORCH_INDEX_URL at PyTorch's CPU wheel index to get the same.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
python=${PYTHON:-python3}

if "$python" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $("$python" -c 'import torch; print(torch.__version__)')"
else
    echo "setup: installing a CPU build of torch"
    "$python" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
fi
"$python" -m pip install --quiet -e ".[${extras}]"
echo "setup: latent-vae installed with extras [${extras}]"
