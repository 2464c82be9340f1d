# Sourced by the bench/*.sh scripts ON the device machine (repo root, `.device` carried; see
# bench/prepare_device_payload.sh): prints the machine, installs the carried wheels into /tmp/site, extracts
# ComfyUI 0.3.75 to /tmp/comfyui and defines make_ckpt ARCH NAME (random weights, ComfyUI's own classes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CK=/tmp/comfyui/models/checkpoints
step() { echo; echo "=== [$SECONDS s] $*"; }

device_setup() {
  step "machine"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
  nproc; free -g | head -2
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], sys.executable); print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'

  step "wheels -> /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/*.whl || {
    echo "wheel install failed"; return 1; }
  export PYTHONPATH=/tmp/site:$PWD

  step "ComfyUI -> /tmp/comfyui"
  rm -rf /tmp/comfyui && tar -xzf .device/comfyui-0.3.75.tar.gz -C /tmp || { echo "extract failed"; return 1; }
  python3 -c 'import sys; sys.path.insert(0, "/tmp/comfyui"); import comfyui_version; print("ComfyUI", comfyui_version.__version__)'
}

make_ckpt() {  # ARCH NAME (kept when an earlier step of the same call wrote it)
  step "$1-shaped random checkpoint -> $CK/$2"
  if [ -f "$CK/$2" ]; then echo "exists"; return 0; fi
  timeout 200 python3 tools/make_rand_ckpt.py /tmp/comfyui "$1" "$CK/$2" 2>&1 | grep -v '^WARNING'
  [ -f "$CK/$2" ]
}
