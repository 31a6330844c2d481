"""Dyna-Q, Dyna-Q+ and expected-update Dyna-Q: tabular model-based RL.

Papers and book:
- Sutton 1990, "Integrated Architectures for Learning, Planning, and Reacting
  Based on Approximating Dynamic Programming" (ICML).
- Sutton & Barto, "Reinforcement Learning: An Introduction", 2nd ed. (2018):
  Sec. 8.2, the Tabular Dyna-Q box (p. 164) and Fig. 8.2 (Dyna Maze);
  Sec. 8.3, Dyna-Q+ (Figs. 8.4 and 8.5, Blocking and Shortcut Mazes);
  Sec. 8.5, expected vs sample updates.
- CS 285 (Levine), model-based RL lecture: "Dyna", the online Q-learning
  algorithm that also learns from transitions replayed through a model.

Real experience is used twice: once directly (a Q-learning update), and once
to learn a model, from which n more Q-learning updates per real step are
*planned* on previously seen state-action pairs. With n = 0 this is plain
Q-learning; with n = 50 the Dyna Maze is solved in about three episodes.

This file also offers:
- Dyna-Q+ (`--plus`): an exploration bonus kappa * sqrt(tau) in planning, tau
  being the number of steps since the pair was last tried for real, so that
  the agent re-checks parts of the world that may have changed.
- A distribution model (`--model expected`): counts of (s, a, s') with mean
  rewards, and *expected* planning updates (the lecture's E over s', r), which
  stay correct on stochastic envs where the last-outcome model does not.

The whole experiment is one jitted program: `lax.scan` over env steps (the
pure-JAX env is stepped inside the scan), `vmap` over independent repetitions
(`--num-seeds 30` gives the book's 30 runs in one call).

Run:
    python -m algos.dyna_q                                   # Dyna Maze, n = 50
    python -m algos.dyna_q --planning-steps 0 --num-seeds 30 # Q-learning
    python -m algos.dyna_q --env-id ShortcutMaze-v0 --plus --total-timesteps 6000
    python -m algos.dyna_q --env-id SlipperyMaze-v0 --model expected

Algorithm (the book's box; the numbers mark the code below):
    Initialise Q(s, a) = 0 and Model(s, a) for all s, a.
    Loop, once per real env step:
      [1] S <- current state (the start state after a terminal one)
      [2] A <- epsilon-greedy(S, Q), ties broken at random
      [3] take A; observe R, S' and whether S' is terminal
      [4] direct RL:  Q(S,A) <- Q(S,A) + alpha [R + gamma max_a Q(S',a) - Q(S,A)]
      [5] model learning:  Model(S,A) <- R, S'  (sample model: last outcome), or
          add the outcome to the counts N(S,A,s') (distribution model)
      [6] planning, n times:
            S, A <- a random previously observed pair
            sample model:       R, S' <- Model(S,A); the update of [4]
            distribution model: Q(S,A) <- Q(S,A) + alpha [sum_s' p(s'|S,A)
                                (r(S,A,s') + gamma max_a Q(s',a)) - Q(S,A)]
            Dyna-Q+: R + kappa sqrt(tau(S,A)) as the reward; every action of a
            visited state may be planned, an untried one modelled as leading
            back to S with reward 0 (the book's footnote in Sec. 8.3).
    [7] every eval_interval steps: evaluate the greedy policy (no exploration).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from common.envs import make_env
from common.experiment import (
    CommonArgs,
    Run,
    check_finite,
    fail,
    record_video,
    save_checkpoint,
    seed_everything,
)
from common.jax_envs.adapter import func_env_of


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "DynaMaze-v0"
    """a pure-JAX env with Discrete observations and actions (DynaMaze-v0,
    BlockingMaze-v0, ShortcutMaze-v0, SlipperyMaze-v0)"""
    total_timesteps: int = 3000
    """real env steps per repetition (a multiple of eval_interval)"""
    eval_interval: int = 500
    """evaluate the greedy policy every this many env steps"""
    eval_episodes: int = 10
    """greedy episodes per evaluation (they differ only on stochastic envs
    and by tie-breaking)"""
    num_seeds: int = 1
    """independent repetitions, vmapped in one jitted program (the book: 30)"""
    planning_steps: int = 50
    """n, planning updates per real step (the book: 0, 5, 50)"""
    alpha: float = 0.1
    """step size (the book: 0.1 on the Dyna Maze)"""
    gamma: float = 0.95
    """discount (the book: 0.95)"""
    epsilon: float = 0.1
    """exploration rate of the epsilon-greedy behaviour policy (the book: 0.1)"""
    model: Literal["sample", "expected"] = "sample"
    """sample: last observed outcome of (s, a), the book's Dyna-Q; expected:
    counts of outcomes and expected planning updates (stochastic envs)"""
    plus: bool = False
    """Dyna-Q+: exploration bonus kappa * sqrt(tau) in planning"""
    kappa: float = 1e-3
    """Dyna-Q+ bonus scale (used only with --plus)"""
    eval_max_steps: int = 200
    """cap on the length of an evaluation episode"""
    num_episodes: int = 0
    """if > 0, stop once every repetition has completed this many episodes
    (the book's Fig. 8.2: 50), checked every eval_interval steps;
    total_timesteps is then the cap"""


class Config(NamedTuple):
    """The static numbers the jitted program is built for."""

    num_states: int
    num_actions: int
    alpha: float
    gamma: float
    epsilon: float
    expected: bool
    plus: bool
    kappa: float
    num_seeds: int
    steps_per_eval: int
    num_evals: int
    num_episodes: int  # stop once every repetition has this many (0: never)
    eval_episodes: int
    eval_max_steps: int


class Agent(NamedTuple):
    """Everything Dyna-Q learns. S states, A actions."""

    q: jax.Array  # (S, A) action values
    # Sample model: the last observed outcome of each pair. Untried pairs lead
    # back to their own state with reward 0 (used only by Dyna-Q+).
    next_obs: jax.Array  # (S, A) int32
    reward: jax.Array  # (S, A)
    terminal: jax.Array  # (S, A) bool, was S' terminal
    # Distribution model (only with --model expected, else None).
    counts: jax.Array | None  # (S, A, S) N(s, a, s')
    reward_sum: jax.Array | None  # (S, A, S) summed rewards
    terminal_sum: jax.Array | None  # (S, A, S) summed terminal flags
    # Bookkeeping for "a random previously observed pair" and for tau.
    tried: jax.Array  # (S, A) bool, tried for real at least once
    last_tried: jax.Array  # (S, A) int32, step when last tried for real
    visited: jax.Array  # (S,) bool, acted from at least once
    seen_states: jax.Array  # (S,) int32, the visited states in the order seen
    num_seen: jax.Array  # () int32


class Carry(NamedTuple):
    agent: Agent
    env_state: jax.Array
    obs: jax.Array  # () int32, current state S
    t: jax.Array  # () int32, real steps taken so far
    episodes: jax.Array  # () int32, episodes completed so far
    key: jax.Array


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------
def init_agent(cfg: Config) -> Agent:
    S, A = cfg.num_states, cfg.num_actions
    dist = (lambda: jnp.zeros((S, A, S))) if cfg.expected else (lambda: None)
    return Agent(
        q=jnp.zeros((S, A)),
        next_obs=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[:, None], (S, A)),
        reward=jnp.zeros((S, A)),
        terminal=jnp.zeros((S, A), bool),
        counts=dist(),
        reward_sum=dist(),
        terminal_sum=dist(),
        tried=jnp.zeros((S, A), bool),
        last_tried=jnp.zeros((S, A), jnp.int32),
        visited=jnp.zeros((S,), bool),
        seen_states=jnp.zeros((S,), jnp.int32),
        num_seen=jnp.int32(0),
    )


def random_argmax(key: jax.Array, values: jax.Array) -> jax.Array:
    """argmax with ties broken uniformly at random (the book's convention;
    with Q initialised to 0, a fixed tie-break would walk into walls forever)."""
    is_max = values == values.max()
    return jax.random.categorical(key, jnp.where(is_max, 0.0, -jnp.inf))


def epsilon_greedy(key: jax.Array, q_row: jax.Array, epsilon: float) -> jax.Array:
    k_explore, k_random, k_greedy = jax.random.split(key, 3)
    random_action = jax.random.randint(k_random, (), 0, q_row.shape[0])
    explore = jax.random.uniform(k_explore) < epsilon
    return jnp.where(explore, random_action, random_argmax(k_greedy, q_row))


def q_update(q: jax.Array, s, a, target, alpha: float) -> jax.Array:
    """Q(s,a) <- Q(s,a) + alpha [target - Q(s,a)]."""
    return q.at[s, a].add(alpha * (target - q[s, a]))


def remember_state(agent: Agent, s) -> Agent:
    """Add s to the list of observed states the first time the agent acts from
    it. A list, so that a uniform pick costs one random number."""
    new = ~agent.visited[s]
    # A write at index S (list full) is dropped by JAX; it only happens when not new.
    seen = agent.seen_states.at[agent.num_seen].set(jnp.where(new, s, agent.seen_states[agent.num_seen]))
    return agent._replace(seen_states=seen, num_seen=agent.num_seen + new,
                          visited=agent.visited.at[s].set(True))


def learn_model(agent: Agent, s, a, r, s_next, terminal, t) -> Agent:
    """[5] Model learning from one real transition."""
    agent = agent._replace(
        next_obs=agent.next_obs.at[s, a].set(s_next),
        reward=agent.reward.at[s, a].set(r),
        terminal=agent.terminal.at[s, a].set(terminal),
        tried=agent.tried.at[s, a].set(True),
        last_tried=agent.last_tried.at[s, a].set(t),
    )
    if agent.counts is not None:
        agent = agent._replace(
            counts=agent.counts.at[s, a, s_next].add(1.0),
            reward_sum=agent.reward_sum.at[s, a, s_next].add(r),
            terminal_sum=agent.terminal_sum.at[s, a, s_next].add(terminal),
        )
    return agent


def planning_target(agent: Agent, q: jax.Array, s, a, t, cfg: Config) -> jax.Array:
    """The target of one planning update of pair (s, a) at step t.

    sample:   r + gamma (1 - terminal) max_a' Q(s', a') with (r, s') the last outcome
    expected: sum_s' p(s'|s,a) [r(s,a,s') + gamma (1 - d(s,a,s')) max_a' Q(s', a')]
    """
    v = q.max(axis=1)  # (S,) max_a' Q(s', a')
    if cfg.expected:
        n = agent.counts[s, a]  # (S,)
        total = n.sum()
        safe = jnp.maximum(n, 1.0)
        backup = agent.reward_sum[s, a] / safe + cfg.gamma * (1 - agent.terminal_sum[s, a] / safe) * v
        # An untried pair (possible only with Dyna-Q+) leads back to s with reward 0.
        target = jnp.where(total > 0, (n / jnp.maximum(total, 1.0)) @ backup, cfg.gamma * v[s])
    else:
        s_next = agent.next_obs[s, a]
        target = agent.reward[s, a] + cfg.gamma * (1 - agent.terminal[s, a]) * v[s_next]
    if cfg.plus:
        tau = (t - agent.last_tried[s, a]).astype(jnp.float32)
        target = target + cfg.kappa * jnp.sqrt(tau)
    return target


def pick_pair(agent: Agent, u: jax.Array, cfg: Config):
    """The book's "S <- random previously observed state; A <- random action
    previously taken in S" (Dyna-Q+: any action of S), from two uniforms u."""
    s = agent.seen_states[jnp.floor(u[0] * agent.num_seen).astype(jnp.int32)]
    allowed = jnp.ones(cfg.num_actions, bool) if cfg.plus else agent.tried[s]  # (A,)
    k = jnp.floor(u[1] * allowed.sum()).astype(jnp.int32)  # pick the k-th allowed action
    a = jnp.argmax(jnp.cumsum(allowed) > k)
    return s, a


