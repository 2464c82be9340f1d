#!/usr/bin/env bash
# GPU check for ComfyUI 0.33, ON the device machine, in one call, from the repo root, with the payload of
# bench/prepare_device_payload_033.sh carried:
#   carry: [".device/site-0.33.tar.xz", ".device/comfyui-0.33.0.tar.xz", ".device/frontend", ".device/tree_state.txt"]
# Unpacks the packages into /tmp/site and ComfyUI into /tmp/comfyui, writes random-weight SD1.5 and SDXL
# checkpoints (both at once) and a random LoRA for each, then runs bench/gpu_check_033.py (the varied workflow set
# and W1/W2 on each server in turn) and prints its table. $OUT gets gpu_check_033.{log,json,md} and the servers'
# logs as server_logs.tar.gz (the device tool brings back 8 files at most).
# Timing on one H200 (bench/results/gpu_check_033_nvidia-h200.md, 10 identity steps): setup 77 s; stock 144 s
# without W2 (~25 s more with it), comfy-parallel ~85 s, stock identity set only 118 s. Hence 8 steps and 180 s
# per server by default, so the whole default list fits one call.
# Knobs: SERVERS (default below), DEVICES (comfy-parallel --devices; default 0*2 on one GPU, 0,1 on two),
#        CALL_S (seconds the whole call may take, default 570), SERVER_S (per server, default 180),
#        W_PROMPTS / W2_PROMPTS (measured W1 / W2 prompts, default 16 / 8), STEPS (identity set, default 8),
#        WORKLOADS (W1,W2), IDENT_ARCHS (model families of the identity set; default sd15,sdxl),
#        ARCHS (checkpoints to build, default sd15,sdxl), KINDS (identity set kinds, default all),
#        SCRIPT=soak (bench/soak.py instead: CONFIGS, default '0*2' and on two GPUs '0*2;0,1'; MINUTES, CLIENTS,
#        SOAK_COMFY_ARG e.g. --cache-classic for stock and comfy-parallel alike),
#        PROBE=1 (per-UNet-call digests of every identity prompt, bench/probe_nodes; $OUT/probe.tar.gz),
#        COMFYUI=0.3.75 (the 0.3.75 payload of bench/prepare_device_payload.sh instead; carry .device then).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_033_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CALL_S=${CALL_S:-570}
CK=/tmp/comfyui/models/checkpoints
ARCHS=${ARCHS:-sd15,sdxl}
step() { echo; echo "=== [$SECONDS s] $*"; }

source "$(dirname "$0")/device_unpack.sh"  # unpack_xz

setup_033() {
  step "packages -> /tmp/site"
  rm -rf /tmp/site && unpack_xz .device/site-0.33.tar.xz /tmp/site || { echo "package unpack failed"; return 1; }
  export PYTHONPATH=/tmp/site:$PWD
  step "ComfyUI 0.33.0 -> /tmp/comfyui"
  rm -rf /tmp/comfyui && unpack_xz .device/comfyui-0.33.0.tar.xz /tmp || { echo "ComfyUI unpack failed"; return 1; }
}

main() {
  step "machine"
  # what the calling checkout was (the device copy has no .git): written by the caller, see the results file
  [ -f .device/tree_state.txt ] && cat .device/tree_state.txt
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
  nproc; free -g | head -2
  ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
  DEVICES=${DEVICES:-$([ "$ngpu" -ge 2 ] && echo 0,1 || echo '0*2')}
  if [ "${COMFYUI:-0.33.0}" = 0.3.75 ]; then
    source bench/device_setup.sh && device_setup || return 1
  else
    setup_033 || return 1
  fi
  python3 - <<'EOF'
import importlib, sys
sys.path.insert(0, "/tmp/comfyui")
import comfyui_version
print("python", sys.version.split()[0], "ComfyUI", comfyui_version.__version__)
for name in ("torch", "torchaudio", "torchvision", "transformers", "comfy_kitchen", "comfy_aimdo", "av", "sqlalchemy",
             "alembic", "simpleeval", "blake3", "torchsde", "safetensors", "numpy"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        print(f"  {name}: IMPORT FAILED {type(err).__name__}: {err}")
import torch
print("  cuda", torch.version.cuda, "devices", torch.cuda.device_count())
EOF

  step "random checkpoints ($ARCHS, at once), then a LoRA for each"
  mkdir -p $CK /tmp/comfyui/models/loras
  for a in ${ARCHS//,/ }; do
    timeout 200 python3 tools/make_rand_ckpt.py /tmp/comfyui $a $CK/${a}_rand.safetensors 2>&1 | grep -v '^WARNING' &
  done
  wait
  archs=""
  for a in sd15 sdxl; do
    if [ -f $CK/${a}_rand.safetensors ]; then
      python3 tools/make_rand_lora.py $CK/${a}_rand.safetensors /tmp/comfyui/models/loras/${a}_rand_lora.safetensors 1 \
        && archs=$archs${archs:+,}$a
    fi
  done
  ls -la $CK /tmp/comfyui/models/loras
  [ -n "$archs" ] || { echo "no checkpoint"; return 1; }

  if [ -n "${PROBE:-}" ]; then
    cp -r bench/probe_nodes /tmp/comfyui/custom_nodes/probe_nodes
  fi
  left=$((CALL_S - SECONDS - 20))
  if [ "${SCRIPT:-}" = soak ]; then
    configs=${CONFIGS:-$([ "$ngpu" -ge 2 ] && echo '0*2;0,1' || echo '0*2')}
    step "soak.py: configs $configs, ${MINUTES:-3} min each, models $archs ($left s left)"
    python3 bench/soak.py --comfyui /tmp/comfyui --frontend .device/frontend --configs "$configs" \
      --archs "$archs" --minutes "${MINUTES:-3}" --steps "${STEPS:-8}" --clients "${CLIENTS:-8}" \
      --seeds "${SEEDS:-1}" --budget-s "$left" --out "$OUT" ${SOAK_COMFY_ARG:+--comfy-arg="$SOAK_COMFY_ARG"}
    rc=$?
  else
    step "gpu_check_033.py: $left s for the servers, devices $DEVICES, models $archs"
    python3 bench/gpu_check_033.py --comfyui /tmp/comfyui --frontend .device/frontend --devices "$DEVICES" \
      --archs "$archs" ${IDENT_ARCHS:+--ident-archs "$IDENT_ARCHS"} ${KINDS:+--kinds "$KINDS"} \
      --workloads "${WORKLOADS:-W1,W2}" ${PROBE:+--probe} --steps "${STEPS:-8}" --w-prompts "${W_PROMPTS:-16}" \
      --w2-prompts "${W2_PROMPTS:-8}" --server-budget-s "${SERVER_S:-180}" --budget-s "$left" --out "$OUT" \
      --servers "${SERVERS:-stock,parallel,parallel-dvram,parallel-pagecache,stock-nodvram-identonly}"
    rc=$?
  fi
  [ -d /tmp/comfyui/output/probe ] && tar -czf "$OUT/probe.tar.gz" -C /tmp/comfyui/output probe
  (cd "$OUT" && ls ./*.log | grep -v gpu_check_033.log >/dev/null 2>&1 \
     && tar -czf server_logs.tar.gz $(ls ./*.log | grep -v gpu_check_033.log) \
     && rm -f $(ls ./*.log | grep -v gpu_check_033.log))
  step "done rc=$rc"
  ls -la "$OUT"
  return $rc
}

main 2>&1 | tee "$OUT/gpu_check_033.log"
exit "${PIPESTATUS[0]}"
