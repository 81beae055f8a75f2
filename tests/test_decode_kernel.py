"""The split-KV decode kernel: its split rule, its default-config switch, and its output on CPU.

The kernel itself runs under the Triton interpreter (``TRITON_INTERPRET=1``: the same kernel code executed with
numpy, no GPU) against a plain masked-softmax reference, on ragged per-(row, KV head) valid lengths and for
several tilings, pipelining depths and split counts. The interpreter is chosen when triton is first imported,
so those cases (and a tiny run of ``benchmarks/decode_kernel_sweep.py``) run in one fresh Python process. Another
test compiles the kernel for an H100/H200 (sm_90) without a GPU and checks that ``num_stages`` > 1 really
pipelines the key loop. Last, the sweep's grid and summaries and ``benchmarks/throughput.py --kernel``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import decode_kernel_sweep as sweep
import pytest
import throughput as tp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from depthkv.engine import decode_kernel
from depthkv.engine.decode_kernel import DEFAULT_CONFIG, KernelConfig
from tests.conftest import BENCHMARKS

# a two-stage sweep small enough for the interpreter: 4 tiles (the default among them), then the best one at
# the two other split targets
SWEEP_TINY = ["--device", "cpu", "--shapes", "2x100", "--kv-heads", "2", "--group", "2", "--head-dim", "16",
              "--dtype", "float32", "--block", "64", "--block-n", "64,128", "--num-warps", "4",
              "--num-stages", "1,2", "--target-programs", "4,2048", "--top", "1", "--cpu-reps", "1", "--ragged"]

# ------------------------------------------------------------------------------------------ the split rule


UNTUNED = KernelConfig(block_n=64, num_warps=4, num_stages=1, target_programs=2048)  # before the H200 sweep


def legacy_split(b: int, kvh: int, c: int) -> tuple[int, int]:
    """The fixed heuristic the fast path used before the rule became a config."""
    want = max(1, min(48, math.ceil(2048 / (b * kvh))))
    chunk = max(128, math.ceil(math.ceil(c / want) / 64) * 64)
    chunk = max(64, chunk // 64 * 64)
    return math.ceil(c / chunk), chunk


@settings(max_examples=300, deadline=None, derandomize=True)
@given(b=st.integers(1, 1024), kvh=st.integers(1, 64), c=st.integers(1, 300_000),
       block_n=st.sampled_from([16, 32, 64, 128, 256]), target=st.integers(1, 20_000),
       max_split=st.integers(1, 128), min_chunk=st.integers(1, 2048))
def test_split_covers_the_buffer_in_whole_tiles(b, kvh, c, block_n, target, max_split, min_chunk):
    cfg = KernelConfig(block_n=block_n, target_programs=target, max_split=max_split, min_chunk=min_chunk)
    n_split, chunk = cfg.split(b, kvh, c)
    assert chunk % block_n == 0 and chunk >= min_chunk
    assert n_split * chunk >= c > (n_split - 1) * chunk  # every slot covered, no split wholly past the buffer
    assert 1 <= n_split <= min(max_split, max(1, math.ceil(target / (b * kvh))))


@pytest.mark.parametrize("b,kvh,c", [(1, 8, 26214), (151, 8, 6554), (38, 8, 26214), (512, 8, 1638), (3, 2, 300),
                                     (1, 1, 1), (64, 8, 100)])
def test_the_untuned_config_splits_as_the_former_heuristic(b, kvh, c):
    assert UNTUNED.split(b, kvh, c) == legacy_split(b, kvh, c)


def test_default_is_the_config_the_h200_sweep_chose():
    """benchmarks/results/decode_kernel_h200/best_kernel.json: the sweep's best over its five shapes."""
    best = json.loads((BENCHMARKS / "results" / "decode_kernel_h200" / "best_kernel.json").read_text())
    assert KernelConfig.from_dict(best) == DEFAULT_CONFIG


@pytest.mark.parametrize("kwargs,field", [({"block_n": 48}, "block_n"), ({"block_n": 8}, "block_n"),
                                          ({"num_warps": 3}, "num_warps"), ({"num_stages": 0}, "num_stages"),
                                          ({"target_programs": 0}, "target_programs"),
                                          ({"max_split": 0}, "max_split"), ({"min_chunk": 0}, "min_chunk")])
