"""depthkv vs NVIDIA kvpress: accuracy and KV kept on the same model and samples, plus token agreement.

One invocation runs both libraries. kvpress 0.5.x needs transformers < 5.3, so its side runs in
``.venv-kvpress`` (``bash scripts/kvpress_env.sh``) as a subprocess of this script, while depthkv's side runs
in the interpreter that started the script (the main environment). Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/kvpress_compare.py \
        --out benchmarks/results/kvpress_compare.json        # also writes kvpress_compare.md

What it does (greedy decoding; ``--setting aware``, the default: the compressed prefill ends with the question,
as in SnapKV's paper; ``--setting agnostic``: kvpress's pipeline layout, the context is compressed alone and the
question appended afterwards):

* samples: the ``needle`` task, ``--n`` samples of ~``--context-tokens`` tokens, eval split, one seed; the
  driver tokenises them once and hands the same token ids to both sides;
* kvpress side: SnapKVPress, PyramidKVPress, ObservedAttentionPress (eager prefill), and
  PerLayerCompressionPress(SnapKVPress) fed with depthkv's budgets through ``depthkv.interop.kvpress``
  (uniform, pyramid and, when ``--profile`` exists, the profile's ``optimal`` allocation). SnapKV's window
  and kernel are set to depthkv's (32, 5). Answers are decoded with kvpress's own pipeline recipe
  (explicit position ids continuing at the original context length), except that the question is fed one
  token at a time: a multi-token forward on the ragged per-layer caches of PyramidKV/PerLayer fails under
  sdpa/eager ("flash attention only"), a one-token forward builds no mask;
* depthkv side: one prefill scored by snapkv and h2o, pruned with uniform / pyramid / optimal budgets
  (``score_prefill`` + ``prune``, as post mode), decoded with ``generate_from_cache``;
* both sides decode the full cache once as well: the two harnesses must agree there;
* agreement (kvpress side, where both libraries import): on ``--agreement-samples`` prompts, which tokens
  each layer/head keeps at equal per-layer counts, kvpress SnapKVPress vs depthkv snapkv and kvpress
  ObservedAttentionPress vs depthkv h2o, with variants that isolate each difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from _common import command_line, versions

from depthkv.io import write_json

REPO = Path(__file__).resolve().parents[1]
RUN_DATE = "2026-11-28"
MODEL = "smollm2-135m"
DEFAULT_PROFILE = REPO / "docs/results/profile_smollm2-135m.json"
DEFAULT_VENV_PY = REPO / ".venv-kvpress/bin/python"
SETTINGS = {
    "aware": "query-aware (the prefill that is compressed ends with the question; only the end of turn and the "
             "generation prompt are appended)",
    "agnostic": "query-agnostic (the context is compressed alone, the question is appended)",
}


# ============================================================================================ shared helpers
def load(threads: int):
    import torch

    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    from depthkv.models import load_model

    hf_logging.disable_progress_bar()

    return load_model(MODEL)


def layer_lengths(cache) -> list[int]:
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def set_attn(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = impl


# ============================================================================================ kvpress side
def greedy_after_prefill(model, cache, question_ids, context_len: int, max_new: int, eos: set[int]) -> list[int]:
    """kvpress pipeline's decoding, question fed token by token (ragged caches need one-token forwards)."""
    import torch

    from depthkv.engine.runner import cache_kwarg

    key = cache_kwarg(model)
    pos = context_len
    logits = None
    with torch.no_grad():
        for tok in question_ids:
            out = model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[pos]]), logits_to_keep=1,
                        **{key: cache})
            logits, pos = out.logits, pos + 1
        generated: list[int] = []
        for _ in range(max_new):
            nxt = int(logits[0, -1].argmax())
            generated.append(nxt)
            if nxt in eos:
                break
            out = model(input_ids=torch.tensor([[nxt]]), position_ids=torch.tensor([[pos]]), logits_to_keep=1,
                        **{key: cache})
            logits, pos = out.logits, pos + 1
    return generated


