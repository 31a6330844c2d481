"""RL² benchmark: the shape of Duan et al. (2016) Tables 1 and 2.

Trains RL² (algos/rl2.py) on each setting over several seeds, then evaluates
it and hand-written baselines on the *same* newly sampled tasks:
- Bernoulli bandits (k arms, n pulls): random, epsilon-greedy, greedy, UCB1,
  Thompson sampling. epsilon and UCB1's c are tuned on separate tasks (as
  Duan et al. tuned their baselines); Thompson sampling has a uniform prior.
- Random tabular MDPs (n episodes of 10 steps): random, PSRL (posterior
  sampling, Strens 2000 / Osband et al. 2013) and greedy (planning with the
  posterior-mean model), all with the true prior of the task family.

The metric is the mean total reward per trial, with standard errors: over
trials for the baselines, over seeds for RL² (each seed's mean over the same
trials). Results (rl2_<setting>.json) and plots (rl2_<setting>.png) go to
benchmarks/out/ (with --save: benchmarks/results/ and benchmarks/plots/).

Run:
    python -m benchmarks.rl2 --quick               # bandit-5-10, 1 seed, a quarter of the training: ~1 min
    python -m benchmarks.rl2 --save                # the default settings
    python -m benchmarks.rl2 --settings bandit-5-10 mdp-10 --seeds 1 2 3
"""

from __future__ import annotations

import dataclasses
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import mean_and_stderr, save_figure, save_results, scratch_dir  # noqa: E402

# --------------------------------------------------------------------------
# Bandit baselines. A history is (counts (k,), successes (k,)); t pulls so far.
# --------------------------------------------------------------------------


def random_argmax(key, values):
    """argmax with ties broken uniformly at random."""
    return jax.random.categorical(key, jnp.where(values >= values.max(), 0.0, -jnp.inf))


def ucb1_choice(key, counts, successes, c: float = 1.0):
    """UCB1 (Auer et al. 2002): every arm once, then argmax mean + c sqrt(2 ln t / N_a)."""
    t = counts.sum()
    bonus = c * jnp.sqrt(2.0 * jnp.log(jnp.maximum(t, 1.0)) / jnp.maximum(counts, 1.0))
    index = jnp.where(counts > 0, successes / jnp.maximum(counts, 1.0) + bonus, jnp.inf)
    return random_argmax(key, index)


def thompson_choice(key, counts, successes):
    """Thompson sampling with a uniform (Beta(1, 1)) prior on each arm's mean."""
    theta = jax.random.beta(key, 1.0 + successes, 1.0 + counts - successes)
    return jnp.argmax(theta)


def epsilon_greedy_choice(key, counts, successes, epsilon: float):
    """With probability epsilon a random arm, else the best posterior mean (s + 1) / (N + 2)."""
    k_e, k_r, k_g = jax.random.split(key, 3)
    greedy = random_argmax(k_g, (successes + 1.0) / (counts + 2.0))
    explore = jax.random.uniform(k_e) < epsilon
    return jnp.where(explore, jax.random.randint(k_r, (), 0, counts.shape[0]), greedy)


def bandit_trial(choose, means, n: int, key):
    """Total reward of n pulls of `choose(key, counts, successes)` on arms `means` (k,)."""

    def pull(carry, k):
        counts, successes = carry
        k_a, k_r = jax.random.split(k)
        a = choose(k_a, counts, successes)
        r = jax.random.bernoulli(k_r, means[a]).astype(jnp.float32)
        return (counts.at[a].add(1.0), successes.at[a].add(r)), r

    zeros = jnp.zeros_like(means)
    _, rewards = jax.lax.scan(pull, (zeros, zeros), jax.random.split(key, n))
    return rewards.sum()


