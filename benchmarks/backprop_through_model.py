"""Benchmark: backprop through a learned model on Pendulum-v1 (and Reacher-v5).

The issue's target: mean evaluation return of -200 or better (10 deterministic
episodes) within 5,000 real env steps, over 3 seeds, in a few minutes on a
laptop CPU. Reference for the sample count: SAC on Pendulum-v1 in the
rl-baselines3-zoo benchmark (benchmark.md, tuned hyperparameters): -157.0 +- 88.7
after 20k steps (one run, 750 evaluation episodes).

Run:
    python -m benchmarks.backprop_through_model --quick   # Pendulum, 1 seed, 1000 steps
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.backprop_through_model --save
    python -m benchmarks.backprop_through_model --envs Reacher-v5 --seeds 1

Writes backprop_through_model.json and .png to benchmarks/out/ (with --save:
benchmarks/results/ and benchmarks/plots/).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from algos import backprop_through_model as btm  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.harness import final_mean_std, plot_curve, save_figure, save_results, scratch_dir, timer  # noqa: E402

SAC_REFERENCE = {
    "Pendulum-v1": {"return": -156.995, "std": 88.714, "steps": 20_000,
                    "source": "rl-baselines3-zoo benchmark.md (DLR-RM), SAC, Pendulum-v1, n_timesteps 20k"},
}
TARGET = {"Pendulum-v1": -200.0}
STEPS = {"Pendulum-v1": 5000, "Reacher-v5": 5000}


def run_env(env_id: str, seeds: list[int], steps: int) -> dict:
    runs = []
    for seed in seeds:
        out = {}
        with scratch_dir(), timer(out):
            res = btm.main(btm.Args(env_id=env_id, seed=seed, total_timesteps=steps))
        hist = res["history"]
        runs.append({"seed": seed, "steps": [h["step"] for h in hist],
                     "eval_return": [h["eval/return"] for h in hist],
                     "grad_norm": [h["policy/grad_norm"] for h in hist],
                     "final_eval_return": hist[-1]["eval/return"], "wall_seconds": out["wall_seconds"]})
        print(f"{env_id} seed {seed}: final eval return {hist[-1]['eval/return']:.1f} "
              f"in {out['wall_seconds']:.0f} s", flush=True)
    curves = np.array([r["eval_return"] for r in runs])  # (seeds, iterations)
    mean_curve = curves.mean(0)
    target = TARGET.get(env_id)
    reached = None
    if target is not None and (mean_curve >= target).any():
        reached = int(runs[0]["steps"][int(np.argmax(mean_curve >= target))])
    finals = np.array([r["final_eval_return"] for r in runs])
    return {"env_id": env_id, "runs": runs, **final_mean_std(finals),
            "first_step_mean_curve_reaches_target": reached,
            "wall_seconds_per_seed": float(np.mean([r["wall_seconds"] for r in runs]))}


def main(argv=None):
    p = harness.parser("backprop_through_model", __doc__, seeds=[1, 2, 3],
                       quick={"envs": ["Pendulum-v1"], "seeds": [1], "steps": 1000})
    p.add_argument("--envs", nargs="+", default=["Pendulum-v1", "Reacher-v5"])
    p.add_argument("--steps", type=int, default=None, help="real env steps per run (default: 5000, the target's)")
    a = harness.parse(p, argv)

    results, headline = {}, []
    fig, axes = plt.subplots(1, len(a.envs), figsize=(5.5 * len(a.envs), 4), squeeze=False)
    for ax, env_id in zip(axes[0], a.envs, strict=True):
        steps_run = a.steps or STEPS.get(env_id, 5000)
        r = results[env_id] = run_env(env_id, a.seeds, steps_run)
        steps = r["runs"][0]["steps"]
        plot_curve(ax, steps, [x["eval_return"] for x in r["runs"]],
                   label=f"backprop through model (ours): mean of {len(a.seeds)} seeds, band 1 s.e.")
        if env_id in TARGET:
            ax.axhline(TARGET[env_id], color="k", ls="--", lw=1, label=f"target {TARGET[env_id]:.0f}")
        if env_id in SAC_REFERENCE:
            ref = SAC_REFERENCE[env_id]
            ax.axhline(ref["return"], color="tab:red", ls=":", lw=1,
                       label=f"SAC (rl-zoo) after {ref['steps'] // 1000}k steps")
        ax.set(title=f"{env_id}, {len(a.seeds)} seeds", xlabel="real env steps",
               ylabel="eval return (10 episodes)")
        ax.legend(loc="lower right", fontsize=8)
        ref = SAC_REFERENCE.get(env_id)
        headline.append({
            "algorithm": "Backprop through model", "setting": f"{env_id}, {steps_run} env steps",
            "metric": "final eval return (10 episodes), mean over seeds",
            "ours": round(r["final_mean"], 1),
            "reference": (f"target >= {TARGET[env_id]:.0f}; SAC {ref['return']:.0f} at {ref['steps']} steps"
                          if ref else None),
            "seeds": len(a.seeds), "wall_seconds": round(r["wall_seconds_per_seed"], 1)})
    fig.tight_layout()
    save_figure(fig, "backprop_through_model")
    save_results("backprop_through_model", {"headline": headline, "results": results,
                                            "sac_reference": SAC_REFERENCE, "args": vars(a)})


if __name__ == "__main__":
    main()
