"""Markdown tables from the committed benchmark results (what docs/benchmarks.md shows).

    python benchmarks/render_tables.py benchmarks/results/prefill_cost.json benchmarks/results/memory_speed_h200.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import config_label

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


def _full_rows(data: dict) -> dict:
    return {r["context"]: r for r in data["rows"] if r.get("method") == "full" and "error" not in r}


def memory(data: dict) -> str:
    """Memory table (runs without decoding): each figure with its ratio to its limit or to the full cache.

    KV kept / full: the limit is 1 - ratio (exact integer budgets). KV peak / kept: the limit is 1 (a
    pruned cache cannot peak below its own size); chunked mode adds at most one chunk of one layer. Peak
    memory and prefill time / full: the same figure for the full cache at that context.
    """
    cpu = not str(data["meta"].get("device", "")).startswith("cuda")
    full = _full_rows(data)
    if cpu:
        head = ("| context | config | ratio | KV kept (MiB) | kept / full | KV peak in prefill (MiB) | peak / kept | "
                "peak RSS growth (MiB) | / full | prefill CPU s | / full | prefill wall s (shared) |")
        unit = MIB
    else:
        head = ("| context | config | ratio | KV kept (GiB) | kept / full | KV peak in prefill (GiB) | peak / kept | "
                "device peak in prefill (GiB) | / full | prefill s | / full |")
        unit = GIB
    rows = [head, "|" + "|".join(["---:", "---"] + ["---:"] * (head.count("|") - 3)) + "|"]
    order = {"full": 0, "uniform": 1, "pyramid": 2, "depthkv": 3}
    for r in sorted(data["rows"], key=lambda r: (r["context"], r["ratio"], order.get(r["method"], 9),
                                                 r["mode"] != "post")):
        if "error" in r:
            rows.append(f"| {r['context']} | {config_label(r)} | {r['ratio']} | error: {r['error'][:60]} |")
            continue
        f = full.get(r["context"])
        kept, peak = r["kv_bytes_kept"], r["kv_bytes_peak_prefill"] or r["kv_bytes_kept"]
        cells = [str(r["context"]), config_label(r) + (f" ({r['source']})" if r.get("source") else ""), f"{r['ratio']:g}", f"{kept / unit:.2f}",
                 f"{kept / r['kv_bytes_full']:.3f}", f"{peak / unit:.2f}", f"{peak / kept:.3f}"]
        if cpu:
            grow, base = r.get("rss_growth_mb"), f and f.get("rss_growth_mb")
            cpu_s, base_cpu = r.get("process_cpu_s"), f and f.get("process_cpu_s")
            cells += [f"{grow:.0f}" if grow is not None else "-",
                      f"{grow / base:.2f}" if grow is not None and base else "-",
                      f"{cpu_s:.1f}" if cpu_s is not None else "-",
                      f"{cpu_s / base_cpu:.2f}" if cpu_s is not None and base_cpu else "-",
                      f"{r['prefill_s']:.1f}"]
        else:
            dev, base = r.get("device_peak_prefill_bytes"), f and f.get("device_peak_prefill_bytes")
            cells += [f"{dev / GIB:.2f}" if dev is not None else "-",
                      f"{dev / base:.2f}" if dev is not None and base else "-",
                      f"{r['prefill_s']:.2f}", f"{r['prefill_s'] / f['prefill_s']:.2f}" if f else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sweep_cost(data: dict) -> str:
    sw, m = data["sweep"], data["meta"]
    rows = ["| run | prefills | wall s | CPU s | CPU s per cell | CPU / naive |", "|---|---:|---:|---:|---:|---:|"]
    for name, key in (("shared prefill (`depthkv eval`)", "shared"), ("naive: one prefill per cell", "naive")):
        x = sw[key]
        rows.append(f"| {name} | {x['prefills']} | {x['wall_s']:.1f} | {x['cpu_s']:.1f} | "
                    f"{x['cpu_s'] / sw['cells']:.2f} | {x['cpu_s'] / sw['naive']['cpu_s']:.2f} |")
    rows.append(f"\n{sw['cells']} cells = {m['samples']} {m['task']} samples x {len(m['methods'])} methods "
                f"({', '.join(m['methods'])}) x {len(m['ratios'])} ratios ({', '.join(f'{r:g}' for r in m['ratios'])}),"
                f" ~{m['context_tokens_mean']:.0f}-token prefills, {m['max_new_tokens']} new tokens at most; saving "
                f"{100 * sw['saving_cpu']:.0f} % of CPU time ({sw['speedup_cpu']}x), {100 * sw['saving_wall']:.0f} % of "
                f"wall time; identical answers {sw['identical_answers']}/{sw['cells']}.")
    cal = ["\n| calibration profile | samples | probes per sample | ablation s | proxy metrics s | total s | "
           "ablation s per probe |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in data.get("calibration", []):
        cal.append(f"| `{c['profile']}` ({c['model']}) | {c['samples']} | {c['probes_per_sample']} | "
                   f"{c.get('ablation_s', '-')} | {c.get('proxy_s', '-')} | {c.get('total_s', '-')} | "
                   f"{c.get('ablation_s_per_probe', '-')} |")
    return "\n".join(rows + cal)


def merged(paths: list[str]) -> dict:
    """The first file's rows plus the configurations that only the later files have (marked by source)."""
    data = json.loads(Path(paths[0]).read_text())
    key = lambda r: (r["context"], r["method"], r["mode"], r["ratio"])  # noqa: E731
    have = {key(r) for r in data["rows"]}
    for path in paths[1:]:
        for r in json.loads(Path(path).read_text())["rows"]:
            if key(r) not in have and "error" not in r:
                have.add(key(r))
                data["rows"].append({**r, "source": Path(path).stem.rsplit("_", 1)[-1]})
    return data


def main() -> None:
    if sys.argv[1:2] == ["--merge"]:  # one memory table from several runs of the same protocol
        paths = sys.argv[2:]
        data = merged(paths)
        print(f"\n**{paths[0]}** + rows only in " + ", ".join(f"**{p}**" for p in paths[1:]) + "\n")
        print(memory(data))
        return
    for path in sys.argv[1:]:
        data = json.loads(Path(path).read_text())
        meta = data["meta"]
        commands = meta.get("commands") or [meta.get("command")]
        print(f"\n**{path}** — {meta.get('date')}, " + "; ".join(f"`{c}`" for c in commands) + "\n")
        if "sweep" in data:
            print(sweep_cost(data))
        elif "config" in data["rows"][0]:
            print(prefill_cost(data))
        elif any("decode_ms_per_step" in r for r in data["rows"]):
            print(memory_speed(data))
        else:
            print(memory(data))


if __name__ == "__main__":
    main()