def kvpress_prefill(model, ctx, press, eager: bool = False):
    import torch
    from transformers import DynamicCache

    from depthkv.engine.runner import cache_kwarg
    from depthkv.models.layers import decoder_body

    cache = DynamicCache()
    if eager:
        set_attn(model, "eager")
    try:
        body = decoder_body(model)
        with torch.no_grad(), (press(model) if press is not None else nullcontext()):
            body(input_ids=torch.tensor([ctx]), **{cache_kwarg(body): cache})
    finally:
        if eager:
            set_attn(model, "sdpa")
    return cache


def kvpress_methods(job: dict, ratio: float, sample_idx: int):
    """(name, press factory, eager?, label of the depthkv budgets fed in or None) for one ratio."""
    from kvpress import ObservedAttentionPress, PyramidKVPress, SnapKVPress

    from depthkv.allocation.budgets import Budgets
    from depthkv.interop.kvpress import per_layer_press

    w, k = job["window"], job["kernel"]
    out = [
        ("kvpress SnapKVPress", lambda: SnapKVPress(compression_ratio=ratio, window_size=w, kernel_size=k), False),
        ("kvpress PyramidKVPress", lambda: PyramidKVPress(compression_ratio=ratio, window_size=w, kernel_size=k),
         False),
        ("kvpress ObservedAttentionPress", lambda: ObservedAttentionPress(compression_ratio=ratio), True),
    ]
    for strategy, per_sample in job["budgets"][str(ratio)].items():
        b = Budgets.from_dict(per_sample[sample_idx])
        out.append((f"kvpress PerLayer(SnapKV) + depthkv {strategy}",
                    lambda b=b: per_layer_press(SnapKVPress(window_size=w, kernel_size=k), b), False))
    return out


def run_kvpress(job: dict) -> dict:
    import logging

    logging.getLogger("kvpress").setLevel(logging.ERROR)  # the per-layer "flash attention only" warning
    lm = load(job["threads"])
    model, tok = lm.model, lm.tokenizer
    eos = {int(tok.eos_token_id)} | set(_as_list(model.generation_config.eos_token_id))
    results: dict[str, dict] = {}
    t0 = time.time()
    for i, s in enumerate(job["samples"]):
        ctx, q = s["context_ids"], s["question_ids"]
        full = greedy_after_prefill(model, kvpress_prefill(model, ctx, None), q, len(ctx), job["max_new_tokens"],
                                    eos)
        _record(results, "kvpress full cache", 0.0, i, tok.decode(full, skip_special_tokens=True),
                [len(ctx)] * model.config.num_hidden_layers)
        for ratio in job["ratios"]:
            for name, make, eager in kvpress_methods(job, ratio, i):
                cache = kvpress_prefill(model, ctx, make(), eager=eager)
                kept = layer_lengths(cache)
                out = greedy_after_prefill(model, cache, q, len(ctx), job["max_new_tokens"], eos)
                _record(results, name, ratio, i, tok.decode(out, skip_special_tokens=True), kept)
        print(f"[kvpress] sample {i + 1}/{len(job['samples'])} done, {time.time() - t0:.0f}s", flush=True)
    agreement = run_agreement(job, lm) if job["agreement_samples"] > 0 else None
    return {"env": versions(), "results": results, "agreement": agreement, "seconds": time.time() - t0}


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _record(results: dict, name: str, ratio: float, i: int, output: str, kept: list[int]) -> None:
    key = f"{name}|{ratio}"
    entry = results.setdefault(key, {"method": name, "ratio": ratio, "outputs": {}, "kept": {}})
    entry["outputs"][i] = output
    entry["kept"][i] = kept


