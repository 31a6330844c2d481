"""MAML's adaptation curves (Finn et al. 2017, Fig. 5) against its baselines.

For each seed: meta-train MAML (TRPO outer loop, second order); train the
paper's "pretrained" multi-task policy (no inner step, one Adam step of 1e-3
per iteration on the multi-task policy-gradient loss: the authors'
use_maml=False) for the same number of iterations; as a labelled extra, the
same multi-task policy trained with TRPO (`--pretrain-optimizer trpo`); and
take a randomly initialised policy. Each is then meta-tested on the same 40
new goals: the average return before adaptation and after 1, 2, 3
policy-gradient steps (step size alpha, then alpha / 2; whole paths until
4000 steps per goal and step, as in the authors' test_maml_point.py).
The authors' own numbers (cbfinn/maml_rl, icml/icml_point_results_*.pkl)
are saved beside ours and drawn dashed.

Runs go method by method (every seed of MAML first), and the JSON and plot
are rewritten after every run, so a run stopped early still leaves numbers.

Run:
    python -m benchmarks.maml --quick                  # 1 seed, 3 small meta-iterations
    python -m benchmarks.maml --save                   # 2-D navigation, 3 seeds, 100 meta-iterations (authors')
    python -m benchmarks.maml --iterations 20 --seeds 1
    python -m benchmarks.maml --methods MAML pretrained --seeds 1 2 3
Writes maml_<env>.json and maml_<env>.png to benchmarks/out/ (with --save:
benchmarks/results/ and benchmarks/plots/). Runs unchanged with jax[cuda].
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

# The authors' 2-D navigation results (cbfinn/maml_rl, icml/icml_point_results_{maml,random,oracle}.pkl: the mean
# over their 40 test goals of the average return before and after 1, 2, 3 steps; the oracle is told the goal).
AUTHORS = {"MAML": [-40.41, -11.68, -3.33, -3.23], "random init": [-82.66, -57.96, -53.84, -46.81],
           "oracle": [-2.29] * 4}
# name -> the flags of maml.Args that make it
METHODS = {"MAML": {"inner_steps": 1},
           "pretrained": {"inner_steps": 0, "pretrain_optimizer": "adam"},
           "pretrained (TRPO, extra)": {"inner_steps": 0, "pretrain_optimizer": "trpo"}}


def run(a, on_run=None):
    """Train every method for every seed (method by method) and meta-test each on the same tasks; `on_run(curves,
    walls)` after every run. Returns curves (name -> list of per-seed curves) and walls (name -> seconds)."""
    base = maml.Args(env_id=a.env_id, meta_batch=a.meta_batch, eval_episodes=a.test_tasks,
                     eval_trajectories=a.test_trajectories, estimator=a.estimator,
                     trajectories_per_task=a.trajectories)
    env, dims, policy, _, test_args, test_phases = maml.setup(base)
    tasks = env.sample_tasks(jax.random.PRNGKey(12345), a.test_tasks)  # the same new tasks for everyone
    curves = {name: [] for name in [*a.methods, "random init"]}
    walls = {name: [] for name in a.methods}
    for name in a.methods:
        for seed in a.seeds:
            flags = {**METHODS[name], "estimator": a.estimator if METHODS[name]["inner_steps"] else "maml"}
            args = dataclasses.replace(base, seed=seed, exp_name=f"bench_{name.split()[0]}", **flags)
            total = a.iterations * maml.steps_per_iteration(args, dims)
            args = dataclasses.replace(args, total_timesteps=total, eval_interval=total)
            start = time.time()
            with scratch_dir():  # the run folders stay out of the repository
                out = maml.main(args)
            walls[name].append(time.time() - start)
            curves[name].append(maml.meta_test(out["theta"], tasks, jax.random.PRNGKey(seed), test_phases,
                                               test_args, 3))
            print(f"seed {seed} {name}: {np.round(curves[name][-1], 2)} ({walls[name][-1]:.0f} s)", flush=True)
            if len(curves["random init"]) < len(a.seeds):
                theta0 = policy.init(jax.random.PRNGKey(seed), jnp.zeros(dims.obs_dim))
                curves["random init"].append(maml.meta_test(theta0, tasks, jax.random.PRNGKey(seed), test_phases,
                                                            test_args, 3))
            if on_run is not None:  # write what we have after every run
                on_run(curves, walls)
    return curves, walls


def main(argv=None):
    parser = harness.parser("maml", __doc__, seeds=[1, 2, 3],
                            quick={"seeds": [1], "iterations": 3, "meta_batch": 5, "test_tasks": 5,
                                   "trajectories": 5, "test_trajectories": 5})
    parser.add_argument("--env-id", default="PointNav2D-v0")
    parser.add_argument("--iterations", type=int, default=100, help="meta-iterations (authors' 2-D code: 100)")
    parser.add_argument("--meta-batch", type=int, default=20, help="tasks per meta-iteration (the authors' Fig. 5 "
                        "policy: 20)")
    parser.add_argument("--test-tasks", type=int, default=40)
    parser.add_argument("--estimator", default="maml", choices=["maml", "promp"])
    parser.add_argument("--trajectories", type=int, default=20,
                        help="step budget per task and batch in trajectories x horizon (authors: 20 x 100)")
    parser.add_argument("--test-trajectories", type=int, default=40,
                        help="meta-test step budget per task and step in trajectories x horizon (authors: 40 x 100)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="what to train (random init is always meta-tested)")
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
        return save_figure(plot(record["curves"], a.env_id, record["seeds"], record["test_tasks"],
                                record.get("authors")), f"maml_{tag}")
    run(a, on_run=lambda curves, walls: report(a, curves, walls))


def baselines_with_step_sizes(a):
    """The baselines of `run`, meta-tested with several step sizes (same tasks and keys)."""
    base = maml.Args(env_id=a.env_id, meta_batch=a.meta_batch, eval_episodes=a.test_tasks,
                     eval_trajectories=a.test_trajectories, trajectories_per_task=a.trajectories)
    env, dims, policy, _, test_args, test_phases = maml.setup(base)
    tasks = env.sample_tasks(jax.random.PRNGKey(12345), a.test_tasks)
    per_iter = maml.steps_per_iteration(dataclasses.replace(base, inner_steps=0), dims)
    curves = {f"{name}, alpha {lr}": [] for name in ("pretrained", "random init") for lr in a.baseline_lrs}
    for seed in a.seeds:
        args = dataclasses.replace(base, seed=seed, inner_steps=0, exp_name="bench_pretrained",
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


def plot(table, env_id, seeds, test_tasks, authors=None, floor=-100.0):
    """Adaptation curves, with the authors' (dashed) when given; points below `floor` (a diverged adaptation) are
    drawn on the floor with their value written next to them."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    steps = np.arange(4)
    for name, row in table.items():
        mean, se = np.array(row["mean"], float), np.array(row["stderr"], float)
        shown = np.where(np.isfinite(mean), np.maximum(mean, floor), floor)
        (line,) = ax.plot(steps, shown, marker="o", label=f"{name} ({row.get('seeds', seeds)} seeds)")
        ax.fill_between(steps, np.maximum(mean - se, floor), np.maximum(mean + se, floor), color=line.get_color(),
                        alpha=0.2, linewidth=0)
        for x, m in zip(steps, mean, strict=True):
            if not np.isfinite(m) or m < floor:
                ax.annotate(f"{m:.0f}" if np.isfinite(m) else "diverged (NaN)", (x, floor), textcoords="offset points",
                            xytext=(4, 6), fontsize=7, color=line.get_color())
    for name, curve in (authors or {}).items():
        ax.plot(steps, curve, linestyle="--", color={"MAML": "green", "random init": "black"}.get(name, "red"),
                alpha=0.6, label=f"authors' {name}")
    ax.set(xlabel="number of gradient steps", ylabel="average return", xticks=steps, ylim=(floor - 3, 0),
           title=f"MAML meta-test, {env_id}\n(mean over seeds, band 1 s.e.; {test_tasks} new tasks)")
    ax.legend(fontsize=7)
    return fig