def plan(agent: Agent, key: jax.Array, n, t, cfg: Config) -> Agent:
    """[6] n planning updates, one after another (each sees the last's Q).

    n is a traced number, so n = 0, 5 and 50 share one compiled program."""

    def one_update(i, q):
        s, a = pick_pair(agent, jax.random.uniform(jax.random.fold_in(key, i), (2,)), cfg)
        return q_update(q, s, a, planning_target(agent, q, s, a, t, cfg), cfg.alpha)

    return agent._replace(q=jax.lax.fori_loop(0, n, one_update, agent.q))


def dyna_step(carry: Carry, n, env, task_at, cfg: Config):
    """One real env step of Dyna-Q with its model learning and n planning updates."""
    agent, env_state, s, t, episodes, key = carry
    key, k_act, k_env, k_reset, k_plan = jax.random.split(key, 5)
    params = task_at(t)
    agent = remember_state(agent, s)
    # [2] act
    a = epsilon_greedy(k_act, agent.q[s], cfg.epsilon)
    # [3] real env step
    next_env_state = env.transition(env_state, a, k_env, params)
    s_next = env.observation(next_env_state, k_env, params)
    r = env.reward(env_state, a, next_env_state, k_env, params)
    terminal = env.terminal(next_env_state, k_env, params)
    # [4] direct RL: one-step Q-learning; no bootstrap from a terminal state
    target = r + cfg.gamma * (1 - terminal) * agent.q[s_next].max()
    agent = agent._replace(q=q_update(agent.q, s, a, target, cfg.alpha))
    # [5] model learning
    agent = learn_model(agent, s, a, r, s_next, terminal, t + 1)
    # [6] planning
    agent = plan(agent, k_plan, n, t + 1, cfg)
    # [1] next state: back to the start after a terminal state
    next_params = task_at(t + 1)  # the maze the next episode starts in
    reset_state = env.initial(k_reset, next_params)
    next_env_state = jnp.where(terminal, reset_state, next_env_state)
    s_next = jnp.where(terminal, env.observation(reset_state, k_reset, next_params), s_next)
    return Carry(agent, next_env_state, s_next, t + 1, episodes + terminal, key), (r, terminal)


