#!/usr/bin/env bash
# Scheduling benchmark (issue 16) ON the device machine, in one call, from the repo root, with the payload of
# bench/prepare_device_payload_033.sh carried:
#   carry: [".device/site-0.33.tar.xz", ".device/comfyui-0.33.0.tar.xz", ".device/frontend",
#           ".device/tree_state.txt", ".device/nginx"]
# Unpacks the packages into /tmp/site and ComfyUI 0.33.0 into /tmp/comfyui, writes one random-weight SDXL checkpoint
# and two perturbed copies of it (three SDXL-shaped checkpoints, tools/perturb_ckpt.py), then runs bench/affinity.py
# (servers pool, auto, stock behind nginx, fifo for stream a) and prints its table. $OUT gets affinity.{log,json,md}
# and the servers' logs as server_logs.tar.gz (the device tool brings back 8 files at most).
# nginx: the one on PATH, else the carried .device/nginx (a copy of this machine's binary), else bench/affinity.py
# makes nginx's least_conn choice itself (the table says which).
# Knobs: SERVERS (default pool,auto,stock,fifo:a), DEVICES (default 0*2 on one GPU, 0,1 on two), CALL_S (seconds the
#        whole call may take, default 540), VRAM_GIB (budget per worker, default 12), A_PROMPTS (16), B_ROUNDS (15),
#        C_LONG / C_SHORT (6 / 18), SLACK (pool's --affinity-slack; default the server's), EXTRA (more affinity.py
#        arguments).
set -uo pipefail
OUT=${OUT:-/tmp/affinity_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CALL_S=${CALL_S:-540}
CK=/tmp/comfyui/models/checkpoints
step() { echo; echo "=== [$SECONDS s] $*"; }

source "$(dirname "$0")/device_unpack.sh"  # unpack_xz

main() {
  step "machine"
  [ -f .device/tree_state.txt ] && cat .device/tree_state.txt
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
  nproc; free -g | head -2
  ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
  DEVICES=${DEVICES:-$([ "$ngpu" -ge 2 ] && echo 0,1 || echo '0*2')}

  step "packages -> /tmp/site, ComfyUI 0.33.0 -> /tmp/comfyui"
  rm -rf /tmp/site /tmp/comfyui
  unpack_xz .device/site-0.33.tar.xz /tmp/site || { echo "package unpack failed"; return 1; }
  unpack_xz .device/comfyui-0.33.0.tar.xz /tmp || { echo "ComfyUI unpack failed"; return 1; }
  export PYTHONPATH=/tmp/site:$PWD

  nginx_arg=()
  if ! command -v nginx >/dev/null && [ -f .device/nginx ]; then
    cp .device/nginx /tmp/nginx-bin && chmod +x /tmp/nginx-bin
    if /tmp/nginx-bin -v 2>&1; then nginx_arg=(--nginx /tmp/nginx-bin); else echo "carried nginx does not run here"; fi
  fi

  step "one random SDXL checkpoint, then two perturbed copies"
  mkdir -p $CK
  timeout 240 python3 tools/make_rand_ckpt.py /tmp/comfyui sdxl $CK/sdxl_a.safetensors 2>&1 | grep -v '^WARNING'
  [ -f $CK/sdxl_a.safetensors ] || { echo "no checkpoint"; return 1; }
  python3 tools/perturb_ckpt.py $CK/sdxl_a.safetensors $CK/sdxl_b.safetensors 2 &
  python3 tools/perturb_ckpt.py $CK/sdxl_a.safetensors $CK/sdxl_c.safetensors 3 &
  wait
  ls -la $CK

  left=$((CALL_S - SECONDS - 25))
  step "affinity.py: $left s for the servers, devices $DEVICES"
  python3 bench/affinity.py --comfyui /tmp/comfyui --frontend .device/frontend --ckpt-dir $CK \
    --ckpts sdxl_a.safetensors,sdxl_b.safetensors,sdxl_c.safetensors --devices "$DEVICES" \
    --servers "${SERVERS:-pool,auto,stock,fifo:a}" --worker-vram-gib "${VRAM_GIB:-12}" \
    --a-prompts "${A_PROMPTS:-16}" --b-rounds "${B_ROUNDS:-15}" --c-long "${C_LONG:-6}" --c-short "${C_SHORT:-18}" \
    ${SLACK:+--slack "$SLACK"} "${nginx_arg[@]}" --budget-s "$left" --out "$OUT" ${EXTRA:-}
  rc=$?
  (cd "$OUT" && logs=$(ls ./*.log 2>/dev/null | grep -v affinity.log) && [ -n "$logs" ] \
     && tar -czf server_logs.tar.gz $logs && rm -f $logs)
  step "done rc=$rc"
  ls -la "$OUT"
  return $rc
}

main 2>&1 | tee "$OUT/affinity.log"
exit "${PIPESTATUS[0]}"
