"""Compare the images of two gpu_check runs seed by seed (stock ComfyUI's digests do not change between runs).

usage: python3 bench/compare_images.py REFERENCE.json [SERVER] OTHER.json [SERVER]
       (SERVER defaults: stock in the reference, parallel in the other)
Prints, per seed, the max |row mean difference| (0..255) and exits 1 when any seed differs or is missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gpu_check import seed_diffs  # this script's folder is on sys.path when run as python3 bench/compare_images.py


def digests(path: str, server: str) -> dict[str, list]:
    results = json.loads(Path(path).read_text())["results"]
    return next(r for r in results if r["server"] == server)["image_digests"]


def main(argv: list[str]) -> int:
    args = list(argv)
    ref_path = args.pop(0)
    ref_server = args.pop(0) if args and not args[0].endswith(".json") else "stock"
    other_path = args.pop(0)
    other_server = args.pop(0) if args else "parallel"
    ref, other = digests(ref_path, ref_server), digests(other_path, other_server)
    worst = 0
    for seed, diff in seed_diffs(ref, other).items():
        if diff is None:
            print(f"seed {seed}: missing or unreadable in {other_path} ({str(other.get(seed))[:80]})")
            worst = 256
            continue
        worst = max(worst, diff)
        print(f"seed {seed}: max diff {diff}")
    print(f"{len(ref)} seeds, worst {worst}")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