def evaluate(q: jax.Array, key: jax.Array, env, params, cfg: Config):
    """[7] Greedy episodes from the start state: mean return and mean length
    (length = eval_max_steps when the goal is not reached)."""

    def episode(key):
        k_init, k_steps = jax.random.split(key)
        state = env.initial(k_init, params)

        def step(c, k):
            state, done, ret, length = c
            k_a, k_env = jax.random.split(k)
            a = random_argmax(k_a, q[env.observation(state, k_env, params)])
            nxt = env.transition(state, a, k_env, params)
            r = env.reward(state, a, nxt, k_env, params)
            new_done = done | env.terminal(nxt, k_env, params)
            return (jnp.where(done, state, nxt), new_done, ret + r * ~done, length + ~done), None

        init = (state, jnp.bool_(False), jnp.float32(0.0), jnp.int32(0))
        (_, _, ret, length), _ = jax.lax.scan(step, init, jax.random.split(k_steps, cfg.eval_max_steps))
        return ret, length

    ret, length = jax.vmap(episode)(jax.random.split(key, cfg.eval_episodes))
    return ret.mean(), length.mean()


def make_experiment(env, cfg: Config, params_before, params_after=None, change_step=None,
                    log_fn=None):
    """Build the jitted `experiment(key, n)`: cfg.num_seeds repetitions of
    Dyna-Q with n planning steps, as one program.

    The env's task is `params_before` until `change_step` real steps have been
    taken, then `params_after` (the Blocking and Shortcut Mazes).

    The program runs periods of `steps_per_eval` env steps, each followed by an
    evaluation [7], until `num_evals` periods are done or (if num_episodes > 0)
    every repetition has completed num_episodes episodes. It returns the final
    agents (leading seed axis), rewards and terminal flags (seeds, T), eval
    returns and lengths (num_evals, seeds; NaN after an early stop) and the
    number of steps run; T = num_evals * steps_per_eval.
    """
    if params_after is None:
        params_after, change_step = params_before, 0
    S, P, E = cfg.num_seeds, cfg.steps_per_eval, cfg.num_evals

    def task_at(t):
        return jax.tree.map(lambda b, a: jnp.where(t >= change_step, a, b), params_before, params_after)

    def init_carry(key):
        k_env, key = jax.random.split(key)
        env_state = env.initial(k_env, task_at(0))
        obs = env.observation(env_state, k_env, task_at(0))
        return Carry(init_agent(cfg), env_state, obs, jnp.int32(0), jnp.int32(0), key)

    def run_period(carry, n):
        carry, trace = jax.lax.scan(lambda c, _: dyna_step(c, n, env, task_at, cfg), carry, None,
                                    length=P)
        k_eval, key = jax.random.split(carry.key)
        eval_ret, eval_len = evaluate(carry.agent.q, k_eval, env, task_at(carry.t), cfg)
        return carry._replace(key=key), trace, eval_ret, eval_len

    def experiment(key, n):
        def not_done(loop):
            i, carry = loop[0], loop[1]
            enough = (cfg.num_episodes > 0) & jnp.all(carry.episodes >= cfg.num_episodes)
            return (i < E) & ~enough

        def period(loop):
            i, carry, rewards, terminals, eval_ret, eval_len = loop
            carry, (r, d), ret, length = jax.vmap(run_period, in_axes=(0, None))(carry, n)
            rewards = jax.lax.dynamic_update_slice(rewards, r, (0, i * P))  # r: (S, P)
            terminals = jax.lax.dynamic_update_slice(terminals, d, (0, i * P))
            eval_ret, eval_len = eval_ret.at[i].set(ret), eval_len.at[i].set(length)
            if log_fn is not None:  # progress, as means over seeds
                jax.debug.callback(log_fn, (i + 1) * P, {
                    "eval/return": ret.mean(), "eval/length": length.mean(),
                    "train/episodes": carry.episodes.mean(), "train/reward": r.sum(1).mean(),
                }, ordered=True)
            return i + 1, carry, rewards, terminals, eval_ret, eval_len

        carry = jax.vmap(init_carry)(jax.random.split(key, S))
        nan = jnp.full((E, S), jnp.nan)
        loop = (jnp.int32(0), carry, jnp.zeros((S, E * P)), jnp.zeros((S, E * P), bool), nan, nan)
        i, carry, rewards, terminals, eval_ret, eval_len = jax.lax.while_loop(not_done, period, loop)
        return carry.agent, rewards, terminals, eval_ret, eval_len, i * P

    return jax.jit(experiment)


