"""The fused column-reduction kernels of H2O and KVzip, and the scorers' dispatch to them.

The kernels run under the Triton interpreter (``TRITON_INTERPRET=1``: the kernel code executed with numpy on
CPU tensors) against the torch path of ``later_attention_mass`` and ``KVzip.score`` on the same inputs: prefill
(Q == K) and replay shapes (Q < K, n_context < K), G in {1, 2, 4}, head_dim 16 / 32 (and 24, padded), key counts
that are no whole tile, strided queries. The interpreter is chosen when triton is first imported, so all cases
run in one fresh Python process. Another test compiles both kernels for an H100/H200 (sm_90) without a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from depthkv.scorers import column_kernel, h2o, kvzip
from depthkv.scorers.base import ScoreInputs
from depthkv.scorers.column_kernel import ColumnKernelConfig
from depthkv.scorers.h2o import later_attention_mass
from depthkv.scorers.kvzip import KVzip

# name: (batch, KV heads, group G, queries Q, keys K, head_dim, n_context, tiles (block_m, block_n) or None)
CASES = {
    "prefill-g1-d16-one-tile": (1, 2, 1, 37, 37, 16, 20, None),
    "prefill-g2-d32-tiled": (1, 2, 2, 100, 100, 32, 100, (16, 32)),
    "prefill-g4-d16-b2": (2, 1, 4, 75, 75, 16, 41, (32, 16)),
    "replay-g2-d32": (1, 2, 2, 30, 90, 32, 55, (16, 16)),
    "replay-g4-d16-b2": (2, 2, 4, 20, 70, 16, 50, (16, 32)),
    "replay-overlapping-context": (1, 2, 2, 24, 60, 16, 45, (16, 16)),  # context keys also hold replay queries
    "replay-g1-d24-padded": (1, 3, 1, 33, 81, 24, 48, (32, 16)),
    "strided-queries": (1, 2, 2, 50, 50, 32, 30, (16, 16)),
}

# all cases through the interpreted kernels in one fresh process: TRITON_INTERPRET must be set before
# triton.language is first imported
RUNNER = """
import sys, torch
from depthkv.scorers import column_kernel as ck
from depthkv.scorers.base import ScoreInputs
cases = torch.load(sys.argv[1])
out = {}
for name, c in cases.items():
    x = ScoreInputs(c["query"], c["key"], c["value"], c["positions"], c["scaling"], 0, n_context=c["n_context"])
    cfg = ck.ColumnKernelConfig(*c["tiles"]) if c["tiles"] else None
    out[name] = {"h2o": ck.later_attention_mass_fused(x, cfg), "kvzip": ck.max_attention_fused(x, c["n_context"], cfg)}
torch.save(out, sys.argv[2])
"""


def make_inputs(name: str, seed: int) -> ScoreInputs:
    b, kvh, g, nq, nk, d, n_context, _ = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(b, kvh, nk, d, generator=gen) * 2.0  # peaky attention: masking mistakes show
    value = torch.randn(b, kvh, nk, d, generator=gen)
    if name == "strided-queries":  # as a model's [B, Q, H, d] projection transposed to [B, H, Q, d]
        query = torch.randn(b, nq, kvh * g, d, generator=gen).transpose(1, 2)
        assert not query.is_contiguous()
    else:
        query = torch.randn(b, kvh * g, nq, d, generator=gen)
    positions = torch.arange(nk).expand(b, kvh, nk)
    return ScoreInputs(query, key, value, positions, 1 / math.sqrt(d), 0, n_context=n_context)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(inputs, {name: {"h2o", "kvzip"}}) of every case, the fused functions run once in the interpreter."""
    triton = pytest.importorskip("triton", reason="the triton package is not installed: the kernel cannot be interpreted")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run loops with runtime bounds under numpy 2 "
                    "(3.8 can): the kernel is tested compiled on the GPU instead")
    tmp = tmp_path_factory.mktemp("interp")
    inputs = {name: make_inputs(name, seed) for seed, name in enumerate(CASES)}
    saved = {name: dict(query=x.query, key=x.key, value=x.value, positions=x.positions, scaling=x.scaling,
                        n_context=x.n_context, tiles=CASES[name][-1]) for name, x in inputs.items()}
    torch.save(saved, tmp / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp / "in.pt"), str(tmp / "out.pt")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return inputs, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_fused_h2o_matches_the_torch_path(interpreted, name):
    inputs, results = interpreted
    x = inputs[name]
    fused = results[name]["h2o"]
    assert fused.dtype == torch.float32 and fused.shape == x.key.shape[:3]
    ref = later_attention_mass(x)  # CPU: the attention_blocks path
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    # the diagonal is left out: with it, some keys would score visibly more
    b, kvh, g, nq, nk = x.key.shape[0], x.key.shape[1], *CASES[name][2:5]
    q = x.query.reshape(b, kvh, g, nq, -1)
    logits = torch.einsum("bhgqd,bhqd->bhgq", q, x.key[:, :, nk - nq:]) * x.scaling
    full = torch.einsum("bhgqd,bhkd->bhgqk", q, x.key) * x.scaling
    hidden = torch.arange(nk)[None, :] > (nk - nq + torch.arange(nq))[:, None]
    diag = (logits - full.masked_fill(hidden, float("-inf")).logsumexp(-1)).exp().mean(2)
    assert diag.max() > 0.05


