"""MAML's adaptation curves (Finn et al. 2017, Fig. 5) against its baselines.

For each seed: meta-train MAML (TRPO outer loop, second order), train the
"pretrained" multi-task policy (the same TRPO on the task distribution with no
inner step, `--inner-steps 0`) for the same number of iterations, and take a
randomly initialised policy. Each is then meta-tested on the same new tasks:
the mean return before adaptation and after 1, 2, 3 policy-gradient steps
(step size alpha, then alpha / 2, as in the authors' test script).

Run:
    python -m benchmarks.maml --quick                  # 1 seed, 3 small meta-iterations
    python -m benchmarks.maml --save                   # 2-D navigation, 3 seeds, 100 meta-iterations
    python -m benchmarks.maml --iterations 20 --seeds 1
Writes maml_<env>.json and maml_<env>.png to benchmarks/out/ (with --save:
benchmarks/results/ and benchmarks/plots/).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from algos import maml  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.harness import load_results, mean_and_stderr, save_figure, save_results, scratch_dir  # noqa: E402


def run(env_id: str, seeds: list[int], iterations: int, meta_batch: int, test_tasks: int, estimator: str,
        on_seed=None, trajectories: int = 20):
    base = maml.Args(env_id=env_id, meta_batch=meta_batch, eval_episodes=test_tasks, estimator=estimator,
                     trajectories_per_task=trajectories)
    env, dims, policy, _, test_args, test_phases = maml.setup(base)
    tasks = env.sample_tasks(jax.random.PRNGKey(12345), test_tasks)  # the same new tasks for everyone
    per_iter = maml.steps_per_iteration(dataclasses.replace(base, inner_steps=0), dims)  # one batch per task
    curves = {"MAML": [], "pretrained": [], "random init": []}
    walls = {"MAML": [], "pretrained": []}
    for seed in seeds:
        for name, inner in (("MAML", 1), ("pretrained", 0)):
            args = maml.Args(env_id=env_id, seed=seed, meta_batch=meta_batch, eval_episodes=test_tasks,
                             trajectories_per_task=trajectories,
                             inner_steps=inner, estimator=estimator if inner else "maml",
                             total_timesteps=iterations * per_iter * (inner + 1),
                             eval_interval=iterations * per_iter * (inner + 1), exp_name=f"bench_{name}")
            start = time.time()
            with scratch_dir():  # the run folders stay out of the repository
                out = maml.main(args)
            walls[name].append(time.time() - start)
            curves[name].append(maml.meta_test(out["theta"], tasks, jax.random.PRNGKey(seed), test_phases,
                                               test_args, 3))
            print(f"seed {seed} {name}: {np.round(curves[name][-1], 2)} ({walls[name][-1]:.0f} s)", flush=True)
        theta0 = policy.init(jax.random.PRNGKey(seed), jnp.zeros(dims.obs_dim))
        curves["random init"].append(maml.meta_test(theta0, tasks, jax.random.PRNGKey(seed), test_phases,
                                                    test_args, 3))
        if on_seed is not None:  # write what we have after every seed
            on_seed({k: np.array(v) for k, v in curves.items()}, walls)
    return {k: np.array(v) for k, v in curves.items()}, walls


def main(argv=None):
    parser = harness.parser("maml", __doc__, seeds=[1, 2, 3],
                            quick={"seeds": [1], "iterations": 3, "meta_batch": 5, "test_tasks": 5,
                                   "trajectories": 5})
    parser.add_argument("--env-id", default="PointNav2D-v0")
    parser.add_argument("--iterations", type=int, default=100, help="meta-iterations (authors' 2-D code: 100)")
    parser.add_argument("--meta-batch", type=int, default=20)
    parser.add_argument("--test-tasks", type=int, default=40)
    parser.add_argument("--estimator", default="maml", choices=["maml", "promp"])
    parser.add_argument("--trajectories", type=int, default=20, help="trajectories per task and step")
    parser.add_argument("--replot", action="store_true", help="redraw the plot from the saved JSON")
    parser.add_argument("--baseline-lrs", type=float, nargs="+",
                        help="only the baselines: meta-test the pretrained and random-init policies with each of "
                             "these first-step sizes (then half), to give them a tuned step size")
    a = harness.parse(parser, argv)
    if a.baseline_lrs:
        return baselines_with_step_sizes(a)
    if a.replot:
        tag = a.env_id.split("-")[0].lower() + ("_promp" if a.estimator == "promp" else "")
        record = load_results(f"maml_{tag}")
        return save_figure(plot(record["curves"], a.env_id, record["seeds"], record["test_tasks"]), f"maml_{tag}")
    run(a.env_id, a.seeds, a.iterations, a.meta_batch, a.test_tasks, a.estimator,
        on_seed=lambda curves, walls: report(a, curves, walls), trajectories=a.trajectories)


def baselines_with_step_sizes(a):
    """The baselines of `run`, meta-tested with several step sizes (same tasks and keys)."""
    base = maml.Args(env_id=a.env_id, meta_batch=a.meta_batch, eval_episodes=a.test_tasks,
                     trajectories_per_task=a.trajectories)
    env, dims, policy, _, test_args, test_phases = maml.setup(base)
    tasks = env.sample_tasks(jax.random.PRNGKey(12345), a.test_tasks)
    per_iter = maml.steps_per_iteration(dataclasses.replace(base, inner_steps=0), dims)
    curves = {f"{name}, alpha {lr}": [] for name in ("pretrained", "random init") for lr in a.baseline_lrs}
    for seed in a.seeds:
        args = maml.Args(env_id=a.env_id, seed=seed, meta_batch=a.meta_batch, eval_episodes=a.test_tasks,
                         trajectories_per_task=a.trajectories, inner_steps=0, exp_name="bench_pretrained",
                         total_timesteps=a.iterations * per_iter, eval_interval=a.iterations * per_iter)
        with scratch_dir():
            pretrained = maml.main(args)["theta"]
        thetas = {"pretrained": pretrained,
                  "random init": policy.init(jax.random.PRNGKey(seed), jnp.zeros(dims.obs_dim))}
        for name, theta in thetas.items():
            for lr in a.baseline_lrs:
                curve = maml.meta_test(theta, tasks, jax.random.PRNGKey(seed), test_phases,
                                       dataclasses.replace(test_args, inner_lr=lr), 3)
                curves[f"{name}, alpha {lr}"].append(curve)
                print(f"seed {seed} {name} alpha {lr}: {np.round(curve, 2)}", flush=True)
    table = {}
    for name, c in curves.items():
        mean, se = mean_and_stderr(c)  # one seed: its curve, stderr 0
        table[name] = {"mean": np.round(mean, 2).tolist(), "stderr": np.round(se, 2).tolist(),
                       "per_seed": np.round(c, 2).tolist()}
        print(f"{name:24s} " + "  ".join(f"{m:8.2f} +- {s:5.2f}" for m, s in zip(mean, se, strict=True)))
    tag = a.env_id.split("-")[0].lower()
    save_results(f"maml_{tag}_baseline_step_sizes", {
        "env_id": a.env_id, "iterations": a.iterations, "meta_batch": a.meta_batch, "seeds": a.seeds,
        "test_tasks": a.test_tasks, "trajectories_per_task": a.trajectories, "curves": table})


def plot(table, env_id, seeds, test_tasks, floor=-100.0):
    """Adaptation curves; points below `floor` (a diverged adaptation) are
    drawn on the floor with their value written next to them."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    steps = np.arange(4)
    for name, row in table.items():
        mean, se = np.array(row["mean"], float), np.array(row["stderr"], float)
        shown = np.where(np.isfinite(mean), np.maximum(mean, floor), floor)
        (line,) = ax.plot(steps, shown, marker="o", label=name)
        ax.fill_between(steps, np.maximum(mean - se, floor), np.maximum(mean + se, floor), color=line.get_color(),
                        alpha=0.2, linewidth=0)
        for x, m in zip(steps, mean, strict=True):
            if not np.isfinite(m) or m < floor:
                ax.annotate(f"{m:.0f}" if np.isfinite(m) else "diverged (NaN)", (x, floor), textcoords="offset points",
                            xytext=(4, 6), fontsize=7, color=line.get_color())
    ax.set(xlabel="number of gradient steps", ylabel="average return", xticks=steps, ylim=(floor - 3, 0),
           title=f"MAML meta-test, {env_id}\n(mean of {seeds} seed{'s' if seeds > 1 else ''}"
                 f"{', band 1 s.e.' if seeds > 1 else ''}; {test_tasks} new tasks)")
    ax.legend(fontsize=8)
    return fig