def test_bad_config_is_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KernelConfig(**kwargs)
    with pytest.raises(ValueError, match="positive"):
        DEFAULT_CONFIG.split(0, 8, 100)


def test_default_config_switch_restores_the_previous_one():
    tuned = KernelConfig(block_n=128, num_warps=8, num_stages=3)
    assert decode_kernel.get_default_config() is DEFAULT_CONFIG
    with decode_kernel.default_config(tuned) as cfg:
        assert cfg is tuned and decode_kernel.get_default_config() is tuned
        with decode_kernel.default_config(None):
            assert decode_kernel.get_default_config() is DEFAULT_CONFIG
        assert decode_kernel.get_default_config() is tuned
    assert decode_kernel.get_default_config() is DEFAULT_CONFIG
    prev = decode_kernel.set_default_config(tuned)
    try:
        assert prev is DEFAULT_CONFIG and decode_kernel.get_default_config() is tuned
    finally:
        decode_kernel.set_default_config(prev)
    with pytest.raises(TypeError, match="KernelConfig"):
        decode_kernel.set_default_config({"block_n": 64})


# ------------------------------------------------------------------------------------------ the interpreter

# (row 0: one valid slot per head; row 1: a prefix ending inside a split and a full buffer; row 2: a prefix
# ending on a 64-key tile boundary and one ending mid-way)
POS = [[0, 0], [150, 299], [63, 200]]
C = 300
CASES = {  # name: (config, G, D)
    "default": (KernelConfig(), 4, 16),  # 3 splits of 128
    "bn32-stages2-10splits": (KernelConfig(block_n=32, num_stages=2, min_chunk=32), 2, 32),  # many wholly empty
    "bn64-stages3-1split-G3": (KernelConfig(block_n=64, num_stages=3, num_warps=8, target_programs=6), 3, 16),
    "bn32-stages1-2splits": (KernelConfig(block_n=32, num_stages=1, target_programs=12, min_chunk=64), 4, 32),
    "bn64-stages2-minchunk96": (KernelConfig(block_n=64, num_stages=2, min_chunk=96), 2, 16),  # rounded up: 128
    "bn128-stages3-2splits": (KernelConfig(block_n=128, num_stages=3, num_warps=8, target_programs=24), 2, 32),
}
# K/V as views of longer buffers (the fast path's storage is rounded up) and no config passed: the default,
# switched with default_config(), must set the launch grid
STRIDED = KernelConfig(block_n=32, num_stages=2, target_programs=30, min_chunk=32)

# Run in a fresh process: TRITON_INTERPRET must be set before triton.language is first imported. Then the
# sweep script, on the same interpreter, its stdout to a file
RUNNER = """
import contextlib, sys, torch
from depthkv.engine import decode_kernel as dk
cases = torch.load(sys.argv[1])
grids, kernel = [], dk._partial
class Recorder:
    def __getitem__(self, grid):
        grids.append(list(grid))
        return kernel[grid]
dk._partial = Recorder()
out = {}
for name, c in cases.items():
    grids.clear()
    cfg = dk.KernelConfig(**c["config"])
    if c["as_default"]:
        with dk.default_config(cfg):
            o = dk.decode_attention(c["q"], c["k"], c["v"], c["pos"], c["scale"])
    else:
        o = dk.decode_attention(c["q"], c["k"], c["v"], c["pos"], c["scale"], cfg)
    out[name] = {"out": o, "grids": list(grids)}
torch.save(out, sys.argv[2])
dk._partial = kernel
sys.path.insert(0, sys.argv[3])
import decode_kernel_sweep
with open(sys.argv[4], "w") as fh, contextlib.redirect_stdout(fh):
    code = decode_kernel_sweep.main(sys.argv[5:])
sys.exit(code)
"""


def inputs(g: int, d: int, seed: int, c: int = C):
    gen = torch.Generator().manual_seed(seed)
    b, kvh = len(POS), len(POS[0])
    q = torch.randn(b, kvh, g, d, generator=gen)
    k = torch.randn(b, kvh, c, d, generator=gen) * 2.0  # peaky scores: masking mistakes show
    v = torch.randn(b, kvh, c, d, generator=gen)
    return q, k, v, torch.tensor(POS)


