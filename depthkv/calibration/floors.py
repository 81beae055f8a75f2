"""Choose the floor share of the input-adaptive allocators per ratio, on the calibration samples.

``adaptive`` / ``adaptive-joint`` give every layer ``floor_share`` of the static split (``optimal`` /
``optimal-joint``) and rank the rest by the input's own scores. The best share depends on the model and the
ratio (Qwen2.5-Coder-1.5B, 4k tokens, KVzip, per-head budgets: the full floor is best at ratio 0.8, half of it
at 0.9; SmolLM2-135M: half at both), so it is chosen per ratio on the calibration samples, by the objective
``depthkv refine`` optimises: the JOINT KL(full || pruned) of the teacher-forced answer tokens with every layer
pruned at once.

For one sample, ratio and share, what is measured is what the engine would keep: the budgets come from the one
budget builder (``BudgetSpec`` with that ``floor_share`` and the sample's own scores); with ``heads`` each
layer's budget is split across its KV heads as the engine splits it (``layer_head_counts``) and every head keeps
the tokens eviction keeps (``choose_tokens``; ``probe_keep_mask`` for one budget per layer). Those tokens become
key masks over the shared full cache, measured in batched forwards (``masked_kl``); shares that keep the same
tokens are measured once. The share with the lowest mean KL over the samples wins (ties: the one closest to
0.5, the allocators' default) and is stored in ``profile.data["floor_shares"]``, where the allocators read it
when their caller gives no ``floor_share``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from depthkv.allocation import Budgets, BudgetSpec, SensitivityView
from depthkv.allocation.adaptive import DEFAULT_FLOOR_SHARE
from depthkv.calibration.refine import PreparedSample, budget_masks, check_ratios, masked_kl
from depthkv.engine.cache import layer_positions
from depthkv.engine.session import Protection, choose_tokens, layer_head_counts

STRATEGIES = ("adaptive", "adaptive-joint")
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


class FloorError(ValueError):
    """A floor-share tuning that cannot run as asked (bad grid, strategy, samples or token floor)."""


@dataclass
class FloorResult:
    """The share chosen at one ratio and every candidate's mean joint KL over the samples."""

    ratio: float
    share: float
    kl: dict[float, float]  # candidate share -> mean joint KL
    heads: bool
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """The profile entry (``profile.data["floor_shares"][strategy][str(ratio)]``)."""
        return {"share": self.share, "kl": {str(s): v for s, v in self.kl.items()}, "heads": self.heads,
                "samples": self.samples}


def check_grid(grid: Sequence[Any]) -> tuple[float, ...]:
    """The candidate shares, sorted: numbers in [0, 1], each listed once, at least one (FloorError otherwise)."""
    out: list[float] = []
    for x in grid:
        try:
            share = float(x)
        except (TypeError, ValueError):
            raise FloorError(f"floor shares must be numbers in [0, 1], got {x!r}") from None
        if not 0.0 <= share <= 1.0:  # NaN fails too
            raise FloorError(f"floor shares must lie in [0, 1], got {x}")
        if share in out:
            raise FloorError(f"floor share {share:g} is listed twice")
        out.append(share)
    if not out:
        raise FloorError("give at least one floor share to try")
    return tuple(sorted(out))


def parse_grid(text: str) -> tuple[float, ...]:
    """``"0,0.25,0.5"`` -> the checked grid (``check_grid``)."""
    return check_grid([x.strip() for x in text.split(",") if x.strip()])


def choose_share(kl: Mapping[float, float]) -> float:
    """The share with the lowest mean KL; ties: the one closest to ``DEFAULT_FLOOR_SHARE``, then the smaller."""
    best = min(kl.values())
    return min((s for s, v in kl.items() if v == best), key=lambda s: (abs(s - DEFAULT_FLOOR_SHARE), s))


def head_masks(sample: PreparedSample, budgets: Budgets,
               protection: Protection) -> tuple[bytes, dict[int, torch.Tensor]]:
    """(the per-head counts as bytes, the key masks) of per-KV-head budgets on ``sample``.

    Each layer's budget is split across its heads as the engine splits it and each head keeps the tokens eviction
    keeps; a layer kept whole is left out.
    """
    sp, n = sample.sp, sample.context_len
    scores = sp.scores[sample.scorer]
    counts = layer_head_counts(sp.cache.layers, scores, [budgets], protection)
    masks: dict[int, torch.Tensor] = {}
    for layer, budget in enumerate(budgets.tokens):
        if budget >= n:
            continue
        cache_layer = sp.cache.layers[layer]
        keep, valid = choose_tokens(scores[layer], layer_positions(cache_layer), n, budget, protection,
                                    head_budgets=True, counts=counts[layer])
        mask = torch.zeros(keep.shape[1], n, dtype=torch.bool, device=keep.device)
        masks[layer] = mask.scatter_(-1, keep[0], valid[0])
    return b"".join(c.astype(np.int64).tobytes() for c in counts), masks