# ============================================================================================ depthkv side
def run_depthkv(job: dict) -> dict:
    import torch

    from depthkv.allocation.budgets import Budgets
    from depthkv.engine import Protection, generate_from_cache, score_prefill
    from depthkv.scorers import get_scorer

    lm = load(job["threads"])
    model, tok = lm.model, lm.tokenizer
    prot = Protection(job["n_sink"], job["n_recent"])
    snap = get_scorer("snapkv", window=job["window"], kernel=job["kernel"])
    h2o = get_scorer("h2o")
    results: dict[str, dict] = {}
    t0 = time.time()

    def decode(cache, full_ids):
        out = generate_from_cache(model, cache, full_ids, max_new_tokens=job["max_new_tokens"], do_sample=False,
                                  pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, full_ids.shape[1]:], skip_special_tokens=True)

    for i, s in enumerate(job["samples"]):
        ctx, q = s["context_ids"], s["question_ids"]
        full_ids = torch.tensor([ctx + q])
        sp = score_prefill(model, torch.tensor([ctx]), [snap, h2o], prot)
        _record(results, "depthkv full cache", 0.0, i, decode(sp.full_cache(), full_ids),
                [len(ctx)] * model.config.num_hidden_layers)
        for ratio in job["ratios"]:
            for strategy, per_sample in job["budgets"][str(ratio)].items():
                b = Budgets.from_dict(per_sample[i])
                scorers = [snap, h2o] if strategy == "uniform" else [snap]
                for sc in scorers:
                    cache = sp.prune(sc.name, b)
                    kept = layer_lengths(cache)
                    _record(results, f"depthkv {sc.name} {strategy}", ratio, i, decode(cache, full_ids), kept)
        print(f"[depthkv] sample {i + 1}/{len(job['samples'])} done, {time.time() - t0:.0f}s", flush=True)
    return {"env": versions(), "results": results, "seconds": time.time() - t0}