def all_cases() -> dict[str, dict]:
    cases = {}
    for i, (name, (cfg, g, d)) in enumerate(CASES.items()):
        q, k, v, pos = inputs(g, d, seed=i)
        cases[name] = dict(q=q, k=k, v=v, pos=pos, scale=1 / math.sqrt(d), config=vars(cfg), as_default=False)
    q, k_big, v_big, pos = inputs(4, 16, seed=99, c=C + 84)
    cases["strided-default"] = dict(q=q, k=k_big[:, :, :C], v=v_big[:, :, :C], pos=pos, scale=0.25,
                                    config=vars(STRIDED), as_default=True)
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case run once through the interpreted kernel, and the tiny sweep:
    (inputs, {name: {"out", "grids"}}, the sweep's output folder, its stdout)."""
    triton = pytest.importorskip("triton", reason="the triton package is not installed: the kernel cannot be interpreted")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run loops with runtime bounds under numpy 2 "
                    "(3.8 can): the kernel is tested compiled on the GPU instead")
    tmp = tmp_path_factory.mktemp("interp")
    cases = all_cases()
    torch.save(cases, tmp / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    argv = [str(tmp / "in.pt"), str(tmp / "out.pt"), str(BENCHMARKS), str(tmp / "sweep.out"), *SWEEP_TINY,
            "--out", str(tmp / "sweep")]
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, torch.load(tmp / "out.pt"), tmp / "sweep", (tmp / "sweep.out").read_text()


def reference(q, k, v, pos, scale):
    """Softmax attention over the first ``pos + 1`` slots of every (row, KV head), in float64."""
    s = torch.einsum("bhgd,bhcd->bhgc", q.double(), k.double()) * scale
    valid = torch.arange(k.shape[2])[None, None, :] <= pos[..., None]
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    return torch.einsum("bhgc,bhcd->bhgd", s.softmax(-1), v.double()).float()


@pytest.mark.parametrize("name", [*CASES, "strided-default"])
def test_kernel_matches_masked_softmax(interpreted, name):
    cases, results, _, _ = interpreted
    c, r = cases[name], results[name]
    out = r["out"]
    assert out.shape == c["q"].shape and out.dtype == c["q"].dtype
    torch.testing.assert_close(out, reference(c["q"], c["k"], c["v"], c["pos"], c["scale"]), atol=1e-4, rtol=0)
    # only each head's own prefix counts: one slot more (where the buffer has one) is a visibly different output
    longer = reference(c["q"], c["k"], c["v"], c["pos"] + 1, c["scale"])
    off_by_one = (out - longer).abs().amax(dim=(2, 3))[c["pos"] < C - 1]
    assert off_by_one.min() > 5e-4, off_by_one
    # the launch grid is (rows x KV heads, the config's split count), passed or set as the default
    cfg = KernelConfig(**c["config"])
    assert r["grids"] == [[len(POS) * 2, cfg.split(len(POS), 2, C)[0]]]


def test_cases_cover_the_ragged_edges():
    """Across the cases: one split only, whole splits past a head's prefix, prefixes ending inside a split and
    inside a tile, a buffer end that is no whole tile, and strided K/V."""
    valid = [p + 1 for p in sum(POS, [])]
    plans = [cfg.split(len(POS), 2, C) + (cfg.block_n,) for cfg, _, _ in CASES.values()]
    assert any(n == 1 for n, _, _ in plans)
    assert all(any(n_ok <= (n - 1) * chunk for n_ok in valid) for n, chunk, _ in plans if n > 1)
    assert all(any(n_ok % chunk and n_ok > chunk for n_ok in valid) for n, chunk, _ in plans if n > 1)
    assert all(any(n_ok % bn for n_ok in valid) and C % bn for _, _, bn in plans)
    assert not all_cases()["strided-default"]["k"].is_contiguous()


def test_bad_shapes_are_one_clear_error():
    q, k, v, pos = inputs(4, 16, seed=0)
    with pytest.raises(ValueError, match="pos must be"):
        decode_kernel.decode_attention(q, k, v, pos[:, :1], 0.25)
    with pytest.raises(ValueError, match="power-of-2 head_dim"):
        decode_kernel.decode_attention(q[..., :12], k[..., :12], v[..., :12], pos, 0.25)
    with pytest.raises(ValueError, match="k and v must be"):
        decode_kernel.decode_attention(q, k, v[:, :, :10], pos, 0.25)


# ------------------------------------------------------------------------------------------ sm_90 code


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU: not in interpreter mode")
@pytest.mark.parametrize("block_n,num_warps,num_stages", [(64, 4, 1), (128, 8, 3)])
def test_kernel_compiles_for_sm90_and_pipelines(block_n, num_warps, num_stages):
    """The kernel as the H200 gets it (bf16, the 8B model's G=4, D=128, arguments as Triton's launcher
    specialises them): compiles to a cubin, fits the SM's shared memory, and ``num_stages`` > 1 turns the key
    loop's loads into asynchronous copies (software pipelining), while 1 keeps plain loads."""
    triton = pytest.importorskip("triton", reason="the triton package is not installed")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - another Triton layout
        pytest.skip(f"this Triton has no ahead-of-time compile API: {exc}")
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "acc_ptr": "*fp32",
           "ml_ptr": "*fp32", "qk_scale": "fp32", "chunk": "i32", "n_split": "i32", "n_kvh": "i32",
           "s_kb": "i32", "s_kh": "i32", "s_kc": "i32", **dict.fromkeys(("G", "GP", "D", "BN", "NUM_STAGES",
                                                                          "IEEE"), "constexpr")}
    # pointers 16-byte aligned, strides and chunk multiples of 16: what the launcher sees for these buffers
    aligned = ("q_ptr", "k_ptr", "v_ptr", "pos_ptr", "acc_ptr", "ml_ptr", "chunk", "s_kb", "s_kh", "s_kc")
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(decode_kernel._partial, sig, attrs=attrs,
                    constexprs={"G": 4, "GP": 16, "D": 128, "BN": block_n, "NUM_STAGES": num_stages, "IEEE": False})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
    except RuntimeError as exc:  # pragma: no cover - e.g. no ptxas in this Triton build
        pytest.skip(f"cannot compile for sm_90 here: {exc}")
    ptx = kernel.asm["ptx"]
    assert kernel.asm.get("cubin") and kernel.metadata.num_warps == num_warps
    assert kernel.metadata.shared <= 227 * 1024  # an H100/H200 block's shared-memory limit
    assert ("cp.async" in ptx) == (num_stages > 1)


