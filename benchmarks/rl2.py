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
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import mean_and_stderr, save_figure, save_results  # noqa: E402

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


def bandit_trial(choose, means, n: int, key, prior_successes: float = 0.0, prior_failures: float = 0.0):
    """Total reward of n pulls of `choose(key, counts, successes)` on arms `means` (k,).

    The statistics may start from pseudo-counts: each arm as if pulled with `prior_successes` successes and
    `prior_failures` failures already (Duan et al. Sec. 3.1 start UCB1 from one of each, a Beta(1, 1) prior)."""

    def pull(carry, k):
        counts, successes = carry
        k_a, k_r = jax.random.split(k)
        a = choose(k_a, counts, successes)
        r = jax.random.bernoulli(k_r, means[a]).astype(jnp.float32)
        return (counts.at[a].add(1.0), successes.at[a].add(r)), r

    start = (jnp.full_like(means, prior_successes + prior_failures), jnp.full_like(means, prior_successes))
    _, rewards = jax.lax.scan(pull, start, jax.random.split(key, n))
    return rewards.sum()


def bandit_baselines(tasks, n: int, key, tune_tasks):
    """Total reward per trial (trials,) for each bandit baseline on `tasks.means` (trials, k)."""
    def run(choose, means, prior=(0.0, 0.0)):
        keys = jax.random.split(key, means.shape[0])
        return jax.jit(jax.vmap(lambda m, k: bandit_trial(choose, m, n, k, *prior)))(means, keys)

    def tuned(make, grid, prior=(0.0, 0.0)):  # best hyperparameter on separate tuning tasks
        scores = [float(run(make(g), tune_tasks.means, prior).mean()) for g in grid]
        best = grid[int(np.argmax(scores))]
        return best, run(make(best), tasks.means, prior)

    k = tasks.means.shape[1]
    out = {
        "random": run(lambda key, c, s: jax.random.randint(key, (), 0, k), tasks.means),
        "greedy": run(lambda key, c, s: epsilon_greedy_choice(key, c, s, 0.0), tasks.means),
        "thompson": run(thompson_choice, tasks.means),
    }
    eps, out["epsilon-greedy"] = tuned(lambda e: lambda key, c, s: epsilon_greedy_choice(key, c, s, e),
                                       [0.01, 0.05, 0.1, 0.2, 0.3])
    # UCB1 as in Duan et al. Sec. 3.1: statistics start from one success and one failure per arm (so no
    # round of pulling every arm once first); "ucb1-plain" is Auer et al.'s original, every arm once first.
    c_best, out["ucb1"] = tuned(lambda cc: lambda key, c, s: ucb1_choice(key, c, s, cc),
                                [0.05, 0.1, 0.2, 0.3, 0.5, 1.0], prior=(1.0, 1.0))
    c_plain, out["ucb1-plain"] = tuned(lambda cc: lambda key, c, s: ucb1_choice(key, c, s, cc),
                                       [0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    return out, {"epsilon": eps, "ucb1_c": c_best, "ucb1_plain_c": c_plain}


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


class Prior(NamedTuple):
    """A tabular learner's prior (iosband/TabulaRL src/finite_tabular_agents.py, FiniteHorizonTabularAgent):
    P(s, a, .) ~ Dirichlet(alpha0, ..., alpha0); mu(s, a) ~ N(mu0, 1 / tau0); reward noise precision 1."""

    alpha0: float
    mu0: float
    tau0: float


TRUE_PRIOR = Prior(1.0, 1.0, 1.0)  # RandomMDP's own: Dirichlet(1), N(1, 1)
DUAN_PSRL_PRIOR = Prior(1.0, 0.0, 1.0)  # TabulaRL's defaults, which Duan's PSRL used
DUAN_GREEDY_PRIOR = Prior(1e-4, 0.0, 1e-4)  # TabulaRL's EpsilonGreedy: "prior effect -> 0"


def posterior_model(counts, reward_sum, key, sample: bool, prior: Prior = TRUE_PRIOR):
    """A model drawn from the posterior (PSRL) or its mean (greedy).

    counts (S, A, S) transitions seen, reward_sum (S, A) summed rewards.
    P(s, a, .) | data ~ Dirichlet(alpha0 + counts); mu(s, a) | data ~
    N((mu0 tau0 + sum r) / (tau0 + N), 1 / (tau0 + N)) (unit reward noise)."""
    n_sa = counts.sum(-1)
    precision = prior.tau0 + n_sa
    mu_mean = (prior.mu0 * prior.tau0 + reward_sum) / precision
    if not sample:
        return (prior.alpha0 + counts) / (prior.alpha0 + counts).sum(-1, keepdims=True), mu_mean
    k_p, k_r = jax.random.split(key)
    P = jax.random.dirichlet(k_p, prior.alpha0 + counts)
    return P, mu_mean + jax.random.normal(k_r, mu_mean.shape) / jnp.sqrt(precision)


def mdp_trial(policy: str, env, task, n: int, key, prior: Prior = TRUE_PRIOR):
    """Reward of each of the n episodes (n,) of PSRL, greedy or random on one MDP task.

    PSRL and greedy re-plan at the start of every episode from all data so far, with `prior`; ties between
    equally good actions are broken at random (TabulaRL's egreedy with epsilon 0)."""
    S, A, H = env.num_states, env.num_actions, env.horizon

    def episode(carry, k):
        counts, reward_sum = carry
        k_model, k_init, k_steps = jax.random.split(k, 3)
        P, R = posterior_model(counts, reward_sum, k_model, sample=policy == "psrl", prior=prior)
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


# The MDP baselines: name -> (policy, prior). "psrl" and "greedy" are Duan et al.'s Table 2 columns (TabulaRL's
# PSRL with its default prior, and its EpsilonGreedy at epsilon 0); the other two know the family's true prior:
# "planner-true-prior" plans with the posterior-mean model of the correct prior (a strong, correct-prior planner).
MDP_BASELINES = {"random": ("random", TRUE_PRIOR), "psrl": ("psrl", DUAN_PSRL_PRIOR),
                 "greedy": ("greedy", DUAN_GREEDY_PRIOR), "psrl-true-prior": ("psrl", TRUE_PRIOR),
                 "planner-true-prior": ("greedy", TRUE_PRIOR)}


def mdp_baselines(env, tasks, n: int, key):
    out = {}
    trials = tasks.mean_rewards.shape[0]
    for name, (policy, prior) in MDP_BASELINES.items():
        f = jax.jit(jax.vmap(lambda task, k, p=policy, q=prior: mdp_trial(p, env, task, n, k, q)))
        out[name] = f(tasks, jax.random.split(key, trials)).sum(-1)
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

# Each setting: env id, n, and the RL² flags (algos/rl2.py Args) of the "before" recipe: the PPO recipe we
# tuned before issue #22 (raw-scale GAE value targets, per-minibatch advantages, done = 0 at a trial's start),
# kept so that its published figures can be re-run.
BEFORE = dict(value_target="gae", adv_norm="minibatch", start_done=False)
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

# Duan et al.'s optimiser (rllab-curriculum sandbox/rocky/neural_learner: algos/pposgd_clip_ratio.py,
# optimizers/tbptt_optimizer.py, baselines/l2_rnn_baseline.py, sample_processors/default_sample_processor.py,
# envs/multi_env.py; docs/rl2.md gives each detail's source): clipped ratio 0.1, Adam 1e-3, 5 epochs, then the
# best epoch within mean KL 0.01 and back-tracking to it, minibatches of 128 whole trials (full BPTT),
# advantages normalised over the batch, GAE(0.99, 0.3) advantages, value regressed on normalised Monte-Carlo
# returns, elementwise gradient clip 40, no entropy bonus, done = 1 at a trial's start, no time input.
DUAN_OPTIMISER = dict(hidden_size=256, learning_rate=1e-3, clip_coef=0.1, update_epochs=5, target_kl=0.01,
                      grad_clip_value=40.0, value_target="mc", adv_norm="batch", gamma=0.99, gae_lambda=0.3,
                      ent_coef=0.0, anneal=False, time_input=False, start_done=True)
DUAN_MINIBATCH = 128  # trials per minibatch (TBPTTOptimizer batch_size)
DUAN_STEPS_PER_ITERATION = 250_000  # batch_size of his launchers
DUAN_ITERATIONS = 1000  # n_itr of his random-MDP launchers


def trial_steps(env_id: str, n: int) -> int:
    return n * (10 if env_id.startswith("RandomMDP") else 1)


def recipe_flags(recipe: str, name: str, minutes: float, steps: int | None = None) -> dict:
    """The RL² flags of `recipe` for setting `name`.

    before:   SETTINGS' flags with the pre-#22 value targets, advantages and inputs.
    duan:     Duan's optimiser at Duan's budget: about 250k env steps per iteration (whole trials, a multiple
              of 128), 1000 iterations (256M steps on mdp-10). Written to run unchanged on a GPU (jax[cuda]).
    duan-cpu: Duan's optimiser, 128 GRU units (his random-MDP launcher's hidden_dim), about 51k steps per
              iteration, and as many steps as `minutes` of training allow on one core of this CPU (measured
              throughput, CPU_STEPS_PER_SECOND).
    ppo-cpu:  the "before" recipe's PPO optimiser (SETTINGS' flags) with Duan's value targets, batch-wide
              advantage normalisation and trial-start input, sized to `minutes` like duan-cpu.
    `steps` (env steps per seed) replaces the `minutes` sizing of the -cpu recipes."""
    env_id, n, flags = SETTINGS[name]
    T = trial_steps(env_id, n)
    if recipe == "before":
        return {**flags, **BEFORE}
    budget = steps if steps is not None else minutes * 60 * CPU_STEPS_PER_SECOND.get(recipe, 0)
    if recipe == "ppo-cpu":
        step = flags.get("meta_batch", 256) * T
        iterations = max(1, int(budget / step))
        every = max(1, iterations // 10)
        return {**flags, "value_target": "mc", "adv_norm": "batch", "start_done": True,
                "total_timesteps": (iterations // every) * every * step, "eval_interval": every * step}
    if recipe == "duan":
        meta_batch = DUAN_MINIBATCH * max(1, round(DUAN_STEPS_PER_ITERATION / T / DUAN_MINIBATCH))
        step = meta_batch * T
        return {**DUAN_OPTIMISER, "meta_batch": meta_batch, "num_minibatches": meta_batch // DUAN_MINIBATCH,
                "total_timesteps": DUAN_ITERATIONS * step, "eval_interval": 20 * step}
    meta_batch = DUAN_MINIBATCH * max(1, round(CPU_STEPS_PER_ITERATION / T / DUAN_MINIBATCH))
    step = meta_batch * T
    iterations = max(1, int(budget / step))
    every = max(1, iterations // 10)
    return {**DUAN_OPTIMISER, "hidden_size": 128, "meta_batch": meta_batch,
            "num_minibatches": meta_batch // DUAN_MINIBATCH,
            "total_timesteps": (iterations // every) * every * step, "eval_interval": every * step}


CPU_STEPS_PER_ITERATION = 51_200
# env steps per CPU second of training on mdp-10, one core of this CPU (docs/rl2.md): duan-cpu measured as
# 12.29M steps in 425-435 CPU s per seed; ppo-cpu as the before recipe's 17.92M steps in 461 s
CPU_STEPS_PER_SECOND = {"duan-cpu": 28_600, "ppo-cpu": 38_900}


def cli_flags(fields: dict) -> list[str]:
    """Args fields as algos/rl2.py flags (booleans as --x / --no-x)."""
    out = []
    for k, v in fields.items():
        flag = k.replace("_", "-")
        out += [f"--{flag}" if v else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
    return out


def score_params(params, family, tasks, key, args, dims) -> np.ndarray:
    """RL²'s reward in each episode of each of the given trials (trials, n)."""
    from algos.rl2 import rollout_trial

    f = jax.jit(jax.vmap(lambda task, k: rollout_trial(params, family, task, k, args, dims,
                                                       greedy=args.eval_greedy).reward))
    rewards = f(tasks, jax.random.split(key, tasks.mean_rewards.shape[0] if hasattr(tasks, "mean_rewards")
                                        else tasks.means.shape[0]))
    return np.asarray(rewards).reshape(rewards.shape[0], args.episodes_per_trial, dims.horizon).sum(-1)


def baselines_table(name: str, eval_trials: int):
    """The task family, the common scoring tasks (key 12345) and key, and the baselines' table on them
    (name -> mean, stderr) with the hyperparameters tuned on separate tasks."""
    from algos.rl2 import make_task_family

    env_id, n, _ = SETTINGS[name]
    family = make_task_family(env_id)
    key = jax.random.PRNGKey(12345)
    k_task, _ = jax.random.split(key)
    tasks = family.sample_tasks(k_task, eval_trials)
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
    return family, tasks, key, table, tuned


def run_setting(name: str, seeds: list[int], eval_trials: int, scale: float = 1.0, recipe: str = "before",
                minutes: float = 20.0, max_minutes: float | None = None, on_partial=None,
                steps: int | None = None) -> dict:
    """Train RL² (one pinned process per seed, one after another), then evaluate each seed's last checkpoint
    and the baselines on the same eval_trials new tasks. A seed still training after max_minutes is stopped
    and scored from its last checkpoint (marked partial). on_partial(result) after every seed."""
    from algos.rl2 import Args, dims_of
    from common.checkpoints import load_checkpoint

    env_id, n, _ = SETTINGS[name]
    flags = recipe_flags(recipe, name, minutes, steps)
    flags["total_timesteps"] = int(flags["total_timesteps"] * scale)
    flags["eval_interval"] = int(flags["eval_interval"] * min(scale, 1.0))  # the same number of evaluations
    fields = dict(env_id=env_id, episodes_per_trial=n, num_seeds=1, eval_episodes=200, **flags)
    args = Args(**fields)

    family, tasks, key, table, tuned = baselines_table(name, eval_trials)
    dims = dims_of(family)

    eval_args = dataclasses.replace(args, eval_episodes=eval_trials)
    per_seed, info = {}, {}

    def result() -> dict:
        done = [s for s in seeds if s in per_seed]
        out = {"setting": name, "env_id": env_id, "n": n, "recipe": recipe, "rl2_flags": flags,
               "seeds": len(done), "seed_list": done, "table": dict(table), "tuned_baselines": tuned,
               "duan": DUAN.get(name), "runs": {s: info[s] for s in done}}
        if not done:
            return out
        rl2 = np.stack([per_seed[s] for s in done])  # (seeds, trials, n)
        seed_means = rl2.sum(-1).mean(1)
        m, se = mean_and_stderr(seed_means)
        out["table"]["rl2"] = {"mean": float(m), "stderr": float(se),
                               "over": f"{len(done)} seeds x {eval_trials} trials", "per_seed": seed_means.tolist()}
        walls = [info[s]["train_wall_seconds"] for s in done]
        out["train_wall_seconds"] = float(np.mean(walls))
        out["train_wall_seconds_per_seed"] = walls
        out["process_cpu_seconds_per_seed"] = [info[s]["process_cpu_seconds"] for s in done]
        out["partial"] = not all(info[s]["finished"] for s in done)
        L = min(len(info[s]["curve_steps"]) for s in done)
        out["curve"] = {"env_steps": info[done[0]]["curve_steps"][:L],
                        "eval_trial_reward": np.array([info[s]["curve_reward"][:L] for s in done]).T}
        out["rl2_per_episode"] = rl2.mean((0, 1))
        return out

    def scored(done: dict) -> None:
        for seed, rec in done.items():
            if seed in per_seed:
                continue
            (run_dir,) = Path(rec["workdir"]).glob("runs/*")
            saved = load_checkpoint(run_dir / "checkpoint.msgpack")
            params = jax.tree.map(lambda x: jnp.asarray(x[0]), saved["state"]["carry"]["train_state"]["params"])
            per_seed[seed] = score_params(params, family, tasks, key, eval_args, dims)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            evals = [r for r in rows if "eval/trial_reward" in r]
            summary = [r for r in rows if "wall_seconds" in r]
            info[seed] = {"finished": rec["finished"], "steps": int(saved["run"]["step"]),
                          "process_wall_seconds": rec["elapsed"], "process_cpu_seconds": rec["cpu_seconds"],
                          "train_wall_seconds": summary[-1]["wall_seconds"] if summary else rec["elapsed"],
                          "curve_steps": [0] + [r["global_step"] for r in evals],
                          "curve_reward": [float(np.asarray(saved["state"]["evals"])[0].sum(-1).mean())]
                          + [r["eval/trial_reward"] for r in evals]}
            print(f"seed {seed}: {'finished' if rec['finished'] else 'partial'} at {info[seed]['steps']} steps, "
                  f"{per_seed[seed].sum(-1).mean():.2f} on the common tasks ({rec['elapsed']:.0f} s wall, "
                  f"{rec['cpu_seconds']:.0f} CPU s)", flush=True)
        if on_partial is not None:
            on_partial(result())

    jobs = {seed: (cli_flags({**fields, "seed": seed, "exp_name": f"bench-{name}"}), {}) for seed in seeds}
    run_jobs(jobs, max_minutes, scored)
    return result()


def run_jobs(jobs: dict, max_minutes: float | None, on_done) -> None:
    """Each seed as `python -m algos.rl2` on this process's first allowed core, one after another
    (harness.run_pinned), with its folder, finish state, wall time and first evaluation recorded."""
    import resource
    import tempfile

    def child_cpu() -> float:  # CPU seconds of the finished (waited-for) children so far
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    tmp = Path(tempfile.mkdtemp(prefix="rl2_bench_"))
    print(f"runs in {tmp}", flush=True)
    done = {}
    for seed, (flags, _) in jobs.items():
        wd = tmp / f"seed{seed}"
        start, cpu0 = time.time(), child_cpu()
        proc = harness.launch_pinned("algos.rl2", flags, 0, wd)
        while proc.poll() is None:
            if max_minutes is not None and time.time() - start > 60 * max_minutes:
                proc.kill()
            time.sleep(2)
        proc.wait()
        log = (wd / "log.txt").read_text()
        done[seed] = {"workdir": str(wd), "finished": proc.returncode == 0, "elapsed": time.time() - start,
                      "cpu_seconds": child_cpu() - cpu0}
        if proc.returncode != 0:
            print(f"seed {seed}: stopped (returncode {proc.returncode}); log tail:\n{log[-800:]}", flush=True)
        on_done(done)


def plot_setting(res: dict, tag: str = "") -> None:
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
    ax.set_title(f"RL², {res['setting']} ({res.get('recipe', 'before')} recipe): total reward per trial")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: the lines stay visible
    save_figure(fig, f"rl2_{res['setting']}{tag}")
    plt.close(fig)


def headline(res: dict) -> list[dict]:
    t, ref = res["table"], res["duan"] or {}
    best = "thompson" if "thompson" in t else "psrl"
    recipe = res.get("recipe", "before")
    setting = res["setting"] if recipe == "before" else f"{res['setting']} ({recipe})"
    return [{"algorithm": "RL²", "setting": setting, "metric": "total reward per trial",
             "ours": round(t["rl2"]["mean"], 2), "ours_stderr": round(t["rl2"]["stderr"], 2),
             "baseline": best, "baseline_ours": round(t[best]["mean"], 2),
             "reference": ref.get("rl2"), "seeds": res["seeds"],
             "wall_seconds": round(res["train_wall_seconds"], 1), "recipe": res.get("recipe", "before")}]


def markdown_tables(tag: str = "") -> str:
    """Tables of all saved settings, ours beside Duan et al.'s, for docs/rl2.md."""
    from benchmarks.harness import load_results

    out = []
    for name in SETTINGS:
        try:
            res = load_results(f"rl2_{name}{tag}")
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
    parser.add_argument("--recipe", choices=["before", "duan", "duan-cpu", "ppo-cpu"], default="before",
                        help="before: the PPO recipe tuned before issue #22; duan: Duan et al.'s optimiser at "
                             "his budget (~250k steps x 1000 iterations; for a GPU); duan-cpu: his optimiser, "
                             "128 units, sized to --minutes of training per seed on one core of this CPU; "
                             "ppo-cpu: the before recipe's PPO with Duan's value targets and inputs, sized so")
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="duan-cpu, ppo-cpu: minutes of training per seed (at the measured throughput)")
    parser.add_argument("--steps", type=int, default=None,
                        help="duan-cpu, ppo-cpu: env steps of training per seed (replaces the --minutes sizing)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop a seed still training after this many minutes and score its last checkpoint")
    parser.add_argument("--eval-trials", type=int, default=2000)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the training steps")
    parser.add_argument("--report", action="store_true", help="only print the markdown tables of saved results")
    parser.add_argument("--baselines-only", action="store_true",
                        help="only score the baselines of --settings on their common tasks (rl2_baselines.json)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plots of the saved rl2_<setting>.json of --settings")
    a = harness.parse(parser, argv)
    tag = "" if a.recipe == "before" else f"_{a.recipe}"
    if a.replot:
        for name in a.settings:
            plot_setting(harness.load_results(f"rl2_{name}{tag}"))
        return
    if a.report:
        print(markdown_tables(tag))
        return
    if a.baselines_only:
        out = {}
        for name in a.settings:
            *_, table, tuned = baselines_table(name, a.eval_trials)
            out[name] = {"table": table, "tuned_baselines": tuned, "duan": DUAN.get(name)}
            for algo, row in table.items():
                print(f"{name:14s} {algo:18s} {row['mean']:9.2f} +- {row['stderr']:.2f}   "
                      f"(Duan: {(DUAN.get(name) or {}).get(algo, '-')})", flush=True)
        save_results("rl2_baselines", {"settings": out})
        return
    for name in a.settings:
        def save(res, name=name):  # after every seed: a run cut short still leaves its numbers
            if res["seeds"]:
                save_results(f"rl2_{name}{tag}", {**res, "headline": headline(res)})

        res = run_setting(name, a.seeds, a.eval_trials, a.scale, a.recipe, a.minutes, a.max_minutes, save, a.steps)
        for algo, row in res["table"].items():
            print(f"{name:14s} {algo:18s} {row['mean']:9.2f} +- {row['stderr']:.2f}   "
                  f"(Duan: {(res['duan'] or {}).get(algo, '-')})", flush=True)
        print(f"{name}: RL² training {res['train_wall_seconds']:.0f} s per seed", flush=True)
        plot_setting(res, tag)


if __name__ == "__main__":
    main()
