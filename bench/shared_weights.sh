#!/usr/bin/env bash
# Shared-weights benchmark, ON the device machine in one call (repo root, `.device` carried; see
# bench/prepare_device_payload.sh): installs, writes SDXL- and SD1.5-shaped random checkpoints, measures swap-in
# GB/s in one process (bench/swap_in.py), then host RSS of stock ComfyUI vs comfy-parallel with two workers
# (bench/shared_weights.py). Two workers need two GPUs or `DEVICES=0*2` (two workers on GPU 0; the default
# when one GPU is visible). Output: $OUT/shared_weights.log, .md, .json, swap_in.json and server logs.
set -uo pipefail
OUT=${OUT:-/tmp/shared_weights_out}
mkdir -p "$OUT"
source bench/device_setup.sh

main() {
  device_setup || return 1
  if [ -z "${DEVICES:-}" ]; then
    n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
    if [ "$n" -ge 2 ]; then DEVICES=0,1; else DEVICES='0*2'; fi
  fi
  make_ckpt sdxl sdxl_rand.safetensors || return 1
  make_ckpt sd15 sd15_rand.safetensors || return 1
  step "swap-in (one process)"
  timeout 200 python3 bench/swap_in.py --comfyui /tmp/comfyui --ckpt sdxl_rand.safetensors --out "$OUT" 2>&1 \
    | grep -v '^WARNING\|^Using\|^Set vram\|^Device:\|^pytorch\|^Total VRAM\|^Enabled\|^Python\|^ComfyUI'
  step "host RSS: stock vs comfy-parallel --devices $DEVICES"
  timeout $((580 - SECONDS)) python3 bench/shared_weights.py --comfyui /tmp/comfyui --frontend .device/frontend \
    --ckpt sdxl_rand.safetensors --ckpt2 sd15_rand.safetensors --devices "$DEVICES" --out "$OUT" \
    ${SCENARIOS:+--scenarios "$SCENARIOS"}
  rc=$?
  step "done rc=$rc"
  return $rc
}

main 2>&1 | tee "$OUT/shared_weights.log"
exit "${PIPESTATUS[0]}"
