#!/usr/bin/env bash
# GPU check, ON the device machine, from the repo root, with `.device` carried (bench/prepare_device_payload.sh):
#   installs the carried wheels into /tmp/site, extracts ComfyUI 0.3.75 to /tmp/comfyui, writes random-weight
#   SD1.5 (and, time permitting, SDXL) checkpoints, then runs bench/gpu_check.py (stock ComfyUI, then
#   comfy-parallel serve on every visible GPU). Everything it prints is in $OUT/gpu_check.log; per-server logs
#   (as server_logs.tar.gz) and one JSON per workload land in $OUT too.
# Keeps the whole call under ~9 minutes: W2 (SDXL) only runs when W1 finished inside the first 4 minutes.
# Knobs: SERVERS_W1 / SERVERS_W2 (comma list of stock, stock-procs, parallel, graphs; default stock,parallel;
#        stock-procs = one stock ComfyUI process per GPU, its N logs joined into one file), PER_GPU (8),
#        DEVICES (comfy-parallel --devices, e.g. 0*2; default every GPU),
#        SKIP_W2=1, W2_AFTER_S (240), BUDGET_S (530). Exit status 1 when any server failed.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
source bench/device_setup.sh
W2_AFTER_S=${W2_AFTER_S:-240}    # start W2 only if this many seconds have not passed yet
BUDGET_S=${BUDGET_S:-530}        # hard stop for the last step

main() {

device_setup || return 1

step "SD1.5-shaped random checkpoint"
timeout 120 python3 tools/make_rand_ckpt.py /tmp/comfyui sd15 $CK/sd15_rand.safetensors 2>&1 | grep -v '^WARNING' || {
  echo "checkpoint failed"; return 1; }
ls -la $CK

step "W1: SD1.5-shaped, 512x512, 20 steps"
timeout $((BUDGET_S - SECONDS)) python3 bench/gpu_check.py --comfyui /tmp/comfyui --frontend .device/frontend \
  --ckpt sd15_rand.safetensors --label W1 --width 512 --steps 20 --per-gpu "${PER_GPU:-8}" --out "$OUT" ${DEVICES:+--devices "$DEVICES"} \
  --servers "${SERVERS_W1:-stock,parallel}"
rc=$?

if [ "$SECONDS" -lt "$W2_AFTER_S" ] && [ "${SKIP_W2:-0}" != 1 ]; then
  step "SDXL-shaped random checkpoint"
  rm -f $CK/sd15_rand.safetensors   # only one checkpoint on disk at a time
  if timeout 150 python3 tools/make_rand_ckpt.py /tmp/comfyui sdxl $CK/sdxl_rand.safetensors 2>&1 | grep -v '^WARNING'; then
    step "W2: SDXL-shaped, 1024x1024, 20 steps"
    timeout $((BUDGET_S - SECONDS)) python3 bench/gpu_check.py --comfyui /tmp/comfyui --frontend .device/frontend \
      --ckpt sdxl_rand.safetensors --label W2 --width 1024 --steps 20 --per-gpu "${PER_GPU:-8}" --out "$OUT" ${DEVICES:+--devices "$DEVICES"} \
      --prompt-timeout 240 --servers "${SERVERS_W2:-stock,parallel}"
    rc2=$?
    [ $rc -ne 0 ] || rc=$rc2
  else
    echo "SDXL checkpoint failed; W2 skipped"
  fi
else
  echo "W2 skipped (${SECONDS}s used)"
fi
# The device tool brings back 8 files: the per-server logs travel as one archive.
(cd "$OUT" && ls W[12]_*.log >/dev/null 2>&1 && tar -czf server_logs.tar.gz W[12]_*.log && rm -f W[12]_*.log)
step "done rc=$rc"
ls -la "$OUT"
return $rc
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
