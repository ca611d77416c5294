#!/usr/bin/env bash
# Create .venv and install clip-fp8. Idempotent: a second call installs nothing new.
#   bash scripts/setup.sh          the pipeline
#   bash scripts/setup.sh --test   the pipeline, its test extras, and Debian's chromium + chromedriver
#                                  (the Prefect UI test drives a real browser)
#
# torch first, explicitly: open_clip and CLIP_benchmark need torchvision, and the torch 2.14.1 +
# torchvision 0.29.1 pair is the one that imports together here (both come from local disk on the
# project's CPU machines; elsewhere pip fetches them). A bare `torch` requirement would pull a newer
# multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
if [ "${1:-}" = "--test" ]; then
  # PYTHONWARNINGS: setuptools warns on every editable install of a package-dir mapping (see pyproject.toml),
  # about folders named like the package; there are none (the folders are tasks/, flows/, deployments/).
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  # Triton's model-configuration schema for the promotion tests: only its generated protobuf module is used,
  # so not its gRPC/ml-dtypes pins (which would downgrade what ONNX and ModelOpt need).
  .venv/bin/python -m pip install -q --no-deps "tritonclient==2.73.0" 2>&1 | grep -v "^WARNING: Location" || true
  if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  fi
else
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -c "import torch, torchvision, modelopt.torch.quantization, prefect, tensorrt_rtx_bindings, clip_benchmark" \
  2>/dev/null || { echo "setup.sh: the environment does not import; see the pip output above" >&2; exit 1; }
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
