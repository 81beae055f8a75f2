"""--device / --dtype: resolution rules, clear errors before any work, and tensors that follow the model.

No GPU is needed: CUDA presence is faked by patching ``torch.cuda`` queries (resolution never allocates),
and "follows the model" is checked on the CPU path (a tiny model, a tiny eval) plus, for the helpers that
create tensors, by asking for another device (``meta``) and checking they honour it.
"""

from __future__ import annotations

import json

import pytest
import torch

from depthkv.models import DeviceError, load_model, resolve_device, resolve_dtype, tiny_model
from depthkv.models import loader as loader_mod
from depthkv.models.device import dtype_name, model_device
from tests.conftest import one_error_line, tiny_loaded_model, trained_bpe_tokenizer


def fake_cuda(monkeypatch, count: int) -> None:
    """Make torch report ``count`` CUDA devices (0: none) without touching a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)


@pytest.fixture(scope="module")
def tokenizer():
    return trained_bpe_tokenizer()


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_loaded_model(tokenizer)


# ---------------------------------------------------------------------------------------------- resolution
def test_auto_resolves_to_cpu_here():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == expected
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_without_cuda_is_cpu_with_cuda_is_first_gpu(monkeypatch):
    fake_cuda(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    fake_cuda(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("text", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(monkeypatch, text):
    fake_cuda(monkeypatch, 0)
    with pytest.raises(DeviceError) as info:
        resolve_device(text)
    message = str(info.value)
    assert "CUDA" in message and "--device cpu" in message and "\n" not in message


def test_missing_gpu_index_is_a_clear_error(monkeypatch):
    fake_cuda(monkeypatch, 2)
    with pytest.raises(DeviceError, match=r"'cuda:7' does not exist: torch sees 2 CUDA devices \(cuda:0\.\.cuda:1\)"):
        resolve_device("cuda:7")
    fake_cuda(monkeypatch, 1)
    with pytest.raises(DeviceError, match=r"1 CUDA device \(cuda:0\)"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("text", ["tpu", "gpu", "meta", "cuda:x", "cuda:-1", "  ", "mps", "cuda0"])
def test_unknown_device_strings(text):
    with pytest.raises(DeviceError, match="unknown device .*; use auto, cpu, cuda or cuda:N"):
        resolve_device(text)


def test_dtype_defaults_follow_the_device():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16  # a device object: no CUDA query
    assert resolve_dtype("float16", torch.device("cuda", 0)) is torch.float16  # the caller's choice wins
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") is torch.float16
    assert resolve_dtype("torch.float32") is torch.float32
    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(DeviceError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")


def test_auto_dtype_with_fake_cuda(monkeypatch):
    fake_cuda(monkeypatch, 1)
    assert resolve_dtype("auto", "auto") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32


# ---------------------------------------------------------------------------------------------- load_model
def test_load_model_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DEPTHKV_QUIET", "1")
    folder = tmp_path / "m"
    tiny_model("llama", n_layers=2).save_pretrained(folder)
    lm = load_model(str(folder))  # auto: the CPU and float32 here, the first GPU and bfloat16 where there is one
    cuda = torch.cuda.is_available()
    assert model_device(lm.model) == resolve_device("auto") == lm.model.device
    assert lm.model.dtype == (torch.bfloat16 if cuda else torch.float32)
    assert load_model(str(folder), device="cpu").model.dtype == torch.float32
    assert load_model(str(folder), device="cpu", dtype="bfloat16").model.dtype == torch.bfloat16
    assert load_model(str(folder), device="cpu", dtype=torch.float16).model.dtype == torch.float16


@pytest.mark.parametrize("device", ["cuda", "tpu", "cuda:7"])
def test_bad_device_fails_before_any_loading(tmp_path, monkeypatch, device):
    monkeypatch.setenv("DEPTHKV_CACHE", str(tmp_path / "cache"))
    fake_cuda(monkeypatch, 0)
    monkeypatch.setattr(loader_mod, "_from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(loader_mod.fetch, "fetch_alias", lambda *a, **k: pytest.fail("alias fetched"))
    for name in ("smollm2-135m", str(tmp_path)):
        with pytest.raises(DeviceError):
            load_model(name, device=device)
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("device", ["tpu", "cuda", "cuda:7"])
def test_cli_bad_device_one_line_exit_2_before_loading(tmp_path, monkeypatch, capsys, device):
    import depthkv.cli as cli

    fake_cuda(monkeypatch, 0)
    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model must not be loaded"))
    monkeypatch.setattr("depthkv.models.load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello there")
    commands = [
        ["generate", "--prompt-file", str(prompt)],
        ["eval", "--methods", "full,uniform", "--out", str(tmp_path / "eval")],
        ["calibrate", "--out", str(tmp_path / "profile.json")],
        ["demo", "--out", str(tmp_path / "demo")],
    ]
    for argv in commands:
        assert cli.main([*argv, "--device", device]) == 2, argv
        line = one_error_line(capsys.readouterr().err)
        assert repr(device) in line
    assert not (tmp_path / "eval").exists() and not (tmp_path / "demo").exists()
    assert not (tmp_path / "profile.json").exists()


def test_cli_bad_dtype_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import depthkv.cli as cli

    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model must not be loaded"))
    assert cli.main(["eval", "--dtype", "int4", "--methods", "full", "--out", str(tmp_path / "e")]) == 2
    assert "unknown dtype 'int4'" in one_error_line(capsys.readouterr().err)


def test_cli_device_and_dtype_defaults(monkeypatch):
    import depthkv.cli as cli

    parser = cli.build_parser()
    for cmd in (["generate"], ["calibrate", "--out", "x"], ["eval", "--out", "x"], ["demo"]):
        args = parser.parse_args(cmd)
        assert (args.device, args.dtype) == ("auto", "auto"), cmd
    fake_cuda(monkeypatch, 0)
    args = parser.parse_args(["eval", "--out", "x"])
    cli.resolve_device_args(args)
    assert (args.device, args.dtype) == ("cpu", "float32")
    fake_cuda(monkeypatch, 2)
    args = parser.parse_args(["eval", "--out", "x"])
    cli.resolve_device_args(args)
    assert (args.device, args.dtype) == ("cuda:0", "bfloat16")
    args = parser.parse_args(["eval", "--out", "x", "--device", "cuda:1", "--dtype", "float16"])
    cli.resolve_device_args(args)
    assert (args.device, args.dtype) == ("cuda:1", "float16")


def test_cli_load_passes_device_and_dtype(monkeypatch):
    import depthkv.cli as cli

    seen = {}
    monkeypatch.setattr("depthkv.models.load_model", lambda name, **kw: seen.update(name=name, **kw))
    args = cli.build_parser().parse_args(["generate", "--model", "m", "--device", "cpu", "--dtype", "bfloat16"])
    cli.resolve_device_args(args)
    cli.load(args)
    assert seen["name"] == "m" and seen["device"] == "cpu" and seen["dtype"] is torch.bfloat16


# ---------------------------------------------------------------------------------------------- tensors follow
def test_eval_prompt_tensors_follow_the_device(lm):
    from depthkv.eval.runner import prompt_ids
    from depthkv.tasks import generate
    from depthkv.tasks.prompt import token_counter

    sample = generate("needle", 1, 0, context_tokens=200, count_tokens=token_counter(lm.tokenizer), split="eval")[0]
    for setting in ("aware", "agnostic"):
        prefix, full = prompt_ids(lm.tokenizer, sample, setting, lm.model.device)
        assert prefix.device == full.device == lm.model.device
        on_meta = prompt_ids(lm.tokenizer, sample, setting, torch.device("meta"))
        assert all(t.device.type == "meta" for t in on_meta)  # the device is really passed through
        assert on_meta[0].shape == prefix.shape and on_meta[1].shape == full.shape


def test_builtin_prompt_follows_the_device(lm):
    from depthkv.prompts import builtin_prompt_ids

    ids, answer = builtin_prompt_ids(lm.tokenizer, 256, device=lm.model.device)
    assert ids.device == lm.model.device and ids.dtype == torch.long and answer
    meta, _ = builtin_prompt_ids(lm.tokenizer, 256, device="meta")
    assert meta.device.type == "meta" and meta.shape == ids.shape


def test_calibration_items_follow_the_device_and_hash_the_same(lm):
    from depthkv.calibration.run import CalibrationConfig, load_items

    cfg = CalibrationConfig(samples=2, context_tokens=200, data="needle")
    items, desc = load_items(lm.tokenizer, cfg, lm.model.device)
    assert all(i.prompt_ids.device == i.answer_ids.device == lm.model.device for i in items)
    meta_items, meta_desc = load_items(lm.tokenizer, cfg, torch.device("meta"))
    assert all(i.prompt_ids.device.type == i.answer_ids.device.type == "meta" for i in meta_items)
    assert meta_desc["sha256"] == desc["sha256"]  # the data hash does not depend on the device
    default_items, default_desc = load_items(lm.tokenizer, cfg)
    assert default_desc == desc and default_items[0].prompt_ids.device.type == "cpu"


def test_calibration_runs_on_the_models_device(lm):
    from depthkv.calibration.ablation import measure_sensitivity
    from depthkv.calibration.run import CalibrationConfig, load_items
    from depthkv.engine.session import Protection
    from depthkv.scorers import get_scorer

    items, _ = load_items(lm.tokenizer, CalibrationConfig(samples=2, context_tokens=160, data="needle"),
                          lm.model.device)
    res = measure_sensitivity(lm.model, items, get_scorer("snapkv"), (0.5,), Protection(4, 16), batch=4)
    assert res.kl.shape == (2, 4, 1) and (res.kl >= -1e-6).all()


def test_tiny_eval_records_dtype_and_device_and_resumes_elsewhere(lm, tmp_path):
    from depthkv.eval import EvalConfig, EvalError, run_eval

    cfg = EvalConfig(model="tiny-llama", tasks=("needle",), methods=("full", "uniform"), scorers=("snapkv",),
                     ratios=(0.5,), samples=1, context_tokens=200, max_new_tokens=2)
    assert cfg.dtype == "auto"
    res = run_eval(lm, cfg, tmp_path / "run", progress=False)
    assert cfg.dtype == "float32"  # filled in from the model
    assert res.new_rows == 2
    assert all(r["device"] == str(lm.model.device) and r["dtype"] == "float32" for r in res.rows)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["device"] == str(lm.model.device) and config["run"]["dtype"] == "float32"
    assert "device" not in config["run"]  # not part of what must match to resume
    assert "--dtype float32" in config["command"]  # the recorded command runs the same dtype on any device
    # the same run resumed on another device is fine: the run record does not hold the device
    config["device"] = "cuda:0"
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    again = EvalConfig(**{**cfg.to_dict(), "dtype": "auto"})
    assert run_eval(lm, again, tmp_path / "run", progress=False).skipped == 2
    # ... but another dtype is another run
    with pytest.raises(EvalError, match="dtype"):
        run_eval(lm, EvalConfig(**{**cfg.to_dict(), "dtype": "bfloat16"}), tmp_path / "run", progress=False)


def test_cli_generate_moves_the_prompt_to_the_models_device(lm, tmp_path, monkeypatch, capsys):
    import depthkv.cli as cli

    seen = []
    original = type(lm.model).generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["input_ids"].device)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(lm.model), "generate", spy)
    monkeypatch.setattr(cli, "load", lambda args: lm)
    prompt = tmp_path / "p.txt"
    prompt.write_text("The cat sat on the mat. " * 12 + "Where did the cat sit?")
    assert cli.main(["generate", "--prompt-file", str(prompt), "--max-new-tokens", "2", "--ratio", "0.3"]) == 0
    assert seen and all(d == lm.model.device for d in seen)
    assert "KV bytes" in capsys.readouterr().out
