"""Benchmark: guided policy search (MDGPS and LQR-FLM) on Reacher-v5 with 4 conditions.

Main setting: the reference experiment's timing (cbfinn/gps
mjc_mdgps_example: dt 0.05 s, T = 100, five seconds per trial; here Reacher-v5
with frame_skip 5), its init_lqr initial controllers and its final-step cost.
The targets (5 samples per condition per iteration, 10 iterations = 200
trajectories = 20,000 real steps): the local controllers' mean final
fingertip distance <= 0.02, the MDGPS global policy's <= 0.03 on the training
conditions; held-out conditions reported. `--setting t50` is the earlier
timing (T = 50 at dt 0.02 s: one second, zero-gain initial controllers).
`--variant` runs a measured option (docs/gps.md): zero_init, per_condition
(MDGPS step multipliers per condition, exploded predictions excluded),
anchor_blend (the C-step anchor halfway to the previous controller),
lqr_low_noise (init_lqr's gains with the zero-gain start's noise). Reference for the
sample count (no SAC figure on Reacher-v5 with these conditions exists): the
rl-baselines3-zoo benchmark (DLR-RM, benchmark.md, one run) trains SAC on the
PyBullet reacher, ReacherBulletEnv-v0, for 300k steps (mean return 18.06 +-
9.73); GPS uses 10,000 real steps here. The tasks differ (random targets there,
4 fixed conditions here), so only the orders of magnitude compare.

Run:
    python -m benchmarks.gps --quick             # both algorithms, 1 seed, 5 iterations
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.gps --seeds 1 2 3 4 5 6 --save
    python -m benchmarks.gps --seeds 1 --algorithms lqr_flm
    python -m benchmarks.gps --iterations 20     # past the issue's budget
    python -m benchmarks.gps --seeds 1 2 3 4 5 6 --algorithms mdgps --variant per_condition --save
    python -m benchmarks.gps --seeds 1 2 3 4 5 6 --setting t50 --save

Writes gps.json and gps.png (gps_<setting>_<variant>_<N>it.* for another setting,
variant or budget; the parts that are the default are left out) to
benchmarks/out/ (with --save: benchmarks/results/ and benchmarks/plots/).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402

from algos import gps  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.harness import final_mean_std, plot_curve, save_figure, save_results, scratch_dir, timer  # noqa: E402

TARGETS = {"local": 0.02, "global_train": 0.03}
SETTINGS = {"reference": ({}, "T=100 at dt 0.05 s (reference timing), init_lqr"),
            "t50": ({"frame_skip": 2, "horizon": 50, "init": "zero"},
                    "T=50 at dt 0.02 s (earlier timing), zero-gain init")}
VARIANTS = {"default": ({}, ""), "zero_init": ({"init": "zero"}, ", zero-gain init"),
            "per_condition": ({"step_scope": "per_condition"}, ", per-condition step multipliers"),
            "anchor_blend": ({"anchor_blend": 0.5}, ", C-step anchor blended 0.5 toward the previous controller"),
            # init_lqr's noise is proportional to init_var (its gains are not): 1/6 gives Reacher's zero-gain 0.003
            "lqr_low_noise": ({"init_var": 1 / 6}, ", init_lqr with init_var 1/6 (action variance 0.003)")}
SAC_REFERENCE = {"steps": 300_000, "return": 18.062, "std": 9.729,
                 "source": "rl-baselines3-zoo benchmark.md (DLR-RM), sac, ReacherBulletEnv-v0, n_timesteps 300k"}
# "local": the final distance of this iteration's noisy training samples (for
# lqr_flm drawn from the controllers: the number the 0.02 target is judged on;
# for on-policy mdgps drawn from the global policy plus noise); "local_mean":
# the noise-free mean controllers u = K x + k after the iteration's C-step,
# one evaluation run per condition.
KEYS = {"local": "local/final_distance", "local_mean": "local/mean_controller_final_distance",
        "global_train": "global/train_final_distance", "global_test": "global/test_final_distance",
        "local_cost": "local/cost", "global_train_cost": "global/train_cost"}
LABELS = {"local": "samples", "local_mean": "mean controllers",  # mdgps samples: the policy + noise
          "global_train": "global policy, training", "global_test": "global policy, held-out"}


def run(algorithm: str, seeds: list[int], iterations: int, overrides: dict) -> dict:
    runs = []
    for seed in seeds:
        out = {}
        with scratch_dir(), timer(out):
            steps = iterations * gps.Args(algorithm=algorithm, **overrides).steps_per_iteration
            res = gps.main(gps.Args(seed=seed, algorithm=algorithm, total_timesteps=steps, **overrides))
        hist = res["history"]
        r = {"seed": seed, "samples": [h["samples"] for h in hist], "wall_seconds": out["wall_seconds"]}
        for name, key in KEYS.items():
            if key in hist[0]:
                r[name] = [h[key] for h in hist]
        runs.append(r)
        print(f"{algorithm} seed {seed}: " + ", ".join(f"{k} {r[k][-1]:.4f}" for k in KEYS if k in r)
              + f" in {out['wall_seconds']:.0f} s", flush=True)
    summary = {}
    for name in KEYS:
        if name in runs[0]:
            finals = np.array([r[name][-1] for r in runs])
            best = np.array([min(r[name]) for r in runs]) if "cost" not in name else None
            summary[name] = {**final_mean_std(finals), "per_seed_final": finals.tolist(),
                             "best_iteration_mean": None if best is None else float(best.mean())}
    return {"algorithm": algorithm, "runs": runs, "summary": summary,
            "wall_seconds_per_seed": float(np.mean([r["wall_seconds"] for r in runs]))}


def main(argv=None):
    p = harness.parser("gps", __doc__, seeds=[1, 2, 3],
                       quick={"seeds": [1], "iterations": 5})
    p.add_argument("--algorithms", nargs="+", default=["mdgps", "lqr_flm"], choices=["mdgps", "lqr_flm"])
    p.add_argument("--iterations", type=int, default=10, help="the issue's budget is 10 (20,000 real steps)")
    p.add_argument("--setting", default="reference", choices=list(SETTINGS),
                   help="reference: T = 100 at dt 0.05 s, init_lqr; t50: T = 50 at dt 0.02 s, zero-gain init")
    p.add_argument("--variant", default="default", choices=list(VARIANTS), help="a measured option (docs/gps.md)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the plot of the saved gps(_<N>it).json (this run's, else the committed one)")
    a = harness.parse(p, argv)
    overrides = SETTINGS[a.setting][0] | VARIANTS[a.variant][0]
    label = SETTINGS[a.setting][1] + VARIANTS[a.variant][1]
    defaults = gps.Args(**overrides)
    it = a.iterations
    steps = it * defaults.steps_per_iteration
    parts = [p_ for p_, d in ((a.setting, "reference"), (a.variant, "default"), (f"{it}it", "10it")) if p_ != d]
    out_name = "_".join(["gps", *parts])
    target = {k: f"target <= {v}" + ("" if it == 10 else " (at 10 iterations)") for k, v in TARGETS.items()}

    if a.replot:
        record = harness.load_results(out_name)
        return save_figure(draw(record["results"], len(record["args"]["seeds"])), out_name)
    results, headline = {}, []
    for algorithm in a.algorithms:
        r = results[algorithm] = run(algorithm, a.seeds, it, overrides)
        s = r["summary"]
        sampled = "local controllers' noisy samples" if algorithm == "lqr_flm" else "noisy samples (global policy)"
        headline.append({
            "algorithm": f"GPS ({algorithm})",
            "setting": f"Reacher-v5, 4 conditions, {label}, 5 samples, {it} iterations",
            "metric": f"final fingertip distance of the {sampled}, mean over seeds",
            "ours": round(s["local"]["final_mean"], 4), "reference": target["local"],
            "seeds": len(a.seeds), "wall_seconds": round(r["wall_seconds_per_seed"], 1)})
        headline.append({
            "algorithm": f"GPS ({algorithm}) mean controllers",
            "setting": f"Reacher-v5, 4 conditions, {label}, after {it} iterations ({steps:,} training steps)",
            "metric": "final fingertip distance, noise-free u = Kx + k, one run per condition, mean over seeds",
            "ours": round(s["local_mean"]["final_mean"], 4), "reference": target["local"],
            "seeds": len(a.seeds), "wall_seconds": round(r["wall_seconds_per_seed"], 1)})
        if "global_train" in s:
            headline.append({
                "algorithm": f"GPS ({algorithm}) global policy",
                "setting": f"Reacher-v5, 4 training conditions (held-out in 'results'), {label}, {it} iterations",
                "metric": "final fingertip distance, deterministic policy, mean over seeds",
                "ours": round(s["global_train"]["final_mean"], 4),
                "held_out": round(s["global_test"]["final_mean"], 4),
                "reference": target["global_train"], "seeds": len(a.seeds),
                "wall_seconds": round(r["wall_seconds_per_seed"], 1)})
    save_figure(draw(results, len(a.seeds)), out_name)
    save_results(out_name, {"headline": headline, "results": results, "targets": TARGETS,
                         "sac_reference": SAC_REFERENCE, "args": vars(a), "overrides": overrides})


def draw(results: dict, seeds: int):
    """Left: final fingertip distance per iteration (mean over seeds, band 1 s.e.) of each algorithm's
    samples, mean controllers and global policy, with the two targets; right: the trajectory cost."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"local": "-", "local_mean": "-.", "global_train": "--", "global_test": ":"}
    for algorithm, r in results.items():
        x = r["runs"][0]["samples"]
        for name, ls in styles.items():
            if name in r["runs"][0]:
                plot_curve(axes[0], x, [run_[name] for run_ in r["runs"]], label=f"{algorithm} {LABELS[name]}", ls=ls)
        plot_curve(axes[1], x, [run_["local_cost"] for run_ in r["runs"]], label=f"{algorithm} {LABELS['local']}")
        if "global_train_cost" in r["runs"][0]:
            plot_curve(axes[1], x, [run_["global_train_cost"] for run_ in r["runs"]],
                       label=f"{algorithm} global policy", ls="--")
    axes[0].axhline(TARGETS["local"], color="k", lw=1, ls=(0, (1, 3)), label="target, local: 0.02")
    axes[0].axhline(TARGETS["global_train"], color="gray", lw=1, ls=(0, (1, 3)), label="target, global: 0.03")
    band = ", band 1 s.e." if seeds > 1 else ""
    axes[0].set(yscale="log", xlabel="real env steps (training samples)", ylabel="final fingertip distance",
                title=f"Reacher-v5: mean of {seeds} seed{'s' if seeds > 1 else ''}{band}")
    axes[0].annotate(f"for scale: SAC (rl-zoo) trains {SAC_REFERENCE['steps'] // 1000}k steps on ReacherBullet",
                     (0.99, 0.98), xycoords="axes fraction", ha="right", va="top", fontsize=7, color="gray")
    plain = mticker.FuncFormatter(lambda v, _: f"{v:g}")  # 0.03, not 3 x 10^-2
    axes[0].yaxis.set_major_formatter(plain)
    axes[0].yaxis.set_minor_locator(mticker.LogLocator(subs=(2, 3, 5)))
    axes[0].yaxis.set_minor_formatter(plain)
    axes[1].set(xlabel="real env steps (training samples)", ylabel="trajectory cost",
                title=f"cost per iteration (mean of {seeds}{band})")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
