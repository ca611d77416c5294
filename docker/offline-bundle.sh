#!/usr/bin/env bash
# Collect clip-fp8 and every dependency as wheels for one Python version and platform, into a tarball
# that installs with no network:
#
#   docker/offline-bundle.sh [--python 3.12] [--platform manylinux_2_28_x86_64] [--extras s3] [--no-torch] OUT.tar.gz
#   # on the air-gapped host:
#   tar xzf OUT.tar.gz && bash clip-fp8-bundle/install.sh            # into the active Python environment
#
# --no-torch leaves out torch, torchvision, triton and the nvidia-* CUDA wheels (several GB) for hosts
# that already have them, e.g. NVIDIA's PyTorch or TensorRT containers; install.sh then uses the
# installed torch. The dependency set is resolved once for the target (pip's --dry-run report), then each
# pinned wheel is downloaded with --no-deps, so leaving packages out cannot pull them back in.
set -euo pipefail

PYVER=3.12
PLATFORM=manylinux_2_28_x86_64
EXTRAS=""
NO_TORCH=0
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PYVER="$2"; shift 2 ;;
    --platform) PLATFORM="$2"; shift 2 ;;
    --extras) EXTRAS="$2"; shift 2 ;;
    --no-torch) NO_TORCH=1; shift ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    -*) echo "offline-bundle: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
[[ -n "$OUT" ]] || { echo "offline-bundle: give the output tarball, e.g. clip-fp8-bundle.tar.gz" >&2; exit 2; }
[[ "$PLATFORM" =~ ^manylinux_2_([0-9]+)_(x86_64|aarch64)$ ]] || {
  echo "offline-bundle: --platform '$PLATFORM' must look like manylinux_2_28_x86_64" >&2; exit 2; }
GLIBC_MINOR="${BASH_REMATCH[1]}"; ARCH="${BASH_REMATCH[2]}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STAGE="$WORK/clip-fp8-bundle"
mkdir -p "$STAGE/wheels"

# Wheels tagged for any glibc up to the target's are installable there; pip matches tags exactly.
PLATFORM_ARGS=()
for minor in $(seq "$GLIBC_MINOR" -1 17); do PLATFORM_ARGS+=(--platform "manylinux_2_${minor}_${ARCH}"); done
PLATFORM_ARGS+=(--platform "manylinux2014_${ARCH}" --platform "linux_${ARCH}")
TARGET_ARGS=(--python-version "$PYVER" --implementation cp --only-binary=:all: "${PLATFORM_ARGS[@]}")

echo "== building the clip-fp8 wheel"
"$PY" -m pip wheel -q --no-deps -w "$STAGE/wheels" "$ROOT"
PROJECT_WHEEL="$(ls "$STAGE"/wheels/clip_fp8-*.whl)"
REQ="$PROJECT_WHEEL"; [[ -n "$EXTRAS" ]] && REQ="clip-fp8[$EXTRAS] @ file://$PROJECT_WHEEL"

echo "== resolving dependencies for CPython $PYVER on $PLATFORM"
"$PY" -m pip install -q --dry-run --ignore-installed --target "$WORK/unused" --report "$WORK/report.json" \
  "${TARGET_ARGS[@]}" "$REQ"

"$PY" - "$WORK/report.json" "$NO_TORCH" > "$WORK/pins.txt" <<'EOF'
import json, re, sys
report, no_torch = json.load(open(sys.argv[1])), sys.argv[2] == "1"
host_provided = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-(cu|nccl|nvjitlink|nvtx|nvshmem).*)$")  # not nvidia-modelopt
for item in report["install"]:
    meta = item["metadata"]
    name = meta["name"].lower().replace("_", "-")
    if name == "clip-fp8" or (no_torch and host_provided.match(name)):
        continue
    print(f"{name}=={meta['version']}")
EOF
echo "== downloading $(wc -l < "$WORK/pins.txt") wheels"
"$PY" -m pip download -q --no-deps -d "$STAGE/wheels" "${TARGET_ARGS[@]}" -r "$WORK/pins.txt"
cp "$WORK/pins.txt" "$STAGE/requirements.lock"

INSTALL_EXTRAS=""; [[ -n "$EXTRAS" ]] && INSTALL_EXTRAS="[$EXTRAS]"
cat > "$STAGE/install.sh" <<EOF
#!/usr/bin/env bash
# Offline install of clip-fp8 from the wheels beside this script (CPython $PYVER, $PLATFORM$([[ $NO_TORCH == 1 ]] && echo ", torch from the host")).
set -euo pipefail
HERE="\$(cd "\$(dirname "\$0")" && pwd)"
PY="\${PYTHON:-python3}"
"\$PY" -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$PYVER" else "this bundle is for Python $PYVER, not " + v)'
$([[ $NO_TORCH == 1 ]] && echo "\"\$PY\" -c 'import torch' 2>/dev/null || { echo 'this bundle leaves torch to the host: install torch first (e.g. use an NVIDIA PyTorch/TensorRT container)' >&2; exit 1; }")
"\$PY" -m pip install --no-index --find-links "\$HERE/wheels" "clip-fp8$INSTALL_EXTRAS"
clip-fp8 --help > /dev/null && echo "clip-fp8 installed offline"
EOF
chmod +x "$STAGE/install.sh"

mkdir -p "$(dirname "$OUT")"
TMP_OUT="$(dirname "$OUT")/.$(basename "$OUT").$$.tmp"
tar -C "$WORK" -czf "$TMP_OUT" clip-fp8-bundle
mv "$TMP_OUT" "$OUT"   # never a half-written bundle under the final name
echo "== $OUT: $(ls "$STAGE/wheels" | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