def episode_lengths(terminals: np.ndarray) -> list[int]:
    """Lengths of the completed episodes in one run's (T,) terminal flags."""
    ends = np.flatnonzero(np.asarray(terminals)) + 1
    return np.diff(np.concatenate([[0], ends])).tolist()


def config_from_args(args: Args, num_states: int, num_actions: int) -> Config:
    return Config(
        num_states=num_states, num_actions=num_actions,
        alpha=args.alpha, gamma=args.gamma, epsilon=args.epsilon,
        expected=args.model == "expected", plus=args.plus, kappa=args.kappa,
        num_seeds=args.num_seeds, steps_per_eval=args.eval_interval,
        num_evals=args.total_timesteps // args.eval_interval, num_episodes=args.num_episodes,
        eval_episodes=args.eval_episodes, eval_max_steps=args.eval_max_steps,
    )


def validate(args: Args) -> None:
    """One-line errors for settings that cannot work."""
    if args.planning_steps < 0:
        fail(f"--planning-steps must be >= 0, got {args.planning_steps}")
    if args.num_seeds < 1 or args.eval_episodes < 1 or args.eval_max_steps < 1:
        fail("--num-seeds, --eval-episodes and --eval-max-steps must be >= 1")
    if args.eval_interval < 1 or args.total_timesteps < args.eval_interval:
        fail(f"need 1 <= --eval-interval ({args.eval_interval}) <= --total-timesteps ({args.total_timesteps})")
    if args.total_timesteps % args.eval_interval:
        fail(f"--total-timesteps ({args.total_timesteps}) must be a multiple of --eval-interval ({args.eval_interval})")
    if not (0 < args.alpha <= 1 and 0 <= args.gamma <= 1 and 0 <= args.epsilon <= 1):
        fail("need 0 < alpha <= 1, 0 <= gamma <= 1 and 0 <= epsilon <= 1")


