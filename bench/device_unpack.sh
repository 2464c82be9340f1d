# Sourced by the device scripts for ComfyUI 0.33 (gpu_check_033.sh, affinity.sh).

unpack_xz() {  # ARCHIVE DIR: tar's xz filter, or Python's lzma where the xz binary is missing
  mkdir -p "$2"
  if command -v xz >/dev/null; then tar -xJf "$1" -C "$2"
  else python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"; fi
}
