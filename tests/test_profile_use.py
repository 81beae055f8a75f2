"""A profile is used only as it was calibrated: its scorer and its setting (question inside the pruned prefill,
"aware", or context pruned before the question is known, "agnostic").

Covers agnostic calibration (every registered scorer, KVzip included), the recorded fields, old profiles
without a setting, and the refusal of a mismatch in ``depthkv.press``, ``depthkv eval``, ``depthkv allocate``
and ``generate``/``compress`` -- one error line, before any model work or pruning -- unless forced.
Tiny random Llama + byte-level tokenizer built in-process (no downloads).
"""

from __future__ import annotations

import json

import pytest
import torch

import depthkv
import depthkv.cli as cli
from depthkv.allocation.profile import KIND, SCHEMA_VERSION, Profile, ProfileError
from depthkv.calibration.run import CalibrationConfig, calibrate
from depthkv.cli import main
from depthkv.eval import EvalConfig, EvalError
from depthkv.scorers import SCORERS
from tests.test_cli import PROMPT_TEXT, one_error_line, tiny_lm


@pytest.fixture(scope="module", autouse=True)
def one_thread(single_thread):
    """Tiny tensors: one thread (see conftest.single_thread)."""


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture
def use_tiny(monkeypatch, lm):
    monkeypatch.setattr(cli, "load", lambda args: lm)


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model must not be loaded"))


def write_profile(lm, path, scorer: str | None = "snapkv", setting: str | None = "aware"):
    """A schema-valid profile for the tiny model (layer 1 the sensitive one); ``setting=None`` writes a file
    as older versions did, without the field."""
    from depthkv.models import model_identity

    mean = [[0.01, 0.03], [0.4, 0.9], [0.02, 0.05], [0.05, 0.1]]
    data = {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "model": model_identity(lm.model, lm.name),
        "probe_ratios": [0.5, 1.0], "protection": {"n_sink": 4, "n_recent": 16},
        "curves": {"kl": {"mean": mean, "lo": mean, "hi": mean}}, "infonce_per_layer": None,
        "data": {"description": "hand-made", "n_samples": 2, "tasks": ["needle"],
                 "sample_ids": ["needle/calib/s0/00000-deadbeef"]},
    }
    if scorer is not None:
        data["scorer"] = {"name": scorer, "options": {}}
    if setting is not None:
        data["setting"] = setting
    path.write_text(json.dumps(data))
    return path


def calib_config(**kw) -> CalibrationConfig:
    base = dict(probe_ratios=(0.5, 1.0), samples=2, context_tokens=200, data="needle", proxy=False, n_perm=50,
                n_boot=20, max_answer_tokens=4, n_sink=2, n_recent=4)
    base.update(kw)
    return CalibrationConfig(**base)


# ---------------------------------------------------------------------------------------------- calibration


def test_agnostic_calibration_prunes_the_context_and_records_the_setting(lm, tmp_path):
    aware = calibrate(lm, calib_config(setting="aware"), progress=False)
    agnostic = calibrate(lm, calib_config(setting="agnostic"), progress=False)
    assert (aware.setting, agnostic.setting) == ("aware", "agnostic")
    assert agnostic.data["setting"] == "agnostic" and agnostic.data["config"]["setting"] == "agnostic"
    assert agnostic.data["scorer"]["name"] == "snapkv" and agnostic.data["scorer"]["options"] == {}
    # same samples, same whole prompts; agnostic prunes only the context part (the question follows it)
    assert agnostic.data["data"]["sample_ids"] == aware.data["data"]["sample_ids"]
    assert agnostic.data["data"]["prompt_tokens"] == aware.data["data"]["prompt_tokens"]
    q_len = [a - b for a, b in zip(aware.data["context_lens"], agnostic.data["context_lens"])]
    assert all(q > 5 for q in q_len)  # the question and the chat turn's end were not prefilled
    assert agnostic.data["data"]["sha256"] != aware.data["data"]["sha256"]
    assert agnostic.curve().shape == aware.curve().shape == (4, 2)
    assert agnostic.curve().max() > 0 and not torch.allclose(torch.tensor(agnostic.curve()),
                                                             torch.tensor(aware.curve()))
    agnostic.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json").setting == "agnostic"


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_agnostic_calibration_with_every_scorer(lm, scorer):
    """Every registered scorer calibrates, KVzip too (its repeat prompt bound from the tokenizer)."""
    prof = calibrate(lm, calib_config(scorer=scorer, setting="agnostic", samples=1), progress=False)
    assert prof.scorer_name == scorer and prof.setting == "agnostic"
    assert prof.curve().shape == (4, 2) and (prof.curve() >= -1e-6).all()
    if scorer == "kvzip":
        assert "prompt_ids=(" in prof.data["scorer"]["repr"]  # bound, not left without its prompt


