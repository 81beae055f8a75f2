"""NVIDIA kvpress on CPU: KV kept, peak RSS and prefill CPU time, on the footing of ``memory_speed.py``.

The kvpress counterpart of ``benchmarks/results/memory_cpu.json`` (depthkv's CPU memory sweep): the same
model and dtype, the same random token ids (``_common.random_ids``: seeded by the context length), the
same forward (``forward_with_cache``: the causal LM, ``logits_to_keep=1``, no grad) and the same measurement
(``_common.rss_mark`` / ``rss_fields``): every configuration runs in a fresh process that loads the
model, warms up (a 512-token full prefill and a 512-token prefill under the press being measured), resets
the kernel's peak-RSS mark, runs the prefill under the kvpress press (kvpress's forward hooks compress each
layer's cache right after its attention), then reads ``VmHWM``. KV kept is the bytes of the cache's key and
value tensors after the prefill; ``process_cpu_s`` is the process's user + system CPU time of the measured
part, as in ``memory_speed.py``.

kvpress 0.5.5 needs transformers < 5.3, so each configuration runs in ``.venv-kvpress``
(``bash scripts/kvpress_env.sh``; ``--python``) while the driver may run in any environment. A ``full``
(no press) row per context is measured in the kvpress environment too, as its own reference. The table
puts depthkv's rows of ``--depthkv`` (same context and ratio) beside kvpress's, with depthkv / kvpress
SnapKVPress ratios::

    OMP_NUM_THREADS=1 python benchmarks/kvpress_memory.py --contexts 2048,4096 \
        --out benchmarks/results/kvpress_memory.json
    python benchmarks/kvpress_memory.py --table --out benchmarks/results/kvpress_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path

from _common import (
    ROOT,
    build_model,
    command_line,
    config_label,
    cpu_seconds,
    random_ids,
    rss_fields,
    rss_mark,
    versions,
    write_results,
)

DEFAULT_VENV_PY = ROOT / ".venv-kvpress/bin/python"
DEFAULT_DEPTHKV = ROOT / "benchmarks/results/memory_cpu.json"
PRESSES = {"snapkv": "SnapKVPress", "pyramidkv": "PyramidKVPress"}
MIB = 1024**2


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"arch": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "mem_gib": round(mem / 1024**2, 1), "kernel": platform.release()}


def make_press(name: str, ratio: float, window: int, kernel: int):
    """A kvpress press (SnapKV's observation window and pooling kernel as in kvpress_compare.py)."""
    import kvpress

    return getattr(kvpress, PRESSES[name])(compression_ratio=ratio, window_size=window, kernel_size=kernel)


def prefill(model, ids, press):
    """kvpress's prefill: depthkv's full-cache forward, with the press's hooks registered around it."""
    from depthkv.engine.runner import forward_with_cache, new_cache

    cache = new_cache(model)
    with press(model) if press is not None else nullcontext():
        forward_with_cache(model, ids, cache)
    return cache


def measure(model, n: int, press_name: str, ratio: float, window: int, kernel: int) -> dict:
    """One prefill of ``n`` tokens under the press; the CPU part of ``memory_speed.measure``, kvpress inside."""
    from depthkv.engine import full_kv_bytes, kv_bytes
    from depthkv.engine.cache import layer_lengths

    press = make_press(press_name, ratio, window, kernel) if press_name != "full" else None
    ids = random_ids(model, n, "cpu")
    prefix = ids[:, :n]
    gc.collect()
    mark = rss_mark()
    t0 = time.perf_counter()
    cache = prefill(model, prefix, press)
    prefill_s = time.perf_counter() - t0
    kept = kv_bytes(cache)
    rss = rss_fields(mark)
    row = {"context": n, "method": "full" if press is None else f"kvpress {PRESSES[press_name]}",
           "ratio": ratio if press is not None else 0.0, "kv_bytes_full": full_kv_bytes(model, n),
           "kv_bytes_kept": kept, "layer_tokens": layer_lengths(cache), "prefill_s": round(prefill_s, 3)}
    row.update(rss)
    del cache
    return row


def warm_up(model, press_name: str, window: int, kernel: int, n: int = 512) -> None:
    """Kernels, allocator pools and the press's code path, before anything is measured."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    prefill(model, ids, None)
    if press_name != "full":
        prefill(model, ids, make_press(press_name, 0.5, window, kernel))


def make_plan(contexts: str, ratios: str, presses: str) -> list[tuple[int, str, float]]:
    plan = []
    for n in (int(x) for x in contexts.split(",")):
        plan.append((n, "full", 0.0))
        for r in (float(x) for x in ratios.split(",")):
            plan.extend((n, p, r) for p in presses.split(","))
    return plan


def run_one(args, plan) -> None:
    """Child process (kvpress environment): one configuration, one JSON line on stdout."""
    import logging

    import torch

    logging.getLogger("kvpress").setLevel(logging.ERROR)
    n, press_name, r = plan[int(args.one)]
    model = build_model(args.model, "cpu", getattr(torch, args.dtype))
    warm_up(model, press_name, args.window, args.kernel)
    c0, w0 = cpu_seconds(), time.perf_counter()
    row = measure(model, n, press_name, r, args.window, args.kernel)
    row["process_cpu_s"] = round(cpu_seconds() - c0, 2)  # CPU time of the measured part (the prefill)
    row["process_wall_s"] = round(time.perf_counter() - w0, 2)
    row["threads"] = torch.get_num_threads()
    row["attn_implementation"] = model.config._attn_implementation
    row["versions"] = versions()
    print(json.dumps(row))


# ============================================================================================ table
def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def table(data: dict, depthkv: dict | None) -> str:
    """kvpress rows, then depthkv's rows of the same context and ratio, with depthkv / kvpress SnapKVPress."""
    head = ("| context | ratio | library | config | KV kept (MiB) | peak RSS growth (MiB) | growth / own full | "
            "prefill CPU s | CPU / own full | prefill wall s (contended) | KV kept d/k | RSS growth d/k | "
            "CPU s d/k |")
    out = [head, "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    drows = [r for r in (depthkv or {}).get("rows", []) if "error" not in r]
    kfull = {r["context"]: r for r in data["rows"] if r["method"] == "full" and "error" not in r}
    dfull = {r["context"]: r for r in drows if r["method"] == "full"}

    def line(lib: str, r: dict, full: dict | None, ref: dict | None) -> str:
        g, c = r["rss_growth_mb"], r["process_cpu_s"]
        cells = [str(r["context"]), f"{r['ratio']:g}", lib, config_label(r) if lib == "depthkv" else r["method"],
                 f"{r['kv_bytes_kept'] / MIB:.2f}", f"{g:.0f}", _ratio(g, full and full["rss_growth_mb"]),
                 f"{c:.1f}", _ratio(c, full and full["process_cpu_s"]), f"{r['prefill_s']:.1f}"]
        if ref is None:
            cells += ["", "", ""]
        else:
            cells += [_ratio(r["kv_bytes_kept"], ref["kv_bytes_kept"]), _ratio(g, ref["rss_growth_mb"]),
                      _ratio(c, ref["process_cpu_s"])]
        return "| " + " | ".join(cells) + " |"

    keys = sorted({(r["context"], r["ratio"]) for r in data["rows"] if "error" not in r})
    for n, ratio in keys:
        ks = [r for r in data["rows"] if "error" not in r and (r["context"], r["ratio"]) == (n, ratio)]
        if ratio == 0.0:  # full vs full: the two environments' own references
            ref = ks[0]
            out.append(line("kvpress env", ref, None, None))
            if n in dfull:
                out.append(line("depthkv", dfull[n], None, ref))
            continue
        ref = next((r for r in ks if r["method"] == "kvpress SnapKVPress"), None)
        for r in ks:
            out.append(line("kvpress", r, kfull.get(n), None))
        for r in drows:
            if r["method"] != "full" and (r["context"], r["ratio"]) == (n, ratio):
                out.append(line("depthkv", r, dfull.get(n), ref))
    return "\n".join(out)


# ============================================================================================ driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", help="as memory_cpu.json (its meta.dtype)")
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--ratios", default="0.4,0.6,0.8")
    ap.add_argument("--presses", default="snapkv,pyramidkv", help=f"of {', '.join(PRESSES)}")
    ap.add_argument("--window", type=int, default=32, help="SnapKV observation window (kvpress_compare.py's)")
    ap.add_argument("--kernel", type=int, default=5, help="SnapKV pooling kernel (kvpress_compare.py's)")
    ap.add_argument("--python", type=Path, default=DEFAULT_VENV_PY, help="interpreter of the kvpress environment")
    ap.add_argument("--depthkv", type=Path, default=DEFAULT_DEPTHKV, help="depthkv's rows for the table")
    ap.add_argument("--append", action="store_true", help="add the rows to those already in --out")
    ap.add_argument("--table", action="store_true", help="only print the table of --out")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    plan = make_plan(args.contexts, args.ratios, args.presses)
    if args.one is not None:
        run_one(args, plan)
        return
    depthkv = json.loads(args.depthkv.read_text()) if args.depthkv.exists() else None
    if args.table:
        print(table(json.loads(args.out.read_text()), depthkv))
        return
    if not args.python.exists():
        sys.exit(f"{args.python} not found: bash scripts/kvpress_env.sh")
    command = command_line(__file__)
    rows, commands, cpu_before = [], [], 0.0
    meta = {"date": date.today().isoformat(), "model": args.model, "device": "cpu", "machine": machine(),
            "dtype": args.dtype, "window": args.window, "kernel": args.kernel,
            "data": "random token ids (seeded by context length): _common.random_ids, as memory_cpu.json",
            "measurement": "_common.rss_mark / rss_fields (VmHWM reset via /proc/self/clear_refs, fresh "
                           "process per configuration, after load + 512-token warm-up); process_cpu_s: "
                           "user + system CPU s of the prefill",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "depthkv_rows": str(args.depthkv.relative_to(ROOT)) if args.depthkv.is_relative_to(ROOT) else None}
    if args.append and args.out.exists():
        old = json.loads(args.out.read_text())
        rows, commands = old["rows"], old["meta"]["commands"]
        cpu_before = old["meta"].get("children_cpu_s_total", 0.0)
        meta["date"] = old["meta"]["date"] if old["meta"]["date"] == meta["date"] else \
            f"{old['meta']['date']}/{meta['date']}"
    meta.update(command=command, commands=commands + [command])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, (n, press_name, r) in enumerate(plan):
        res = subprocess.run([str(args.python), __file__, *sys.argv[1:], "--one", str(i)], capture_output=True,
                             text=True, cwd=ROOT)
        if res.returncode != 0:
            print(res.stderr[-1500:], file=sys.stderr)
            row = {"context": n, "method": press_name, "ratio": r, "error": res.stderr[-300:]}
        else:
            row = json.loads(res.stdout.strip().splitlines()[-1])
            env = row.pop("versions")
            if meta.setdefault("versions", env) != env:
                row["versions"] = env
            meta.setdefault("threads", row["threads"])
            row["load_average_1min"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        # whole child processes (load + warm-up + prefill), this invocation plus earlier appended ones
        meta["children_cpu_s_total"] = round(cpu_before + ru.ru_utime + ru.ru_stime, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "layer_tokens"}), flush=True)
        write_results(args.out, meta, rows)
    print(table({"meta": meta, "rows": rows}, depthkv))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