def report(a, curves, walls):
    """Print the table and (re)write the JSON and the plot with every run so far."""
    table = {}
    for name, c in curves.items():
        if not c:
            continue
        mean, se = mean_and_stderr(np.array(c))
        table[name] = {"mean": np.round(mean, 2).tolist(), "stderr": np.round(se, 2).tolist(),
                       "per_seed": np.round(c, 2).tolist(), "seeds": len(c)}
        print(f"{name:26s} " + "  ".join(f"{m:8.2f} +- {s:5.2f}" for m, s in zip(mean, se, strict=True)), flush=True)
    tag = a.env_id.split("-")[0].lower() + ("_promp" if a.estimator == "promp" else "")
    authors = AUTHORS if a.env_id == "PointNav2D-v0" else None
    seeds = len(curves[a.methods[0]])
    fig = plot(table, a.env_id, seeds, a.test_tasks, authors)
    save_figure(fig, f"maml_{tag}")
    plt.close(fig)
    first = table.get("MAML", next(iter(table.values())))
    save_results(f"maml_{tag}", {
        "env_id": a.env_id, "iterations": a.iterations, "meta_batch": a.meta_batch, "seeds": seeds,
        "seed_list": a.seeds, "trajectories_per_task": a.trajectories, "test_trajectories": a.test_trajectories,
        "step_budget": "whole paths until trajectories x horizon steps per task (rllab)",
        "test_tasks": a.test_tasks, "estimator": a.estimator, "curves": table, "authors": authors,
        "complete": all(len(curves[m]) == len(a.seeds) for m in a.methods),
        "wall_seconds": {k: np.round(v, 1).tolist() for k, v in walls.items()},
        "headline": [{
            "algorithm": "MAML" if a.estimator == "maml" else "ProMP",
            "setting": f"{a.env_id}, {a.iterations} meta-iterations, return after 1 step",
            "metric": "mean return on new tasks", "ours": first["mean"][1],
            "reference": (f"authors {AUTHORS['MAML'][1]}; " if authors else "")
            + ", ".join(f"{k} {v['mean'][1]}" for k, v in table.items() if k != "MAML"),
            "seeds": first["seeds"], "wall_seconds": round(float(np.mean(walls[a.methods[0]])), 1)}],
    })


if __name__ == "__main__":
    main()