def make_func_env(env_id: str):
    """The pure-JAX env behind `env_id`, or a one-line error saying why not."""
    from gymnasium import spaces

    func_env = func_env_of(make_env(env_id))
    if func_env is None:
        fail(f"Dyna-Q runs the whole experiment under jit and needs a pure-JAX env "
             f"(common/jax_envs.py); '{env_id}' is not one")
    if not (isinstance(func_env.observation_space, spaces.Discrete)
            and isinstance(func_env.action_space, spaces.Discrete)):
        fail(f"tabular Dyna-Q needs Discrete observations and actions; '{env_id}' has "
             f"{func_env.observation_space} and {func_env.action_space}")
    return func_env


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def main(args: Args) -> dict:
    validate(args)
    func_env = make_func_env(args.env_id)
    key = seed_everything(args.seed)
    run = Run(args)
    cfg = config_from_args(args, func_env.num_states, func_env.num_actions)

    def log_fn(step, metrics):  # called from inside the jitted program
        run.log(metrics, int(step))

    experiment = make_experiment(
        func_env, cfg, func_env.default_params,
        getattr(func_env, "changed_params", None), getattr(func_env, "change_step", None),
        log_fn=log_fn)
    start = time.time()
    agent, rewards, terminals, eval_ret, eval_len, steps = jax.block_until_ready(
        experiment(key, args.planning_steps))
    wall = time.time() - start
    steps = int(steps)
    check_finite(steps, q=agent.q)
    rewards, terminals = np.asarray(rewards)[:, :steps], np.asarray(terminals)[:, :steps]
    done_evals = steps // args.eval_interval
    eval_ret, eval_len = np.asarray(eval_ret)[:done_evals], np.asarray(eval_len)[:done_evals]

    # Summary: the book's learning-curve statistic, steps per episode.
    lengths = [episode_lengths(terminals[i]) for i in range(args.num_seeds)]
    n_common = min(len(x) for x in lengths)
    mean_len = np.mean([x[:n_common] for x in lengths], axis=0) if n_common else np.array([])
    summary = {
        "wall_seconds": wall,
        "episodes_completed": float(np.mean([len(x) for x in lengths])),
        "final_eval_return": float(eval_ret[-1].mean()),
        "final_eval_length": float(eval_len[-1].mean()),
        "cumulative_reward": float(rewards.sum(1).mean()),
    }
    run.log(summary, steps)
    if n_common:
        shown = ", ".join(f"{i + 1}: {mean_len[i]:.1f}" for i in range(min(n_common, 10)))
        print(f"mean steps per episode over {args.num_seeds} seed(s), episodes {shown}", flush=True)

    if args.save_model:  # tables of every repetition, leading axis = seed
        tables = {k: v for k, v in agent._asdict().items() if v is not None}
        print(f"saved {save_checkpoint(run.dir / 'agent.msgpack', tables)}")
    if args.capture_video:  # greedy episodes of the first repetition
        q = np.asarray(agent.q[0])
        rng = np.random.default_rng(args.seed)
        policy = lambda o: int(rng.choice(np.flatnonzero(q[o] == q[o].max())))  # noqa: E731
        env = make_env(args.env_id, render_mode="rgb_array")
        folder = record_video(env, policy, run.dir / "videos", episodes=1, seed=args.seed,
                              max_steps=args.eval_max_steps)
        print(f"video in {folder}")
    run.close()
    return {"agent": agent, "rewards": rewards, "terminals": terminals, "eval_return": eval_ret,
            "eval_length": eval_len, "run_dir": run.dir, **summary}


if __name__ == "__main__":
    main(tyro.cli(Args))
