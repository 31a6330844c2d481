"""Benchmark: MB-MPO (Clavera et al. 2018) beside ME-TRPO on the same CPU-scale setting, and its meta-step speed.

Each seed runs `python -m algos.mb_mpo` as its own process, pinned to one core (`--parallel` of them at a time,
on cores 0, 1, ...). The evaluation curve (the deterministic pre-update policy, 5 real episodes of T steps) is read
from the run's metrics.jsonl, so a run stopped by `--max-minutes` still contributes the part it finished (marked
partial). The plot puts ME-TRPO's curve from its own benchmark (benchmarks/me_trpo.py, read with
harness.load_results("me_trpo")) beside MB-MPO's when that result exists.

Settings (`--setting`):
    cpu    ME-TRPO's CPU setting (benchmarks/me_trpo.py CPU_SETTING): HalfCheetah-v5, T = 100, 30k real steps,
           models 2x256 (the authors 2x512). MB-MPO's own sizes scaled down alike: meta-batch 10 = 2 tasks per
           model (20 = 4) so that one iteration is 10 x 100 = 1000 real steps, ME-TRPO's CPU iteration;
           10 imagined trajectories per task (50) = 10k imagined steps per sampling, half of ME-TRPO's CPU
           20000 per TRPO iteration because a meta step samples twice (before and after adaptation); 10 meta
           steps per iteration (30); at most 50 model epochs per fit (500: the rolling rule with persistence
           0.99 rarely stops a fit before a few hundred epochs, and a 30k-row epoch is about 1 s here); the
           5000 random steps, the inner step 0.001, KL 0.01, gamma 0.99, the 1e5 buffer and the ensemble of 5
           are the authors'. About 10-15 minutes per seed on one core.
    paper  the authors' configuration (mb_mpo_train.py) for HalfCheetah-v5: T = 200, 100k real steps, 2x512
           models, 20 tasks x 50 trajectories, 30 meta steps, 500 model epochs; runs unchanged on a GPU
           (jax[cuda]); on this CPU only `--speed` (the cost per meta step) is practical.

`--speed` instead times, in this process, one jitted meta step of the chosen setting, its imagined sampling
alone and one model epoch on the run's largest buffer, and reports seconds per call (and the resulting upper
bound on an iteration: meta steps x step + max epochs x epoch) and the sampling's achieved GFLOP/s (counted
from the layer sizes: M N T rows through the model and the policy) against the XLA fp32 matmul rate it
measures here (pin it to one core: `taskset -c 0`).

Run:
    python -m benchmarks.mb_mpo --quick                          # 1 seed, 8k steps, a few minutes
    python -m benchmarks.mb_mpo --seeds 1 2 3 --parallel 2 --max-minutes 10 --save   # the CPU comparison
    python -m benchmarks.mb_mpo --speed                          # seconds per meta step, GFLOP/s
    python -m benchmarks.mb_mpo --speed --setting paper

Writes mb_mpo.json (mb_mpo_partial.json while running, mb_mpo_speed.json) and mb_mpo.png to benchmarks/out/
(with --save: benchmarks/results/ and benchmarks/plots/).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.me_trpo import CPU_SETTING as ME_TRPO_CPU  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# ME-TRPO's env, horizon, budget and model width; MB-MPO's own sizes scaled down (see the docstring).
CPU_SETTING = dict(env_id=ME_TRPO_CPU["env_id"], horizon=ME_TRPO_CPU["horizon"],
                   total_timesteps=ME_TRPO_CPU["total_timesteps"], model_hidden=ME_TRPO_CPU["model_hidden"],
                   meta_batch=10, trajectories_per_task=10, meta_steps=10, model_max_epochs=50)
PAPER_SETTING = dict(env_id="HalfCheetah-v5")  # everything else: algos/mb_mpo.py's defaults for the env


def setting_fields(setting: str) -> dict:
    return dict(CPU_SETTING if setting == "cpu" else PAPER_SETTING)


def flags(setting: str) -> list[str]:
    return harness.as_flags(setting_fields(setting)) + ["--eval-episodes", "5"]


def run_curves(a) -> dict:
    jobs = {s: (flags(a.setting) + ["--seed", str(s), "--exp-name", "bench"]
                + (["--total-timesteps", str(a.steps)] if a.steps else []), {"seed": s}) for s in a.seeds}
    keys = {"eval_return": "eval/return", "adapted_return": "train/episode_return",
            "post_update_imagined": "meta/return/post_update", "model_epochs": "model/epochs",
            "wall_seconds": "time", "meta_step_seconds": "time/meta_step", "model_seconds": "time/model_train"}
    save = lambda done: harness.save_results(a.name + "_partial", {"setting": a.setting, "runs": list(done.values())})
    return harness.run_pinned(jobs, "algos.mb_mpo", a.parallel, a.max_minutes, keys, "mb_mpo_bench_", save)


def me_trpo_runs() -> list[dict] | None:
    """ME-TRPO's per-seed curves on the same setting, from its benchmark's results (None if not there)."""
    try:
        saved = harness.load_results("me_trpo")
    except FileNotFoundError:
        return None
    if saved.get("setting") != "cpu":
        return None
    return saved["results"].get(CPU_SETTING["env_id"], {}).get("me_trpo", {}).get("runs")


def curve_stats(runs: list[dict]) -> dict | None:
    """Mean curve over the seeds up to the last evaluation all of them reached."""
    n = min((len(r["steps"]) for r in runs), default=0)
    if n == 0:
        return None
    x = np.asarray(runs[0]["steps"][:n])
    curves = np.asarray([r["eval_return"][:n] for r in runs], float)
    return {"x": x, "curves": curves, "finals": curves[:, -1], "final_step": int(x[-1]),
            "partial": not all(r.get("finished", True) for r in runs),
            "wall": [r["wall_seconds"][n - 1] for r in runs]}


def summarise(a, done: dict) -> None:
    runs = [done[s] for s in a.seeds if s in done]
    ours = curve_stats(runs)
    theirs_runs = me_trpo_runs()
    theirs = curve_stats(theirs_runs) if theirs_runs else None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    results, headline = {"setting": a.setting, "cpu_setting": CPU_SETTING, "seeds": a.seeds, "runs": runs}, []
    for name, st, color in (("MB-MPO", ours, "C0"), ("ME-TRPO", theirs, "C1")):
        if st is None:
            continue
        tag = " (partial: runs stopped by --max-minutes)" if st["partial"] else ""
        n = len(st["curves"])
        label = f"{name}: mean of {n} seeds, band 1 s.e.{tag}" if n > 1 else f"{name}: 1 seed{tag}"
        harness.plot_curve(ax, st["x"], st["curves"], label, color=color)
        for c in st["curves"]:
            ax.plot(st["x"], c, lw=0.5, alpha=0.35, color=color)
        key = name.lower().replace("-", "_")
        results[key] = {"final_step": st["final_step"], "finals": st["finals"].tolist(), "partial": st["partial"],
                        **harness.final_mean_std(st["finals"]), "wall_seconds": st["wall"]}
    if ours is not None and theirs is not None:
        # Compare at the last real step both reached (the curves are on the same 1000-step grid from 6k on).
        common = min(ours["final_step"], theirs["final_step"])
        at = lambda st: st["curves"][:, int(np.searchsorted(st["x"], common, side="right")) - 1]  # noqa: E731
        results["comparison"] = {"step": common, "mb_mpo": at(ours).tolist(), "me_trpo": at(theirs).tolist(),
                                 "mb_mpo_mean": float(at(ours).mean()), "me_trpo_mean": float(at(theirs).mean())}
        print(f"at {common} real steps: MB-MPO {at(ours).mean():.1f} vs ME-TRPO {at(theirs).mean():.1f}", flush=True)
    if ours is not None:
        headline.append({"algorithm": "MB-MPO", "setting": f"{CPU_SETTING['env_id']} T={CPU_SETTING['horizon']}, "
                                                            f"{ours['final_step'] // 1000}k steps ({a.setting} setting)"
                                                            + (", partial" if ours["partial"] else ""),
                         "metric": "eval return (5 episodes of T steps, deterministic pre-update policy), mean",
                         "ours": f"{ours['finals'].mean():.0f} (min {ours['finals'].min():.0f}, max "
                                 f"{ours['finals'].max():.0f})",
                         "reference": (f"ME-TRPO {results['comparison']['me_trpo_mean']:.0f} at "
                                       f"{results['comparison']['step'] // 1000}k" if "comparison" in results
                                       else "ME-TRPO: no result yet"),
                         "seeds": len(runs), "wall_seconds": round(float(np.mean(ours["wall"])))})
    results["headline"] = headline
    ax.set_title(f"{CPU_SETTING['env_id']}, T={CPU_SETTING['horizon']} ({a.setting} setting; thin lines: each seed)")
    ax.set_xlabel("real env steps")
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda val, _: f"{val / 1000:g}k"))
    ax.xaxis.set_major_locator(mticker.MaxNLocator(5))
    ax.set_ylabel("eval return")
    ax.legend(fontsize=8)
    harness.save_results(a.name, results)
    harness.save_figure(fig, a.name)


def speed(a) -> None:
    """Seconds per jitted meta step ([3]-[6]) and per imagined sampling ([3] alone: M N trajectories of T steps,
    one per task's own model, with advantages), and the sampling's GFLOP/s from the layer sizes (XLA's cost
    analysis counts a scan's body once, not per step). The inner and outer steps are policy-bound (a 32x32 net)."""
    import jax
    import jax.numpy as jnp

    from algos import mb_mpo as m
    from common import ensembles as ens

    args = m.resolve(m.Args(**setting_fields(a.setting)))
    env = m.make_task_env(args.env_id, args.horizon)
    task = m.make_task(args, env)
    dims = task.dims
    cfg, policy = m.ensemble_config(args, dims), m.Policy(dims.act_dim, args.policy_hidden)
    key = jax.random.PRNGKey(0)
    theta = policy.init(key, jnp.zeros((1, dims.obs_dim - dims.skip)))
    model = ens.create(cfg, key)
    # a fitted normaliser's scale, so that the imagined states stay in a realistic range
    model = model._replace(norm=model.norm._replace(out_std=0.01 * model.norm.out_std))
    pool = jnp.asarray(m.draw_starts(env, 1000))
    rows = args.meta_batch * args.trajectories_per_task * dims.horizon
    per_row = harness.mlp_flops([cfg.in_dim, cfg.hidden, cfg.hidden, cfg.out_dim]) + harness.mlp_flops(
        [dims.obs_dim - dims.skip, args.policy_hidden, args.policy_hidden, dims.act_dim])
    sample = jax.jit(m.imagine_tasks, static_argnums=(0, 1, 2, 3), static_argnames=("per_task",))
    res = {"rows_per_sampling": rows, "gflop_per_sampling": rows * per_row / 1e9}
    sec = harness.timed_call(sample, (task, cfg, policy, args, theta, model, pool, key), a.reps, per_task=False)
    res["sampling"] = {"seconds": sec, "gflop_per_s": rows * per_row / 1e9 / sec}
    step = harness.timed_call(m.meta_step, (task, cfg, policy, args, theta, model, pool, key), a.reps)
    res["meta_step"] = {"seconds": step, "imagined_steps": 2 * rows,
                        "sampling_share": 2 * sec / step}
    # one model epoch on the largest D of the run (min(total steps, buffer) rows), random data of the right shape
    rows_d = min(args.total_timesteps, args.buffer_size)
    data_rng = np.random.default_rng(0)
    xd = data_rng.normal(size=(rows_d, cfg.in_dim)).astype(np.float32)
    yd = data_rng.normal(size=(rows_d, cfg.out_dim)).astype(np.float32)
    ens.train(cfg, model, xd, yd, np.random.default_rng(0), max_epochs=1)  # compile
    tic = time.perf_counter()
    ens.train(cfg, model, xd, yd, np.random.default_rng(0), max_epochs=2)
    res["model_epoch"] = {"seconds": (time.perf_counter() - tic) / 2, "rows": rows_d}
    res["iteration_upper_bound_seconds"] = args.meta_steps * step + args.model_max_epochs * res["model_epoch"][
        "seconds"]
    peak = res["matmul_gflop_per_s"] = harness.matmul_rate()
    res["sampling"]["fraction_of_matmul"] = res["sampling"]["gflop_per_s"] / peak
    print(f"{args.env_id} {a.setting}: meta step {step:.2f} s ({2 * rows:,} imagined steps, sampling "
          f"{2 * sec / step:.0%} of it); one sampling {sec * 1000:.0f} ms, {rows * per_row / 1e9:.2f} GFLOP, "
          f"{res['sampling']['gflop_per_s']:.1f} GFLOP/s = {res['sampling']['fraction_of_matmul']:.0%} of the XLA "
          f"fp32 matmul rate here ({peak:.1f} GFLOP/s, {jax.devices()[0].device_kind}, "
          f"{len(os.sched_getaffinity(0))} core(s) allowed); a model epoch on {rows_d:,} rows "
          f"{res['model_epoch']['seconds']:.2f} s, so an iteration takes at most {args.meta_steps} x "
          f"{step:.2f} + {args.model_max_epochs} x {res['model_epoch']['seconds']:.2f} = "
          f"{res['iteration_upper_bound_seconds']:.0f} s", flush=True)
    harness.save_results(a.name + "_speed", {"setting": a.setting, "args": {k: getattr(args, k) for k in (
        "horizon", "model_hidden", "meta_batch", "trajectories_per_task", "meta_steps", "ensemble_size",
        "model_max_epochs", "total_timesteps")},
        "results": res})


def main(argv=None):
    p = harness.parser("mb_mpo", __doc__, seeds=[1, 2, 3],
                       quick={"seeds": [1], "steps": 8000, "max_minutes": 6, "reps": 3})
    p.add_argument("--setting", choices=["cpu", "paper"], default="cpu")
    p.add_argument("--steps", type=int, default=None, help="override the setting's real-step budget")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time, each pinned to its own core")
    p.add_argument("--max-minutes", type=float, default=None, help="stop each run after this long (partial)")
    p.add_argument("--speed", action="store_true", help="time one meta step and its sampling instead")
    p.add_argument("--reps", type=int, default=5, help="--speed: timed calls")
    p.add_argument("--summarise", default=None, help="rebuild the summary and plot from a saved results file "
                                                     "(e.g. benchmarks/out/mb_mpo_partial.json); runs nothing")
    a = harness.parse(p, argv)
    a.name = "mb_mpo" + (f"_{a.setting}" if a.setting != "cpu" else "")
    if a.speed:
        speed(a)
        return
    if a.summarise:
        saved = json.loads(Path(a.summarise).read_text())
        summarise(a, {r["seed"]: r for r in saved["runs"]})
        return
    summarise(a, run_curves(a))


if __name__ == "__main__":
    main()
