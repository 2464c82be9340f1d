#!/usr/bin/env bash
# The write-ahead queue's cost (bench/crash_safe_queue.py) ON the device machine, whose 16 idle cores give the
# quiet machine a 2-core shared VM lacks (there single rounds scatter from 0.4 to 1.5 times the no-store rate).
# Only CPU workers run (the GPU is not used). From the repo root, with the payload of
# bench/prepare_device_payload_033.sh carried:
#   carry: [".devtree", ".device/site-0.33.tar.xz", ".device/comfyui-0.33.0.tar.xz", ".device/frontend",
#           ".device/tree_state.txt"]
#   command: cd .devtree && ln -sfn ../.device .device && ROUNDS=48 BUDGET_S=300 bash bench/crash_safe_queue_device.sh
# Knobs: ROUNDS, BUDGET_S (seconds of throughput rounds), VARIANTS (comma list of bench/store_variants/ folders,
# e.g. writer_thread,switch_0_5ms), SKIP_FULL=1 (no synchronous=FULL server), SKIP_CRASH=1 (no crash-to-/ready),
# OTHER_LOAD. bench/gil_handover.py runs first (seconds).
# $OUT gets crash_safe_queue_device.{md,json,log} and gil_handover_device.md.
set -uo pipefail
OUT=${OUT:-/tmp/crash_safe_queue_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/device_unpack.sh"  # unpack_xz
{
  [ -f .device/tree_state.txt ] && cat .device/tree_state.txt
  nproc; free -g | head -2
  rm -rf /tmp/site /tmp/comfyui
  unpack_xz .device/site-0.33.tar.xz /tmp/site || { echo "package unpack failed"; exit 1; }
  unpack_xz .device/comfyui-0.33.0.tar.xz /tmp || { echo "ComfyUI unpack failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${EXTRA_SITE:+:$EXTRA_SITE}  # EXTRA_SITE: packages carried beside the payload
  python3 bench/gil_handover.py --out "$OUT/gil_handover_device.md"
  python3 bench/crash_safe_queue.py --comfyui /tmp/comfyui --rounds "${ROUNDS:-48}" \
    --comfy-arg="--front-end-root=$PWD/.device/frontend" ${VARIANTS:+$(printf -- "--variant %s " ${VARIANTS//,/ })} \
    ${SKIP_FULL:+--skip-full} ${SKIP_CRASH:+--skip-crash} --other-load "${OTHER_LOAD:-0.5}" --budget-s "${BUDGET_S:-300}" --out "$OUT" --label device
} 2>&1 | tee "$OUT/crash_safe_queue_device.log"
exit "${PIPESTATUS[0]}"
