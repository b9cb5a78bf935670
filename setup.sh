#!/usr/bin/env bash
# Set up PancreasC2F in ./.venv (idempotent).
#   bash setup.sh          runtime: the library, the CLI and the bundled demo model
#   bash setup.sh --test   also the test requirements (pytest, hypothesis, slicer-core, ...)
# PyTorch: an existing torch in the venv is kept. Otherwise torch==$TORCH_VERSION is installed
# (on Linux, PyPI's default wheel is the CUDA build; where a local CPU wheel is configured, as on
# our CI, pip takes that). For a specific CUDA/ROCm/CPU build, install torch into .venv first
# (see https://pytorch.org/get-started/locally/) and this script will keep it.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "installing torch==$TORCH_VERSION ..."
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
"${PIP[@]}" install -e ".$extras"
"$VENV/bin/python" -c "import torch, PancreasC2FLib; print('PancreasC2F', PancreasC2FLib.__version__, '| torch', torch.__version__, '| CUDA' if torch.cuda.is_available() else '| CPU')"