def test_calibrate_rejects_an_unknown_setting(lm):
    with pytest.raises(ValueError, match="unknown calibration setting 'sideways'"):
        calibrate(lm, calib_config(setting="sideways"), progress=False)


def test_cli_calibrate_agnostic_kvzip(tmp_path, capsys, use_tiny):
    out = tmp_path / "p.json"
    rc = main(["calibrate", "--setting", "agnostic", "--scorer", "kvzip", "--data", "needle", "--samples", "2",
               "--context-tokens", "200", "--probe-ratios", "0.5,1", "--no-proxy", "--permutations", "50",
               "--n-sink", "2", "--n-recent", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    prof = Profile.load(out)
    assert (prof.scorer_name, prof.setting) == ("kvzip", "agnostic")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # a usage error: argparse's one line, exit code 2
        main(["calibrate", "--setting", "both", "--out", str(tmp_path / "q.json")])
    assert exc.value.code == 2 and "invalid choice: 'both'" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- the profile


def test_check_use_message_and_force(lm, tmp_path):
    prof = Profile.load(write_profile(lm, tmp_path / "p.json"))
    prof.check_use("snapkv", "aware")
    prof.check_use(None, "aware")
    prof.check_use("snapkv", None)
    with pytest.raises(ProfileError) as exc:
        prof.check_use("h2o", "agnostic")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "'snapkv' in the aware setting" in msg and "'h2o' in the agnostic setting" in msg
    assert "depthkv calibrate --scorer h2o --setting agnostic" in msg and "--force-profile" in msg
    with pytest.raises(ProfileError, match="scorer 'snapkv' in the agnostic setting"):
        prof.check_use("snapkv", "agnostic")
    with pytest.raises(ProfileError, match="scorer 'knorm' in the aware setting"):
        prof.check_use("knorm", "aware")
    prof.check_use("h2o", "agnostic", force=True)
    with pytest.raises(ProfileError, match="unknown setting 'both'"):
        prof.check_use("snapkv", "both", force=True)


def test_old_profile_without_setting_reads_as_aware(lm, tmp_path):
    prof = Profile.load(write_profile(lm, tmp_path / "old.json", setting=None))
    assert prof.setting == "aware" and "setting" not in prof.data
    prof.check_use("snapkv", "aware")
    with pytest.raises(ProfileError, match="in the aware setting but is used .* agnostic"):
        prof.check_use("snapkv", "agnostic")
    # a hand-made file without a scorer: only the setting can be checked
    bare = Profile.load(write_profile(lm, tmp_path / "bare.json", scorer=None, setting=None))
    bare.check_use("h2o", "aware")
    with pytest.raises(ProfileError, match="calibrate one with `depthkv calibrate --scorer h2o --setting agnostic`"):
        bare.check_use("h2o", "agnostic")


def test_profile_with_a_bad_setting_is_refused(lm, tmp_path):
    path = write_profile(lm, tmp_path / "p.json", setting="sideways")
    with pytest.raises(ProfileError, match="setting 'sideways'"):
        Profile.load(path)


# ---------------------------------------------------------------------------------------------- press


def _ids(n: int = 96) -> torch.Tensor:
    return torch.randint(3, 260, (1, n), generator=torch.Generator().manual_seed(0))


class Forwards:
    """Counts the model's forwards: a refusal must come before the first one."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


PRESS = dict(ratio=0.5, n_sink=2, n_recent=4)


def test_press_refuses_a_mismatch_at_use_before_pruning(lm, tmp_path):
    model = lm.model
    aware = write_profile(lm, tmp_path / "aware.json")
    agnostic = write_profile(lm, tmp_path / "agnostic.json", setting="agnostic")
    ids = _ids()
    p = depthkv.press(model, "snapkv", profile=aware, **PRESS)
    with Forwards(model) as f, pytest.raises(ProfileError, match="used with scorer 'snapkv' in the agnostic") as exc:
        p.compress(ids)
    assert f.n == 0 and "\n" not in str(exc.value)
    with p:  # generate with the question in the prompt: how it was calibrated
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 2 and p.budgets is not None and p.budgets.strategy == "optimal"
    for mode in ({}, {"mode": "chunked", "chunk_size": 32}):
        q = depthkv.press(model, "snapkv", profile=agnostic, **PRESS, **mode)
        with q, Forwards(model) as f, pytest.raises(ProfileError, match="used with scorer 'snapkv' in the aware"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
        assert f.n == 0
        comp = q.compress(ids)  # agnostic use of an agnostic profile
        assert sum(comp.budgets.tokens) == round(4 * 96 * 0.5)
    assert "generate" not in vars(model)  # every press left the model as found


def test_press_setting_checks_at_construction_and_force_overrides(lm, tmp_path):
    model = lm.model
    aware = write_profile(lm, tmp_path / "aware.json")
    with pytest.raises(ProfileError, match="used with scorer 'snapkv' in the agnostic setting"):
        depthkv.press(model, "snapkv", profile=aware, setting="agnostic", **PRESS)
    with pytest.raises(ProfileError, match="calibrate one with `depthkv calibrate --scorer h2o --setting aware`"):
        depthkv.press(model, "h2o", profile=aware, setting="aware", **PRESS)
    with pytest.raises(ValueError, match="setting must be"):
        depthkv.press(model, "snapkv", profile=aware, setting="both", **PRESS)
    depthkv.press(model, "snapkv", profile=aware, setting="aware", **PRESS)
    forced = depthkv.press(model, "h2o", profile=aware, setting="agnostic", force_profile=True,
                           strategy="optimal", head_budgets=False, **PRESS)
    comp = forced.compress(_ids())
    assert comp.budgets.strategy == "optimal" and comp.budgets.tokens[1] > comp.budgets.tokens[0]
    # left open, the agnostic setting splits from each input's scores on the profile's floors, per head
    default = depthkv.press(model, "h2o", profile=aware, setting="agnostic", force_profile=True, **PRESS)
    assert (default.config.strategy, default.config.head_budgets) == ("adaptive", True)
    assert sum(default.compress(_ids()).budgets.tokens) == sum(comp.budgets.tokens)


# ---------------------------------------------------------------------------------------------- eval


def _eval_config(profile, **kw) -> EvalConfig:
    base = dict(model="tiny-llama", tasks=("needle",), methods=("uniform", "optimal"), scorers=("snapkv",),
                ratios=(0.5,), samples=1, context_tokens=200, settings=("aware",), profile=str(profile),
                max_new_tokens=2, n_sink=2, n_recent=4)
    base.update(kw)
    return EvalConfig(**base)


def test_eval_refuses_grid_cells_the_profile_was_not_calibrated_for(lm, tmp_path):
    prof = write_profile(lm, tmp_path / "aware.json")
    _eval_config(prof).validate()
    for kw, want in (({"settings": ("aware", "agnostic")}, "'snapkv' in the agnostic setting"),
                     ({"scorers": ("snapkv", "h2o")}, "'h2o' in the aware setting")):
        with pytest.raises(EvalError, match=want) as exc:
            _eval_config(prof, **kw).validate()
        assert "\n" not in str(exc.value) and str(prof) in str(exc.value)
    # methods that do not read the profile may run in any setting with any scorer
    _eval_config(prof, methods=("full", "uniform", "pyramid"), settings=("agnostic",), scorers=("h2o",)).validate()
    forced = _eval_config(prof, settings=("aware", "agnostic"), scorers=("snapkv", "h2o"), force_profile=True)
    forced.validate()
    assert "--force-profile" in forced.command_line()
    assert "force_profile" not in forced.run_record()  # resuming does not depend on it: it changes no result


def test_cli_eval_mismatch_is_one_line_before_loading(lm, tmp_path, capsys, no_model):
    prof = write_profile(lm, tmp_path / "aware.json")
    out = tmp_path / "run"
    rc = main(["eval", "--tasks", "needle", "--methods", "uniform,optimal", "--settings", "agnostic",
               "--profile", str(prof), "--out", str(out)])
    assert rc == 2 and not out.exists()
    line = one_error_line(capsys.readouterr().err)
    assert "in the agnostic setting" in line and "--setting agnostic" in line


def test_forced_eval_runs_and_records_it(lm, tmp_path):
    from depthkv.eval import run_eval

    prof = write_profile(lm, tmp_path / "aware.json")
    cfg = _eval_config(prof, settings=("agnostic",), force_profile=True)
    res = run_eval(lm, cfg, tmp_path / "run", progress=False)
    assert {r["method"] for r in res.rows} == {"uniform", "optimal"}
    assert all(r["status"] == "ok" and r["setting"] == "agnostic" for r in res.rows)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["force_profile"] is True and "--force-profile" in config["command"]
    with pytest.raises(EvalError, match="agnostic setting"):  # resuming unforced is refused, not silently run
        run_eval(lm, _eval_config(prof, settings=("agnostic",)), tmp_path / "run", progress=False)


# ---------------------------------------------------------------------------------------------- allocate / CLI


def test_allocate_checks_scorer_and_setting_when_given(lm, tmp_path, capsys):
    prof = write_profile(lm, tmp_path / "p.json", setting="agnostic")
    base = ["allocate", "--profile", str(prof), "--ratio", "0.5", "--context-tokens", "200", "--min-tokens", "4"]
    assert main(base) == 0
    assert "calibrated with scorer snapkv in the agnostic setting" in capsys.readouterr().out
    assert main([*base, "--scorer", "snapkv", "--setting", "agnostic"]) == 0
    capsys.readouterr()
    out = tmp_path / "b.json"
    assert main([*base, "--setting", "aware", "--out", str(out)]) == 2 and not out.exists()
    assert "--scorer snapkv --setting aware" in one_error_line(capsys.readouterr().err)
    assert main([*base, "--scorer", "h2o"]) == 2
    assert "'h2o' in the agnostic setting" in one_error_line(capsys.readouterr().err)
    assert main([*base, "--scorer", "h2o", "--setting", "aware", "--force-profile", "--out", str(out)]) == 0
    assert out.exists()
    capsys.readouterr()
    assert main(["allocate", "--layers", "4", "--ratio", "0.5", "--setting", "aware"]) == 2
    assert "give one" in one_error_line(capsys.readouterr().err)


def test_generate_and_compress_refuse_before_loading(lm, tmp_path, capsys, no_model):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT_TEXT)
    aware = write_profile(lm, tmp_path / "aware.json")
    agnostic = write_profile(lm, tmp_path / "agnostic.json", setting="agnostic")
    out = tmp_path / "ctx.dkv"
    assert main(["generate", "--profile", str(agnostic), "--prompt-file", str(prompt)]) == 2
    assert "'snapkv' in the aware setting" in one_error_line(capsys.readouterr().err)
    assert main(["compress", "--profile", str(aware), "--context-file", str(prompt), "--out", str(out)]) == 2
    assert "'kvzip' in the agnostic setting" in one_error_line(capsys.readouterr().err)  # compress's default
    assert main(["generate", "--scorer", "h2o", "--profile", str(aware), "--prompt-file", str(prompt)]) == 2
    assert "--scorer h2o --setting aware" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_generate_and_compress_with_force_or_a_matching_profile(lm, tmp_path, capsys, use_tiny):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT_TEXT)
    agnostic = write_profile(lm, tmp_path / "agnostic.json", setting="agnostic")
    common = ["--ratio", "0.5", "--n-sink", "2", "--n-recent", "4"]
    assert main(["generate", "--profile", str(agnostic), "--force-profile", "--prompt-file", str(prompt),
                 "--max-new-tokens", "2", *common]) == 0, capsys.readouterr().err
    out = tmp_path / "ctx.dkv"
    assert main(["compress", "--scorer", "snapkv", "--profile", str(agnostic), "--context-file", str(prompt),
                 "--out", str(out), *common]) == 0, capsys.readouterr().err
    assert out.exists()


@pytest.mark.parametrize("method", ["optimal-joint", "adaptive-joint+heads"])
def test_eval_refuses_ratios_the_profile_was_not_refined_at(lm, tmp_path, method):
    """Before any model work: a refined split exists per ratio; a grid ratio without one is one clear line."""
    prof = write_profile(lm, tmp_path / "aware.json")
    with pytest.raises(EvalError, match="no refined budgets for ratio 0.8 .*refined ratios: none"):
        _eval_config(prof, methods=("full", method), ratios=(0.8,)).validate()
    data = json.loads(prof.read_text())
    data["refined"] = {"0.8": {"shares": [0.3, 0.1, 0.3, 0.1]}}
    prof.write_text(json.dumps(data))
    _eval_config(prof, methods=("full", method), ratios=(0.8,)).validate()
    with pytest.raises(EvalError, match="no refined budgets for ratio 0.6 .*refined ratios: 0.8") as exc:
        _eval_config(prof, methods=("full", method), ratios=(0.6, 0.8)).validate()
    assert "depthkv refine" in str(exc.value) and "\n" not in str(exc.value)
