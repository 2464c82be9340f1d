#!/usr/bin/env bash
# Build what bench/gpu_check_033.sh needs on the device machine for ComfyUI 0.33.0 (run HERE, from anywhere):
#   .device/site-0.33.tar.xz      the Python packages the device image lacks, installed with pip --target
#                                 for cp312 manylinux x86_64 (unpacked there into /tmp/site, no pip run needed)
#   .device/comfyui-0.33.0.tar.xz ComfyUI 0.33.0 (.cache/comfyui/0.33.0) without tests/.git/__pycache__
#   .device/frontend/index.html   a stand-in front end (ComfyUI is started with --front-end-root)
#   .device/tree_state.txt        the checkout's commit and uncommitted files (the device copy has no .git)
#   .device/nginx                 this machine's nginx binary, for bench/affinity.sh (when this machine has one)
# The 0.3.75 payload (bench/prepare_device_payload.sh: .device/*.whl, comfyui-0.3.75.tar.gz) may sit beside it;
# a 0.33 call carries only these four paths, which must stay under the 64 MiB a call can carry.
#
# Why a pre-installed, xz-compressed folder and not wheels: comfy-kitchen's wheel is 58 MB and av's 35 MB, so
# the wheels alone exceed the carry limit. Installed and xz-compressed, without comfy-kitchen's HIP backend
# (37 MB unpacked, never loaded on NVIDIA GPUs; its RECORD line is removed with it) and without the optional
# kornia/kornia-rs/spandrel (only extra nodes import them; ComfyUI logs the failed import and goes on), the
# packages take ~47 MiB.
#
# Not carried because the device image has them (KINDS.md package list): torch 2.11, torchaudio 2.11,
# torchvision, transformers 5.x (0.33 accepts >=4.50.3), tokenizers, safetensors, aiohttp, yarl, filelock,
# psutil, einops, scipy, pillow, numpy, prometheus-client, requests, pyyaml, tqdm, sentencepiece.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
COMFY_SRC=${COMFY_SRC:-$ROOT/.cache/comfyui/0.33.0}
D=.device
WHEELS_DIR=${WHEELS_DIR:-$ROOT/.cache/device-wheels-0.33}
STAGE=$ROOT/.cache/device-site-0.33
mkdir -p "$D/frontend" "$WHEELS_DIR"

WHEELS=(
  torchsde==0.2.6 trampoline==0.1.2 av==18.1.0
  alembic==1.20.1 SQLAlchemy==2.1.9 Mako==1.4.3 greenlet==3.4.0
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  typing-inspection==0.4.5 annotated-types==0.8.0
  comfy-kitchen==0.2.31 comfy-aimdo==0.4.13 simpleeval==1.0.8 blake3==1.0.11 orjson==3.13.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux1_x86_64 any)
TARGET_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for p in "${PLATFORMS[@]}"; do TARGET_ARGS+=(--platform "$p"); done

if [ ! -f "$D/site-0.33.tar.xz" ]; then
  # PIP_CONSTRAINT/config of this machine must not filter a cross-platform download.
  PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps "${TARGET_ARGS[@]}" -d "$WHEELS_DIR" "${WHEELS[@]}"
  rm -rf "$STAGE"
  PIP_CONFIG_FILE=/dev/null python3 -m pip install -q --no-deps --no-compile "${TARGET_ARGS[@]}" --target "$STAGE" \
    "$WHEELS_DIR"/*.whl
  rm -rf "$STAGE/bin" "$STAGE/include"  # console scripts with this machine's shebang; greenlet's C headers
  rm -f "$STAGE/comfy_kitchen/backends/hip/_C.abi3.so"
  sed -i '\,^comfy_kitchen/backends/hip/_C\.abi3\.so,d' "$STAGE"/comfy_kitchen-*.dist-info/RECORD
  tar -C "$STAGE" -cf - . | xz -T0 -6 > "$D/site-0.33.tar.xz.part"
  mv "$D/site-0.33.tar.xz.part" "$D/site-0.33.tar.xz"
  rm -rf "$STAGE"
fi

if [ ! -f "$D/comfyui-0.33.0.tar.xz" ]; then
  [ -f "$COMFY_SRC/main.py" ] || { echo "no ComfyUI 0.33.0 at $COMFY_SRC (run: make provision)" >&2; exit 1; }
  tar -C "$(dirname "$COMFY_SRC")" -cf - \
      --exclude=.git --exclude=__pycache__ --exclude='*.pyc' --exclude=tests --exclude=tests-unit \
      --exclude=.ci --exclude=.github --exclude='models/*/*.safetensors' --exclude='output/*' --exclude='temp/*' \
      --exclude='user/*' --transform "s,^$(basename "$COMFY_SRC"),comfyui," "$(basename "$COMFY_SRC")" \
    | xz -T0 -6 > "$D/comfyui-0.33.0.tar.xz"
fi
# The device copy of the working tree has no .git: record what it is (run this script right before each call).
{ echo "checkout: $(git log -1 --format='%h %s' | cut -c1-150)"
  echo "uncommitted (git status --short):"; git status --short | sed 's/^/  /'
  echo "diff of tracked files: $(git diff HEAD | sha256sum | cut -c1-16)"; } > "$D/tree_state.txt"
echo '<!doctype html><html><head><title>ComfyUI</title></head><body>comfy-parallel gpu check</body></html>' \
  > "$D/frontend/index.html"
# bench/affinity.sh puts stock ComfyUI behind nginx; the device image may have none: carry this machine's binary
# (1.3 MB; it links libssl, libcrypto, libpcre2-8, libz and libcrypt, which a CUDA image with Python has)
NGINX=$(command -v nginx || ls /usr/sbin/nginx 2>/dev/null || true)
if [ -n "$NGINX" ] && [ ! -f "$D/nginx" ]; then cp "$NGINX" "$D/nginx"; fi
ls -la "$D"
size=$(du -ck "$D/site-0.33.tar.xz" "$D/comfyui-0.33.0.tar.xz" "$D/frontend" "$D/tree_state.txt" \
  $([ -f "$D/nginx" ] && echo "$D/nginx") | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "0.33 payload ${size} KiB + working tree ${tree} KiB"
[ $((size + tree)) -lt $((62 * 1024)) ] || { echo "too close to the 64 MiB carry limit" >&2; exit 1; }