def report(a, curves, walls):
    seeds = len(curves["MAML"])
    table = {}
    for name, c in curves.items():
        mean, se = mean_and_stderr(c)
        table[name] = {"mean": np.round(mean, 2).tolist(), "stderr": np.round(se, 2).tolist(),
                       "per_seed": c.round(2).tolist()}
        print(f"{name:12s} " + "  ".join(f"{m:8.2f} +- {s:5.2f}" for m, s in zip(mean, se, strict=True)))
    tag = a.env_id.split("-")[0].lower() + ("_promp" if a.estimator == "promp" else "")
    fig = plot(table, a.env_id, seeds, a.test_tasks)
    save_figure(fig, f"maml_{tag}")
    plt.close(fig)
    save_results(f"maml_{tag}", {
        "env_id": a.env_id, "iterations": a.iterations, "meta_batch": a.meta_batch, "seeds": seeds,
        "trajectories_per_task": a.trajectories,
        "test_tasks": a.test_tasks, "estimator": a.estimator, "curves": table,
        "wall_seconds": {k: np.round(v, 1).tolist() for k, v in walls.items()},
        "headline": [{
            "algorithm": "MAML" if a.estimator == "maml" else "ProMP",
            "setting": f"{a.env_id}, {a.iterations} meta-iterations, return after 1 step",
            "metric": "mean return on new tasks", "ours": table["MAML"]["mean"][1],
            "reference": f"pretrained {table['pretrained']['mean'][1]}, random {table['random init']['mean'][1]}",
            "seeds": seeds, "wall_seconds": round(float(np.mean(walls["MAML"])), 1)}],
    })


if __name__ == "__main__":
    main()