def sample_rows(sample: PreparedSample, specs: Sequence[BudgetSpec], n_layers: int, heads: bool,
                protection: Protection) -> tuple[list[dict[int, torch.Tensor]], list[int]]:
    """The key masks of every spec on ``sample``, those keeping the same tokens once, and each spec's row."""
    rows: list[dict[int, torch.Tensor]] = []
    index: dict[tuple, int] = {}
    which: list[int] = []
    for spec in specs:
        budgets = spec.for_context(n_layers, sample.context_len, scores=sample.sp.scores[sample.scorer])
        if heads:
            counts, masks = head_masks(sample, budgets, protection)
            key: tuple = (budgets.tokens, counts)
        else:
            key, masks = (budgets.tokens,), None
        if key not in index:
            index[key] = len(rows)
            rows.append(masks if masks is not None else budget_masks(sample, budgets.tokens))
        which.append(index[key])
    return rows, which


def _protection(samples: Sequence[PreparedSample], given: Protection | None) -> Protection:
    """The protected window every sample was prepared with (and ``given``, when given, must be it)."""
    found = {s.sp.protection for s in samples}
    if len(found) != 1 or (given is not None and given not in found):
        raise FloorError(f"the samples were prepared with protected windows {sorted(map(str, found))}; "
                         f"tune with the one they share{f', not {given}' if given is not None else ''}")
    return found.pop()


@torch.no_grad()
def tune_floor_shares(
    model: torch.nn.Module,
    samples: list[PreparedSample],
    profile,
    ratios: Sequence[float],
    grid: Sequence[float] = GRID,
    strategy: str = "adaptive",
    heads: bool = True,
    protection: Protection | None = None,
    protected: Sequence[int] = (),
    min_tokens: int | None = None,
    batch: int = 8,
    tick: Callable[[int], None] | None = None,
) -> dict[float, FloorResult]:
    """Per ratio, the floor share of ``strategy`` with the lowest mean joint KL over ``samples`` (module docstring).

    ``profile``: the calibration Profile (or its SensitivityView) the allocator reads; ``heads``: per-KV-head
    budgets inside each layer (as ``adaptive+heads``), else one budget per layer; ``protection``: the protected
    window (default: the one the samples were prepared with, which it must equal); ``protected`` and
    ``min_tokens`` (default the protected window) as the engine passes them to the budget builder; ``batch``:
    rows per forward (speed only); ``tick(rows)`` after every sample.
    """
    if strategy not in STRATEGIES:
        raise FloorError(f"floor shares are tuned for {' or '.join(STRATEGIES)}, not {strategy!r}")
    grid = check_grid(grid)
    if not samples:
        raise FloorError("tuning floor shares needs at least one calibration sample")
    protection = _protection(samples, protection)
    floor = max(1, protection.size) if min_tokens is None else int(min_tokens)
    if floor < max(1, protection.size):
        raise FloorError(f"min_tokens {floor} is below the protected window ({protection.size} tokens)")
    view = profile if isinstance(profile, SensitivityView) else profile.view()
    n_layers = view.n_layers
    ratios = check_ratios(n_layers, [s.context_len for s in samples], ratios, floor)
    cells = [(r, g) for r in ratios for g in grid]
    specs = [BudgetSpec(r, strategy, view, tuple(protected), floor, {"floor_share": g}) for r, g in cells]
    kl = np.zeros((len(samples), len(cells)))
    for i, sample in enumerate(samples):
        rows, which = sample_rows(sample, specs, n_layers, heads, protection)
        kl[i] = masked_kl(model, sample, rows, batch)[which]
        if tick is not None:
            tick(len(rows))
    mean = kl.mean(axis=0)
    out: dict[float, FloorResult] = {}
    for r in ratios:
        per_share = {g: float(mean[j]) for j, (rr, g) in enumerate(cells) if rr == r}
        out[r] = FloorResult(r, choose_share(per_share), per_share, heads, len(samples))
    return out


def store_floor_shares(profile, strategy: str, results: Mapping[float, FloorResult]) -> None:
    """Write ``results`` into ``profile.data["floor_shares"][strategy]``; other ratios and strategies are kept."""
    stored = profile.data.setdefault("floor_shares", {}).setdefault(strategy, {})
    for r, res in results.items():
        stored[str(r)] = res.to_dict()


def tune_profile(
    profile,
    model: torch.nn.Module,
    samples: list[PreparedSample],
    ratios: Sequence[float],
    grid: Sequence[float] = GRID,
    strategy: str = "adaptive",
    *,
    heads: bool = True,
    batch: int = 8,
    progress: bool = True,
) -> dict[float, FloorResult]:
    """``tune_floor_shares`` on samples prepared with ``profile``'s scoring (``refine.profile_scoring``), stored
    in the profile (``store_floor_shares``) with its time under ``timings["floor_shares_s"]``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=None, desc=f"floor shares ({strategy})", unit="row", disable=not progress, mininterval=2.0)
    try:
        results = tune_floor_shares(model, samples, profile, ratios, grid, strategy, heads, batch=batch,
                                    tick=bar.update)
    finally:
        bar.close()
    store_floor_shares(profile, strategy, results)
    profile.data.setdefault("timings", {})["floor_shares_s"] = round(time.perf_counter() - t0, 2)
    return results
