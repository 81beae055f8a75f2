"""The sensitivity profile: a versioned JSON file bound to one model (no pickle anywhere).

Schema (``schema_version`` 1), top-level keys:
  schema_version, kind="depthkv-profile", created (ISO time), package_version, seed
  model: {name, model_type, n_layers, n_heads, n_kv_heads, head_dim, config_sha256}
  scorer: {name, options}; protection: {n_sink, n_recent}
  probe_ratios: [r...] (1.0 = only the protected window kept)
  curves: {"kl"|"nll": {"mean": [L][R], "lo": [L][R], "hi": [L][R]}}   95 % percentile bootstrap CIs
  samples: {"kl"|"nll": [S][L][R]} raw per-sample degradations (small; kept so that statistics can be redone)
  full_nll: [S]; context_lens: [S]
  permutation: {"kl"|"nll": {str(ratio): {statistic, p_value, effect_size, n_perm, null_mean, null_std}}}
  proxy: ProxyResult.to_dict() or null; spearman: [{metric, stage, rho, p}] or null; best_proxy: {...} or null
  data: {description, sha256 (of the calibration token ids), n_samples, tasks}
  timings: {prefill_and_ablation_s, proxy_s, total_s}
A profile made for another model (different config hash or layer count) is refused with an error.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from depthkv.allocation.sensitivity import SensitivityView

SCHEMA_VERSION = 1
KIND = "depthkv-profile"


class ProfileError(ValueError):
    """A profile file that is malformed, from a newer schema, or made for another model."""


@dataclass
class Profile:
    data: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ accessors
    @property
    def n_layers(self) -> int:
        return int(self.data["model"]["n_layers"])

    @property
    def probe_ratios(self) -> tuple[float, ...]:
        return tuple(self.data["probe_ratios"])

    def curve(self, metric: str = "kl") -> np.ndarray:
        """Mean degradation [L, R] of a single-layer ablation."""
        return np.asarray(self.data["curves"][metric]["mean"], dtype=float)

    def sensitivity(self, metric: str = "kl") -> np.ndarray:
        """One number per layer: the mean degradation over the probe ratios (area under the curve)."""
        return self.curve(metric).mean(axis=1)

    def view(self, metric: str = "kl") -> SensitivityView:
        """What allocators read: curves (clipped at 0: negative values are noise) and InfoNCE if measured."""
        infonce = None
        proxy = self.data.get("proxy")
        if proxy and self.data.get("infonce_per_layer") is not None:
            infonce = np.asarray(self.data["infonce_per_layer"], dtype=float)
        return SensitivityView(self.probe_ratios, np.clip(self.curve(metric), 0.0, None), infonce)

    def policy(self, strategy: str, ratio: float, *, protected=(), min_tokens: int = 1, **options):
        """A budget policy (context length -> Budgets) for ``strategy`` at ``ratio`` from this profile."""
        from depthkv.allocation import allocate
        from depthkv.allocation.budgets import check_ratio

        ratio = check_ratio(ratio)
        view = self.view()

        def make(n: int):
            return allocate(strategy, self.n_layers, n, ratio, sensitivity=view, protected=protected,
                            min_tokens=min(n, min_tokens), **options)

        make(max(min_tokens, 1) * 64)  # fail now, not mid-generation, on an infeasible request
        return make

    # ------------------------------------------------------------------ binding
    def check_model(self, identity: dict[str, Any]) -> None:
        """Raise unless this profile was made for the model described by ``identity``."""
        mine = self.data["model"]
        for key in ("n_layers", "config_sha256"):
            if mine.get(key) != identity.get(key):
                raise ProfileError(
                    f"profile was made for {mine.get('name')!r} ({mine.get('n_layers')} layers, config "
                    f"{str(mine.get('config_sha256'))[:12]}), not for {identity.get('name')!r} "
                    f"({identity.get('n_layers')} layers, config {str(identity.get('config_sha256'))[:12]}); "
                    "calibrate this model first (depthkv calibrate)"
                )

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """Write atomically: a crash never leaves a half-written profile behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".profile-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.data, fh, indent=1)
                fh.write("\n")
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a profile is meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, identity: dict[str, Any] | None = None) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path} is not a JSON profile: {exc}") from exc
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ProfileError(f"{path} is not a depthkv profile (kind {data.get('kind') if isinstance(data, dict) else None!r})")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProfileError(f"{path} has profile schema {version}; this depthkv reads schema {SCHEMA_VERSION}")
        for key in ("model", "probe_ratios", "curves"):
            if key not in data:
                raise ProfileError(f"{path} lacks the field {key!r}")
        prof = cls(data)
        if identity is not None:
            prof.check_model(identity)
        return prof