def bandit_baselines(tasks, n: int, key, tune_tasks):
    """Total reward per trial (trials,) for each bandit baseline on `tasks.means` (trials, k)."""
    def run(choose, means):
        keys = jax.random.split(key, means.shape[0])
        return jax.jit(jax.vmap(lambda m, k: bandit_trial(choose, m, n, k)))(means, keys)

    def tuned(make, grid):  # best hyperparameter on separate tuning tasks
        scores = [float(run(make(g), tune_tasks.means).mean()) for g in grid]
        best = grid[int(np.argmax(scores))]
        return best, run(make(best), tasks.means)

    k = tasks.means.shape[1]
    out = {
        "random": run(lambda key, c, s: jax.random.randint(key, (), 0, k), tasks.means),
        "greedy": run(lambda key, c, s: epsilon_greedy_choice(key, c, s, 0.0), tasks.means),
        "thompson": run(thompson_choice, tasks.means),
    }
    eps, out["epsilon-greedy"] = tuned(lambda e: lambda key, c, s: epsilon_greedy_choice(key, c, s, e),
                                       [0.01, 0.05, 0.1, 0.2, 0.3])
    c_best, out["ucb1"] = tuned(lambda cc: lambda key, c, s: ucb1_choice(key, c, s, cc),
                                [0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    return out, {"epsilon": eps, "ucb1_c": c_best}


# --------------------------------------------------------------------------
# Tabular MDP baselines (the prior of RandomMDP: P ~ Dir(1), mu ~ N(1, 1),
# reward noise N(0, 1)), finite-horizon planning by backward induction.
# --------------------------------------------------------------------------


def plan_finite_horizon(P, R, horizon: int):
    """Backward induction: Q_h(s, a) = R(s, a) + sum_s' P(s, a, s') V_{h+1}(s'), V_H = 0.

    Returns Q (H, S, A); step h of an episode acts greedily on Q[h]."""

    def backup(v_next, _):
        q = R + P @ v_next  # (S, A)
        return q.max(1), q

    _, q = jax.lax.scan(backup, jnp.zeros(P.shape[0]), None, length=horizon)
    return q[::-1]


def posterior_model(counts, reward_sum, key, sample: bool):
    """A model drawn from the posterior (PSRL) or its mean (greedy).

    counts (S, A, S) transitions seen, reward_sum (S, A) summed rewards.
    P(s, a, .) | data ~ Dirichlet(1 + counts); mu(s, a) | data ~
    N((1 + sum r) / (1 + N), 1 / (1 + N)) (prior N(1, 1), unit noise)."""
    n_sa = counts.sum(-1)
    mu_mean = (1.0 + reward_sum) / (1.0 + n_sa)
    if not sample:
        return (1.0 + counts) / (1.0 + counts).sum(-1, keepdims=True), mu_mean
    k_p, k_r = jax.random.split(key)
    P = jax.random.dirichlet(k_p, 1.0 + counts)
    return P, mu_mean + jax.random.normal(k_r, mu_mean.shape) / jnp.sqrt(1.0 + n_sa)


def mdp_trial(policy: str, env, task, n: int, key):
    """Reward of each of the n episodes (n,) of PSRL, greedy or random on one MDP task.

    PSRL and greedy re-plan at the start of every episode from all data so far."""
    S, A, H = env.num_states, env.num_actions, env.horizon

    def episode(carry, k):
        counts, reward_sum = carry
        k_model, k_init, k_steps = jax.random.split(k, 3)
        P, R = posterior_model(counts, reward_sum, k_model, sample=policy == "psrl")
        q = plan_finite_horizon(P, R, H)
        state = env.initial(k_init, task)

        def step(c, inp):
            state, counts, reward_sum = c
            h, k = inp
            k_a, k_env = jax.random.split(k)
            greedy_a = random_argmax(k_a, q[h, state])
            a = jax.random.randint(k_a, (), 0, A) if policy == "random" else greedy_a
            nxt = env.transition(state, a, k_env, task)
            r = env.reward(state, a, nxt, k_env, task)
            return (nxt, counts.at[state, a, nxt].add(1.0), reward_sum.at[state, a].add(r)), r

        (_, counts, reward_sum), r = jax.lax.scan(
            step, (state, counts, reward_sum), (jnp.arange(H), jax.random.split(k_steps, H)))
        return (counts, reward_sum), r.sum()

    init = (jnp.zeros((S, A, S)), jnp.zeros((S, A)))
    _, per_episode = jax.lax.scan(episode, init, jax.random.split(key, n))
    return per_episode


def mdp_baselines(env, tasks, n: int, key):
    out = {}
    for policy in ("random", "psrl", "greedy"):
        trials = tasks.mean_rewards.shape[0]
        f = jax.jit(jax.vmap(lambda task, k, p=policy: mdp_trial(p, env, task, n, k)))
        out[policy] = f(tasks, jax.random.split(key, trials)).sum(-1)
    return out


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------
# Duan et al. (2016), Tables 1 and 2, mean total reward per trial, as we
# transcribed them (unverified against the paper's PDF; see docs/rl2.md).
DUAN = {
    "bandit-5-10": {"random": 5.0, "gittins": 6.6, "thompson": 5.7, "ucb1": 6.7, "epsilon-greedy": 6.6,
                    "greedy": 6.6, "rl2": 6.7},
    "bandit-5-100": {"random": 49.9, "gittins": 78.3, "thompson": 74.7, "ucb1": 78.0, "epsilon-greedy": 75.4,
                     "greedy": 74.8, "rl2": 78.7},
    "bandit-10-100": {"random": 49.9, "gittins": 82.8, "thompson": 76.7, "ucb1": 82.4, "epsilon-greedy": 77.4,
                      "greedy": 77.1, "rl2": 83.5},
    "bandit-50-500": {"random": 249.6, "gittins": 463.7, "thompson": 427.2, "ucb1": 457.6,
                      "epsilon-greedy": 413.6, "greedy": 402.8, "rl2": 438.9},
    "mdp-10": {"random": 100.1, "psrl": 138.1, "greedy": 134.8, "rl2": 156.2},
    "mdp-25": {"random": 250.2, "psrl": 408.8, "greedy": 368.8, "rl2": 445.7},
    "mdp-50": {"random": 499.7, "psrl": 904.4, "greedy": 769.3, "rl2": 936.1},
}

# Each setting: env id, n, and the RL² flags (algos/rl2.py Args) it trains with.
SETTINGS = {
    "bandit-5-10": ("BernoulliBandit5-v0", 10, dict(total_timesteps=1_024_000, eval_interval=128_000)),
    "bandit-5-100": ("BernoulliBandit5-v0", 100, dict(hidden_size=64, meta_batch=128, learning_rate=3e-3,
                                                       ent_coef=0.05, anneal=True,
                                                       total_timesteps=11_520_000, eval_interval=1_152_000)),
    "bandit-10-100": ("BernoulliBandit10-v0", 100, dict(hidden_size=64, meta_batch=128, learning_rate=3e-3,
                                                         ent_coef=0.05, anneal=True,
                                                         total_timesteps=11_520_000, eval_interval=1_152_000)),
    "bandit-50-500": ("BernoulliBandit50-v0", 500, dict(hidden_size=64, meta_batch=128, learning_rate=3e-3,
                                                         anneal=True,
                                                         total_timesteps=11_520_000, eval_interval=1_152_000)),
    "mdp-10": ("RandomMDP-v0", 10, dict(hidden_size=128, meta_batch=512, num_minibatches=8, learning_rate=3e-3,
                                        ent_coef=0.01, anneal=True, time_input=True,
                                        total_timesteps=17_920_000, eval_interval=1_792_000)),
    "mdp-25": ("RandomMDP-v0", 25, dict(hidden_size=128, meta_batch=256, num_minibatches=4, learning_rate=3e-3,
                                        ent_coef=0.01, anneal=True, time_input=True,
                                        total_timesteps=17_920_000, eval_interval=1_792_000)),
    "mdp-50": ("RandomMDP-v0", 50, dict(hidden_size=128, meta_batch=128, num_minibatches=2, learning_rate=3e-3,
                                        ent_coef=0.01, anneal=True, time_input=True,
                                        total_timesteps=12_800_000, eval_interval=1_280_000)),
}


def run_setting(name: str, seeds: list[int], eval_trials: int, scale: float = 1.0) -> dict:
    """Train RL² (seeds vmapped in one program), then evaluate it and the
    baselines on the same eval_trials new tasks."""
    from algos.rl2 import Args, dims_of, evaluate, main, make_task_family, steps_per_update, updates_per_eval

    env_id, n, flags = SETTINGS[name]
    flags = dict(flags)
    flags["total_timesteps"] = int(flags["total_timesteps"] * scale)
    flags["eval_interval"] = int(flags["eval_interval"] * min(scale, 1.0))  # the same number of evaluations
    # One training program per seed, run one after another. (vmapping the
    # seeds in one program, --num-seeds, hung in XLA:CPU on this machine at
    # meta-batch 256 x 256 units; smaller programs are fine.)
    runs, walls = [], []
    for seed in seeds:
        args = Args(env_id=env_id, episodes_per_trial=n, num_seeds=1, seed=seed, exp_name=f"bench-{name}",
                    eval_episodes=200, **flags)
        start = time.time()
        with scratch_dir():  # the run folders stay out of the repository
            runs.append(main(args))  # prints progress; the wall time includes compilation
        walls.append(time.time() - start)
    out = {"params": jax.tree.map(lambda *x: np.concatenate(x), *[r["params"] for r in runs]),
           "evals": np.concatenate([r["evals"] for r in runs], axis=1)}
    train_wall = float(np.mean(walls))

    # Final evaluation on a common set of tasks (the same for RL² and baselines).
    family = make_task_family(env_id)
    key = jax.random.PRNGKey(12345)
    k_task, _ = jax.random.split(key)
    tasks = family.sample_tasks(k_task, eval_trials)
    dims = dims_of(family)
    eval_args = dataclasses.replace(args, eval_episodes=eval_trials)
    per_seed = []
    for s in range(len(seeds)):
        params = jax.tree.map(lambda x, s=s: x[s], out["params"])
        per_seed.append(np.asarray(jax.jit(lambda p: evaluate(p, family, key, eval_args, dims))(params)))
    rl2 = np.stack(per_seed)  # (seeds, trials, n) reward of each episode
    k_base = jax.random.PRNGKey(777)
    if "Bandit" in env_id:
        tune_tasks = family.sample_tasks(jax.random.PRNGKey(999), eval_trials)
        base, tuned = bandit_baselines(tasks, n, k_base, tune_tasks)
    else:
        base, tuned = mdp_baselines(family, tasks, n, k_base), {}
    table = {}
    for algo, totals in base.items():
        m, se = mean_and_stderr(np.asarray(totals))
        table[algo] = {"mean": float(m), "stderr": float(se), "over": f"{eval_trials} trials"}
    seed_means = rl2.sum(-1).mean(1)
    m, se = mean_and_stderr(seed_means)
    table["rl2"] = {"mean": float(m), "stderr": float(se), "over": f"{len(seeds)} seeds x {eval_trials} trials",
                    "per_seed": seed_means.tolist()}
    evals = out["evals"]  # (num_evals + 1, seeds, 200, n) during training
    steps = np.arange(evals.shape[0]) * updates_per_eval(args, dims) * steps_per_update(args, dims)
    return {
        "setting": name, "env_id": env_id, "n": n, "rl2_flags": flags, "seeds": len(seeds), "seed_list": seeds,
        "train_wall_seconds": train_wall, "train_wall_seconds_per_seed": walls,
        "table": table, "tuned_baselines": tuned, "duan": DUAN.get(name),
        "curve": {"env_steps": steps, "eval_trial_reward": evals.sum(-1).mean(-1)},  # (evals, seeds)
        "rl2_per_episode": rl2.mean((0, 1)),  # (n,) mean reward of episode i of a trial
    }


def plot_setting(res: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker

    from benchmarks.harness import plot_curve

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.asarray(res["curve"]["env_steps"])
    band = ", band 1 s.e." if res["seeds"] > 1 else ""
    plot_curve(ax, x, np.asarray(res["curve"]["eval_trial_reward"]).T,
               f"RL² (ours): mean of {res['seeds']} seed{'s' if res['seeds'] > 1 else ''}{band}", color="k")
    for i, (algo, row) in enumerate(res["table"].items()):
        if algo != "rl2":
            ax.axhline(row["mean"], ls="--", lw=1, color=f"C{i}", label=f"{algo} (ours, same tasks)")
    if (res.get("duan") or {}).get("rl2") is not None:
        ax.axhline(res["duan"]["rl2"], ls=":", lw=1.2, color="k", label="RL², Duan et al. 2016 (published)")
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v / 1e6:g}M"))
    ax.set_xlabel("env steps of meta-training (per seed)")
    ax.set_ylabel("total reward per trial")
    ax.set_title(f"RL², {res['setting']}: total reward per trial on new tasks")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: the lines stay visible
    save_figure(fig, f"rl2_{res['setting']}")
    plt.close(fig)


def headline(res: dict) -> list[dict]:
    t, ref = res["table"], res["duan"] or {}
    best = "thompson" if "thompson" in t else "psrl"
    return [{"algorithm": "RL²", "setting": res["setting"], "metric": "total reward per trial",
             "ours": round(t["rl2"]["mean"], 2), "ours_stderr": round(t["rl2"]["stderr"], 2),
             "baseline": best, "baseline_ours": round(t[best]["mean"], 2),
             "reference": ref.get("rl2"), "seeds": res["seeds"],
             "wall_seconds": round(res["train_wall_seconds"], 1)}]


def markdown_tables() -> str:
    """Tables of all saved settings, ours beside Duan et al.'s, for docs/rl2.md."""
    from benchmarks.harness import load_results

    out = []
    for name in SETTINGS:
        try:
            res = load_results(f"rl2_{name}")
        except FileNotFoundError:
            continue
        duan = res["duan"] or {}
        out.append(f"**{name}** ({res['env_id']}, n = {res['n']}; RL²: {res['seeds']} seeds, "
                   f"{res['train_wall_seconds']:.0f} s of training per seed; all scored on the same "
                   f"{res['table']['random']['over']})\n")
        out.append("| algorithm | ours: total reward per trial | Duan et al. |")
        out.append("|---|---|---|")
        for algo, row in res["table"].items():
            out.append(f"| {algo} | {row['mean']:.2f} ± {row['stderr']:.2f} | {duan.get(algo, '-')} |")
        if res.get("tuned_baselines"):
            out.append(f"\ntuned on separate tasks: {res['tuned_baselines']}")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = harness.parser("rl2", __doc__, seeds=[1, 2, 3],
                            quick={"settings": ["bandit-5-10"], "seeds": [1], "scale": 0.25, "eval_trials": 200})
    parser.add_argument("--settings", nargs="+", default=["bandit-5-10", "mdp-10", "bandit-10-100"],
                        choices=list(SETTINGS))
    parser.add_argument("--eval-trials", type=int, default=2000)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the training steps")
    parser.add_argument("--report", action="store_true", help="only print the markdown tables of saved results")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plots of the saved rl2_<setting>.json of --settings")
    a = harness.parse(parser, argv)
    if a.replot:
        for name in a.settings:
            plot_setting(harness.load_results(f"rl2_{name}"))
        return
    if a.report:
        print(markdown_tables())
        return
    for name in a.settings:
        res = run_setting(name, a.seeds, a.eval_trials, a.scale)
        for algo, row in res["table"].items():
            print(f"{name:14s} {algo:15s} {row['mean']:9.2f} +- {row['stderr']:.2f}   "
                  f"(Duan: {(res['duan'] or {}).get(algo, '-')})", flush=True)
        print(f"{name}: RL² training {res['train_wall_seconds']:.0f} s per seed", flush=True)
        plot_setting(res)
        save_results(f"rl2_{name}", {**res, "headline": headline(res)})


if __name__ == "__main__":
    main()