# ------------------------------------------------------------------------------------------ the benchmarks

def test_sweep_grid_keeps_the_default_and_prunes_hopeless_tiles():
    tiles = sweep.tile_grid(DEFAULT_CONFIG, [32, 64, 128], [2, 4, 8], [1, 2, 3, 4])
    assert tiles[0] == DEFAULT_CONFIG and len(tiles) == len(set(tiles)) == 28
    assert not any((c.block_n, c.num_warps) in ((32, 8), (128, 2)) for c in tiles)
    assert all(c.target_programs == DEFAULT_CONFIG.target_programs for c in tiles)
    more = sweep.split_grid(tiles[:3], [1024, 2048, 4096], [48], set(tiles))
    assert len(more) == 6 and {c.target_programs for c in more} == {1024, 2048, 4096} - {tiles[0].target_programs}
    rows = [dict(config="a", shape="s1", ok=True, ms=1.0), dict(config="a", shape="s2", ok=True, ms=1.0),
            dict(config="b", shape="s1", ok=True, ms=0.5), dict(config="b", shape="s2", ok=False),
            dict(config="c", shape="s1", ok=True, ms=1.2), dict(config="c", shape="s2", ok=True, ms=0.9)]
    assert sweep.totals(rows, ["s1", "s2"]) == [(2.0, "a"), (2.1, "c")]  # b failed on s2: never chosen
    assert sweep.best_per_shape(rows)["s1"]["config"] == "b"


