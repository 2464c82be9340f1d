"""Compare two servers' ProbeUNetCalls records (bench/probe_nodes): for each prompt and sampler, the first UNet call
where they part, which of its inputs already differed, and the torch state fields that differ.

usage: python bench/probe_compare.py PROBE_DIR SERVER_A SERVER_B [ROUND]   (PROBE_DIR: output/probe, unpacked)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    probe_dir, a, b = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    rnd = sys.argv[4] if len(sys.argv) > 4 else "2"
    for fa in sorted(probe_dir.glob(f"{a}_r{rnd}_*.jsonl")):
        key = fa.name[len(f"{a}_r{rnd}_"):-len(".jsonl")]
        fb = probe_dir / f"{b}_r{rnd}_{key}.jsonl"
        if not fb.exists():
            print(f"{key}: no record from {b}")
            continue
        ra, rb = rows(fa), rows(fb)
        first = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x["out"] != y["out"]), None)
        if first is None:
            print(f"{key}: {len(ra)} / {len(rb)} calls, every output equal")
            continue
        x, y = ra[first], rb[first]
        inputs = [k for k in ("shape", "x", "t", "cond_or_uncond", "c") if x[k] != y[k]]
        state = {k: (x["state"].get(k), y["state"].get(k)) for k in set(x["state"]) | set(y["state"])
                 if x["state"].get(k) != y["state"].get(k) and k not in ("thread",)}
        print(f"{key}: first differing call {first} of {len(ra)}; inputs differing: {inputs or 'none'}; "
              f"shape {x['shape']} / {y['shape']}, cond_or_uncond {x['cond_or_uncond']} / {y['cond_or_uncond']}; "
              f"|out| {x['out_abs_sum']:.6g} / {y['out_abs_sum']:.6g}; state differing: {state or 'none'}")
        print(f"    {a} state: {x['state']}")
        print(f"    {b} state: {y['state']}")


if __name__ == "__main__":
    main()
