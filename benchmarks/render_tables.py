"""Markdown tables from the committed benchmark results (what docs/benchmarks.md shows).

    python benchmarks/render_tables.py benchmarks/results/prefill_cost.json benchmarks/results/memory_speed_h200.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 1024**3
MIB = 1024**2


def prefill_cost(data: dict) -> str:
    rows = ["| model | context | configuration | prefill s | scoring share | KV kept | KV peak (MiB) | RSS growth (MiB) |",
            "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        rows.append(f"| {r['model']} | {r['context']} | {r['config']} | {r['prefill_s']:.2f} | "
                    f"{100 * r['score_share']:.1f} % | {r['kv_share_kept']:.3f} | {r['kv_bytes_peak'] / MIB:.1f} | "
                    f"{r['rss_prefill_mb']:.0f} |")
    return "\n".join(rows)


def memory_speed(data: dict) -> str:
    rows = ["| context | config | ratio | KV kept (GiB) | KV peak in prefill (GiB) | device peak in prefill (GiB) | "
            "prefill s | decode ms/step (1st call) | decode ms/step (2nd call) | bytes-read bound ms | 2nd / bound |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if "error" in r:
            rows.append(f"| {r['context']} | {r['method']}/{r['mode']} | {r['ratio']} | {r['error'][:40]} |||||")
            continue
        cfg = "full" if r["method"] == "full" else f"{r['method']} {r['mode']}"
        peak = r.get("device_peak_prefill_bytes")
        second = r.get("decode_ms_per_step_after_empty_cache")
        rows.append(f"| {r['context']} | {cfg} | {r['ratio']} | {r['kv_bytes_kept'] / GIB:.2f} | "
                    f"{(r['kv_bytes_peak_prefill'] or r['kv_bytes_kept']) / GIB:.2f} | "
                    f"{peak / GIB if peak is not None else float('nan'):.2f} | {r['prefill_s']:.2f} | "
                    f"{r['decode_ms_per_step']:.1f} | {second if second is not None else '-'} | "
                    f"{r.get('bound_ms', '-')} | {r.get('ratio_to_bound', '-')} |")
    return "\n".join(rows)


def main() -> None:
    for path in sys.argv[1:]:
        data = json.loads(Path(path).read_text())
        meta = data["meta"]
        print(f"\n**{path}** — {meta.get('date')}, `{meta.get('command')}`\n")
        print(prefill_cost(data) if "config" in data["rows"][0] else memory_speed(data))


if __name__ == "__main__":
    main()