def test_sweep_runs_end_to_end_in_the_interpreter(interpreted):
    """The whole script on CPU (kernel interpreted, wall-clock timing): both stages, outputs checked against
    the default config, results, CSV and the best config as a file and as the last stdout line."""
    _, _, tmp_path, stdout = interpreted
    data = json.loads((tmp_path / sweep.RESULTS_JSON).read_text())
    rows, meta = data["rows"], data["meta"]
    assert [r["stage"] for r in rows] == [1] * 4 + [2] * 2  # 4 tiles, then the best tile at the other targets
    assert all(r["ok"] and r["max_abs_diff"] < 1e-5 and r["ms"] > 0 for r in rows)
    assert rows[0]["config"] == sweep.config_label(DEFAULT_CONFIG) and rows[0]["speedup_vs_default"] == 1.0
    assert meta["shapes"][0]["slots"] == 128 and meta["shapes"][0]["default_vs_reference"] < 1e-5
    assert meta["triton"] and "--ragged" in meta["command"] and not meta["truncated"]
    best = json.loads((tmp_path / sweep.BEST_JSON).read_text())
    assert json.loads(stdout.strip().splitlines()[-1]) == best == meta["best_overall"]["config"]
    assert KernelConfig.from_dict(best).to_dict() == best
    with open(tmp_path / sweep.RESULTS_CSV, newline="") as fh:
        assert [r["config"] for r in csv.DictReader(fh)] == [r["config"] for r in rows]


@pytest.mark.parametrize("flags, message", [
    (["--shapes", "151by6554"], "--shapes: expected BATCHxTOKENS"),
    (["--block-n", "48"], "--block-n: block_n must be a power of two"),
    (["--num-stages", "0"], "--num-stages: expected positive integers"),
    (["--head-dim", "96"], "--head-dim must be a power of two"),
])
def test_sweep_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as exc:
        sweep.main([*SWEEP_TINY, *flags, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_sweep_on_cpu_needs_the_interpreter(tmp_path, capsys, monkeypatch):
    pytest.importorskip("triton", reason="the triton package is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exc:
        sweep.main([*SWEEP_TINY, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "set TRITON_INTERPRET=1" in capsys.readouterr().err


THROUGHPUT = ["--model", "random:tiny-32l", "--contexts", "256", "--ratios", "0.8", "--memory-gib", "0.25",
              "--steps", "2", "--dtype", "float32", "--device", "cpu"]


@pytest.mark.parametrize("flags, message", [
    (["--kernel", "{block_n: 64}"], "--kernel: not JSON"),
    (["--kernel", '{"block_m": 64}'], "unknown kernel config field(s) block_m"),
    (["--kernel", '{"num_warps": 3}'], "num_warps must be a power of two"),
    (["--kernel", '{"num_stages": "3"}'], "num_stages must be integers"),
    (["--kernel", "[64]"], "a kernel config is a JSON object"),
    (["--kernel", "{}", "--attention", "split"], "--attention split does not use it"),
])
def test_throughput_kernel_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        tp.main([*THROUGHPUT, *flags, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_throughput_kernel_is_the_default_while_rows_run_and_recorded(tmp_path, monkeypatch, capsys, tiny_models):
    seen = []

    def fake_row(bench, spec):
        seen.append(decode_kernel.get_default_config())
        return {**dataclasses.asdict(spec), "batch": 1}

    monkeypatch.setattr(tp, "build_model", lambda name, dev, dtype: tiny_models("llama"))
    monkeypatch.setattr(tp, "measure_row", fake_row)
    chosen = {"block_n": 128, "num_warps": 8, "num_stages": 3}
    assert tp.main([*THROUGHPUT, "--kernel", json.dumps(chosen), "--out", str(tmp_path)]) == 0
    assert seen == [KernelConfig(**chosen)] * 2  # the HF row and the fast row
    assert decode_kernel.get_default_config() is DEFAULT_CONFIG  # restored after the run
    meta = json.loads((tmp_path / tp.RESULTS_JSON).read_text())["meta"]
    assert meta["settings"]["kernel"] == meta["kernel"] == KernelConfig(**chosen).to_dict()
    with pytest.raises(SystemExit):  # results of another kernel config are not mixed in
        tp.main([*THROUGHPUT, "--out", str(tmp_path)])
    assert "made with other settings (kernel:" in capsys.readouterr().err
