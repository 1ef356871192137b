"""Turn pytest-benchmark JSON files into the ratio tables of bench/RESULTS.md.

Usage: python bench/report.py OUT.json [MORE.json ...] > table.md
Ratios are formed only between rows of the same JSON file (one run, one machine).
"""

import json
import sys
from collections import defaultdict


def median_ms(bench):
    return 1e3 * bench["stats"]["median"]


def speed_table(benches):
    groups = defaultdict(list)
    for b in benches:
        if not b["extra_info"].get("memory") and not b["extra_info"].get("interleaved"):
            groups[b["group"]].append(b)
    lines = []
    for name, rows in groups.items():
        by_method = {r["extra_info"]["method"]: r for r in rows}
        frozen = by_method.get("frozen")
        lora = by_method.get("LoRA r=16")
        peft = by_method.get("peft LoRA r=16")
        lines += [
            f"\n**{name}**\n",
            "| method | median ms | / frozen | / LoRA r=16 | / peft LoRA r=16 | TFLOP/s (frozen-layer flops) |",
            "|---|---|---|---|---|---|",
        ]

        def ratio(ms, ref):
            return f"{ms / median_ms(ref):.3f}" if ref else "-"

        for method, r in by_method.items():
            ms = median_ms(r)
            tflops = r["extra_info"]["flops"] / (ms * 1e-3) / 1e12
            lines.append(
                f"| {method} | {ms:.2f} | {ratio(ms, frozen)} | {ratio(ms, lora)} | {ratio(ms, peft)} | {tflops:.3f} |"
            )
    return "\n".join(lines)


def interleaved_table(benches):
    lines = []
    for b in benches:
        info = b["extra_info"]
        if not info.get("interleaved"):
            continue
        medians = info["median_ms"]
        frozen = medians["frozen"]
        lora = next((v for k, v in medians.items() if k.startswith("LoRA")), None)
        peft = next((v for k, v in medians.items() if k.startswith("peft")), None)
        lines += [
            f"\n**{b['group']}** ({info['rounds']} rounds, every method once per round)\n",
            "| method | median ms | / frozen | / LoRA r=16 | / peft LoRA r=16 |",
            "|---|---|---|---|---|",
        ]
        for name, ms in medians.items():
            cells = [f"{ms / ref:.3f}" if ref else "-" for ref in (frozen, lora, peft)]
            lines.append(f"| {name} | {ms:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(benches):
    groups = defaultdict(list)
    for b in benches:
        if b["extra_info"].get("memory"):
            groups[b["group"]].append(b)
    lines = []
    for name, rows in groups.items():
        by_method = {r["extra_info"]["method"]: r["extra_info"] for r in rows}
        lora = by_method.get("lora", {}).get("saved_bytes")
        lines += [
            f"\n**{name}**\n",
            "| method | saved activations MiB | / LoRA | peak MiB (GPU) |",
            "|---|---|---|---|",
        ]
        for method, info in by_method.items():
            saved = info["saved_bytes"]
            peak = f"{info['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in info else "-"
            ratio = f"{saved / lora:.3f}" if lora else "-"
            lines.append(f"| {method} | {saved / 2**20:.2f} | {ratio} | {peak} |")
    return "\n".join(lines)


def main(paths):
    for path in paths:
        data = json.load(open(path))
        benches = data["benchmarks"]
        machine = benches[0]["extra_info"].get("machine", "?") if benches else "?"
        print(f"\n### {path} — {machine}, {data['datetime'][:19]}")
        print(interleaved_table(benches))
        print(speed_table(benches))
        print(memory_table(benches))


if __name__ == "__main__":
    main(sys.argv[1:])
