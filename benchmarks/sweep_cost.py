"""What the shared prefill of ``depthkv eval`` saves, and what calibration costs.

Sweep cost: one small sweep (one task, a few samples, methods x ratios, one scorer, question inside the
prefill) run twice on the same model and samples:

* **shared**: ``depthkv.eval.run_eval`` as ``depthkv eval`` runs it: one full prefill per sample, scored by
  the scorer (``score_prefill``), then per cell a top-k + gather (``prune``) and a greedy generation;
* **naive**: the loop a user would write with the public API: per (sample, method, ratio) a fresh prefill
  under ``depthkv.press(model, scorer, budgets=...)`` (post mode: pruned right after the prefill), then the
  same greedy generation from the pruned cache.

Both use the same budgets (the eval's allocator call: floor 20 tokens, 4 sinks + 16 recent protected) and the
same decoding arguments, so their answers must agree; the script counts the cells that do. Times are wall
clock and process CPU time (``resource.getrusage``, user + system) of each phase; on a shared machine the
CPU time is the steadier figure.

Calibration cost is not re-measured: it is read from the ``timings`` of the committed calibration profiles
(``docs/results/profile_*.json``).

    OMP_NUM_THREADS=1 python benchmarks/sweep_cost.py --samples 3 --out benchmarks/results/sweep_cost.json
    python benchmarks/sweep_cost.py --calibration-only     # re-read the profiles' timings only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

from _common import ROOT, command_line, cpu_seconds

from depthkv.io import write_json


class Clock:
    """Wall and process CPU seconds of a ``with`` block, accumulated."""

    def __init__(self):
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += cpu_seconds() - self._c

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall, 2), "cpu_s": round(self.cpu, 2)}


def calibration_costs() -> list[dict]:
    """Calibration timings recorded in the committed profiles."""
    out = []
    for path in sorted((ROOT / "docs" / "results").glob("profile_*.json")):
        d = json.loads(path.read_text())
        cfg = d.get("config") or {}
        n_layers = d["model"]["n_layers"]
        probes = len(d.get("probe_ratios") or ())
        n = cfg.get("samples") or len(d.get("context_lens") or ())
        t = d.get("timings") or {}
        out.append({
            "profile": str(path.relative_to(ROOT)), "model": d["model"]["name"], "created": d.get("created"),
            "samples": n, "n_layers": n_layers, "probe_ratios": d.get("probe_ratios"),
            "probes_per_sample": n_layers * probes,
            "context_tokens_mean": round(sum(d["context_lens"]) / len(d["context_lens"]), 1)
            if d.get("context_lens") else None,
            "scorer": (d.get("scorer") or {}).get("name"), "proxy": cfg.get("proxy"), **t,
            "ablation_s_per_sample": round(t["ablation_s"] / n, 2) if t.get("ablation_s") and n else None,
            "ablation_s_per_probe": round(t["ablation_s"] / (n * n_layers * probes), 3)
            if t.get("ablation_s") and n and probes else None,
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="needle")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--methods", default="uniform,pyramid,optimal")
    ap.add_argument("--ratios", default="0.25,0.5,0.75,0.9")
    ap.add_argument("--scorer", default="snapkv")
    ap.add_argument("--profile", default=str(ROOT / "docs" / "results" / "profile_smollm2-135m.json"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sweep_cost.json")
    ap.add_argument("--calibration-only", action="store_true",
                    help="only refresh the calibration timings in an existing --out (e.g. after a new profile)")
    args = ap.parse_args()
    if args.calibration_only:
        data = json.loads(args.out.read_text())
        data["calibration"] = calibration_costs()
        write_json(args.out, data, indent=1)
        print(f"calibration timings of {len(data['calibration'])} profile(s) written to {args.out}")
        return

    import warnings

    import torch

    import depthkv
    from depthkv.allocation import allocate
    from depthkv.allocation.profile import Profile
    from depthkv.engine import generate_from_cache
    from depthkv.eval.runner import EvalConfig, load_samples, prompt_ids, run_eval
    from depthkv.models import load_model

    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in args.ratios.split(",")]
    cfg = EvalConfig(model=args.model, tasks=(args.task,), methods=tuple(methods), scorers=(args.scorer,),
                     ratios=tuple(ratios), samples=args.samples, context_tokens=args.context_tokens,
                     settings=("aware",), profile=args.profile, dtype=args.dtype)
    lm = load_model(args.model, dtype=getattr(torch, args.dtype))
    model, tok = lm.model, lm.tokenizer
    n_layers = model.config.num_hidden_layers
    view = Profile.load(args.profile).view()
    samples = load_samples(cfg, tok)[args.task]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    max_new = cfg.max_tokens_for(args.task)

    # warm-up outside both timings (kernels, allocator, scorer code paths)
    ids = torch.randint(100, 1000, (1, 256), generator=torch.Generator().manual_seed(1))
    with depthkv.press(model, args.scorer, ratio=0.5) as p:
        p.compress(ids)

    # ---- shared: depthkv eval's runner (one scored prefill per sample, prune + generate per cell)
    shared = Clock()
    with tempfile.TemporaryDirectory() as tmp, shared:
        run = run_eval(lm, cfg, Path(tmp) / "run", progress=False)
    rows = [r for r in run.rows if r["status"] == "ok"]
    shared_prefill = sum({(r["sample_id"]): r["prefill_seconds"] for r in rows}.values())
    shared_cells = sum(r["seconds"] for r in rows)
    shared_out = {(r["sample_id"], r["method"], r["ratio"]): r["output"] for r in rows}

    # ---- naive: one prefill per (sample, method, ratio) through the public press API
    naive, naive_prefill, naive_gen = Clock(), Clock(), Clock()
    naive_out = {}
    with naive:
        for s in samples:
            prefix, full_ids = prompt_ids(tok, s, "aware")
            n = prefix.shape[1]
            for m in methods:
                for r in ratios:
                    b = allocate(m, n_layers, n, r, sensitivity=view, min_tokens=min(cfg.floor, n))
                    with naive_prefill, depthkv.press(model, args.scorer, budgets=b) as p:
                        cache = p.compress(prefix).cache
                    with naive_gen, warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        out = generate_from_cache(model, cache, full_ids, max_new_tokens=max_new, do_sample=False,
                                                  pad_token_id=pad, top_p=None, top_k=None, temperature=None)
                    naive_out[(s.id, m, r)] = tok.decode(out[0, full_ids.shape[1]:], skip_special_tokens=True).strip()
    same = sum(naive_out[k] == shared_out.get(k) for k in naive_out)
    cells = len(samples) * len(methods) * len(ratios)
    result = {
        "meta": {
            "date": date.today().isoformat(), "command": command_line(__file__),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "model": args.model, "dtype": args.dtype,
            "task": args.task, "samples": len(samples), "context_tokens_mean": round(
                sum(prompt_ids(tok, s, "aware")[0].shape[1] for s in samples) / len(samples), 1),
            "methods": methods, "ratios": ratios, "scorer": args.scorer, "setting": "aware",
            "max_new_tokens": max_new, "profile": str(Path(args.profile).relative_to(ROOT))
            if Path(args.profile).is_relative_to(ROOT) else args.profile,
        },
        "sweep": {
            "cells": cells,
            "shared": {**shared.as_dict(), "prefills": run.prefills, "prefill_wall_s": round(shared_prefill, 2),
                       "cells_wall_s": round(shared_cells, 2)},
            "naive": {**naive.as_dict(), "prefills": cells, "prefill": naive_prefill.as_dict(),
                      "generate": naive_gen.as_dict()},
            "saving_wall": round(1 - shared.wall / naive.wall, 3),
            "saving_cpu": round(1 - shared.cpu / naive.cpu, 3),
            "speedup_wall": round(naive.wall / shared.wall, 2),
            "speedup_cpu": round(naive.cpu / shared.cpu, 2),
            "identical_answers": same,
        },
        "calibration": calibration_costs(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result, indent=1)
    sw = result["sweep"]
    print(f"{cells} cells ({len(samples)} samples x {len(methods)} methods x {len(ratios)} ratios), "
          f"~{result['meta']['context_tokens_mean']:.0f} tokens")
    print(f"shared prefill: {sw['shared']['wall_s']:.1f} s wall, {sw['shared']['cpu_s']:.1f} s CPU, "
          f"{sw['shared']['prefills']} prefills")
    print(f"naive loop:     {sw['naive']['wall_s']:.1f} s wall, {sw['naive']['cpu_s']:.1f} s CPU, {cells} prefills")
    print(f"saving: {100 * sw['saving_cpu']:.0f} % CPU ({sw['speedup_cpu']}x), identical answers {same}/{cells}")
    for c in result["calibration"]:
        print(f"calibration {c['model']}: {c.get('total_s')} s total ({c['samples']} samples x "
              f"{c['probes_per_sample']} probes)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
