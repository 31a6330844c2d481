"""Benchmark: ME-TRPO and the paper's ablations (Kurutach et al. 2018, Sec. 6), and its imagined-side speed.

Each (variant, seed) runs `python -m algos.me_trpo` as its own process, pinned to one core (`--parallel` of
them at a time, on cores 0, 1, ...). The evaluation curve is read from the run's metrics.jsonl, so a run
stopped by `--max-minutes` still contributes the part it finished (marked partial). Variants:

    me_trpo     5 models, the stopping rule, TRPO        (the method)
    one_model   --ensemble-size 1                        (the paper's "ensemble vs single model")
    no_stop     --no-stopping-rule: max-policy-iters iterations every time, the last policy kept
    bptt        --policy-update bptt: backprop through the models instead of TRPO ("TRPO > BPTT")

Settings (`--setting`):
    cpu    HalfCheetah-v5, T = 100 (the authors' horizon), 1000 real steps per iteration (the authors: 3000),
           30 iterations (100), models 2x256 (2x1024), 20000 imagined steps per TRPO iteration (50000), at most
           100 TRPO iterations per policy phase (400), 200 validation starts (500: as many as the imagined
           trajectories of one TRPO iteration, 200 here), BPTT on 50 starts per step (500): the method at a
           size a 2-core CPU runs in about 10-15 minutes per seed and variant
    paper  the authors' configuration (thanard/me-trpo params-<env>.json) for HalfCheetah, Swimmer and Hopper:
           3000 real steps per iteration, 100 iterations, 2x1024 models (Swimmer 2x512), 50000 imagined steps,
           400 TRPO iterations, 500 validation starts; runs unchanged on a GPU (jax[cuda])
MB-MPO's benchmark (issue #19) uses the same env, horizon and budget (CPU_SETTING) so that the two can be
plotted together.

`--speed` instead times the imagined-side phases of the chosen setting in this process (each one jitted call:
sampling, advantages, the TRPO step, the whole TRPO iteration = the three fused, a validation check) and reports
seconds per call and, for the model-bound phases, the achieved GFLOP/s against the XLA fp32 matmul rate it
measures here (pin it to one core: `taskset -c 0`).

Run:
    python -m benchmarks.me_trpo --quick                      # me_trpo and one_model, 1 seed, 4k steps, minutes
    python -m benchmarks.me_trpo --seeds 1 2 3 --parallel 2 --save          # the CPU headline (12 runs)
    python -m benchmarks.me_trpo --setting paper --envs HalfCheetah-v5 Swimmer-v5 Hopper-v5 --variants me_trpo
    python -m benchmarks.me_trpo --speed --setting paper --envs HalfCheetah-v5

Writes me_trpo.json (or me_trpo_<tag>.json, me_trpo_speed.json) and me_trpo.png to benchmarks/out/ (with
--save: benchmarks/results/ and benchmarks/plots/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "me_trpo": [],
    "one_model": ["--ensemble-size", "1"],
    "no_stop": ["--no-stopping-rule"],
    "bptt": ["--policy-update", "bptt"],
}
LABELS = {"me_trpo": "ME-TRPO (5 models)", "one_model": "1 model", "no_stop": "no stopping rule",
          "bptt": "BPTT (5 models)"}
# The CPU-scale setting (see the docstring); MB-MPO's benchmark imports it.
CPU_SETTING = dict(env_id="HalfCheetah-v5", horizon=100, steps_per_iteration=1000, total_timesteps=30_000,
                   model_hidden=256, imagined_steps=20_000, max_policy_iters=100, validation_starts=200,
                   bptt_batch=50)
# The authors' configuration (thanard/me-trpo params/params-<env>.json); horizon and width from PAPER_CONFIGS.
PAPER_SETTING = dict(steps_per_iteration=3000, total_timesteps=300_000, imagined_steps=50_000,
                     max_policy_iters=400, validation_starts=500, bptt_batch=500)


def setting_fields(setting: str, env_id: str) -> dict:
    """algos.me_trpo Args fields of a setting (the rest are the authors' defaults)."""
    return dict(CPU_SETTING if setting == "cpu" else PAPER_SETTING, env_id=env_id)


def flags(setting: str, env_id: str) -> list[str]:
    cfg = setting_fields(setting, env_id)
    return harness.as_flags(cfg) + ["--eval-interval", str(cfg["steps_per_iteration"]), "--eval-episodes", "5"]


def run_curves(a) -> dict:
    jobs = {(env_id, v, s): (flags(a.setting, env_id) + VARIANTS[v] + ["--seed", str(s), "--exp-name", "bench"]
                             + (["--total-timesteps", str(a.steps)] if a.steps else []),
                             {"env_id": env_id, "variant": v, "seed": s})
            for env_id in a.envs for v in a.variants for s in a.seeds}
    keys = {"eval_return": "eval/return", "policy_iterations": "policy/iterations", "model_passes": "model/passes",
            "wall_seconds": "time"}
    # partial results after every finished run, so a stopped benchmark keeps what it measured
    save = lambda done: harness.save_results(a.name + "_partial", {"setting": a.setting, "runs": list(done.values())})
    return harness.run_pinned(jobs, "algos.me_trpo", a.parallel, a.max_minutes, keys, "me_trpo_bench_", save)


def summarise(a, done: dict) -> None:
    results, headline = {}, []
    fig, axes = plt.subplots(1, len(a.envs), figsize=(6 * len(a.envs), 4), squeeze=False)
    for ax, env_id in zip(axes[0], a.envs, strict=True):
        results[env_id] = {}
        # The ablations compare every variant at the same real step: the last one all runs reached.
        common = min((len(r["steps"]) for k, r in done.items() if k[0] == env_id), default=0)
        for i, v in enumerate(a.variants):
            runs = [done[(env_id, v, s)] for s in a.seeds if (env_id, v, s) in done]
            n = min((len(r["steps"]) for r in runs), default=0)
            if n == 0:
                continue
            x = np.asarray(runs[0]["steps"][:n])
            curves = np.asarray([r["eval_return"][:n] for r in runs], float)
            harness.plot_curve(ax, x, curves, f"{LABELS[v]}: mean of {len(runs)} seeds, band 1 s.e.",
                               color=f"C{i}")
            for r in runs:
                ax.plot(r["steps"], r["eval_return"], lw=0.5, alpha=0.35, color=f"C{i}")
            finals = curves[:, -1]
            wall = float(np.mean([r["wall_seconds"][n - 1] for r in runs]))
            at = curves[:, common - 1] if common > 0 else finals
            results[env_id][v] = {"runs": runs, "final_step": int(x[-1]), "finals": finals.tolist(),
                                  **harness.final_mean_std(finals), "wall_seconds_mean": wall,
                                  "common_step": int(x[common - 1]), "at_common_step": at.tolist(),
                                  "common_mean": float(at.mean()), "common_min": float(at.min()),
                                  "common_max": float(at.max())}
            headline.append({"algorithm": "ME-TRPO" if v == "me_trpo" else f"ME-TRPO ablation: {LABELS[v]}",
                             "setting": f"{env_id} T={CPU_SETTING['horizon'] if a.setting == 'cpu' else 'paper'}, "
                                        f"{int(x[common - 1]) // 1000}k steps ({a.setting} setting)",
                             "metric": "eval return (5 episodes of T steps, deterministic), mean over seeds",
                             "ours": f"{at.mean():.0f} (min {at.min():.0f}, max {at.max():.0f})",
                             "reference": "ME-TRPO (5 models) row" if v != "me_trpo" else "",
                             "seeds": len(runs), "wall_seconds": round(wall)})
        ax.set_title(f"{env_id} ({a.setting} setting; thin lines: each seed)")
        ax.set_xlabel("real env steps")
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda val, _: f"{val / 1000:g}k"))
        ax.xaxis.set_major_locator(mticker.MaxNLocator(5))
        ax.set_ylabel("eval return")
        ax.legend(fontsize=8)
    # The paper's ablations: does the method beat each ablation with non-overlapping seed spreads?
    ablations = {}
    for env_id, res in results.items():
        if "me_trpo" not in res:
            continue
        for v in ("one_model", "no_stop", "bptt"):
            if v in res:
                ours, other = res["me_trpo"], res[v]
                ablations[f"{env_id}: me_trpo vs {v}"] = {
                    "step": ours["common_step"], "me_trpo": ours["at_common_step"], v: other["at_common_step"],
                    "higher_mean": ours["common_mean"] > other["common_mean"],
                    "non_overlapping": ours["common_min"] > other["common_max"]}
    for k, v in ablations.items():
        print(f"{k}: {v}", flush=True)
    harness.save_results(a.name, {"setting": a.setting, "cpu_setting": CPU_SETTING, "paper_setting": PAPER_SETTING,
                                  "seeds": a.seeds, "results": results, "ablations": ablations,
                                  "headline": headline})
    harness.save_figure(fig, a.name)


