"""Registry of allocators: one name -> one function that splits the global KV budget across layers.

    from depthkv.allocation import allocate
    b = allocate("mga", n_layers=32, context_len=8192, rho=0.6, sensitivity=view, protected=(0,))

Every allocator receives a validated ``AllocationRequest`` (exact global total, protected and free layers,
token floor) and returns ``Budgets`` whose sum is exactly ``round(L * N * (1 - rho))``, every entry in
``[min(min_tokens, N), N]``, protected layers at ``N`` -- or raises ``BudgetError`` saying why the
request cannot be met.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from depthkv.allocation.budgets import BudgetError, Budgets, check_ratio, global_budget
from depthkv.allocation.budgets import uniform as uniform_budgets
from depthkv.allocation.sensitivity import SensitivityError, SensitivityView


class AllocatorError(ValueError):
    """A misconfigured allocation call: unknown allocator or option, missing sensitivity."""


@dataclass(frozen=True)
class AllocationRequest:
    """A validated request: what every allocator starts from.

    ``total`` is the exact global budget; ``free`` are the layers the allocator may prune; ``floor`` is the
    least a pruned layer keeps: ``min(min_tokens, N)`` (a context shorter than the scorer's protected
    window is simply kept whole).
    """

    n_layers: int
    context_len: int
    rho: float
    total: int
    protected: tuple[int, ...]
    floor: int

    @property
    def free(self) -> tuple[int, ...]:
        prot = set(self.protected)
        return tuple(i for i in range(self.n_layers) if i not in prot)

    @property
    def rest(self) -> int:
        """Tokens left for the free layers once protected layers keep everything."""
        return self.total - len(self.protected) * self.context_len

    def with_protected(self, more: Iterable[int]) -> AllocationRequest:
        prot = tuple(sorted(set(self.protected) | {int(p) for p in more}))
        return AllocationRequest(self.n_layers, self.context_len, self.rho, self.total, prot, self.floor)

    def check_feasible(self, strategy: str, lo: int | None = None, why: str = "") -> int:
        """Raise unless the free layers can hold ``rest`` tokens with each in [lo, N]; return ``lo``."""
        lo = self.floor if lo is None else int(lo)
        n_free = len(self.free)
        if n_free == 0:
            if self.rest != 0:
                raise BudgetError(
                    f"{strategy}: all {self.n_layers} layers are protected ({list(self.protected)}), so nothing "
                    f"can be pruned, but ratio {self.rho} asks to remove {-self.rest} of "
                    f"{self.n_layers * self.context_len} KV pairs"
                )
            return lo
        if self.rest < n_free * lo:
            most = n_free * (self.context_len - lo)
            reach = most / (self.n_layers * self.context_len)
            raise BudgetError(
                f"{strategy}: ratio {self.rho} on a {self.context_len}-token context leaves {self.rest} tokens for "
                f"{n_free} pruned layers, but each must keep at least {lo}{why}; protected layers "
                f"{list(self.protected)} keep all {self.context_len}. The maximum reachable ratio here is "
                f"{reach:.4f}"
            )
        return lo

    def budgets(
        self, free_tokens: Sequence[int] | np.ndarray, strategy: str, protected: Sequence[int] | None = None
    ) -> Budgets:
        """Budgets with ``free_tokens`` on the free layers (in order) and N on the protected ones."""
        tokens = [self.context_len] * self.n_layers
        free = self.free
        if len(free_tokens) != len(free):
            raise BudgetError(f"{strategy}: {len(free_tokens)} budgets for {len(free)} free layers")
        for i, t in zip(free, free_tokens):
            tokens[i] = int(t)
        if sum(tokens) != self.total:  # a bug, never a user error: refuse rather than return a wrong sum
            raise BudgetError(
                f"{strategy}: internal error, budgets sum to {sum(tokens)} instead of {self.total}"
            )
        prot = self.protected if protected is None else tuple(protected)
        return Budgets(tuple(tokens), self.context_len, self.rho, strategy, prot)


def _as_index(x: Any, what: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise BudgetError(f"{what} must be an integer, got {x!r}")
    return int(x)


def make_request(
    n_layers: int, context_len: int, rho: float, *, protected: Iterable[int] = (), min_tokens: int = 1
) -> AllocationRequest:
    """Validate the common inputs of every allocator."""
    n_layers = _as_index(n_layers, "n_layers")
    context_len = _as_index(context_len, "context_len")
    min_tokens = _as_index(min_tokens, "min_tokens")
    if n_layers < 1:
        raise BudgetError(f"a model needs at least one layer, got {n_layers}")
    if context_len < 1:
        raise BudgetError(f"context length must be >= 1, got {context_len}")
    if min_tokens < 1:
        raise BudgetError(f"min_tokens must be >= 1 (a layer never keeps zero tokens), got {min_tokens}")
    rho = check_ratio(rho)
    if isinstance(protected, (int, np.integer)):
        protected = (protected,)
    prot = sorted({_as_index(p, "a protected layer") for p in protected})
    for p in prot:
        if not 0 <= p < n_layers:
            raise BudgetError(
                f"protected layer {p} does not exist (model has {n_layers} layers, 0..{n_layers - 1})"
            )
    total = global_budget(n_layers, context_len, rho)
    return AllocationRequest(n_layers, context_len, rho, total, tuple(prot), min(min_tokens, context_len))


AllocatorFn = Callable[..., Budgets]


@dataclass(frozen=True)
class AllocatorSpec:
    """A registered allocator: its function, what sensitivity it needs, and its options with defaults."""

    name: str
    fn: AllocatorFn
    needs: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    def __call__(
        self, request: AllocationRequest, sensitivity: SensitivityView | None = None, **options
    ) -> Budgets:
        return self.fn(request, sensitivity, **options)


ALLOCATORS: dict[str, AllocatorSpec] = {}


def register_allocator(name: str, *, needs: Sequence[str] = ()) -> Callable[[AllocatorFn], AllocatorFn]:
    """Register ``fn(request, sensitivity, **options) -> Budgets`` under ``name``.

    ``needs``: parts of the SensitivityView the allocator reads ("degradation", "metric"). Options are the
    function's keyword-only parameters; their defaults are recorded in the spec.
    """
    for n in needs:
        if n not in ("degradation", "metric"):
            raise ValueError(f"unknown sensitivity need {n!r}")

    def deco(fn: AllocatorFn) -> AllocatorFn:
        if name in ALLOCATORS:
            raise ValueError(f"allocator {name!r} is already registered")
        sig = inspect.signature(fn)
        opts = {
            p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        doc = inspect.getdoc(fn) or ""
        ALLOCATORS[name] = AllocatorSpec(name, fn, tuple(needs), opts, doc.splitlines()[0] if doc else "")
        return fn

    return deco


def list_allocators() -> list[str]:
    """Registered allocator names, sorted."""
    return sorted(ALLOCATORS)


def get_allocator(name: str) -> AllocatorSpec:
    try:
        return ALLOCATORS[name]
    except (KeyError, TypeError):
        raise AllocatorError(
            f"unknown allocator {name!r}; available: {', '.join(list_allocators())}"
        ) from None


def allocate(
    strategy: str,
    n_layers: int,
    context_len: int,
    rho: float,
    *,
    sensitivity: SensitivityView | None = None,
    protected: Iterable[int] = (),
    min_tokens: int = 1,
    **options: Any,
) -> Budgets:
    """Tokens kept per layer for ``strategy`` at global pruning ratio ``rho`` on a ``context_len`` context.

    The sum is exactly ``round(n_layers * context_len * (1 - rho))``; ``protected`` layers keep all
    ``context_len`` tokens; every other layer keeps at least ``min(min_tokens, context_len)``.
    Raises AllocatorError for an unknown strategy/option or missing sensitivity, BudgetError for a
    request that cannot be met exactly.
    """
    spec = get_allocator(strategy)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "none"
        raise AllocatorError(
            f"allocator {strategy!r} has no option {', '.join(unknown)}; its options: {allowed}"
        )
    request = make_request(n_layers, context_len, rho, protected=protected, min_tokens=min_tokens)
    if spec.needs:
        if sensitivity is None:
            raise AllocatorError(
                f"allocator {strategy!r} needs a sensitivity view with {' and '.join(spec.needs)} "
                f"(from a calibration profile); none was given"
            )
        if not isinstance(sensitivity, SensitivityView):
            raise AllocatorError(f"sensitivity must be a SensitivityView, got {type(sensitivity).__name__}")
    try:
        if spec.needs:
            sensitivity.check_layers(request.n_layers)
            for need in spec.needs:
                sensitivity.require(need, strategy)
        return spec(request, sensitivity, **options)
    except SensitivityError as exc:  # a view that does not fit this request: a configuration error
        raise AllocatorError(str(exc)) from exc


@register_allocator("uniform")
def _uniform(request: AllocationRequest, sensitivity: SensitivityView | None = None) -> Budgets:
    """Uniform: every unprotected layer pruned to rho (baseline of the paper, H2O-style).

    Wraps ``budgets.uniform``: the free layers share the rest as evenly as integers allow (the first
    layers get the +1s), which is monotone in the total.
    """
    request.check_feasible("uniform")
    return uniform_budgets(
        request.n_layers,
        request.context_len,
        request.rho,
        protected=request.protected,
        min_tokens=request.floor,
    )
