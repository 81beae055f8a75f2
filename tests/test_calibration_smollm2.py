"""Integration: calibrate SmolLM2 end to end (a few samples), reload the profile, drive generate with it."""

from __future__ import annotations

import json

from depthkv.allocation.profile import Profile
from depthkv.cli import main


def test_calibrate_smollm2_end_to_end(tmp_path, capsys):
    prof_path = tmp_path / "smol.json"
    rc = main(["calibrate", "--model", "smollm2-135m", "--samples", "3", "--context-tokens", "160",
               "--probe-ratios", "0.5,1", "--permutations", "500", "--out", str(prof_path),
               "--plots", str(tmp_path / "plots")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "permutation test" in out and "best proxy" in out
    prof = Profile.load(prof_path)
    assert prof.n_layers == 30 and prof.probe_ratios == (0.5, 1.0)
    assert len(prof.data["samples"]["kl"]) == 3
    assert prof.data["data"]["sha256"] and prof.data["timings"]["total_s"] > 0
    assert all(s.startswith(("needle", "multikey", "vartrack")) for s in prof.data["data"]["sample_ids"])
    assert (tmp_path / "plots" / "sensitivity_smollm2-135m.png").stat().st_size > 10_000

    budgets = tmp_path / "b.json"
    assert main(["allocate", "--profile", str(prof_path), "--ratio", "0.7", "--strategy", "optimal",
                 "--context-tokens", "300", "--out", str(budgets), "--plot", str(tmp_path / "alloc.png")]) == 0
    b = json.loads(budgets.read_text())
    assert sum(b["tokens"]) == round(30 * 300 * 0.3)

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Here is a list of fruits: apple, banana, cherry. " * 12 + "\nWhich fruit comes second?")
    result = tmp_path / "gen.json"
    assert main(["generate", "--model", "smollm2-135m", "--ratio", "0.7", "--profile", str(prof_path),
                 "--strategy", "optimal", "--prompt-file", str(prompt), "--max-new-tokens", "8",
                 "--json", str(result)]) == 0
    gen = json.loads(result.read_text())
    assert gen["budgets"]["strategy"] == "optimal"
    assert sum(gen["budgets"]["tokens"]) == round(30 * gen["context_tokens"] * 0.3)
    assert abs(gen["kv_bytes_kept"] / gen["kv_bytes_full"] - 0.3) < 0.01
