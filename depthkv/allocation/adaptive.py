"""Input-adaptive allocation: split the global budget by ranking the current input's token scores.

A static allocator (``optimal``) decides per-layer budgets once per model, from calibration. But which layer
needs its tokens depends on the input too: KVzip (Kim et al. 2025) ranks its scores across all layers and
heads at once for every context, so a layer whose attention is spread thin gives up tokens to one that has
many sharply attended ones. Two allocators do that here, both exact in the global total:

* ``global``: the ranking alone. Each layer's k-th unit is worth the k-th largest of its per-token scores
  (each KV head's scores sorted, then averaged over heads at equal rank: non-increasing in k), and the budget
  goes to the best units of all layers together (``select_top``: exact, monotone in the total).
* ``adaptive``: the same ranking on top of the calibrated profile (the DepthKV paper's future work): every
  layer first keeps ``floor_share`` of what the static ``optimal`` allocation gives it at this ratio (measured
  sensitivity is a floor the input cannot overrule), the rest follows the input's ranking;
  ``adaptive-joint`` takes the floors from the refined ``optimal-joint`` split instead.

The best ``floor_share`` depends on the model and the ratio (a full floor wins at a moderate ratio on one
model, half of it at a high ratio), so it is measured rather than fixed: ``depthkv refine --floor-shares``
picks, per ratio, the share with the lowest joint degradation on the calibration samples and stores it in the
profile. Without ``floor_share`` the allocators use that stored share for their ratio, else 0.5; an explicit
``floor_share`` always wins.

Scores are compared as they come (``normalise="none"``; attention-based scorers give probabilities, on one
scale across layers) or after dividing each layer by its mean score (``normalise="mean"``), which suits
scorers whose scale drifts with depth.

Cost. The allocators run once per input, on scores that live on the model's device, so the work stays
there and is vectorised: one batched sort of every layer's scores, one selection of the budget's threshold
(the need-th best unit) over all layers' curves at once, and a single transfer of two small count vectors
to the host, where the ties at the threshold are filled in the fixed order of ``select_top``. The budgets
are those of the pointwise definition above (``select_top`` over the same curves), bit for bit. Per-KV-head
budgets (``head_split_layers``) split every layer's budget across its heads in one pass the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from depthkv.allocation.apportion import fill_ties
from depthkv.allocation.budgets import BudgetError, Budgets
from depthkv.allocation.optimal import allocate_optimal
from depthkv.allocation.optimal_joint import allocate_optimal_joint
from depthkv.allocation.registry import AllocationRequest, AllocatorError, register_allocator
from depthkv.allocation.sensitivity import SensitivityView

NORMALISE = ("none", "mean")
DEFAULT_FLOOR_SHARE = 0.5  # floor share of ``adaptive`` / ``adaptive-joint`` where the profile tuned none
HOST_DEVICES = ("cpu",)  # device types whose sort and selection run the host algorithms (numpy, kthvalue)


def _work_device(scores: Sequence[Any]) -> torch.device:
    """Where the curves are computed: the first torch score's device (CPU for numpy input and for MPS,
    which has no float64)."""
    for s in scores:
        if isinstance(s, torch.Tensor):
            return torch.device("cpu") if s.device.type == "mps" else s.device
    return torch.device("cpu")


def _as_rows(s: Any, device: torch.device) -> torch.Tensor:
    """One layer's scores as ``[batch * kv_heads, N]`` on ``device``: torch scores (the engine's, float32 or
    lower) in float32, arrays in float64 (the precision each is compared at)."""
    if isinstance(s, torch.Tensor):
        t = s.detach().to(device=device).float()
    else:
        t = torch.as_tensor(np.asarray(s, dtype=np.float64), device=device)
    return t.reshape(-1, t.shape[-1])


def _inf_for_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every non-finite score (protected tokens, NaN) set to +inf: they rank first."""
    return x.nan_to_num(nan=torch.inf, posinf=torch.inf, neginf=torch.inf)


