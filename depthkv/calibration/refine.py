"""Refine the ``optimal`` budgets on the JOINT degradation of pruning every layer at once.

Calibration (``depthkv.calibration.ablation``) prunes one layer at a time, and ``optimal`` minimises the sum of
those single-layer degradations. When every layer is pruned together the damage compounds, which the
single-layer curves cannot see: at high ratios the optimiser cuts many layers to the protected window and
quality collapses. Refinement measures instead, on the calibration samples, the degradation with ALL layers
at their budgets (KL(full || pruned) of the teacher-forced answer tokens, as calibration measures it) and
improves the vector by local search:

1. start from the ``optimal`` vector at the target ratio (on the samples' median context length ``N_ref``);
2. marginal effects: for every layer l, the joint degradation when l alone gets ``+delta`` or ``-delta``
   tokens while every other layer stays at its budget (2L probes per sample, batched);
3. moves: pair the layers where adding tokens helps most (gain per token) with those where removing them
   hurts least (cost per token) while the gain exceeds the cost; each pair moves ``delta`` tokens (less at a
   floor or cap), so the global total, the floor (the protected window) and the cap N hold exactly;
4. accept: the first k pairs for k = all, half, a quarter, ..., one are measured jointly (one batch), and the
   best is kept only if it lowers the measured mean joint degradation; ``delta`` then shrinks;
5. after the last round the start and the result are measured in the same batch and the start is returned
   if the result is not better: the refined vector is never worse than the start on the calibration data.

This is coordinate-wise local search with exact acceptance (no surrogate), a discrete analogue of a
projected-gradient step on the simplex with a backtracking line search; it stops at a local optimum of the
measured objective and, with few samples, can fit them: evaluate on held-out data (``depthkv eval`` uses a
disjoint split).

Probes reuse calibration's batched masked forwards: each batch row hides, in EVERY layer, the tokens that
eviction at that row's budget would drop (a key mask over the shared full cache, ``Plan(kind="ablate")``), and
the forward starts at the lowest pruned layer from the reference pass's hidden state. The KL equals that of
physically evicting the tokens (tested). ``masked_kl`` is that measurement for explicit per-row key masks
(``joint_kl`` builds them from budget vectors; ``depthkv.calibration.floors`` from per-KV-head budgets).
Vectors are kept as per-layer shares of the context (``B_l / N``), so the result serves any context length
through the ``optimal-joint`` allocator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from depthkv.allocation import SensitivityView, allocate, budgets_from_shares, make_request
from depthkv.allocation.budgets import BudgetError, check_ratio
from depthkv.calibration.ablation import (
    CalibrationItem,
    _answer_stats,
    _layer_inputs,
    layers_from,
    probe_keep_mask,
    shared_cache,
)
from depthkv.engine.runner import ScoredPrefill, cache_kwarg, score_prefill
from depthkv.engine.session import Plan, Protection, Session
from depthkv.scorers import Scorer, get_scorer

START = "optimal"


class RefineError(ValueError):
    """A refinement that cannot run as asked (e.g. the profile's calibration data cannot be re-created)."""


@dataclass
class RefineConfig:
    """How to refine: search schedule and probe batching (defaults in docs/calibration.md)."""

    rounds: int = 4  # probe + move rounds per ratio
    step: float = 0.5  # first delta, as a share of the mean per-layer budget at the target ratio
    shrink: float = 0.5  # delta is multiplied by this after every round (never below 1 token)
    max_pairs: int = 8  # most donor -> receiver moves tried in one round
    batch: int = 8  # probe rows per batched forward (speed only)
    min_tokens: int | None = None  # least tokens a layer keeps; default the protected window

    def validate(self, protection: Protection) -> int:
        """Raise ValueError on a bad setting; return the per-layer floor."""
        if self.rounds < 1:
            raise ValueError(f"refinement needs at least one round, got {self.rounds}")
        if not 0.0 < self.step <= 1.0:
            raise ValueError(f"step must lie in (0, 1] (share of the mean budget), got {self.step}")
        if not 0.0 < self.shrink <= 1.0:
            raise ValueError(f"shrink must lie in (0, 1], got {self.shrink}")
        if self.max_pairs < 1 or self.batch < 1:
            raise ValueError(f"max_pairs and batch must be >= 1, got {self.max_pairs} and {self.batch}")
        floor = max(1, protection.size) if self.min_tokens is None else int(self.min_tokens)
        if floor < max(1, protection.size):
            raise ValueError(f"min_tokens {floor} is below the protected window ({protection.size} tokens)")
        return floor


@dataclass
class RefineResult:
    """One refined vector: per-layer shares and how the joint degradation moved."""

    ratio: float
    shares: tuple[float, ...]
    start_shares: tuple[float, ...]
    reference_context: int
    joint_kl_start: float
    joint_kl_refined: float
    rounds: int
    accepted: int
    samples: int
    min_tokens: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The profile entry (``profile.data["refined"][str(ratio)]``)."""
        d = asdict(self)
        d.pop("ratio")
        d["start"] = START
        d["shares"], d["start_shares"] = list(self.shares), list(self.start_shares)
        return d


# ----------------------------------------------------------------------------------------------- probes
@dataclass
class PreparedSample:
    """One calibration sample prefilled once: scores, the reference answer distribution, layer inputs."""

    sp: ScoredPrefill
    scorer: str
    hidden_in: list[torch.Tensor]  # hidden state entering each decoder layer (reference pass), [1, T, d]
    targets: torch.Tensor  # [1, T] answer ids
    ref_logp: torch.Tensor  # [1, T, V] full-cache log-probs of the forced tokens
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def context_len(self) -> int:
        return self.sp.context_len

    def keep_mask(self, layer: int, budget: int) -> torch.Tensor:
        """[KVH, N] bool: the tokens layer ``layer`` keeps at ``budget`` (the choice eviction makes)."""
        key = (layer, budget)
        if key not in self.masks:
            self.masks[key] = probe_keep_mask(self.sp, self.scorer, layer, budget)
        return self.masks[key]


@torch.no_grad()
def prepare_samples(
    model: torch.nn.Module, items: Sequence[CalibrationItem], scorer: Scorer, protection: Protection
) -> list[PreparedSample]:
    """One scored prefill and one reference pass per item (same split of prompt and answer as calibration)."""
    out = []
    device = next(model.parameters()).device
    for item in items:
        prefix, forced = (t.to(device) for t in item.split())  # no-op when the items are already there
        answer = item.answer_ids.to(device)
        sp = score_prefill(model, prefix, [scorer], protection)
        ref_logits, hidden_in = _layer_inputs(model, forced, shared_cache(sp.cache), answer.shape[1])
        _, ref_logp = _answer_stats(ref_logits, answer)
        out.append(PreparedSample(sp, scorer.name, hidden_in, answer, ref_logp))
    return out


RowMasks = Mapping[int, torch.Tensor]
"""One probe row: layer -> [KVH, N] bool, the context keys each KV head may see there (absent layer: all)."""


@torch.no_grad()
def masked_kl(model: torch.nn.Module, sample: PreparedSample, rows: Sequence[RowMasks], batch: int = 8) -> np.ndarray:
    """KL(full || pruned) of the answer tokens [R], row r seeing in each layer only the keys ``rows[r]`` allows.

    ``batch`` rows share a forward over the shared full cache, which starts at the lowest layer any of them
    restricts; a row without masks is the full cache (KL 0, not computed).
    """
    n = sample.context_len
    kl = np.zeros(len(rows))
    n_forced = sample.targets.shape[1]
    device = sample.targets.device
    with Session(model) as session:
        for lo in range(0, len(rows), batch):
            chunk = rows[lo : lo + batch]
            pruned = sorted({layer for row in chunk for layer in row})
            if not pruned:
                continue  # full cache in every layer: no degradation
            masks: dict[int, torch.Tensor] = {}
            for layer in pruned:
                kvh = sample.sp.cache.layers[layer].keys.shape[1]
                m = torch.ones(len(chunk), kvh, n, dtype=torch.bool, device=device)
                for r, row in enumerate(chunk):
                    if layer in row:
                        m[r] = row[layer]
                masks[layer] = m
            session.set_plan(Plan(kind="ablate", key_masks=masks))
            with layers_from(model, pruned[0]) as start:
                embeds = sample.hidden_in[start].expand(len(chunk), -1, -1)
                out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=n_forced,
                            **{cache_kwarg(model): shared_cache(sample.sp.cache, len(chunk))})
            _, logp = _answer_stats(out.logits, sample.targets)
            ref = sample.ref_logp
            kl[lo : lo + len(chunk)] = (ref.exp() * (ref - logp)).sum(-1).mean(-1).double().cpu().numpy()
    return kl


def budget_masks(sample: PreparedSample, budgets: Sequence[int]) -> dict[int, torch.Tensor]:
    """The key masks of one budget vector: in every layer below the full context, the tokens eviction keeps."""
    n = sample.context_len
    return {layer: sample.keep_mask(layer, int(b)) for layer, b in enumerate(budgets) if int(b) < n}


def joint_kl(model: torch.nn.Module, sample: PreparedSample, rows: np.ndarray, batch: int = 8) -> np.ndarray:
    """KL(full || pruned) of the answer tokens [R] for budget vectors ``rows`` [R, L], every layer pruned at once.

    Each row masks, in every layer, the tokens eviction would drop at that row's budget (``masked_kl``);
    identical rows are computed once.
    """
    uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), axis=0, return_inverse=True)
    kl = masked_kl(model, sample, [budget_masks(sample, row) for row in uniq], batch)
    return kl[np.asarray(inverse).reshape(-1)]


# ----------------------------------------------------------------------------------------------- moves
def propose_moves(
    tokens: Sequence[int] | np.ndarray,
    gain: Sequence[float] | np.ndarray,
    cost: Sequence[float] | np.ndarray,
    delta: int,
    floor: int,
    cap: int,
    max_pairs: int = 8,
) -> tuple[list[tuple[int, int, int]], list[np.ndarray]]:
    """Token moves suggested by measured marginal effects, and the candidate vectors they give.

    ``gain[l]``: drop of the degradation per token added to layer l; ``cost[l]``: rise per token removed
    (non-finite = not measured). Receivers in order of gain, donors in order of cost, are paired while the
    gain exceeds the cost; a layer is in at most one pair; a pair moves ``min(delta, room, slack)`` tokens.
    Returns ``(pairs, candidates)``: pairs ``(donor, receiver, amount)`` in order of predicted benefit, and
    one vector per prefix of k pairs (k = all, half, a quarter, ..., 1). Every candidate has the same sum as
    ``tokens`` and every entry in ``[floor, cap]``.
    """
    t = np.asarray(tokens, dtype=np.int64)
    g = np.asarray(gain, dtype=np.float64)
    c = np.asarray(cost, dtype=np.float64)
    if not (t.shape == g.shape == c.shape) or t.ndim != 1:
        raise ValueError(f"tokens, gain and cost must be vectors of one length, got {t.shape}, {g.shape}, {c.shape}")
    if delta < 1 or floor > cap or np.any(t < floor) or np.any(t > cap):
        raise ValueError(f"need delta >= 1 and tokens within [floor, cap] = [{floor}, {cap}]")
    room, slack = cap - t, t - floor
    recv = [int(i) for i in np.argsort(-np.nan_to_num(g, nan=-np.inf), kind="stable")
            if room[i] > 0 and np.isfinite(g[i])]
    don = [int(i) for i in np.argsort(np.nan_to_num(c, nan=np.inf), kind="stable")
           if slack[i] > 0 and np.isfinite(c[i])]
    pairs: list[tuple[int, int, int]] = []
    used: set[int] = set()
    i = j = 0
    while i < len(recv) and j < len(don) and len(pairs) < max_pairs:
        r, d = recv[i], don[j]
        if r in used:
            i += 1
        elif d in used or d == r:  # a layer that is both the best receiver and the cheapest donor receives
            j += 1
        elif g[r] > c[d]:
            pairs.append((d, r, int(min(delta, room[r], slack[d]))))
            used.update((r, d))
            i += 1
            j += 1
        else:
            break
    sizes, k = [], len(pairs)
    while k >= 1:
        if k not in sizes:
            sizes.append(k)
        k = k // 2 if k > 1 else 0
    cands = []
    for k in sizes:
        v = t.copy()
        for d, r, a in pairs[:k]:
            v[d] -= a
            v[r] += a
        cands.append(v)
    return pairs, cands


# ----------------------------------------------------------------------------------------------- search
def check_ratios(
    n_layers: int, context_lens: Sequence[int], ratios: Sequence[float], floor: int
) -> tuple[float, ...]:
    """Validated refinement ratios: each in (0, 1), distinct, and feasible on every calibration sample."""
    out: list[float] = []
    for r in ratios:
        r = check_ratio(r)
        if r <= 0.0:
            raise BudgetError("refinement ratios must be > 0 (ratio 0 keeps the full cache: nothing to refine)")
        if any(abs(r - o) <= 1e-9 for o in out):
            raise BudgetError(f"refinement ratio {r:g} is listed twice")
        out.append(r)
    if not out:
        raise BudgetError("give at least one ratio to refine")
    for r in out:
        for n in sorted(set(int(x) for x in context_lens)):
            make_request(n_layers, n, r, min_tokens=floor).check_feasible(
                "refine", why=f" (the protected window) on a {n}-token calibration sample")
    return tuple(out)


class _Meter:
    """Joint degradations of budget vectors over all prepared samples, counting the rows measured."""

    def __init__(self, model, samples: list[PreparedSample], ratio: float, floor: int, n_ref: int, batch: int,
                 tick: Callable[[int], None] | None):
        self.model, self.samples, self.ratio, self.floor, self.n_ref = model, samples, ratio, floor, n_ref
        self.batch, self.tick, self.rows = batch, tick, 0

    def per_sample(self, tokens_ref: np.ndarray) -> list[np.ndarray]:
        """Budgets on each sample's own context for a vector given in tokens on ``n_ref`` (via its shares)."""
        shares = np.asarray(tokens_ref, dtype=np.float64) / self.n_ref
        return [np.asarray(budgets_from_shares(shares, s.context_len, self.ratio, min_tokens=self.floor).tokens)
                for s in self.samples]

    def measure_rows(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        """``rows[s]`` [R, L] budget vectors of sample s -> KL [R] per sample."""
        out = []
        for s, r in zip(self.samples, rows):
            out.append(joint_kl(self.model, s, r, self.batch))
            self.rows += len(r)
            if self.tick is not None:
                self.tick(len(r))
        return out

    def measure(self, vectors: Sequence[np.ndarray]) -> np.ndarray:
        """[V, S] joint KL of vectors (tokens on ``n_ref``) on every sample."""
        per = [self.per_sample(v) for v in vectors]
        rows = [np.stack([p[s] for p in per]) for s in range(len(self.samples))]
        return np.stack(self.measure_rows(rows), axis=1)


def refine_ratio(
    model: torch.nn.Module,
    samples: list[PreparedSample],
    view: SensitivityView,
    ratio: float,
    cfg: RefineConfig,
    floor: int,
    tick: Callable[[int], None] | None = None,
) -> RefineResult:
    """Refine the ``optimal`` vector at ``ratio`` on the prepared samples (see the module docstring)."""
    t0 = time.perf_counter()
    n_layers = view.n_layers
    n_ref = int(np.median([s.context_len for s in samples]))
    lo_ref = min(floor, n_ref)
    start = np.asarray(allocate(START, n_layers, n_ref, ratio, sensitivity=view, min_tokens=floor).tokens)
    meter = _Meter(model, samples, ratio, floor, n_ref, cfg.batch, tick)
    cur = start.copy()
    d_cur = meter.measure([cur])[0]
    delta = max(1, int(round(cfg.step * int(start.sum()) / n_layers)))
    history: list[dict[str, Any]] = []
    accepted = 0
    for rnd in range(cfg.rounds):
        base = meter.per_sample(cur)
        plus = [layer for layer in range(n_layers) if cur[layer] < n_ref]
        minus = [layer for layer in range(n_layers) if cur[layer] > lo_ref]
        rows = []
        for s, b in zip(samples, base):
            d_s = max(1, int(round(delta * s.context_len / n_ref)))
            lo_s = min(floor, s.context_len)
            probe = [b]
            for layer in plus:
                v = b.copy()
                v[layer] = min(s.context_len, v[layer] + d_s)
                probe.append(v)
            for layer in minus:
                v = b.copy()
                v[layer] = max(lo_s, v[layer] - d_s)
                probe.append(v)
            rows.append(np.stack(probe))
        kl = np.stack(meter.measure_rows(rows))  # [S, 1 + |plus| + |minus|]
        d0 = kl[:, 0].mean()
        gain = np.full(n_layers, -np.inf)
        cost = np.full(n_layers, np.inf)
        for k, layer in enumerate(plus):
            gain[layer] = (d0 - kl[:, 1 + k].mean()) / min(delta, n_ref - cur[layer])
        for k, layer in enumerate(minus):
            cost[layer] = (kl[:, 1 + len(plus) + k].mean() - d0) / min(delta, cur[layer] - lo_ref)
        pairs, cands = propose_moves(cur, gain, cost, delta, lo_ref, n_ref, cfg.max_pairs)
        entry: dict[str, Any] = {"round": rnd + 1, "delta": delta, "probes": int(kl.shape[1] - 1),
                                 "pairs": len(pairs), "accepted": False}
        if cands:
            d = meter.measure(cands)  # [C, S]
            best = int(np.argmin(d.mean(axis=1)))
            entry["candidates_kl"] = [float(x) for x in d.mean(axis=1)]
            if d[best].mean() < d_cur.mean():
                k = sum(1 for a, b in zip(cands[best], cur) if a != b) // 2
                entry.update(accepted=True, moves=[list(p) for p in pairs[: max(k, 1)]])
                cur, d_cur = cands[best], d[best]
                accepted += 1
        entry["joint_kl"] = float(d_cur.mean())
        history.append(entry)
        delta = max(1, int(round(delta * cfg.shrink)))
    final = meter.measure([start, cur])  # one batch per sample: the comparison shares its float rounding
    if final[1].mean() > final[0].mean():
        cur, final[1] = start.copy(), final[0]
    return RefineResult(
        ratio=float(ratio), shares=tuple(float(x) / n_ref for x in cur),
        start_shares=tuple(float(x) / n_ref for x in start), reference_context=n_ref,
        joint_kl_start=float(final[0].mean()), joint_kl_refined=float(final[1].mean()), rounds=cfg.rounds,
        accepted=accepted, samples=len(samples), min_tokens=floor, seconds=round(time.perf_counter() - t0, 2),
        history=history,
    )


def profile_protection(profile) -> Protection:
    """The protected window (sinks + recent tokens) ``profile`` was calibrated with."""
    prot = profile.data.get("protection") or {}
    return Protection(int(prot.get("n_sink", 4)), int(prot.get("n_recent", 16)))


def profile_scoring(profile, model: torch.nn.Module) -> tuple[Scorer, Protection]:
    """The scorer (bound to ``model`` where it needs its tokenizer) and protected window ``profile`` was
    calibrated with: what its samples are prepared with (``prepare_samples``)."""
    protection = profile_protection(profile)
    scorer_info = profile.data.get("scorer") or {}
    scorer = get_scorer(scorer_info.get("name", "snapkv"), **(scorer_info.get("options") or {}))
    if scorer.context_pass:  # KVzip's repeat prompt: the tokenizer saved next to the model's weights
        from depthkv.engine.press import bind_scorer

        scorer = bind_scorer(scorer, model)
    return scorer, protection


def refine_profile(
    profile,
    model: torch.nn.Module,
    items: Sequence[CalibrationItem],
    ratios: Sequence[float],
    cfg: RefineConfig | None = None,
    *,
    data: dict[str, Any] | None = None,
    progress: bool = True,
    samples: list[PreparedSample] | None = None,
) -> dict[float, RefineResult]:
    """Refine ``profile``'s optimal vectors at ``ratios`` on ``items`` and store them in ``profile.data["refined"]``.

    ``profile`` is a loaded calibration Profile of ``model`` (its scorer and protected window are used);
    ``data`` optionally describes the items (sha256, sample ids), recorded with each vector; ``samples``: the
    items already prepared with ``profile_scoring`` (so that other measurements can share them). Existing
    vectors for other ratios are kept; a ratio refined again is replaced.
    """
    from tqdm.auto import tqdm

    cfg = cfg or RefineConfig()
    protection = profile_protection(profile)
    floor = cfg.validate(protection)
    view = profile.view()
    if not items:
        raise ValueError("refinement needs at least one calibration sample")
    ratios = check_ratios(view.n_layers, [i.context_len for i in items], ratios, floor)
    t0 = time.perf_counter()
    if samples is None:
        samples = prepare_samples(model, items, *profile_scoring(profile, model))
    elif len(samples) != len(items) or any(s.sp.protection != protection for s in samples):
        raise ValueError(f"{len(samples)} prepared samples for {len(items)} calibration items, or prepared with "
                         f"another protected window than the profile's ({protection})")
    bar = tqdm(total=None, desc="refine (joint probes)", unit="row", disable=not progress, mininterval=2.0)
    results: dict[float, RefineResult] = {}
    try:
        for r in ratios:
            bar.set_postfix_str(f"ratio {r:g}", refresh=False)
            results[r] = refine_ratio(model, samples, view, r, cfg, floor, tick=bar.update)
    finally:
        bar.close()
    refined = profile.data.setdefault("refined", {})
    for r, res in results.items():
        entry = res.to_dict()
        entry["config"] = asdict(cfg)
        if data is not None:
            entry["data"] = data
        refined[str(r)] = entry
    profile.data.setdefault("timings", {})["refine_s"] = round(time.perf_counter() - t0, 2)
    return results


def recorded_config(profile, samples: int | None = None):
    """The ``CalibrationConfig`` a profile was calibrated with (``samples`` overrides the count).

    Raises RefineError when the profile does not record it.
    """
    from depthkv.calibration.run import CalibrationConfig

    recorded = profile.data.get("config")
    if not isinstance(recorded, dict) or "data" not in recorded:
        raise RefineError("the profile does not record its calibration data (no 'config'); calibrate again with "
                          "depthkv calibrate ... --refine-ratios R")
    known = set(CalibrationConfig.__dataclass_fields__)
    cfg = CalibrationConfig(**{k: v for k, v in recorded.items() if k in known})
    if samples is not None:
        cfg.samples = int(samples)
    if cfg.samples < 1:
        raise RefineError(f"refinement needs at least one calibration sample, got {cfg.samples}")
    return cfg


def recreate_items(
    profile, tokenizer, samples: int | None = None, device: torch.device | None = None
) -> tuple[list[CalibrationItem], dict[str, Any]]:
    """The profile's calibration samples, re-created from the data spec and seed it records.

    ``samples``: how many (default: as many as the profile used). With the profile's own count the token ids
    must hash to the recorded sha256 (same tokenizer, same generators), otherwise RefineError. The token ids
    are put on ``device`` (the model's).
    """
    from depthkv.calibration.run import load_items

    cfg = recorded_config(profile, samples)
    items, desc = load_items(tokenizer, cfg, device)
    want = (profile.data.get("data") or {}).get("sha256")
    if cfg.samples == profile.data["config"].get("samples") and want and desc["sha256"] != want:
        raise RefineError(f"the calibration samples re-created from the profile ({desc['description']}) differ "
                          "from those it was calibrated on (sha256 mismatch: another tokenizer or data source?)")
    return items, {k: desc[k] for k in ("sha256", "sample_ids", "description")}