def speed(a) -> None:
    """Seconds per jitted call of each imagined-side phase, and the achieved GFLOP/s of the model-bound ones.
    FLOPs are counted from the layer sizes (XLA's cost analysis counts a scan's body once, not per step):
    sampling N T (model + policy forward); validation check K P T (model + policy forward). The TRPO step is
    policy-bound (a 32x32 net: small matmuls), so it is reported in seconds."""
    import jax
    import jax.numpy as jnp

    from algos import me_trpo as m
    from common import ensembles as ens

    out = {}
    for env_id in a.envs:
        args = m.resolve(m.Args(**setting_fields(a.setting, env_id)))
        env = m.make_task_env(env_id, args.horizon)
        task = m.make_task(args, env)
        dims = task.dims
        cfg, policy = m.ensemble_config(args, dims), m.Policy(dims.act_dim, args.policy_hidden)
        key = jax.random.PRNGKey(0)
        params = policy.init(key, jnp.zeros((1, dims.obs_dim - dims.skip)))
        model = ens.create(cfg, key)
        pool = jnp.asarray(m.draw_starts(env, 1000))
        n = m.trajectories(args, dims)
        starts, val_starts = pool[:n], pool[: args.validation_starts]
        w = jnp.zeros(2 * (dims.obs_dim - dims.skip) + 4)
        sample = jax.jit(m.imagine, static_argnums=(0, 1, 2))
        batch = sample(task, cfg, policy, params, model, starts, key)
        adv_fn = jax.jit(m.advantages, static_argnums=(1, 3))
        adv, _ = adv_fn(batch, dims.skip, w, args.gamma)
        step_fn = jax.jit(m.trpo_step, static_argnums=(0, 4, 5))
        per_row = harness.mlp_flops([cfg.in_dim, cfg.hidden, cfg.hidden, cfg.out_dim]) + harness.mlp_flops(
            [dims.obs_dim - dims.skip, args.policy_hidden, args.policy_hidden, dims.act_dim])
        phases = {
            "sampling": (sample, (task, cfg, policy, params, model, starts, key), n * dims.horizon * per_row),
            "advantages": (adv_fn, (batch, dims.skip, w, args.gamma), None),
            "trpo_step": (step_fn, (policy, params, batch, adv, dims.skip, args), None),
            "trpo_iteration": (m.trpo_iteration, (task, cfg, policy, args, params, w, model, pool, key), None),
            "validation_check": (m.validation_check, (task, cfg, policy, args.gamma, params, model, val_starts),
                                 cfg.num_members * args.validation_starts * dims.horizon * per_row),
        }
        res = {}
        for name, (fn, call_args, flops) in phases.items():
            sec = harness.timed_call(fn, call_args, a.reps)
            res[name] = {"seconds": sec}
            line = f"{env_id} {a.setting} {name}: {sec * 1000:.1f} ms"
            if flops is not None:
                res[name].update(gflop=flops / 1e9, gflop_per_s=flops / 1e9 / sec)
                line += f", {flops / 1e9:.2f} GFLOP, {flops / 1e9 / sec:.1f} GFLOP/s"
            print(line, flush=True)
        peak = res["matmul_gflop_per_s"] = harness.matmul_rate()
        for name in ("sampling", "validation_check"):
            res[name]["fraction_of_matmul"] = res[name]["gflop_per_s"] / peak
        print(f"XLA fp32 matmul 2048x2048 here: {peak:.1f} GFLOP/s ({jax.devices()[0].device_kind}, "
              f"{len(os.sched_getaffinity(0))} core(s) allowed)", flush=True)
        out[env_id] = res
    harness.save_results(a.name + "_speed", {"setting": a.setting, "results": out})


