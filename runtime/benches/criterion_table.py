#!/usr/bin/env python3
"""Prints the results of `cargo bench --bench memory` as Markdown tables.

Reads criterion's `target/criterion/*/**/new/{benchmark,estimates}.json` and
prints, per group, each bench's median and mean time per iteration and, for
topos variants, the ratio of its median to each baseline's median measured
with the same parameter (hit/miss, size). Usage, from the workspace root:

    python3 runtime/benches/criterion_table.py [target/criterion]
"""

import json
import pathlib
import sys

BASELINES = ["ch_bus", "crosvm_bus", "vm_device", "vm_device_mutex", "vm_memory"]


def fmt(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
    groups = {}
    for b in sorted(root.glob("**/new/benchmark.json")):
        meta = json.loads(b.read_text())
        est = json.loads((b.parent / "estimates.json").read_text())
        groups.setdefault(meta["group_id"], []).append(
            (meta["function_id"], meta.get("value_str") or "", est["median"]["point_estimate"], est["mean"]["point_estimate"])
        )
    for group, rows in groups.items():
        base = {(f, v): med for f, v, med, _ in rows if f in BASELINES}
        names = [b for b in BASELINES if any(f == b for f, _ in base)]
        print(f"\n#### `{group}`\n")
        head = "| bench | param | median | mean |" + "".join(f" topos ÷ {n} |" for n in names)
        print(head)
        print("|" + " --- |" * (4 + len(names)))
        for f, v, med, mean in sorted(rows, key=lambda r: (r[1], r[0] in BASELINES, r[0])):
            cells = ""
            for n in names:
                ref = base.get((n, v))
                cells += f" {med / ref:.2f} |" if ref and f.startswith("topos") else " |"
            print(f"| {f} | {v} | {fmt(med)} | {fmt(mean)} |{cells}")


if __name__ == "__main__":
    main()
