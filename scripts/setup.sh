#!/usr/bin/env bash
# Create .venv and install clip-fp8. Idempotent: a second call installs nothing new.
#   bash scripts/setup.sh          the pipeline
#   bash scripts/setup.sh --serve  the pipeline and a Triton server for `clip-fp8 serve` and promotion's smoke check
#   bash scripts/setup.sh --test   the pipeline, the server, its test extras, and Debian's chromium + chromedriver
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
  if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  fi
elif [ "${1:-}" = "--serve" ]; then
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".[serve]" 2>&1 | grep -v "^WARNING: Location" || true
else
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true
fi
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--serve" ]; then
  # tritonserver and its Python-backend stubs from nvidia-pytriton's wheel, without its numpy<2 pin (its own Python
  # code is not used); the stub, built against NumPy 1, gets a NumPy 1 of its own (clip_fp8/triton_server.py).
  .venv/bin/python -m pip install -q --no-deps "nvidia-pytriton==0.7.0" 2>&1 | grep -v "^WARNING: Location" || true
  read -r STUB_SITE STUB_NUMPY <<< "$(.venv/bin/python -c "from clip_fp8.triton_server import STUB_SITE, STUB_NUMPY; print(STUB_SITE, STUB_NUMPY)")"
  [ -d "$STUB_SITE/numpy" ] || .venv/bin/python -m pip install -q --no-deps --target "$STUB_SITE" "$STUB_NUMPY" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -c "import torch, torchvision, modelopt.torch.quantization, prefect, tensorrt_rtx_bindings, clip_benchmark" \
  2>/dev/null || { echo "setup.sh: the environment does not import; see the pip output above" >&2; exit 1; }
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