def main(argv=None):
    p = harness.parser("me_trpo", __doc__, seeds=[1, 2, 3],
                       quick={"seeds": [1], "variants": ["me_trpo", "one_model"], "steps": 4000,
                              "max_minutes": 4, "reps": 3})
    p.add_argument("--setting", choices=["cpu", "paper"], default="cpu")
    p.add_argument("--envs", nargs="+", default=None, help="default: HalfCheetah-v5 (cpu); the three (paper)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="override the setting's real-step budget")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time, each pinned to its own core")
    p.add_argument("--max-minutes", type=float, default=None, help="stop each run after this long (partial)")
    p.add_argument("--tag", default="", help="results name suffix: me_trpo_<tag>.json")
    p.add_argument("--speed", action="store_true", help="time the imagined-side phases instead")
    p.add_argument("--reps", type=int, default=10, help="--speed: timed calls per phase")
    p.add_argument("--summarise", default=None, help="rebuild the summary and plot from a saved results file "
                                                     "(e.g. benchmarks/out/me_trpo_partial.json); runs nothing")
    a = harness.parse(p, argv)
    if a.envs is None:
        a.envs = ["HalfCheetah-v5"] if a.setting == "cpu" else ["HalfCheetah-v5", "Swimmer-v5", "Hopper-v5"]
    if a.setting == "cpu" and a.envs != ["HalfCheetah-v5"]:
        raise SystemExit("error: the cpu setting is HalfCheetah-v5 only")
    a.name = "me_trpo" + (f"_{a.setting}" if a.setting != "cpu" else "") + (f"_{a.tag}" if a.tag else "")
    if a.speed:
        speed(a)
        return
    if a.summarise:
        saved = json.loads(Path(a.summarise).read_text())
        runs = saved["runs"] if "runs" in saved else [r for res in saved["results"].values() for v in res.values()
                                                       for r in v["runs"]]
        summarise(a, {(r["env_id"], r["variant"], r["seed"]): r for r in runs})
        return
    summarise(a, run_curves(a))


if __name__ == "__main__":
    main()