@pytest.mark.parametrize("name", list(CASES))
def test_fused_kvzip_matches_the_torch_path(interpreted, name):
    inputs, results = interpreted
    x = inputs[name]
    fused = results[name]["kvzip"]
    assert fused.dtype == torch.float32 and fused.shape == (*x.key.shape[:2], x.n_context)
    torch.testing.assert_close(fused, KVzip(prompt_ids=(1,)).score(x), rtol=1e-5, atol=1e-6)


def test_cases_cover_the_edges():
    """Across the cases: G 1 / 2 / 4, head_dim 16 / 32, prefill and replay, keys and queries that are no whole
    tile, several tiles each way, a context ending inside a tile, context keys that replay queries sit on."""
    assert {c[2] for c in CASES.values()} == {1, 2, 4} and {16, 32} <= {c[5] for c in CASES.values()}
    tiled = [c for c in CASES.values() if c[-1]]
    assert any(c[3] == c[4] for c in tiled) and any(c[3] < c[4] for c in tiled)
    assert all(c[4] % c[-1][1] and c[4] > c[-1][1] for c in tiled)
    assert any(c[3] % c[-1][0] and c[3] > c[-1][0] for c in tiled)
    assert any(c[6] % c[-1][1] and c[6] < c[4] for c in tiled)
    assert any(c[6] > c[4] - c[3] for c in CASES.values() if c[3] < c[4])


# ------------------------------------------------------------------------------------------ sm_90 code

SCALAR_ARGS = {"qk_scale": "fp32", "n_q": "i32", "n_k": "i32"}
STRIDES = dict.fromkeys(("s_qb", "s_qh", "s_qi", "s_kb", "s_kh", "s_kj"), "i32")
TILES = ("D", "DP", "BM", "BN", "NUM_STAGES", "IEEE")
SIGNATURES = {
    "_row_lse": {"q_ptr": "*bf16", "k_ptr": "*bf16", "lse_ptr": "*fp32", **SCALAR_ARGS, "n_heads": "i32",
                 "group": "i32", **STRIDES, **dict.fromkeys(TILES, "constexpr")},
    "_column_reduce": {"q_ptr": "*bf16", "k_ptr": "*bf16", "lse_ptr": "*fp32", "out_ptr": "*fp32", **SCALAR_ARGS,
                       "n_cols": "i32", "n_kvh": "i32", **STRIDES,
                       **dict.fromkeys(("G", *TILES, "SUM"), "constexpr")},
}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU: not in interpreter mode")
@pytest.mark.parametrize("kernel,extra", [("_row_lse", {}), ("_column_reduce", {"G": 4, "SUM": True}),
                                          ("_column_reduce", {"G": 4, "SUM": False})])
