"""``depthkv demo``: the README's main job end to end on SmolLM2-135M, sized for ~10 minutes on 2 CPUs.

1. calibrate: single-layer ablations on ``calib_samples`` calibration samples (split "calib") ->
   ``OUT/profile.json`` (+ sensitivity plot); reused on a rerun when its settings are unchanged;
2. allocate: print the optimal vs uniform budget vectors at each ratio for an evaluation-length context;
3. eval: needle + multikey (512 and 1024 tokens) x {full, uniform, pyramid, optimal} x snapkv x ratios {0.5, 0.8}, query-aware,
   into ``OUT/eval`` (resumable: Ctrl-C and rerun);
4. report: ``OUT/report.html``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class DemoConfig:
    model: str = "smollm2-135m"
    samples: int = 6  # evaluation samples per task
    context_tokens: int = 1024
    calib_samples: int = 8
    calib_context_tokens: int = 512
    probe_ratios: tuple[float, ...] = (0.5, 0.9, 1.0)
    tasks: tuple[str, ...] = ("needle", "multikey")
    methods: tuple[str, ...] = ("full", "uniform", "pyramid", "optimal")
    scorers: tuple[str, ...] = ("snapkv",)
    ratios: tuple[float, ...] = (0.5, 0.8)
    settings: tuple[str, ...] = ("aware",)
    mixed_lengths: bool = True  # needle tasks at context_tokens/2 and context_tokens (depth x length heatmap)
    seed: int = 0
    out: str = "depthkv-demo"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU


def _calibration(lm, cfg: DemoConfig, path: Path, force: bool):
    from depthkv.allocation.profile import Profile, ProfileError
    from depthkv.calibration.report import plot_sensitivity, print_summary
    from depthkv.calibration.run import CalibrationConfig, calibrate

    ccfg = CalibrationConfig(scorer=cfg.scorers[0], probe_ratios=cfg.probe_ratios, samples=cfg.calib_samples,
                             context_tokens=cfg.calib_context_tokens, seed=cfg.seed, n_perm=2000, proxy=False)
    wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(ccfg).items()}
    if path.exists() and not force:
        try:
            prof = Profile.load(path, lm.identity)
            if prof.data.get("config") == wanted:
                print(f"[demo] 1/4 calibrate: reusing {path}")
                return prof
        except ProfileError:
            pass
    t0 = time.perf_counter()
    print(f"[demo] 1/4 calibrate: {cfg.calib_samples} samples x ~{cfg.calib_context_tokens} tokens, "
          f"probe ratios {list(cfg.probe_ratios)}, scorer {ccfg.scorer}")
    prof = calibrate(lm, ccfg)
    prof.save(path)
    print_summary(prof)
    plot_sensitivity(prof, path.parent / "plots")
    print(f"[demo] profile written to {path} ({time.perf_counter() - t0:.0f} s)")
    return prof


def _task_options(cfg: DemoConfig) -> dict:
    if not cfg.mixed_lengths:
        return {}
    lengths = [cfg.context_tokens // 2, cfg.context_tokens]
    return {t: {"lengths": lengths} for t in cfg.tasks if t in ("needle", "multikey")}


def run_demo(cfg: DemoConfig | None = None, *, force: bool = False, progress: bool = True) -> Path:
    """Run the demo; returns the path of the HTML report."""
    from depthkv.allocation import BudgetSpec
    from depthkv.eval.report import build_report
    from depthkv.eval.runner import EvalConfig, run_eval
    from depthkv.eval.summary import print_summary
    from depthkv.models import load_model

    cfg = cfg or DemoConfig()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    profile_path = out / "profile.json"
    prof = _calibration(lm, cfg, profile_path, force)

    print(f"[demo] 2/4 allocate: optimal vs uniform tokens per layer for a {cfg.context_tokens}-token context")
    for r in cfg.ratios:
        for strategy in ("uniform", "optimal"):
            b = BudgetSpec(r, strategy, prof, min_tokens=20).for_context(prof.n_layers, cfg.context_tokens)
            print(f"  ratio {r:g} {strategy:>8}: {' '.join(str(t) for t in b.tokens)}")

    ecfg = EvalConfig(model=cfg.model, tasks=cfg.tasks, methods=cfg.methods, scorers=cfg.scorers,
                      ratios=cfg.ratios, samples=cfg.samples, context_tokens=cfg.context_tokens,
                      settings=cfg.settings, profile=str(profile_path), seed=cfg.seed,
                      task_options=_task_options(cfg), dtype=str(lm.model.dtype).removeprefix("torch."))
    print(f"[demo] 3/4 eval: {', '.join(cfg.tasks)} x {', '.join(cfg.methods)} x ratios "
          f"{', '.join(f'{r:g}' for r in cfg.ratios)}, {cfg.samples} samples per task\n  = {ecfg.command_line(out / 'eval')}")
    res = run_eval(lm, ecfg, out / "eval", force=force, progress=progress)
    print_summary(res.cells, title=f"{lm.name}: mean [95 % CI]; diff = method - uniform (paired over samples)")

    print("[demo] 4/4 report")
    path = build_report([res.folder], out / "report.html")
    print(f"[demo] done in {time.perf_counter() - t_start:.0f} s")
    print(f"[demo] report: {path.resolve()}")
    return path