def _finite_range(y: torch.Tensor, dims: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest, smallest) finite value of ``y`` (non-finite already +inf) over ``dims`` (kept as size 1;
    default: all, 0-d), as float64 device tensors: 0 and 0 where no value is finite."""
    dims = tuple(range(y.dim())) if dims is None else dims
    keep = len(dims) < y.dim()
    low = y.amin(dim=dims, keepdim=keep)
    top = y.masked_fill(y == torch.inf, -torch.inf).amax(dim=dims, keepdim=keep)
    found = low < torch.inf
    return torch.where(found, top, 0.0).double(), torch.where(found, low, 0.0).double()


def _to_device(a: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """A small int64 host array on ``device`` without waiting for the device's queue (no host sync)."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, M] -> [B]``: the k-th largest value of each row. On CPU a selection (``kthvalue``, linear time);
    on an accelerator a sort, as ``kthvalue`` there runs one thread block per row."""
    if flat.device.type in HOST_DEVICES:
        return flat.kthvalue(flat.shape[-1] - k + 1, dim=-1).values
    return flat.sort(dim=-1).values[:, flat.shape[-1] - k]


def _sort_ascending(x: torch.Tensor) -> torch.Tensor:
    """``x`` sorted along its last axis; on CPU by numpy, whose vectorised sort is several times faster."""
    if x.device.type in HOST_DEVICES:
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return x.sort(dim=-1).values


def _sorted_head_mean(y: torch.Tensor, top: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``[..., R, N] -> [..., N]`` float64 from scores ``y`` whose non-finite entries are +inf: those set to
    ``top + 1``, all shifted by ``-min(low, 0)``, each row sorted descending, the R rows averaged at equal rank.

    The rows are sorted in their own dtype before the (monotone) map to float64, which gives the same sorted
    values as mapping first. They are summed one after the other and divided by R as a float64 division on
    the device (not a multiplication by 1/R): exactly the values of a float64 ``mean`` over the rows.
    """
    shift = torch.clamp(low, max=0.0)
    x = _sort_ascending(y).double().sub_(shift)  # +inf (last) stays +inf
    x = torch.where(x == torch.inf, (top + 1.0) - shift, x)
    rows = x.shape[-2]
    c = x[..., 0, :]
    for r in range(1, rows):
        c = c + x[..., r, :]
    c = c / torch.full((), float(rows), dtype=c.dtype, device=c.device)
    return c.flip(-1)


