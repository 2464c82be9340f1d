#!/usr/bin/env bash
# Build the payload that bench/gpu_check.sh needs on the device machine (run HERE, from anywhere).
#   .device/*.whl                 cp312 manylinux x86_64 wheels the device image lacks (DESIGN.md section 6)
#   .device/comfyui-0.3.75.tar.gz ComfyUI 0.3.75 without tests/.git/__pycache__
#   .device/frontend/index.html   a stand-in front end (ComfyUI is started with --front-end-root)
# Versions are pinned to the ones tested on the development machines (.venv). The device image already has
# aiohttp, yarl, multidict, propcache, prometheus-client, psutil, safetensors, transformers, einops, scipy, av's
# needs... (see the device docs' KINDS.md package list), so those are not carried.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
COMFY_SRC=${COMFY_SRC:-$ROOT/.cache/comfyui/0.3.75}
D=${DEVICE_DIR:-.device}  # DEVICE_DIR=.device075 keeps it beside the 0.33 payload; link it as .device there
grep -qxF "/$D/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$D/" >> .git/info/exclude; }
mkdir -p "$D/frontend"

WHEELS=(
  torchsde==0.2.6 trampoline==0.1.2 kornia==0.9.0 kornia-rs==0.2.0 spandrel==0.4.2 av==18.1.0
  alembic==1.20.1 SQLAlchemy==2.1.9 Mako==1.4.3 greenlet==3.4.0
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  typing-inspection==0.4.5 annotated-types==0.8.0
)
# PIP_CONSTRAINT/config of this machine must not filter a cross-platform download.
PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$D" "${WHEELS[@]}"

# Exactly one version of each distribution (two versions break `pip install --target`).
dups=$(ls "$D"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then echo "duplicate wheels in $D: $dups" >&2; exit 1; fi

if [ ! -f "$D/comfyui-0.3.75.tar.gz" ]; then
  [ -f "$COMFY_SRC/main.py" ] || { echo "no ComfyUI at $COMFY_SRC (run: comfy-parallel provision)" >&2; exit 1; }
  tar -C "$(dirname "$COMFY_SRC")" -czf "$D/comfyui-0.3.75.tar.gz" \
      --exclude=.git --exclude=__pycache__ --exclude='*.pyc' --exclude=tests --exclude=tests-unit \
      --exclude=.ci --exclude=.github --transform "s,^$(basename "$COMFY_SRC"),comfyui," "$(basename "$COMFY_SRC")"
fi
echo '<!doctype html><html><head><title>ComfyUI</title></head><body>comfy-parallel gpu check</body></html>' \
  > "$D/frontend/index.html"
ls -la "$D"
du -sh "$D"
size=$(du -sk "$D" | cut -f1)
[ "$size" -lt $((60 * 1024)) ] || { echo "payload ${size} KiB is too close to the 64 MiB carry limit" >&2; exit 1; }
