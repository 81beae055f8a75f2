"""Per-layer KV budgets: the one object every allocator returns and the engine consumes.

Contract: ``ratio`` is the share of the context's KV pairs removed, averaged
over layers; budgets are integers per layer, identical for every KV head of a layer, and their sum is
exactly ``round(L * N * (1 - ratio))``. Protected layers keep all N tokens and the others absorb the
difference. A budget never falls below ``min_tokens`` (at least 1, or the scorer's protected window).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from depthkv.io import write_json


class BudgetError(ValueError):
    """An allocation request that cannot be met exactly (bad ratio, budget rounding to zero, ...)."""


def check_ratio(ratio: float) -> float:
    """Validate a pruning ratio: the share of KV pairs removed must lie in [0, 1)."""
    try:
        ratio = float(ratio)
    except (TypeError, ValueError) as exc:
        raise BudgetError(f"ratio must be a number in [0, 1), got {ratio!r}") from exc
    if not (0.0 <= ratio < 1.0) or np.isnan(ratio):
        raise BudgetError(f"ratio must lie in [0, 1) (share of KV pairs removed), got {ratio}")
    return ratio


def global_budget(n_layers: int, context_len: int, ratio: float) -> int:
    """Total tokens kept over all layers: round(L * N * (1 - ratio)) (Python's round, half to even)."""
    ratio = check_ratio(ratio)
    return int(round(n_layers * context_len * (1.0 - ratio)))


@dataclass(frozen=True)
class Budgets:
    """Tokens kept per layer for a context of ``context_len`` tokens.

    ``tokens[l]`` is the number of KV pairs layer ``l`` keeps (per KV head). ``strategy`` and ``ratio``
    record where the vector came from (for results files); ``protected`` lists layers kept whole.

    ``shares`` (per-layer share of the context kept, as written to budget files) makes the vector portable
    across prompt lengths: :meth:`for_context` then recomputes exact integer budgets for any N, keeping
    ``min_tokens`` (the allocator's per-layer floor) where recorded. Without shares a vector is absolute and
    only serves its own ``context_len``.
    """

    tokens: tuple[int, ...]
    context_len: int
    ratio: float | None = None
    strategy: str = "explicit"
    protected: tuple[int, ...] = field(default_factory=tuple)
    shares: tuple[float, ...] | None = field(default=None, compare=False)
    min_tokens: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        toks = tuple(int(t) for t in self.tokens)
        object.__setattr__(self, "tokens", toks)
        object.__setattr__(self, "protected", tuple(sorted(int(p) for p in self.protected)))
        if len(toks) == 0:
            raise BudgetError("a budget vector needs at least one layer")
        if self.shares is not None:
            shares = tuple(float(x) for x in self.shares)
            if len(shares) != len(toks) or not all(0.0 < x <= 1.0 for x in shares):
                raise BudgetError(
                    f"budget shares must be {len(toks)} numbers in (0, 1] (share of the context each layer "
                    f"keeps), got {list(self.shares)}"
                )
            object.__setattr__(self, "shares", shares)
        if self.min_tokens is not None and int(self.min_tokens) < 1:
            raise BudgetError(f"min_tokens must be >= 1, got {self.min_tokens}")
        if self.context_len < 1:
            raise BudgetError(f"context length must be >= 1, got {self.context_len}")
        bad = [(i, t) for i, t in enumerate(toks) if t < 1 or t > self.context_len]
        if bad:
            i, t = bad[0]
            raise BudgetError(
                f"layer {i} budget {t} is outside [1, {self.context_len}] (context length {self.context_len})"
            )
        for p in self.protected:
            if not 0 <= p < len(toks):
                raise BudgetError(f"protected layer {p} does not exist (model has {len(toks)} layers)")

    @property
    def n_layers(self) -> int:
        return len(self.tokens)

    @property
    def total(self) -> int:
        return sum(self.tokens)

    @property
    def kept_share(self) -> float:
        """Share of the full cache kept, over all layers."""
        return self.total / (self.n_layers * self.context_len)

    @property
    def layer_ratios(self) -> tuple[float, ...]:
        """Per-layer share removed, 1 - B_l / N."""
        return tuple(1.0 - t / self.context_len for t in self.tokens)

    def check_length(self, n_layers: int) -> None:
        """Raise unless this vector has one entry per model layer."""
        if self.n_layers != n_layers:
            raise BudgetError(f"budget vector has {self.n_layers} entries but the model has {n_layers} layers")

    def for_context(self, context_len: int) -> Budgets:
        """The vector for a context of ``context_len`` tokens.

        Equal N: this vector. With ``shares`` (budget files): exact integer budgets for the new N, total
        ``round(L * N * (1 - ratio))`` (or the same kept share when no ratio is recorded), protected layers
        whole, every other layer as close to its share as integers allow (bounded Webster apportionment)
        and never below ``min_tokens``. A uniform vector is re-made for N. Otherwise an error: a bare
        token vector is absolute, and silently rescaling it would change what the user asked for.
        """
        if context_len == self.context_len:
            return self
        if self.shares is not None:
            return self._rescaled(int(context_len))
        if self.ratio is not None and self.strategy == "uniform":
            return uniform(self.n_layers, context_len, self.ratio, protected=self.protected,
                           min_tokens=min(context_len, self.min_tokens or 1))
        raise BudgetError(
            f"budgets were made for a {self.context_len}-token context, the prompt has {context_len} tokens "
            "(this budget file holds token counts only; write it again with depthkv allocate to get per-layer "
            "shares that serve any prompt length)"
        )

    def _rescaled(self, n: int) -> Budgets:
        from depthkv.allocation.apportion import apportion  # apportion imports this module

        if n < 1:
            raise BudgetError(f"context length must be >= 1, got {n}")
        assert self.shares is not None
        if self.ratio is not None:
            total = global_budget(self.n_layers, n, self.ratio)
        else:
            total = int(round(n * sum(self.shares)))
        prot = set(self.protected)
        free = [i for i in range(self.n_layers) if i not in prot]
        rest = total - len(prot) * n
        floor = min(n, self.min_tokens or 1)
        if rest < len(free) * floor or rest > len(free) * n or (not free and rest != 0):
            raise BudgetError(
                f"{self.strategy} budgets (shares from a {self.context_len}-token context) cannot be applied to "
                f"a {n}-token context: {rest} tokens for {len(free)} pruned layers, each between {floor} and {n}"
            )
        tokens = [n] * self.n_layers
        if free:
            got = apportion(rest, [self.shares[i] for i in free], [floor] * len(free), [n] * len(free))
            for i, t in zip(free, got):
                tokens[i] = int(t)
        return Budgets(tuple(tokens), n, self.ratio, self.strategy, self.protected, self.shares, self.min_tokens)

    def to_dict(self) -> dict:
        """JSON form; ``shares`` and ``min_tokens`` let the file serve prompts of any length."""
        shares = self.shares if self.shares is not None else tuple(t / self.context_len for t in self.tokens)
        d = {
            "tokens": list(self.tokens),
            "context_len": self.context_len,
            "ratio": self.ratio,
            "strategy": self.strategy,
            "protected": list(self.protected),
            "shares": [round(x, 12) for x in shares],
        }
        if self.min_tokens is not None:
            d["min_tokens"] = self.min_tokens
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Budgets:
        """Inverse of :meth:`to_dict`; older files without ``shares`` load as fixed-length vectors."""
        if not isinstance(d, dict):
            raise BudgetError(f"a budget file holds a JSON object, got {type(d).__name__}")
        try:
            return cls(
                tokens=tuple(d["tokens"]),
                context_len=int(d["context_len"]),
                ratio=d.get("ratio"),
                strategy=d.get("strategy", "explicit"),
                protected=tuple(d.get("protected", ())),
                shares=d.get("shares"),
                min_tokens=d.get("min_tokens"),
            )
        except KeyError as exc:
            raise BudgetError(f"budget file lacks the field {exc}") from exc
        except BudgetError:
            raise
        except (TypeError, ValueError) as exc:
            raise BudgetError(f"budget file has a malformed field: {exc}") from exc

    def save(self, path: str | Path) -> None:
        """Write the vector as JSON, atomically (a crash never leaves a half-written file)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Budgets:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise BudgetError(f"{path} is not a JSON budget file: {exc}") from exc
        if isinstance(data, list):  # a bare vector needs a context length: the largest entry is not it
            raise BudgetError(f"{path} holds a bare list; expected {{'tokens': [...], 'context_len': N}}")
        return cls.from_dict(data)


def spread(total: int, n: int, weights: Sequence[float] | None = None) -> list[int]:
    """Split ``total`` into ``n`` non-negative integers proportional to ``weights`` (largest remainder).

    The result sums to ``total`` exactly; ties in the remainders go to the lower index (deterministic).
    """
    if n <= 0:
        if total != 0:
            raise BudgetError(f"cannot place {total} tokens on zero layers")
        return []
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise BudgetError(f"weights must be {n} finite non-negative numbers with a positive sum")
    exact = total * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    rest = int(total - base.sum())
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:rest]] += 1
    return [int(x) for x in base]


def uniform(
    n_layers: int,
    context_len: int,
    ratio: float,
    *,
    protected: Sequence[int] = (),
    min_tokens: int = 1,
) -> Budgets:
    """Every unprotected layer pruned at ``ratio``; protected layers keep all N tokens; the total stays exact.

    The paper never prunes the first layer: pass ``protected=(0,)`` for that. The remaining layers then
    share ``round(L*N*(1-ratio)) - |P|*N`` tokens as evenly as integers allow.
    """
    ratio = check_ratio(ratio)
    if n_layers < 1:
        raise BudgetError(f"a model needs at least one layer, got {n_layers}")
    if context_len < 1:
        raise BudgetError(f"context length must be >= 1, got {context_len}")
    prot = sorted(set(int(p) for p in protected))
    for p in prot:
        if not 0 <= p < n_layers:
            raise BudgetError(f"protected layer {p} does not exist (model has {n_layers} layers)")
    total = global_budget(n_layers, context_len, ratio)
    free = [i for i in range(n_layers) if i not in prot]
    rest = total - len(prot) * context_len
    if not free:
        if rest != 0:
            raise BudgetError(f"all layers are protected: ratio {ratio} cannot be met (only 0 can)")
        return Budgets(tuple([context_len] * n_layers), context_len, ratio, "uniform", tuple(prot))
    if rest < len(free) * max(1, min_tokens):
        raise BudgetError(
            f"ratio {ratio} on a {context_len}-token context leaves {rest} tokens for {len(free)} pruned layers: "
            f"each needs at least {max(1, min_tokens)} (budget would round below the protected minimum)"
        )
    tokens = [context_len] * n_layers
    for i, t in zip(free, spread(rest, len(free))):
        tokens[i] = t
    if max(tokens) > context_len:  # only possible when protected layers force the others above N
        raise BudgetError(f"ratio {ratio} with protected layers {prot} would need more than N tokens in a layer")
    return Budgets(tuple(tokens), context_len, ratio, "uniform", tuple(prot))