def _mean_normalised(c: torch.Tensor, top: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Each curve divided by the mean of its finite-score part (1 where that mean is not positive).

    The means are taken on the host with numpy's float64 summation, the reference definition of the curves.
    """
    top_f, low_f = float(top), float(low)
    edge = top_f + 1.0 - min(low_f, 0.0) - 1e-12
    host = c.cpu().numpy()
    means = np.ones(host.shape[0])
    for i, row in enumerate(host):
        fin = row[row <= edge]
        if fin.size and fin.mean() > 0:
            means[i] = float(fin.mean())
    return torch.from_numpy(host / means[:, None]).to(c.device)


def _rank_curves(scores: Sequence[Any], normalise: str = "none",
                 layers: Sequence[int] | None = None) -> torch.Tensor:
    """Rank curves ``[len(layers), N]`` (float64, on the scores' device) of ``layers`` (default: all)."""
    if normalise not in NORMALISE:
        raise AllocatorError(f"normalise must be one of {NORMALISE}, got {normalise!r}")
    if len(scores) == 0:
        raise AllocatorError("rank curves need the scores of at least one layer")
    device = _work_device(scores)
    rows = [_as_rows(s, device) for s in scores]
    if len({r.dtype for r in rows}) > 1:  # arrays and tensors mixed: compare all in float64
        rows = [r.double() for r in rows]
    chosen = range(len(rows)) if layers is None else [int(i) for i in layers]
    if len(chosen) == 0:
        return torch.empty(0, rows[0].shape[-1], dtype=torch.float64, device=device)
    if len({r.shape for r in rows}) == 1:  # the usual case: one batched sort for all layers
        y = _inf_for_nonfinite(torch.stack(rows))  # [L, R, N]
        top, low = _finite_range(y)  # over every layer, protected ones included: one scale for all
        if len(chosen) != len(rows):
            y = y.index_select(0, _to_device(list(chosen), device))
        c = _sorted_head_mean(y, top, low)
    else:  # layers with different numbers of heads
        ys = [_inf_for_nonfinite(r) for r in rows]
        top, low = _finite_range(torch.cat([y.flatten() for y in ys]))
        c = torch.stack([_sorted_head_mean(ys[i], top, low) for i in chosen])
    if normalise == "mean":
        c = _mean_normalised(c, top, low)
    return torch.cummin(c, dim=-1).values  # guard against float noise: exactly non-increasing


def rank_curves(scores: Sequence[Any], normalise: str = "none") -> np.ndarray:
    """[L, N] non-increasing unit values: per layer, heads' scores sorted descending, averaged at equal rank.

    Protected tokens (scored +inf by the engine) and any other non-finite score become the largest finite
    value + 1, so they rank first; the curves are shifted to be >= 0 (ranking is unchanged by a shift).
    """
    return _rank_curves(scores, normalise).cpu().numpy()


def take_best(need: int, lo: Sequence[int] | np.ndarray, hi: Sequence[int] | np.ndarray,
              curves: torch.Tensor | np.ndarray) -> np.ndarray:
    """``select_top`` for rank-curve priorities, vectorised: ``lo`` plus, per row g of ``curves``, how many of
    its units k = lo[g]+1 .. hi[g] (worth ``curves[..., g, k - 1]``) are among the ``need`` best of all rows.

    ``curves`` is ``[G, M]`` or a batch ``[B, G, M]`` of independent problems sharing ``need``, ``lo`` and
    ``hi`` (result ``[G]`` or ``[B, G]``); rows must be non-increasing, finite and >= 0. The need-th best
    value of all candidate units is the threshold: every unit above it is taken, then units equal to it in
    the order (k ascending, row ascending), exactly as ``select_top`` orders them.
    """
    t = torch.as_tensor(curves)
    batched = t.dim() == 3
    if not batched:
        t = t[None]
    lo = np.asarray(lo, dtype=np.int64).reshape(-1)
    hi = np.asarray(hi, dtype=np.int64).reshape(-1)
    n_rows, width = t.shape[-2], t.shape[-1]
    if lo.shape != (n_rows,) or hi.shape != (n_rows,) or np.any(hi < lo) or np.any(lo < 0) or np.any(hi > width):
        raise BudgetError(f"every one of the {n_rows} rows needs 0 <= lo <= hi <= {width}")
    total = int((hi - lo).sum())
    need = int(need)
    if need < 0 or need > total:
        raise BudgetError(f"cannot place {need} units: the bounds allow between 0 and {total}")
    if need in (0, total):
        out = np.broadcast_to(lo if need == 0 else hi, (t.shape[0], n_rows)).copy()
        return out if batched else out[0]
    k = torch.arange(width, device=t.device)
    cand = (k >= _to_device(lo, t.device)[:, None]) & (k < _to_device(hi, t.device)[:, None])
    vals = torch.where(cand, t, -1.0)  # non-candidates below every priority (>= 0)
    theta = _kth_largest(vals.reshape(t.shape[0], -1), need)[:, None, None]
    counts = torch.stack(((vals > theta).sum(-1), (vals >= theta).sum(-1))).cpu().numpy()  # the one host sync
    out = np.stack([fill_ties(need - int(gt.sum()), lo + gt, lo + ge) for gt, ge in zip(counts[0], counts[1])])
    return out if batched else out[0]


def ranked_budgets(request: AllocationRequest, curves: torch.Tensor | np.ndarray, lo: np.ndarray,
                   strategy: str) -> Budgets:
    """Budgets with ``lo`` per free layer plus the best-ranked units of all free layers (exact total).

    ``curves``: the free layers' rank curves, in the order of ``request.free``.
    """
    free = request.free
    n = request.context_len
    hi = np.full(len(free), n, dtype=np.int64)
    lo = np.minimum(np.asarray(lo, dtype=np.int64), hi)
    need = request.rest - int(lo.sum())
    if need < 0:
        raise BudgetError(f"{strategy}: the per-layer floors ({int(lo.sum())} tokens) exceed the budget {request.rest}")
    picked = take_best(need, lo, hi, curves)
    return request.budgets(picked, strategy)


@register_allocator("global", needs=("scores",))
def allocate_global(
    request: AllocationRequest, sensitivity: SensitivityView | None = None, *, scores, normalise: str = "none"
) -> Budgets:
    """Global: rank the input's token scores across layers (KVzip's split), exact total, floors kept."""
    lo = request.check_feasible("global")
    curves = _rank_curves(scores, normalise, request.free)
    return ranked_budgets(request, curves, np.full(len(request.free), lo), "global")


def _on_static(request: AllocationRequest, static: Budgets, scores, floor_share: float, normalise: str,
               strategy: str) -> Budgets:
    """``floor_share`` of the ``static`` split as per-layer floors, the rest by the input's ranking."""
    if not 0.0 <= floor_share <= 1.0:
        raise AllocatorError(f"floor_share must lie in [0, 1], got {floor_share}")
    lo = request.check_feasible(strategy)
    base = np.asarray(static.tokens, dtype=np.int64)
    floors = np.maximum(lo, np.floor(floor_share * base[list(request.free)]).astype(np.int64))
    curves = _rank_curves(scores, normalise, request.free)
    return ranked_budgets(request, curves, floors, strategy)


def stored_floor_share(sensitivity: SensitivityView | None, strategy: str, ratio: float) -> float:
    """The floor share the profile tuned for ``strategy`` at ``ratio``, else ``DEFAULT_FLOOR_SHARE``."""
    share = None if sensitivity is None else sensitivity.floor_share(strategy, ratio)
    return DEFAULT_FLOOR_SHARE if share is None else share


def _register_on_static(name: str, static_split, doc: str, needs: tuple[str, ...] = ("degradation",)):
    """Register allocator ``name``: ``floor_share`` of ``static_split(request, sensitivity)`` as per-layer
    floors, the rest by the input's ranking; ``floor_share=None``: the share the profile stores for ``name``
    at this ratio (``stored_floor_share``)."""

    def allocate_on_static(
        request: AllocationRequest,
        sensitivity: SensitivityView | None = None,
        *,
        scores,
        floor_share: float | None = None,
        normalise: str = "none",
    ) -> Budgets:
        share = floor_share if floor_share is not None else stored_floor_share(sensitivity, name, request.ratio)
        return _on_static(request, static_split(request, sensitivity), scores, share, normalise, name)

    allocate_on_static.__name__ = allocate_on_static.__qualname__ = f"allocate_{name.replace('-', '_')}"
    allocate_on_static.__doc__ = doc  # before registering: the registry's summary is its first line
    return register_allocator(name, needs=(*needs, "scores"))(allocate_on_static)


allocate_adaptive = _register_on_static(
    "adaptive", allocate_optimal,
    "Adaptive: the profile's optimal split as a floor (``floor_share`` of it), the rest by the input's ranking.")
allocate_adaptive_joint = _register_on_static(
    "adaptive-joint", allocate_optimal_joint,
    "Adaptive on the refined split: ``optimal-joint``'s budgets as the floor, the rest by the input's ranking.\n\n"
    "The floors are ``floor_share`` of the vector ``depthkv refine`` stored for this ratio (which accounts for the\n"
    "damage of every layer pruned at once); a ratio the profile was not refined at is refused.",
    needs=("degradation", "refined"))


HEAD_SPLIT_STEP = 1 << 24  # score entries per batched device step of ``head_split_layers``: bounds its memory


def head_split(layer_scores: Any, budget: int, floor: int) -> np.ndarray:
    """Tokens per KV head [B, KVH] for one layer: ``budget * KVH`` per batch row, ranked across heads.

    Each head keeps at least ``min(floor, N)``; the rest goes to the best-scored tokens of all heads of the
    layer together (head-level budgets, as AdaKV), so the layer's total stays exactly ``budget * KVH``.
    Every batch row is its own ranking (its own scale for protected tokens). Several layers at once:
    ``head_split_layers``.
    """
    return head_split_layers([layer_scores], [budget], floor)[0]


def head_split_layers(scores: Sequence[Any], budgets: Sequence[int],
                      floor: int | Sequence[int]) -> list[np.ndarray]:
    """``[head_split(s, b, f) for s, b, f in zip(scores, budgets, floors)]``, bit for bit, in one pass.

    Each entry is one layer's (or one sequence's) scores ``[B, KVH, N_i]`` with its own budget and floor
    (``floor``: one for all entries, or one per entry). On an accelerator, the entries that share N, head
    count and dtype are stacked and solved together in a few batched steps, and the counts of all entries
    reach the host in one transfer: pruning L layers with per-head budgets waits for the device once, not L
    times. On the host each batch row is solved on its own (nothing to wait for; the data stays in cache).

    The definition (per batch row): head h's unit k is worth its k-th largest score, mapped as
    ``rank_curves`` maps scores (non-finite -> largest finite + 1, all shifted to be >= 0). Every head takes
    its ``lo = min(floor, N, budget)`` best units; the ``need = (budget - lo) * KVH`` best of the remaining
    units of all heads follow, ties at the threshold taken in the order (k ascending, head ascending) of
    ``select_top``. That needs only the threshold and, per head, how many of its remaining units lie above
    it and at it, so nothing is sorted per head: each head's ``lo`` best units are set aside (``topk``), the
    threshold is the need-th largest of the rest (a selection on the host, one sort on an accelerator).
    """
    n_items = len(scores)
    budgets = [int(b) for b in budgets]
    try:
        floors = [int(f) for f in np.broadcast_to(np.asarray(floor, dtype=np.int64), (n_items,))]
    except ValueError:
        raise AllocatorError(f"head_split needs one floor, or one per entry ({n_items}), got {floor!r}") from None
    if len(budgets) != n_items:
        raise AllocatorError(f"head_split needs one budget per entry: {len(budgets)} budgets for {n_items} entries")
    out: list[np.ndarray] = [np.zeros((0, 0), dtype=np.int64)] * n_items
    groups: dict[tuple, list[tuple[int, torch.Tensor, int, int]]] = {}  # (device, dtype, KVH, N) -> entries
    for i, (s, budget, fl) in enumerate(zip(scores, budgets, floors)):
        shape = tuple(s.shape) if isinstance(s, torch.Tensor) else np.shape(s)
        if len(shape) != 3:
            entry = f" (entry {i})" if n_items > 1 else ""
            raise AllocatorError(f"head_split takes one layer's scores [batch, kv_heads, N], got shape {shape}{entry}")
        b, kvh, n = shape
        lo = min(fl, n, budget)
        if b == 0:
            out[i] = np.zeros((0, kvh), dtype=np.int64)
            continue
        if lo < 0:
            raise BudgetError(f"head_split needs a budget and a floor >= 0, got budget {budget} and floor {fl}")
        need, total = (budget - lo) * kvh, (n - lo) * kvh
        if need > total:
            raise BudgetError(f"cannot place {need} units: the bounds allow between 0 and {total}")
        if need in (0, total):  # nothing to rank
            out[i] = np.full((b, kvh), lo if need == 0 else n, dtype=np.int64)
            continue
        device = _work_device([s])
        rows = _as_rows(s, device).reshape(b, kvh, n)
        if device.type in HOST_DEVICES:
            out[i] = np.stack([_take_units(*_host_counts(row, lo, need), lo, need) for row in rows])
        else:
            groups.setdefault((device, rows.dtype, kvh, n), []).append((i, rows, lo, need))
    if groups:
        _solve_on_device(groups, out)
    return out


def _take_units(gt: np.ndarray, ge: np.ndarray, lo: int, need: int) -> np.ndarray:
    """Units per head: ``lo``, those above the threshold, and the ties at it that ``need`` still reaches."""
    return fill_ties(need - int(gt.sum()), lo + gt, lo + ge)


def _mapped(y: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Scores with non-finite entries +inf -> float64 unit values as ``_sorted_head_mean`` maps them (one
    scale per slice over ``dims``), element by element: ranking does not need them sorted."""
    top, low = _finite_range(y, dims)
    shift = torch.clamp(low, max=0.0)
    x = y.double().sub_(shift)
    return torch.where(x == torch.inf, (top + 1.0) - shift, x)


def _host_counts(y: torch.Tensor, lo: int, need: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch row ``[KVH, N]`` on the host -> per head, how many units beyond its ``lo`` best are worth
    more than, and at least, the need-th best of all those units.

    Without negative finite scores the map to unit values is the identity on finite scores and sends every
    non-finite one to a single value above them all: +inf in the scores' own dtype ranks the same, so the
    comparisons run on the scores themselves, without the float64 copy.
    """
    x = _inf_for_nonfinite(y)  # a copy: set-aside units are overwritten below
    if float(x.min()) < 0:
        x = _mapped(x, (0, 1))
    if lo > 0:
        x.scatter_(-1, x.topk(lo, dim=-1, sorted=False).indices, -torch.inf)
    a = x.numpy()
    flat = a.reshape(-1)
    theta = np.partition(flat, flat.size - need)[flat.size - need]  # the need-th largest
    return np.count_nonzero(a > theta, axis=-1), np.count_nonzero(a >= theta, axis=-1)


def _solve_on_device(groups: dict[tuple, list[tuple[int, torch.Tensor, int, int]]], out: list[np.ndarray]) -> None:
    """``head_split_layers`` on an accelerator: each group's rows stacked (``HEAD_SPLIT_STEP`` entries per
    step), counted on the device, and all counts brought to the host in one transfer per device."""
    pending: dict[torch.device, list[torch.Tensor]] = {}  # per device: [2, rows * KVH] counts (> and >=)
    order: list[tuple] = []  # (device, entry, rows, KVH, lo, need), in the order of the counts
    for (device, _, kvh, n), entries in groups.items():
        step = max(1, HEAD_SPLIT_STEP // (kvh * n))  # batch rows per step
        pieces = [(i, rows[start:start + step], lo, need)
                  for i, rows, lo, need in entries for start in range(0, rows.shape[0], step)]
        chunks, size = [[]], 0
        for piece in pieces:
            if size + piece[1].shape[0] > step:
                chunks.append([])
                size = 0
            chunks[-1].append(piece)
            size += piece[1].shape[0]
        for chunk in chunks:
            los = np.concatenate([np.full(rows.shape[0], lo) for _, rows, lo, _ in chunk])
            needs = np.concatenate([np.full(rows.shape[0], need) for _, rows, _, need in chunk])
            counts = _device_counts(torch.cat([rows for _, rows, _, _ in chunk]), los, needs)
            pending.setdefault(device, []).append(counts.reshape(2, -1))
            order.extend((device, i, rows.shape[0], kvh, lo, need) for i, rows, lo, need in chunk)
    host = {d: torch.cat(c, dim=1).cpu().numpy() for d, c in pending.items()}  # the one transfer per device
    offset = dict.fromkeys(host, 0)
    done: dict[int, list[np.ndarray]] = {}
    for device, i, n_rows, kvh, lo, need in order:
        counts = host[device][:, offset[device]:offset[device] + n_rows * kvh].reshape(2, n_rows, kvh)
        offset[device] += n_rows * kvh
        done.setdefault(i, []).extend(_take_units(gt, ge, lo, need) for gt, ge in zip(counts[0], counts[1]))
    for i, rows in done.items():
        out[i] = np.stack(rows)


def _device_counts(y: torch.Tensor, lo: np.ndarray, need: np.ndarray) -> torch.Tensor:
    """``_host_counts`` of R rows at once on the device: ``[R, KVH, N]`` -> ``[2, R, KVH]``, row r with its
    own ``lo[r]`` and ``need[r]``; the thresholds by one sort of all rows (``kthvalue`` runs one thread block
    per row on a GPU)."""
    device = y.device
    x = _mapped(_inf_for_nonfinite(y), (1, 2))
    k = int(lo.max())
    if k > 0:  # set each head's lo[r] best units aside, below every unit
        best = x.topk(k, dim=-1, sorted=True).indices
        aside = torch.arange(k, device=device) < _to_device(lo, device)[:, None, None]
        x.masked_fill_(torch.zeros_like(x, dtype=torch.bool).scatter_(-1, best, aside.expand_as(best)), -torch.inf)
    flat = x.reshape(x.shape[0], -1)
    theta = flat.sort(dim=-1).values.gather(-1, _to_device(flat.shape[-1] - need, device)[:, None])[:, :, None]
    return torch.stack(((x > theta).sum(-1), (x >= theta).sum(-1)))