def test_kernels_compile_for_sm90(kernel, extra):
    """Both kernels as an H200 gets them (bf16, G=4, D=128, default tiles): compile to a cubin that fits the
    SM's shared memory, with pipelined (asynchronous-copy) loads in the key / query loops."""
    triton = pytest.importorskip("triton", reason="the triton package is not installed")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - another Triton layout
        pytest.skip(f"this Triton has no ahead-of-time compile API: {exc}")
    cfg = ColumnKernelConfig()
    sig = SIGNATURES[kernel]
    names = list(sig)
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("s_")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    constexprs = {"D": 128, "DP": 128, "BM": cfg.block_m, "BN": cfg.block_n, "NUM_STAGES": cfg.num_stages,
                  "IEEE": False, **extra}
    src = ASTSource(getattr(column_kernel, kernel), sig, attrs=attrs, constexprs=constexprs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except RuntimeError as exc:  # pragma: no cover - e.g. no ptxas in this Triton build
        pytest.skip(f"cannot compile for sm_90 here: {exc}")
    assert compiled.asm.get("cubin") and compiled.metadata.num_warps == cfg.num_warps
    assert compiled.metadata.shared <= 227 * 1024  # an H100/H200 block's shared-memory limit
    assert "cp.async" in compiled.asm["ptx"]


# ------------------------------------------------------------------------------------------ dispatch


def test_usable_only_on_cuda_and_when_not_switched_off(monkeypatch):
    x = make_inputs("replay-g2-d32", 0)
    monkeypatch.delenv(column_kernel.ENV_SWITCH, raising=False)
    assert not column_kernel.usable(x)  # CPU tensors
    cuda = SimpleNamespace(device=torch.device("cuda"))  # stands for CUDA tensors; no GPU needed
    on_gpu = SimpleNamespace(query=cuda, key=cuda)
    assert column_kernel.usable(on_gpu) == column_kernel.available()
    monkeypatch.setenv(column_kernel.ENV_SWITCH, "0")
    assert not column_kernel.usable(on_gpu)
    monkeypatch.setenv(column_kernel.ENV_SWITCH, "1")
    assert column_kernel.usable(on_gpu) == column_kernel.available()


def test_cpu_dispatch_keeps_the_torch_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the fused kernels must not run on CPU tensors")

    monkeypatch.setattr(column_kernel, "later_attention_mass_fused", fail)
    monkeypatch.setattr(column_kernel, "max_attention_fused", fail)
    x = make_inputs("replay-g2-d32", 3)
    assert later_attention_mass(x).shape == x.key.shape[:3]
    assert KVzip(prompt_ids=(1,), kernel=3).score(x).shape == (*x.key.shape[:2], x.n_context)


def test_dispatch_calls_the_fused_h2o_once_per_forward(monkeypatch):
    x = make_inputs("prefill-g2-d32-tiled", 4)
    calls = []
    fused = torch.rand(x.key.shape[:3], generator=torch.Generator().manual_seed(0))

    def stub(inputs):
        calls.append(inputs)
        return fused

    monkeypatch.setattr(h2o.column_kernel, "usable", lambda inputs: True)
    monkeypatch.setattr(h2o.column_kernel, "later_attention_mass_fused", stub)
    assert later_attention_mass(x) is fused
    assert later_attention_mass(x) is fused  # the memo: H2O and H2O with values share one computation
    assert calls == [x] and x.memo["later_attention_mass"] is fused


def test_dispatch_pools_the_fused_kvzip_scores(monkeypatch):
    x = make_inputs("replay-g2-d32", 5)
    seen = []
    fused = torch.zeros(*x.key.shape[:2], x.n_context)
    fused[..., 10] = 0.7

    def stub(inputs, n_context):
        seen.append(n_context)
        return fused

    monkeypatch.setattr(kvzip.column_kernel, "usable", lambda inputs: True)
    monkeypatch.setattr(kvzip.column_kernel, "max_attention_fused", stub)
    pooled = KVzip(prompt_ids=(1,), kernel=3).score(x)
    assert seen == [x.n_context]
    assert torch.equal(pooled[..., 9:12], torch.full((*x.key.shape[:2], 3), 0.7))
    assert pooled.sum() == pytest.approx(0.7 * 3 * x.key.shape[1])
    assert KVzip(prompt_ids=(1,)).score(x) is fused  # kernel 1: the fused scores unchanged


def test_dispatch_gives_the_fused_kvzip_the_chunk_keys_only(monkeypatch):
    """normalise="chunk": the fused kernel scores the sink and chunk keys (plus the replayed tokens) and the
    scores land back at those keys' places; every other context key scores 0."""
    x = make_inputs("replay-g4-d16-b2", 5)  # queries = the keys after the context, as in a replay
    n = x.n_context
    x = dataclasses.replace(x, replay_span=(8, 20))
    seen = []

    def stub(inputs, n_context):
        seen.append((n_context, inputs.key.shape[2]))
        return torch.arange(1, n_context + 1, dtype=torch.float32).expand(*inputs.key.shape[:2], n_context)

    monkeypatch.setattr(kvzip.column_kernel, "usable", lambda inputs: True)
    monkeypatch.setattr(kvzip.column_kernel, "max_attention_fused", stub)
    scores = KVzip(prompt_ids=(1,), normalise="chunk", sink=2).score(x)
    assert seen == [(14, 14 + x.key.shape[2] - n)]
    want = torch.zeros(n)
    want[[0, 1, *range(8, 20)]] = torch.arange(1, 15, dtype=torch.float32)
    assert torch.equal(scores, want.expand(*x.key.shape[:2], n))


# ------------------------------------------------------------------------------------------ bad input


def test_bad_shapes_are_one_clear_error():
    x = make_inputs("replay-g2-d32", 6)
    with pytest.raises(ValueError, match="n_context must lie in"):
        column_kernel.max_attention_fused(x, x.key.shape[2] + 1)
    swapped = ScoreInputs(x.key.repeat(1, 2, 1, 1), x.query[:, :2], x.value, x.positions, x.scaling, 0)
    with pytest.raises(ValueError, match="Q <= K"):
        column_kernel.later_attention_mass_fused(swapped)
    odd = ScoreInputs(x.query[:, :3], x.key, x.value, x.positions, x.scaling, 0)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        column_kernel.later_attention_mass_fused(odd)


@pytest.mark.parametrize("fields, message", [
    (dict(block_m=48), "block_m must be a power of two"),
    (dict(block_n=8), "block_n must be a power of two >= 16"),
    (dict(num_warps=3), "num_warps must be a power of two"),
    (dict(num_stages=0), "num_stages must be >= 1"),
])
def test_config_rejects_bad_tiles(fields, message):
    with pytest.raises(ValueError, match=message):
        ColumnKernelConfig(**fields)


@pytest.mark.skipif(os.environ.get("DEPTHKV_TEST_DEVICE") != "cuda" or not torch.cuda.is_available(),
                    reason="needs DEPTHKV_TEST_DEVICE=cuda and a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_kernels_match_the_torch_path_on_the_gpu(name, dtype, monkeypatch):
    """The compiled kernels (default tiles) against the scorers' torch path on the same CUDA inputs; in bfloat16
    the torch path rounds its logits to bfloat16 before the softmax and the kernel does not, hence the tolerance."""
    cpu = make_inputs(name, 11)
    x = ScoreInputs(*(t.to("cuda", dtype) for t in (cpu.query, cpu.key, cpu.value)), cpu.positions.cuda(),
                    cpu.scaling, 0, n_context=cpu.n_context)
    assert column_kernel.usable(x)
    chunk = KVzip(prompt_ids=(1,), normalise="chunk", sink=2)
    x_span = dataclasses.replace(x, replay_span=(3, cpu.n_context // 2))
    fused_h2o, fused_kvzip = later_attention_mass(x), KVzip(prompt_ids=(1,)).score(x)  # the dispatch: fused
    fused_chunk = chunk.score(x_span)
    monkeypatch.setenv("DEPTHKV_FUSED_SCORES", "0")
    x.memo.clear()
    assert not column_kernel.usable(x)
    ref_h2o, ref_kvzip = later_attention_mass(x), KVzip(prompt_ids=(1,)).score(x)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(fused_h2o, ref_h2o, **tol)
    torch.testing.assert_close(fused_kvzip, ref_kvzip, **tol)
    torch.testing.assert_close(fused_chunk, chunk.score(x_span), **tol)
