"""What an allocator may read from a calibration profile: per-layer sensitivity curves and metrics.

A calibration run (``depthkv calibrate``) prunes one layer at a time to each probe ratio and
measures the mean increase of NLL (or KL) on answer tokens; the proxy-metric pass computes, among
others, the per-layer InfoNCE of the paper. ``SensitivityView`` is the small, validated slice of that
profile the allocators consume, so that allocation does not depend on the profile's file format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


class SensitivityError(ValueError):
    """A sensitivity view that is malformed or lacks what an allocator needs."""


def refined_entry(refined: Mapping | None, ratio: float):
    """What ``refined`` (ratio -> refined split, keys numbers or the strings a profile file holds) stores for
    ``ratio``, or None. A refined split serves only the ratio it was refined at (within 1e-9): the one rule for
    matching ratios to refined splits."""
    for key, value in (refined or {}).items():
        if abs(float(key) - float(ratio)) <= 1e-9:
            return value
    return None


def tuned_floor_share(floor_shares: Mapping | None, strategy: str, ratio: float) -> float | None:
    """The floor share tuned for allocator ``strategy`` at ``ratio`` (``depthkv refine --floor-shares``), or None.

    ``floor_shares``: strategy -> ratio -> share, each share a number or a profile entry ``{"share": s, ...}``;
    ratios match by ``refined_entry``'s rule (a share serves only the ratio it was tuned at).
    """
    entry = refined_entry((floor_shares or {}).get(strategy), ratio)
    return None if entry is None else _share_of(entry)


def _share_of(entry) -> float:
    """A stored floor share (a number, or a profile entry holding it under "share") as a float."""
    share = entry.get("share") if isinstance(entry, Mapping) else entry
    if isinstance(share, bool) or not isinstance(share, (int, float, np.integer, np.floating)):
        raise SensitivityError(f"a floor share must be a number, got {share!r}")
    return float(share)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class SensitivityView:
    """Per-layer sensitivity that allocators may use.

    ``probe_ratios``: the pruning ratios at which each layer was probed, strictly increasing, each in
    (0, 1]; 1.0 may stand for "only the scorer's protected window kept".
    ``degradation``: ``[L, R]`` array, mean increase of NLL (or KL) when only layer ``l`` is pruned to
    ratio ``probe_ratios[r]``. Mostly >= 0; small negative values (noise) are allowed.
    ``metric``: optional ``[L]`` array of a per-layer proxy metric, InfoNCE in the paper: a LOWER value
    marks a MORE critical layer.
    Either array may be absent (``None``), not both. Arrays are copied and made read-only.
    ``refined``: optional ``{ratio: [L] shares}``, per-layer kept shares of the context (``B_l / N``) refined
    on the joint degradation at that global ratio (``depthkv refine``; read by ``optimal-joint``).
    ``floor_shares``: optional ``{strategy: {ratio: share}}``, the floor share in [0, 1] chosen on the
    calibration samples for an input-adaptive allocator at that ratio (``depthkv refine --floor-shares``; read
    by ``adaptive`` and ``adaptive-joint``).
    """

    probe_ratios: tuple[float, ...] = ()
    degradation: np.ndarray | None = None
    metric: np.ndarray | None = None
    metric_name: str = "infonce"
    refined: Mapping[float, Sequence[float]] | None = None
    floor_shares: Mapping[str, Mapping[float, float]] | None = None

    def __post_init__(self) -> None:
        try:
            ratios = tuple(float(r) for r in self.probe_ratios)
        except (TypeError, ValueError) as exc:
            raise SensitivityError(f"probe_ratios must be numbers, got {self.probe_ratios!r}") from exc
        object.__setattr__(self, "probe_ratios", ratios)
        if self.degradation is None and self.metric is None:
            raise SensitivityError("a sensitivity view needs degradation curves, a metric, or both")
        for r in ratios:
            if not (0.0 < r <= 1.0):
                raise SensitivityError(f"probe ratios must lie in (0, 1], got {r}")
        if any(b <= a for a, b in zip(ratios, ratios[1:])):
            raise SensitivityError(f"probe ratios must be strictly increasing, got {ratios}")
        n_layers = None
        if self.degradation is not None:
            d = np.asarray(self.degradation, dtype=np.float64)
            if d.ndim == 1 and len(ratios) == 1:
                d = d[:, None]
            if d.ndim != 2:
                raise SensitivityError(f"degradation must be a [layers, ratios] array, got shape {d.shape}")
            if d.shape[1] != len(ratios):
                raise SensitivityError(
                    f"degradation has {d.shape[1]} columns but there are {len(ratios)} probe ratios {ratios}"
                )
            if d.shape[0] < 1 or d.shape[1] < 1:
                raise SensitivityError(f"degradation is empty (shape {d.shape})")
            if not np.isfinite(d).all():
                bad = np.argwhere(~np.isfinite(d))[0]
                raise SensitivityError(
                    f"degradation has a non-finite value (NaN or inf) at layer {bad[0]}, ratio {ratios[bad[1]]}"
                )
            object.__setattr__(self, "degradation", _frozen(d))
            n_layers = d.shape[0]
        elif ratios:
            raise SensitivityError("probe_ratios were given without degradation curves")
        if self.metric is not None:
            m = np.asarray(self.metric, dtype=np.float64)
            if m.ndim != 1 or m.size < 1:
                raise SensitivityError(f"metric must be a non-empty [layers] vector, got shape {m.shape}")
            if not np.isfinite(m).all():
                raise SensitivityError(
                    f"{self.metric_name} has a non-finite value (NaN or inf) at layer {int(np.argmin(np.isfinite(m)))}"
                )
            if n_layers is not None and m.size != n_layers:
                raise SensitivityError(
                    f"{self.metric_name} has {m.size} layers but the degradation curves have {n_layers}"
                )
            object.__setattr__(self, "metric", _frozen(m))
        if self.refined is not None:
            object.__setattr__(self, "refined", self._check_refined(self.refined))
        if self.floor_shares is not None:
            object.__setattr__(self, "floor_shares", _check_floor_shares(self.floor_shares))

    def _check_refined(self, refined: Mapping[float, Sequence[float]]) -> dict[float, np.ndarray]:
        out: dict[float, np.ndarray] = {}
        for key, shares in refined.items():
            ratio, w = float(key), np.asarray(shares, dtype=np.float64)
            if not 0.0 < ratio < 1.0:
                raise SensitivityError(f"refined shares are for ratio {key}, which is outside (0, 1)")
            if w.shape != (self.n_layers,) or not np.isfinite(w).all() or np.any(w <= 0) or np.any(w > 1):
                raise SensitivityError(
                    f"refined shares at ratio {key} must be {self.n_layers} numbers in (0, 1], got shape {w.shape}"
                )
            out[ratio] = _frozen(w)
        return out

    def refined_shares(self, ratio: float, user: str) -> np.ndarray:
        """The refined per-layer shares at ``ratio``, or a clear error naming the ratios available."""
        shares = refined_entry(self.refined, ratio)
        if shares is not None:
            return shares
        have = ", ".join(f"{r:g}" for r in sorted(self.refined or {})) or "none"
        raise SensitivityError(
            f"allocator {user!r} has no refined budgets for ratio {float(ratio):g} in this profile (refined "
            f"ratios: {have}); add them with: depthkv refine --profile PROFILE --model MODEL --ratios {float(ratio):g}"
        )

    def floor_share(self, strategy: str, ratio: float) -> float | None:
        """The floor share tuned for ``strategy`` at ``ratio``, or None when the profile holds none."""
        return tuned_floor_share(self.floor_shares, strategy, ratio)

    @property
    def n_layers(self) -> int:
        return int(self.degradation.shape[0] if self.degradation is not None else self.metric.shape[0])

    @classmethod
    def from_metric(cls, metric: Sequence[float] | np.ndarray, name: str = "infonce") -> SensitivityView:
        """A view holding only a per-layer metric (what MGA / MLMA need)."""
        return cls(metric=np.asarray(metric, dtype=np.float64), metric_name=name)

    def check_layers(self, n_layers: int) -> None:
        if self.n_layers != n_layers:
            raise SensitivityError(
                f"sensitivity was measured on {self.n_layers} layers but the request is for {n_layers} layers"
            )

    def require(self, what: str, user: str):
        """The part ``what`` ("degradation", "metric" or "refined"), or a clear error naming the allocator
        ``user``."""
        arr = getattr(self, what)
        if arr is None and what == "refined":
            raise SensitivityError(
                f"allocator {user!r} has no refined budgets in this profile (refined ratios: none); add them with: "
                "depthkv refine --profile PROFILE --model MODEL --ratios R"
            )
        if arr is None:
            hint = {
                "degradation": "run calibration with the ablation pass (per-layer degradation curves)",
                "metric": "run calibration with the metrics pass (per-layer InfoNCE)",
            }[what]
            raise SensitivityError(
                f"allocator {user!r} needs {what} in the sensitivity view, which has none: {hint}"
            )
        return arr

    def ratio_index(self, ratio: float | None) -> int:
        """Column of ``degradation`` for probe ratio ``ratio`` (``None``: the largest)."""
        if not self.probe_ratios:
            raise SensitivityError("this sensitivity view has no probe ratios")
        if ratio is None:
            return len(self.probe_ratios) - 1
        hits = [i for i, r in enumerate(self.probe_ratios) if abs(r - float(ratio)) <= 1e-9]
        if not hits:
            raise SensitivityError(f"probe ratio {ratio} was not measured; available: {self.probe_ratios}")
        return hits[0]


def _check_floor_shares(floor_shares: Mapping) -> dict[str, dict[float, float]]:
    """``{strategy: {ratio: share}}`` with every ratio in (0, 1) and every share in [0, 1], or SensitivityError."""
    out: dict[str, dict[float, float]] = {}
    for strategy, per_ratio in floor_shares.items():
        if not isinstance(per_ratio, Mapping):
            raise SensitivityError(f"floor shares of {strategy!r} must map ratios to shares, got {per_ratio!r}")
        out[str(strategy)] = {}
        for key, entry in per_ratio.items():
            try:
                ratio = float(key)
            except (TypeError, ValueError):
                raise SensitivityError(f"floor shares of {strategy!r}: {key!r} is not a ratio") from None
            share = _share_of(entry)
            if not 0.0 < ratio < 1.0:
                raise SensitivityError(f"floor share of {strategy!r} is for ratio {key}, which is outside (0, 1)")
            if not 0.0 <= share <= 1.0:
                raise SensitivityError(f"floor share of {strategy!r} at ratio {key} must lie in [0, 1], got {share}")
            out[str(strategy)][ratio] = share
    return out
