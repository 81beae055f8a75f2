"""Expected Attention (Devoto et al. 2025, kvpress ``ExpectedAttentionPress``): the attention future queries
would pay, estimated from the statistics of the queries seen so far.

Queries of the prefill are turned back into their pre-RoPE form; their mean mu and covariance S (per query
head) describe a typical future query. Rotated to future positions t in [T, T + n_future) and averaged
(R = mean_t R_t), a future query is q ~ N(R mu, R S R^T); for a Gaussian q,
E[exp(s q.k)] = exp(s k.R mu + s^2/2 k^T R S R^T k). These expected logits, soft-maxed over the keys and
averaged over each KV group, times ||V_j|| (what the token would write), are the scores. Nothing here needs
the question, so the context can be compressed before it is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthkv.scorers.base import ScoreInputs, Scorer, grouped_queries


def rope_matrix(inv_freq: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [T, d, d] of HF's rotate-half RoPE for positions ``offsets`` (float64 for accuracy)."""
    ang = offsets.double()[:, None] * inv_freq.double()[None, :]  # [T, d/2]
    cos, sin = torch.cos(ang), torch.sin(ang)
    h = inv_freq.shape[0]
    r = torch.zeros(offsets.shape[0], 2 * h, 2 * h, dtype=torch.float64, device=inv_freq.device)
    i = torch.arange(h, device=inv_freq.device)
    # rotate_half(q) = [-q2, q1]: q' = q cos + rotate_half(q) sin
    r[:, i, i] = cos
    r[:, i + h, i + h] = cos
    r[:, i, i + h] = -sin
    r[:, i + h, i] = sin
    return r


@dataclass
class ExpectedAttention(Scorer):
    """Scores from the expected softmax of future queries; see the module docstring."""

    n_future: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_value_norm: bool = True
    name = "expected_attention"

    def __post_init__(self) -> None:
        if self.n_future < 1 or self.n_sink < 0:
            raise ValueError(f"n_future must be >= 1 and n_sink >= 0, got {self.n_future}, {self.n_sink}")

    def score(self, x: ScoreInputs) -> torch.Tensor:
        if x.inv_freq is None:
            raise ValueError("expected_attention needs the model's RoPE frequencies (a rotary model)")
        q = grouped_queries(x).double()  # [B, KVH, G, Q, d] post-RoPE
        b, kvh, g, nq, d = q.shape
        nk = x.key.shape[2]
        inv = x.inv_freq.to(q.device).double()
        qpos = x.positions[:, 0, nk - nq:].to(q.device).double()  # [B, Q] logical positions of the queries
        pre = rotate(q, -qpos[:, None, None, :, None] * inv)  # rotating by -pos undoes RoPE
        pre = pre[..., min(self.n_sink, nq - 1):, :]
        mu = pre.mean(dim=3)  # [B, KVH, G, d]
        end = int(qpos.max()) + 1
        r = rope_matrix(inv, torch.arange(end, end + self.n_future, device=q.device)).mean(dim=0)  # [d, d]
        mu_f = (mu @ r.T).float()
        k = x.key.float()  # [B, KVH, K, d]
        logits = torch.einsum("bhgd,bhkd->bhgk", mu_f, k) * x.scaling
        if self.use_covariance and pre.shape[3] > 1:
            c = pre - mu[:, :, :, None, :]
            cov_f = (r @ (torch.einsum("bhgqi,bhgqj->bhgij", c, c) / pre.shape[3]) @ r.T).float()
            for gi in range(g):  # k^T S k per group member, without a [K, G, d] intermediate
                kc = torch.einsum("bhki,bhij->bhkj", k, cov_f[:, :, gi])
                logits[:, :, gi] += 0.5 * x.scaling**2 * (kc * k).sum(-1)
        scores = torch.softmax(logits, dim=-1).mean(dim=2)  # [B, KVH, K]
        if self.use_value_norm:
            scores = scores * x.value.float().norm(dim=-1)
        return scores


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE of ``x`` [..., d] by ``angles`` [..., d/2] (broadcast)."""
    h = x.shape[-1] // 2
    cos, sin = torch.cos(angles), torch.sin(angles)
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
