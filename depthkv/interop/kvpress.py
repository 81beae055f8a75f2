"""depthkv's per-layer budgets inside NVIDIA kvpress (https://github.com/NVIDIA/kvpress, 0.5.x).

kvpress prunes every layer with one compression ratio; its ``PerLayerCompressionPress`` wraps any
``ScorerPress`` (SnapKV, Knorm, ExpectedAttention, ...) and gives each layer its own ratio. This module turns
depthkv's integer per-layer budgets -- from a calibration profile (``optimal``, ``mga``, ...), from a ratio
and an allocator, or an explicit ``Budgets`` vector -- into those ratios so that kvpress keeps **exactly**
depthkv's token count in every layer::

    from kvpress import SnapKVPress
    from depthkv.interop.kvpress import per_layer_press, depthkv_press

    # a fixed context length: budgets computed now, one ratio per layer
    press = per_layer_press(SnapKVPress(window_size=32), ratio=0.75, strategy="optimal",
                            profile="docs/results/profile_smollm2-135m.json", context_len=ids.shape[1])
    # any context length: the budgets are recomputed at each prefill from the real context length
    press = depthkv_press(SnapKVPress(window_size=32), ratio=0.75, strategy="optimal", profile=profile)
    with press(model):
        model.model(input_ids=ids, past_key_values=cache)

Rounding (kvpress 0.5.5, ``kvpress.utils.compute_n_kept``): a layer of ``N`` keys at ratio ``r`` keeps
``max(1, int(N * (1 - r)))`` keys (``N`` when ``r == 0``: ``ScorerPress.compress`` returns early). The
obvious conversion ``r = 1 - B/N`` is off by one (keeps ``B - 1``) whenever ``N * (1 - r)`` lands just below
``B`` in floating point -- for about 19 % of the pairs ``1 <= B < N < 3000``. ``layer_ratios`` aims at the
middle of the interval instead, ``r = 1 - (B + 0.5) / N``, which truncates to ``B`` for every ``B`` (checked
for each layer when converting), and uses ``r = 0`` for a layer kept whole.

What the counts do not carry over: depthkv's engine also always keeps ``n_sink`` first and ``n_recent``
last tokens (its protected window) and remembers each kept token's logical position; kvpress's scorers
keep what their own score says (SnapKV protects its observation window, nothing protects sinks). Ragged
per-layer caches also need an attention path that accepts different key lengths per layer: kvpress marks
``PerLayerCompressionPress`` "flash attention only"; with sdpa/eager, feed tokens after the compressed
prefill one at a time (a one-token forward builds no mask), as ``benchmarks/kvpress_compare.py`` does.

kvpress is imported lazily: everything here except the press builders is plain arithmetic that runs
without it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from depthkv.allocation.budgets import BudgetError, Budgets
from depthkv.allocation.builder import BudgetPolicy, BudgetSpec, SpecPolicy, policy_needs_scores
from depthkv.allocation.registry import AllocatorError

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'depthkv[kvpress]' in an environment with transformers < 5.3 "
    "(kvpress 0.5.x pins transformers < 5.3; scripts/kvpress_env.sh builds such an environment, .venv-kvpress)"
)
TESTED_KVPRESS = "0.5"  # the rounding rule below was read from kvpress 0.5.5

__all__ = [
    "INSTALL_HINT",
    "depthkv_press",
    "kept_counts",
    "kvpress_n_kept",
    "layer_ratios",
    "per_layer_press",
    "ratio_for_count",
    "require_kvpress",
]


# ---------------------------------------------------------------------------------------------- arithmetic
def kvpress_n_kept(context_len: int, ratio: float) -> int:
    """Keys kvpress 0.5.x's ``ScorerPress`` keeps of ``context_len`` at compression ``ratio``.

    ``ratio == 0`` keeps everything (the press returns before scoring); ``ratio >= 1`` keeps nothing;
    otherwise ``max(1, int(context_len * (1 - ratio)))`` (truncation, floored at one key).
    """
    if context_len < 0:
        raise ValueError(f"context length must be >= 0, got {context_len}")
    if ratio == 0:
        return context_len
    if ratio >= 1.0:
        return 0
    return max(1, int(context_len * (1.0 - ratio)))


def ratio_for_count(n_keep: int, context_len: int) -> float:
    """The kvpress compression ratio that keeps exactly ``n_keep`` of ``context_len`` keys.

    ``n_keep == context_len`` gives 0.0 (no pruning), ``n_keep == 0`` gives 1.0 (empty layer), anything
    between ``1 - (n_keep + 0.5) / context_len``: ``context_len * (1 - r)`` then sits half a token above
    ``n_keep``, far from both truncation edges, so float error cannot move it to ``n_keep - 1``.
    """
    n_keep, context_len = int(n_keep), int(context_len)
    if context_len < 1:
        raise BudgetError(f"context length must be >= 1, got {context_len}")
    if not 0 <= n_keep <= context_len:
        raise BudgetError(f"cannot keep {n_keep} of {context_len} tokens")
    if n_keep == context_len:
        return 0.0
    if n_keep == 0:
        return 1.0
    ratio = 1.0 - (n_keep + 0.5) / context_len
    if kvpress_n_kept(context_len, ratio) != n_keep:  # pragma: no cover - guarded by an exhaustive test
        raise BudgetError(f"no float ratio reproduces {n_keep} of {context_len} under kvpress's rounding")
    return ratio


def layer_ratios(budgets: Budgets | Sequence[int], context_len: int | None = None) -> list[float]:
    """Per-layer kvpress compression ratios that keep exactly ``budgets`` tokens in each layer.

    ``budgets`` is a ``Budgets`` (its ``context_len`` is used unless one is given, which must then agree)
    or a plain sequence of token counts together with ``context_len``.
    """
    if isinstance(budgets, Budgets):
        if context_len is not None and int(context_len) != budgets.context_len:
            raise BudgetError(
                f"budgets were made for a {budgets.context_len}-token context, not {context_len} tokens"
            )
        tokens, n = budgets.tokens, budgets.context_len
    else:
        if context_len is None:
            raise BudgetError("a plain list of token counts needs context_len=")
        tokens, n = tuple(int(t) for t in budgets), int(context_len)
    if not tokens:
        raise BudgetError("a budget vector needs at least one layer")
    return [ratio_for_count(t, n) for t in tokens]


def kept_counts(ratios: Sequence[float], context_len: int) -> list[int]:
    """What kvpress keeps per layer for per-layer ``ratios`` on a ``context_len``-token prefill."""
    return [kvpress_n_kept(int(context_len), float(r)) for r in ratios]


def _spec_policy(
    ratio: float,
    strategy: str = "uniform",
    *,
    profile: Any = None,
    n_layers: int | None = None,
    protected: Sequence[int] = (),
    min_tokens: int = 20,
    **options: Any,
) -> SpecPolicy:
    """``BudgetSpec(...).policy(n_layers)``, the budgets depthkv's engine would use, validated now.

    ``n_layers`` defaults to the profile's; ``min_tokens`` (default 20: depthkv's protected window of 4 sinks
    + 16 recent tokens) is the per-layer floor. A policy that needs the input's token scores is refused: a
    kvpress press compresses each layer inside its own forward hook, before later layers are scored.
    """
    policy = BudgetSpec(ratio, strategy, profile, tuple(protected), min_tokens, options).policy(n_layers)
    _refuse_scores(policy)
    return policy


def _refuse_scores(policy: BudgetPolicy) -> None:
    if policy_needs_scores(policy):
        raise AllocatorError("this budget policy adapts to the input (it needs every layer's token scores), but "
                             "kvpress compresses each layer in its own forward hook, before later layers are "
                             "scored: use depthkv's own engine (depthkv.press) for input-adaptive allocators")


# ---------------------------------------------------------------------------------------------- kvpress
def require_kvpress():
    """Import kvpress or raise an ImportError that says how to get it."""
    try:
        import kvpress
    except Exception as exc:  # ImportError, or a kvpress that breaks against the installed transformers
        raise ImportError(f"depthkv.interop.kvpress needs NVIDIA kvpress ({type(exc).__name__}: {exc}); "
                          f"{INSTALL_HINT}") from exc
    version = getattr(kvpress, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as _version

            version = _version("kvpress")
        except Exception:  # pragma: no cover - metadata missing (source checkout)
            version = None
    if version is not None and not str(version).startswith(TESTED_KVPRESS + "."):
        logger.warning("kvpress %s: the ratio conversion was checked against kvpress %s.x; verify that layers "
                       "keep their budgets (depthkv.interop.kvpress.kept_counts)", version, TESTED_KVPRESS)
    return kvpress


def _check_inner(press) -> None:
    from kvpress.presses.scorer_press import ScorerPress

    if not isinstance(press, ScorerPress):
        raise TypeError(f"the inner press must be a kvpress ScorerPress (SnapKVPress, KnormPress, ...), "
                        f"got {type(press).__name__}")
    if type(press).compress is not ScorerPress.compress:
        # e.g. PyramidKVPress: it derives its own per-layer budgets from the ratio, so counts would not match
        raise TypeError(f"{type(press).__name__} overrides ScorerPress.compress (its own per-layer rule): "
                        "depthkv's budgets would not be kept exactly; wrap its plain scorer instead "
                        "(PyramidKVPress -> SnapKVPress)")


def per_layer_press(
    press,
    budgets: Budgets | Sequence[int] | None = None,
    *,
    context_len: int | None = None,
    ratio: float | None = None,
    strategy: str = "uniform",
    profile: Any = None,
    n_layers: int | None = None,
    protected: Sequence[int] = (),
    min_tokens: int = 20,
    **options: Any,
):
    """A kvpress ``PerLayerCompressionPress`` around ``press`` keeping depthkv's budgets on one context length.

    Give either ``budgets`` (a ``Budgets``, or token counts with ``context_len``) or ``ratio`` (+ ``strategy``,
    ``profile``/``n_layers``, ``context_len``). The ratios are exact only for prefills of ``context_len``
    tokens; for contexts of varying length use :func:`depthkv_press`.
    """
    kvpress = require_kvpress()
    _check_inner(press)
    if (budgets is None) == (ratio is None):
        raise ValueError("give exactly one of budgets= or ratio=")
    if budgets is None:
        if context_len is None:
            raise BudgetError("ratio= needs context_len= (or use depthkv_press for any context length)")
        budgets = _spec_policy(ratio, strategy, profile=profile, n_layers=n_layers, protected=protected,
                              min_tokens=min_tokens, **options)(int(context_len))
    ratios = layer_ratios(budgets, context_len)
    return kvpress.PerLayerCompressionPress(press=press, compression_ratios=ratios)


@functools.lru_cache(maxsize=1)
def _dynamic_class():
    """kvpress's PerLayerCompressionPress with ratios recomputed from each prefill's length (built lazily)."""
    from dataclasses import dataclass, field

    kvpress = require_kvpress()

    @dataclass
    class DepthKVPerLayerPress(kvpress.PerLayerCompressionPress):
        """Per-layer ratios from a depthkv budget policy, evaluated on the length of every prefill.

        ``last_budgets`` holds the depthkv ``Budgets`` of the latest prefill.
        """

        compression_ratios: list = field(default_factory=list)
        policy: BudgetPolicy | None = None
        nominal_ratio: float = 0.0
        last_budgets: Budgets | None = None

        def post_init_from_model(self, model):
            super().post_init_from_model(model)
            self.press.post_init_from_model(model)

        def forward_hook(self, module, input, kwargs, output):
            q_len = kwargs["hidden_states"].shape[1]
            pos = kwargs.get("cache_position")
            prefill = pos is not None and int(pos[-1]) + 1 == q_len
            if prefill and (self.last_budgets is None or self.last_budgets.context_len != q_len):
                budgets = self.policy(q_len)
                n_layers = module.config.num_hidden_layers
                budgets.check_length(n_layers)
                self.compression_ratios = layer_ratios(budgets)
                self.last_budgets = budgets
            if not prefill:
                return output
            return super().forward_hook(module, input, kwargs, output)

        @property
        def compression_ratio(self):  # the global ratio the policy was built for
            return self.nominal_ratio

        @compression_ratio.setter
        def compression_ratio(self, value):
            raise AttributeError(f"compression ratio cannot be set for {type(self).__name__}")

    return DepthKVPerLayerPress


def depthkv_press(
    press,
    *,
    ratio: float | None = None,
    strategy: str = "uniform",
    profile: Any = None,
    n_layers: int | None = None,
    policy: BudgetPolicy | None = None,
    protected: Sequence[int] = (),
    min_tokens: int = 20,
    **options: Any,
):
    """A kvpress press that splits ``ratio`` across layers like depthkv, for prefills of any length.

    At each prefill the budgets for the real context length come from ``policy`` (or from ``ratio`` +
    ``strategy`` + ``profile``/``n_layers``, see :class:`depthkv.allocation.BudgetSpec`) and are converted with
    :func:`layer_ratios`, so every layer keeps exactly its depthkv budget. Only prefills are compressed
    (later forwards, questions and decoding, are left alone), as with every kvpress prefill press.
    """
    require_kvpress()
    _check_inner(press)
    if (policy is None) == (ratio is None):
        raise ValueError("give exactly one of ratio= or policy=")
    if policy is None:
        policy = _spec_policy(ratio, strategy, profile=profile, n_layers=n_layers, protected=protected,
                             min_tokens=min_tokens, **options)
    _refuse_scores(policy)
    cls = _dynamic_class()
    return cls(press=press, policy=policy, nominal_ratio=float(ratio) if ratio is not None else float("nan"))