# ============================================================================================ agreement
def _variant_scorers(window: int, kernel: int):
    """Two depthkv scorers rebuilt with one kvpress choice each, to show where the kept sets differ."""
    import torch
    import torch.nn.functional as F

    from depthkv.scorers.base import ScoreInputs, Scorer, attention_blocks

    class SnapKVPoolOnContext(Scorer):
        """depthkv's SnapKV votes, pooled as kvpress does: only over keys before the window, zero-padded."""

        name = "snapkv_kvpress_pooling"
        needs_attention = True

        def score(self, x: ScoreInputs) -> torch.Tensor:
            nq, nk = x.query.shape[2], x.key.shape[2]
            w = min(window, nq)
            votes = torch.zeros(x.key.shape[0], x.key.shape[1], nk, device=x.key.device)
            for _, _, probs in attention_blocks(x, q_start=nq - w):
                votes += probs.sum(dim=3).mean(dim=2)
            votes = votes / w
            b, h, _ = votes.shape
            head = votes[..., : nk - w].reshape(b * h, 1, nk - w)
            head = F.avg_pool1d(head, kernel, stride=1, padding=kernel // 2).reshape(b, h, nk - w)
            return torch.cat([head, torch.full((b, h, w), float(head.max()) + 1.0)], dim=-1)

    class MeanObservedAttention(Scorer):
        """Attention each key receives from every query that sees it (diagonal included), averaged."""

        name = "h2o_mean_incl_self"
        needs_attention = True

        def score(self, x: ScoreInputs) -> torch.Tensor:
            nk = x.key.shape[2]
            total = torch.zeros(x.key.shape[0], x.key.shape[1], nk)
            for _, _, probs in attention_blocks(x):
                total += probs.sum(dim=3).mean(dim=2)
            return total / torch.arange(nk, 0, -1, dtype=torch.float32)

    return SnapKVPoolOnContext(), MeanObservedAttention()


def _capture(press):
    """Record every layer's (scores, keys) that a kvpress ScorerPress computes."""
    store: dict[int, tuple] = {}
    original = press.score

    def score(module, hidden_states, keys, values, attentions, kwargs):
        s = original(module, hidden_states, keys, values, attentions, kwargs)
        store[module.layer_idx] = (s.detach().clone(), keys.detach().clone())
        return s

    press.score = score
    return store


def _overlap(a, b, n: int):
    """Per-head share of a's kept tokens also kept by b: a, b [KVH, B] index tensors -> [KVH]."""
    import torch

    ma = torch.zeros(a.shape[0], n)
    mb = torch.zeros(a.shape[0], n)
    ma.scatter_(1, a.long(), 1.0)
    mb.scatter_(1, b.long(), 1.0)
    return (ma * mb).sum(1) / a.shape[1]


def run_agreement(job: dict, lm) -> dict:
    import dataclasses

    import torch
    from kvpress import ObservedAttentionPress, SnapKVPress

    from depthkv.allocation.budgets import Budgets
    from depthkv.engine import Protection, score_prefill
    from depthkv.interop.kvpress import per_layer_press
    from depthkv.scorers import get_scorer

    model = lm.model
    n_layers = model.config.num_hidden_layers
    w, k = job["window"], job["kernel"]
    pool_variant, mean_variant = _variant_scorers(w, k)
    scorers = [get_scorer("snapkv", window=w, kernel=k), pool_variant, get_scorer("h2o"), mean_variant]
    default_prot, no_prot = Protection(job["n_sink"], job["n_recent"]), Protection(0, 0)
    pairs = [  # (label, kvpress press, depthkv scorer, protection)
        ("SnapKV: depthkv snapkv (4 sinks + 16 recent protected) vs kvpress SnapKVPress", "snapkv", "snapkv",
         default_prot),
        ("SnapKV: depthkv snapkv, no protection", "snapkv", "snapkv", no_prot),
        ("SnapKV: depthkv votes pooled like kvpress (context keys only, zero pad), no protection", "snapkv",
         pool_variant.name, no_prot),
        ("H2O: depthkv h2o (protected) vs kvpress ObservedAttentionPress", "observed", "h2o", default_prot),
        ("H2O: depthkv h2o, no protection", "observed", "h2o", no_prot),
        ("H2O: mean over the queries that see the key, self-attention included, no protection", "observed",
         mean_variant.name, no_prot),
    ]
    acc: dict[tuple[str, float], list] = {}
    checks = []
    for i, s in enumerate(job["samples"][: job["agreement_samples"]]):
        ctx = s["context_ids"]
        n = len(ctx)
        first = Budgets.from_dict(job["budgets"][str(job["ratios"][0])]["uniform"][i])
        kv_kept: dict[str, dict[int, tuple]] = {}
        for label, inner, eager in (("snapkv", SnapKVPress(window_size=w, kernel_size=k), False),
                                    ("observed", ObservedAttentionPress(), True)):
            store = _capture(inner)
            cache = kvpress_prefill(model, ctx, per_layer_press(inner, first), eager=eager)
            # the captured scores reproduce kvpress's own selection exactly (same top-k on the same scores)
            for layer, (sc, keys) in store.items():
                idx = sc.topk(first.tokens[layer], dim=-1).indices
                got = keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
                checks.append(bool(torch.equal(got, cache.layers[layer].keys)))
            kv_kept[label] = store
        sp = score_prefill(model, torch.tensor([ctx]), scorers, default_prot)
        for ratio in job["ratios"]:
            b = Budgets.from_dict(job["budgets"][str(ratio)]["uniform"][i])
            for label, kv_label, ours, prot in pairs:
                pruned = dataclasses.replace(sp, protection=prot).prune(ours, b)
                per_layer = []
                for layer in range(n_layers):
                    theirs = kv_kept[kv_label][layer][0].topk(b.tokens[layer], dim=-1).indices[0]
                    mine = pruned.layers[layer].kept_pos[0]
                    per_layer.append(_overlap(mine, theirs, n).tolist())
                acc.setdefault((label, ratio), []).append(per_layer)
    out = {"samples": job["agreement_samples"], "budgets": "depthkv uniform (same count per layer on both sides)",
           "capture_reproduces_kvpress_selection": all(checks), "pairs": []}
    for (label, ratio), per_sample in acc.items():
        t = torch.tensor(per_sample)  # [S, L, KVH]
        out["pairs"].append({
            "pair": label, "ratio": ratio, "mean_overlap": round(float(t.mean()), 4),
            "min_layer_head_overlap": round(float(t.min()), 4),
            "per_layer_mean": [round(float(x), 4) for x in t.mean(dim=(0, 2))],
        })
    return out


# ============================================================================================ driver
def make_job(args) -> tuple[dict, list]:
    from depthkv.allocation import allocate
    from depthkv.allocation.profile import Profile
    from depthkv.tasks import generate
    from depthkv.tasks.prompt import build_prompt, token_counter

    lm = load(args.threads)
    tok = lm.tokenizer
    n_layers = lm.model.config.num_hidden_layers
    samples = generate("needle", args.n, args.seed, context_tokens=args.context_tokens,
                       count_tokens=token_counter(tok), split="eval")
    rows = []
    for s in samples:
        ctx, q = build_prompt(tok, s, question_in_prefill=args.setting == "aware")
        rows.append({"id": s.id, "context_ids": list(ctx), "question_ids": list(q)})
    floor = args.n_sink + args.n_recent
    strategies = {"uniform": None, "pyramid": None}
    profile_note = None
    if args.profile and Path(args.profile).exists():
        prof = Profile.load(args.profile, identity=lm.identity)
        strategies["optimal"] = prof.view()
        profile_note = str(Path(args.profile).resolve().relative_to(REPO))
    budgets: dict[str, dict[str, list]] = {}
    for ratio in args.ratios:
        budgets[str(ratio)] = {
            name: [allocate(name, n_layers, len(r["context_ids"]), ratio, sensitivity=view,
                            min_tokens=floor).to_dict() for r in rows]
            for name, view in strategies.items()
        }
    job = {
        "samples": rows, "ratios": list(args.ratios), "budgets": budgets, "window": args.window,
        "kernel": args.kernel, "n_sink": args.n_sink, "n_recent": args.n_recent,
        "max_new_tokens": args.max_new_tokens, "threads": args.threads,
        "agreement_samples": min(args.agreement_samples, len(rows)), "profile": profile_note,
    }
    return job, samples


def run_part(part: str, job: dict, python: str) -> dict:
    """Run one side in this interpreter, or in ``python`` as a subprocess (job and result through files)."""
    if Path(python).resolve() == Path(sys.executable).resolve() and (part != "kvpress" or _has_kvpress()):
        return run_kvpress(job) if part == "kvpress" else run_depthkv(job)
    if not Path(python).exists():
        raise SystemExit(f"{python} not found: run `bash scripts/kvpress_env.sh` first (creates .venv-kvpress)")
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
        subprocess.run([python, __file__, "--part", part, "--job", str(job_path), "--part-out", str(out_path)],
                       check=True, env=env, cwd=REPO)
        return json.loads(out_path.read_text())


def _has_kvpress() -> bool:
    try:
        import kvpress  # noqa: F401
    except Exception:
        return False
    return True


def digit_prefix(answer: str, output: str) -> float:
    """Secondary score: the longest run of digits in ``output`` that starts like ``answer``, as a share of it.

    The needle answer is a 7-digit number that SmolLM2 writes one digit token at a time; pruned caches often
    keep only its first digits ("65432" for "6544168"), which the all-or-nothing substring metric scores 0.
    """
    import re

    best = 0
    for run in re.findall(r"\d+", output):
        k = 0
        while k < min(len(run), len(answer)) and run[k] == answer[k]:
            k += 1
        best = max(best, k)
    return best / max(1, len(answer))


PAIRS = [  # (kvpress method, depthkv method): same scorer family and, for PerLayer, the same budgets
    ("kvpress full cache", "depthkv full cache"),
    ("kvpress PerLayer(SnapKV) + depthkv uniform", "depthkv snapkv uniform"),
    ("kvpress PerLayer(SnapKV) + depthkv pyramid", "depthkv snapkv pyramid"),
    ("kvpress PerLayer(SnapKV) + depthkv optimal", "depthkv snapkv optimal"),
    ("kvpress SnapKVPress", "depthkv snapkv uniform"),
    ("kvpress PyramidKVPress", "depthkv snapkv pyramid"),
    ("kvpress ObservedAttentionPress", "depthkv h2o uniform"),
]


def output_agreement(methods: list[dict]) -> list[dict]:
    """How often matched kvpress/depthkv methods produce the very same answer text."""
    by = {(m["method"], m["ratio"]): m for m in methods}
    out = []
    for a, b in PAIRS:
        for (name, ratio), m in sorted(by.items(), key=lambda kv: kv[0][1]):
            if name != a or (b, ratio) not in by:
                continue
            pa, pb = m["per_sample"], by[(b, ratio)]["per_sample"]
            same = sum(x["output"].strip() == y["output"].strip() for x, y in zip(pa, pb))
            out.append({"kvpress": a, "depthkv": b, "ratio": ratio, "identical_outputs": same, "n": len(pa)})
    return out


def summarise(job: dict, samples: list, parts: dict) -> list[dict]:
    from depthkv.tasks.metrics import METRICS, score

    n_layers = None
    rows = []
    for part in parts.values():
        for entry in part["results"].values():
            outs = {int(k): v for k, v in entry["outputs"].items()}
            kept = {int(k): v for k, v in entry["kept"].items()}
            per_sample, shares, totals = [], [], []
            for i, s in enumerate(samples):
                sc = score(s, outs[i])
                primary = sc[METRICS[s.metric].primary]
                n_layers = len(kept[i])
                n_ctx = len(job["samples"][i]["context_ids"])
                shares.append(sum(kept[i]) / (n_layers * n_ctx))
                totals.append(sum(kept[i]))
                per_sample.append({"id": s.id, "answer": s.answer, "output": outs[i], "score": primary,
                                   "digit_prefix": round(digit_prefix(s.answer, outs[i]), 4),
                                   "kv_kept": sum(kept[i])})
            rows.append({
                "method": entry["method"], "ratio": entry["ratio"],
                "accuracy": round(sum(p["score"] for p in per_sample) / len(per_sample), 4),
                "digit_prefix": round(sum(p["digit_prefix"] for p in per_sample) / len(per_sample), 4),
                "kv_kept_share": round(sum(shares) / len(shares), 4),
                "kv_kept_tokens_mean": round(sum(totals) / len(totals), 1),
                "layer_kept_sample0": kept[0], "per_sample": per_sample,
            })
    order = ["full cache", "SnapKVPress", "PerLayer(SnapKV) + depthkv uniform", "snapkv uniform",
             "PyramidKVPress", "PerLayer(SnapKV) + depthkv pyramid", "snapkv pyramid",
             "PerLayer(SnapKV) + depthkv optimal", "snapkv optimal", "ObservedAttentionPress", "h2o uniform"]

    def rank(r):
        pos = next((j for j, o in enumerate(order) if r["method"].endswith(o)), len(order))
        return (pos, 0 if r["method"].startswith("kvpress") else 1, r["ratio"])

    return sorted(rows, key=rank)


def markdown(report: dict) -> str:
    ratios = report["settings"]["ratios"]
    rows = report["methods"]
    lines = [
        f"# depthkv vs kvpress ({report['date']})", "",
        f"Model {report['model']}; {report['data']['n_samples']} `needle` samples (eval split, seed "
        f"{report['data']['seed']}, {min(report['data']['context_lens'])}-{max(report['data']['context_lens'])} "
        f"context tokens), {report['data']['setting'].split(' (')[0]}, greedy. Cell: substring accuracy / "
        "digit-prefix score (KV kept, share of the full cache). Digit-prefix: share of the 7-digit answer that the "
        "output's best number starts with (secondary; the needle is written one digit token at a time).",
        "", f"Command: `{report['command']}`", "",
        "| method | full | " + " | ".join(f"ratio {r}" for r in ratios) + " |",
        "| --- | --- | " + " | ".join("---" for _ in ratios) + " |",
    ]
    names = []
    for r in rows:
        if r["method"] not in names:
            names.append(r["method"])
    for name in names:
        cells = []
        full = next((r for r in rows if r["method"] == name and r["ratio"] == 0.0), None)
        cells.append(f"{full['accuracy']:.2f} / {full['digit_prefix']:.2f}" if full else "")
        for ratio in ratios:
            r = next((r for r in rows if r["method"] == name and r["ratio"] == ratio), None)
            cells.append(f"{r['accuracy']:.2f} / {r['digit_prefix']:.2f} ({r['kv_kept_share']:.3f})" if r else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    agr = report.get("agreement")
    if agr:
        lines += ["", f"Token agreement (share of depthkv's kept tokens that kvpress also keeps, mean over "
                      f"{agr['samples']} prompts x layers x KV heads; equal per-layer counts):", "",
                  "| pair | " + " | ".join(f"ratio {r}" for r in ratios) + " |",
                  "| --- | " + " | ".join("---" for _ in ratios) + " |"]
        labels = []
        for p in agr["pairs"]:
            if p["pair"] not in labels:
                labels.append(p["pair"])
        for label in labels:
            cells = []
            for ratio in ratios:
                p = next((p for p in agr["pairs"] if p["pair"] == label and p["ratio"] == ratio), None)
                cells.append(f"{p['mean_overlap']:.3f} (min {p['min_layer_head_overlap']:.2f})" if p else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    agree = report.get("output_agreement")
    if agree:
        cols = sorted({a["ratio"] for a in agree})
        lines += ["", "Identical answer text, kvpress method vs its depthkv counterpart (samples):", "",
                  "| kvpress | depthkv | " + " | ".join("full" if c == 0 else f"ratio {c}" for c in cols) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
        for a, b in PAIRS:
            row = {x["ratio"]: x for x in agree if x["kvpress"] == a and x["depthkv"] == b}
            if row:
                lines.append(f"| {a} | {b} | " + " | ".join(
                    f"{row[c]['identical_outputs']}/{row[c]['n']}" if c in row else "" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=12, help="needle samples")
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    ap.add_argument("--window", type=int, default=32, help="SnapKV observation window (both libraries)")
    ap.add_argument("--kernel", type=int, default=5, help="SnapKV pooling kernel (both libraries)")
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--n-recent", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--setting", choices=["aware", "agnostic"], default="aware",
                    help="aware: the question is inside the compressed prefill (SnapKV's setting); agnostic: "
                         "the context is compressed alone and the question appended (kvpress's pipeline)")
    ap.add_argument("--agreement-samples", type=int, default=3)
    ap.add_argument("--profile", default=str(DEFAULT_PROFILE), help="adds the `optimal` allocation if it exists")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kvpress-python", default=None,
                    help="interpreter with kvpress (default: this one if it imports kvpress, else .venv-kvpress)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/kvpress_compare.json"))
    ap.add_argument("--part", choices=["kvpress", "depthkv"], help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.part:  # a subprocess of the driver: one side, job and result through files
        job = json.loads(Path(args.job).read_text())
        res = run_kvpress(job) if args.part == "kvpress" else run_depthkv(job)
        Path(args.part_out).write_text(json.dumps(res))
        return 0

    t0 = time.time()
    job, samples = make_job(args)
    kv_python = args.kvpress_python or (sys.executable if _has_kvpress() else str(DEFAULT_VENV_PY))
    parts = {"depthkv": run_part("depthkv", job, sys.executable), "kvpress": run_part("kvpress", job, kv_python)}
    methods = summarise(job, samples, parts)
    full_dk = next(r for r in methods if r["method"] == "depthkv full cache")
    full_kv = next(r for r in methods if r["method"] == "kvpress full cache")
    same = sum(a["output"].strip() == b["output"].strip()
               for a, b in zip(full_dk["per_sample"], full_kv["per_sample"]))
    cmd = command_line(__file__, argv, launcher="OMP_NUM_THREADS=1 python")
    report = {
        "date": RUN_DATE, "command": cmd,
        "model": "smollm2-135m (HuggingFaceTB/SmolLM2-135M-Instruct, llama, 30 layers, 9 query / 3 KV heads), "
                 "float32, sdpa (eager for ObservedAttentionPress's prefill), CPU",
        "data": {"task": "needle", "split": "eval", "seed": args.seed, "n_samples": len(samples),
                 "context_tokens_target": args.context_tokens,
                 "context_lens": [len(r["context_ids"]) for r in job["samples"]],
                 "setting": SETTINGS[args.setting],
                 "metric": "substring (depthkv.tasks.metrics)"},
        "settings": {"ratios": job["ratios"], "snapkv_window": args.window, "snapkv_kernel": args.kernel,
                     "depthkv_protection": {"n_sink": args.n_sink, "n_recent": args.n_recent},
                     "min_tokens_per_layer": args.n_sink + args.n_recent,
                     "max_new_tokens": args.max_new_tokens, "profile": job["profile"],
                     "strategies": sorted(next(iter(job["budgets"].values())))},
        "environments": {k: v["env"] for k, v in parts.items()},
        "harness_parity": {"identical": same, "n": len(samples),
                           "note": "full-cache outputs of the kvpress harness vs depthkv's generate_from_cache"},
        "output_agreement": output_agreement(methods),
        "methods": methods,
        "agreement": parts["kvpress"].get("agreement"),
        "seconds": {"total": round(time.time() - t0, 1),
                    **{k: round(v["seconds"], 1) for k, v in parts.items()}},
    }
    out = Path(args.out)
    write_json(out, report, indent=1)
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
