#!/usr/bin/env bash
# Host-time profile of one sampling step, ON the device machine, from the repo root, with `.device` carried
# (bench/prepare_device_payload.sh, plus the py-spy wheel: see bench/results/profile_step_nvidia-h200.md):
#   installs the carried wheels into /tmp/site (py-spy lands in /tmp/site/bin), extracts ComfyUI 0.3.75 to
#   /tmp/comfyui, writes the SD1.5- and SDXL-shaped random-weight checkpoints (in parallel), then runs
#   bench/profile_step.py (W1, W2, then py-spy children). Output in $OUT: profile_step.log, profile_step.json,
#   key_averages.txt, pyspy_*.txt (6 files; the device tool brings back 8).
# Keeps the whole call under ~9 minutes (BUDGET_S, default 520 s). Extra arguments go to profile_step.py.
set -uo pipefail
OUT=${OUT:-/tmp/profile_step_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-520}
step() { echo; echo "=== [$SECONDS s] $*"; }

main() {
step "machine"
nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv || true
nproc; free -g | head -2; uname -r; grep -m1 'model name' /proc/cpuinfo
python3 -c 'import sys, torch; print("python", sys.version.split()[0], sys.executable); print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'

step "wheels -> /tmp/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/*.whl || {
  echo "wheel install failed"; return 1; }
export PYTHONPATH=/tmp/site:$PWD
PYSPY=/tmp/site/bin/py-spy
if [ -x "$PYSPY" ]; then "$PYSPY" --version; else echo "no py-spy carried; py-spy part skipped"; PYSPY=""; fi

step "ComfyUI -> /tmp/comfyui"
rm -rf /tmp/comfyui && tar -xzf .device/comfyui-0.3.75.tar.gz -C /tmp || { echo "extract failed"; return 1; }
python3 -c 'import sys; sys.path.insert(0, "/tmp/comfyui"); import comfyui_version; print("ComfyUI", comfyui_version.__version__)'

step "random-weight checkpoints (SD1.5 and SDXL shapes, in parallel)"
CK=/tmp/ckpt; mkdir -p $CK
timeout 150 python3 tools/make_rand_ckpt.py /tmp/comfyui sd15 $CK/sd15_rand.safetensors > /tmp/ck_sd15.log 2>&1 &
p1=$!
timeout 150 python3 tools/make_rand_ckpt.py /tmp/comfyui sdxl $CK/sdxl_rand.safetensors > /tmp/ck_sdxl.log 2>&1 &
p2=$!
wait $p1; r1=$?; wait $p2; r2=$?
grep -v '^WARNING' /tmp/ck_sd15.log /tmp/ck_sdxl.log | tail -6
ls -la $CK
[ $r1 -eq 0 ] || { echo "SD1.5 checkpoint failed"; return 1; }
W2ARG=(--ckpt-w2 $CK/sdxl_rand.safetensors)
[ $r2 -eq 0 ] || { echo "SDXL checkpoint failed; W2 skipped"; W2ARG=(); }

step "profile_step.py"
timeout $((BUDGET_S - SECONDS)) python3 bench/profile_step.py --comfyui /tmp/comfyui \
  --ckpt-w1 $CK/sd15_rand.safetensors "${W2ARG[@]}" --out "$OUT" --pyspy "$PYSPY" "$@"
rc=$?
step "done rc=$rc"
ls -la "$OUT"
return $rc
}

main "$@" 2>&1 | tee "$OUT/profile_step.log"
exit "${PIPESTATUS[0]}"
