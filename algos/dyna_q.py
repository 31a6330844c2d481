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
Q-learning.

This file also offers:
- Dyna-Q+ (`--plus`): an exploration bonus kappa * sqrt(tau) in planning, tau
  being the number of steps since the pair was last tried for real, so that
  the agent re-checks parts of the world that may have changed.
- A distribution model (`--model expected`): counts of (s, a, s') with mean
  rewards, and *expected* planning updates (the lecture's E over s', r), which
  stay correct on stochastic envs where the last-outcome model does not.

The pure-JAX env is stepped inside the program: one jitted call per
evaluation period (`run_period`: `lax.scan` over its env steps, `vmap` over
independent repetitions, `--num-seeds 30` gives the book's 30 runs), with a
checkpoint between periods. `experiment` runs the same periods as one program.

Run:
    python -m algos.dyna_q                                   # Dyna Maze, n = 50: 2 s on a 2-core CPU
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
import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces

from common.checkpoints import save_checkpoint
from common.checks import check_finite_series, check_memory, check_ranges, fail
from common.command_line import cli
from common.envs import make_env
from common.experiment import CommonArgs, Run, check_video_support, record_video, seed_everything
from common.jax_envs.adapter import func_env_of
from common.progress import Progress


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

    @property
    def num_periods(self) -> int:
        """Evaluation periods of eval_interval env steps (at most: --num-episodes may stop earlier)."""
        return self.total_timesteps // self.eval_interval


class Dims(NamedTuple):
    """The sizes read from the env (static in the jitted functions)."""

    num_states: int  # nS
    num_actions: int  # nA


class Agent(NamedTuple):
    """Everything Dyna-Q learns. Shapes: nS states, nA actions."""

    q: jax.Array  # (nS, nA) action values
    # Sample model: the last observed outcome of each pair. Untried pairs lead
    # back to their own state with reward 0 (used only by Dyna-Q+).
    next_obs: jax.Array  # (nS, nA) int32
    reward: jax.Array  # (nS, nA)
    terminal: jax.Array  # (nS, nA) bool, was S' terminal
    # Distribution model (only with --model expected, else None).
    counts: jax.Array | None  # (nS, nA, nS) N(s, a, s')
    reward_sum: jax.Array | None  # (nS, nA, nS) summed rewards
    terminal_sum: jax.Array | None  # (nS, nA, nS) summed terminal flags
    # Bookkeeping for "a random previously observed pair" and for tau.
    tried: jax.Array  # (nS, nA) bool, tried for real at least once
    last_tried: jax.Array  # (nS, nA) int32, step when last tried for real
    visited: jax.Array  # (nS,) bool, acted from at least once
    seen_states: jax.Array  # (nS,) int32, the visited states in the order seen
    num_seen: jax.Array  # () int32


class Carry(NamedTuple):
    """One repetition's state between env steps (and in the checkpoint)."""

    agent: Agent
    env_state: jax.Array
    obs: jax.Array  # () int32, current state S
    t: jax.Array  # () int32, real steps taken so far
    episodes: jax.Array  # () int32, episodes completed so far
    key: jax.Array


class Schedule(NamedTuple):
    """The env's task over time: `before` until `change_step` real steps have
    been taken, then `after` (the Blocking and Shortcut Mazes change layout)."""

    before: Any
    after: Any
    change_step: jax.Array  # () int32


class StepRecord(NamedTuple):
    """What each real step leaves behind, (seeds, steps) per period."""

    reward: jax.Array
    terminal: jax.Array
    q: jax.Array  # max |Q| after the step: non-finite exactly from the step Q went bad


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------
def init_agent(args: Args, dims: Dims) -> Agent:
    nS, nA = dims.num_states, dims.num_actions
    dist = (lambda: jnp.zeros((nS, nA, nS))) if args.model == "expected" else (lambda: None)
    return Agent(
        q=jnp.zeros((nS, nA)),
        next_obs=jnp.broadcast_to(jnp.arange(nS, dtype=jnp.int32)[:, None], (nS, nA)),
        reward=jnp.zeros((nS, nA)),
        terminal=jnp.zeros((nS, nA), bool),
        counts=dist(),
        reward_sum=dist(),
        terminal_sum=dist(),
        tried=jnp.zeros((nS, nA), bool),
        last_tried=jnp.zeros((nS, nA), jnp.int32),
        visited=jnp.zeros((nS,), bool),
        seen_states=jnp.zeros((nS,), jnp.int32),
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
    # A write at index nS (list full) is dropped by JAX; it only happens when not new.
    seen = agent.seen_states.at[agent.num_seen].set(jnp.where(new, s, agent.seen_states[agent.num_seen]))
    return agent._replace(seen_states=seen, num_seen=agent.num_seen + new,
                          visited=agent.visited.at[s].set(True))


def learn_model(agent: Agent, s, a, r, s_next, terminal, t) -> Agent:
    """[5] Model learning from one real transition (t: the env step it ends)."""
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


def planning_target(agent: Agent, q: jax.Array, s, a, t, args: Args) -> jax.Array:
    """The target of one planning update of pair (s, a) at step t.

    sample:   r + gamma (1 - terminal) max_a' Q(s', a') with (r, s') the last outcome
    expected: sum_s' p(s'|s,a) [r(s,a,s') + gamma (1 - d(s,a,s')) max_a' Q(s', a')]
    """
    v = q.max(axis=1)  # (nS,) max_a' Q(s', a')
    if args.model == "expected":
        n = agent.counts[s, a]  # (nS,)
        total = n.sum()
        safe = jnp.maximum(n, 1.0)
        backup = agent.reward_sum[s, a] / safe + args.gamma * (1 - agent.terminal_sum[s, a] / safe) * v
        # An untried pair (possible only with Dyna-Q+) leads back to s with reward 0.
        target = jnp.where(total > 0, (n / jnp.maximum(total, 1.0)) @ backup, args.gamma * v[s])
    else:
        s_next = agent.next_obs[s, a]
        target = agent.reward[s, a] + args.gamma * (1 - agent.terminal[s, a]) * v[s_next]
    if args.plus:
        tau = (t - agent.last_tried[s, a]).astype(jnp.float32)
        target = target + args.kappa * jnp.sqrt(tau)
    return target


def pick_pair(agent: Agent, u: jax.Array, args: Args):
    """The book's "S <- random previously observed state; A <- random action
    previously taken in S" (Dyna-Q+: any action of S), from two uniforms u."""
    s = agent.seen_states[jnp.floor(u[0] * agent.num_seen).astype(jnp.int32)]
    allowed = jnp.ones(agent.q.shape[1], bool) if args.plus else agent.tried[s]  # (nA,)
    k = jnp.floor(u[1] * allowed.sum()).astype(jnp.int32)  # pick the k-th allowed action
    a = jnp.argmax(jnp.cumsum(allowed) > k)
    return s, a


def plan(agent: Agent, key: jax.Array, n, t, args: Args) -> Agent:
    """[6] n planning updates, one after another (each sees the last's Q).

    n is a traced number, so n = 0, 5 and 50 share one compiled program."""

    def one_update(i, q):
        s, a = pick_pair(agent, jax.random.uniform(jax.random.fold_in(key, i), (2,)), args)
        return q_update(q, s, a, planning_target(agent, q, s, a, t, args), args.alpha)

    return agent._replace(q=jax.lax.fori_loop(0, n, one_update, agent.q))


def task_at(schedule: Schedule, t):
    """The env's params at real step t."""
    return jax.tree.map(lambda b, a: jnp.where(t >= schedule.change_step, a, b), schedule.before, schedule.after)


def dyna_step(carry: Carry, n, env, schedule: Schedule, args: Args):
    """[1]-[6] One real env step of Dyna-Q with its model learning and n planning updates."""
    agent, env_state, s, t, episodes, key = carry
    key, k_act, k_env, k_reset, k_plan = jax.random.split(key, 5)
    params = task_at(schedule, t)
    agent = remember_state(agent, s)
    # [2] act
    a = epsilon_greedy(k_act, agent.q[s], args.epsilon)
    # [3] real env step
    next_env_state = env.transition(env_state, a, k_env, params)
    s_next = env.observation(next_env_state, k_env, params)
    r = env.reward(env_state, a, next_env_state, k_env, params)
    terminal = env.terminal(next_env_state, k_env, params)
    # [4] direct RL: one-step Q-learning; no bootstrap from a terminal state
    target = r + args.gamma * (1 - terminal) * agent.q[s_next].max()
    agent = agent._replace(q=q_update(agent.q, s, a, target, args.alpha))
    # [5] model learning
    agent = learn_model(agent, s, a, r, s_next, terminal, t + 1)
    # [6] planning
    agent = plan(agent, k_plan, n, t + 1, args)
    # [1] next state: back to the start after a terminal state
    next_params = task_at(schedule, t + 1)  # the maze the next episode starts in
    reset_state = env.initial(k_reset, next_params)
    next_env_state = jnp.where(terminal, reset_state, next_env_state)
    s_next = jnp.where(terminal, env.observation(reset_state, k_reset, next_params), s_next)
    record = StepRecord(r, terminal, jnp.abs(agent.q).max())  # max is NaN as soon as one entry is
    return Carry(agent, next_env_state, s_next, t + 1, episodes + terminal, key), record


def evaluate(q: jax.Array, key: jax.Array, env, params, args: Args):
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
        (_, _, ret, length), _ = jax.lax.scan(step, init, jax.random.split(k_steps, args.eval_max_steps))
        return ret, length

    ret, length = jax.vmap(episode)(jax.random.split(key, args.eval_episodes))
    return ret.mean(), length.mean()


# ----------------------------------------------------------------------------
# The jitted chunks: start, one evaluation period, the whole experiment
# ----------------------------------------------------------------------------
jit_static = functools.partial(jax.jit, static_argnames=("env", "args", "dims"))


@jit_static
def init_carry(key, schedule: Schedule, env, args: Args, dims: Dims) -> Carry:
    """The carry of every repetition before its first step (leading axis: seed)."""

    def one(key):
        k_env, key = jax.random.split(key)
        env_state = env.initial(k_env, task_at(schedule, 0))
        obs = env.observation(env_state, k_env, task_at(schedule, 0))
        return Carry(init_agent(args, dims), env_state, obs, jnp.int32(0), jnp.int32(0), key)

    return jax.vmap(one)(jax.random.split(key, args.num_seeds))


def period(carry: Carry, n, schedule: Schedule, env, args: Args):
    """eval_interval real steps of every repetition, then [7] an evaluation.

    Returns the carry, the per-step record (seeds, eval_interval), the eval
    returns and lengths (seeds,) and the progress metrics (means over seeds)."""

    def one(carry):  # one repetition; vmapped below
        carry, record = jax.lax.scan(lambda c, _: dyna_step(c, n, env, schedule, args), carry, None,
                                     length=args.eval_interval)
        k_eval, key = jax.random.split(carry.key)
        ret, length = evaluate(carry.agent.q, k_eval, env, task_at(schedule, carry.t), args)
        return carry._replace(key=key), record, ret, length

    carry, record, ret, length = jax.vmap(one)(carry)
    progress = {"eval/return": ret.mean(), "eval/length": length.mean(),
                "train/episodes": carry.episodes.mean(), "train/reward": record.reward.sum(1).mean()}
    return carry, record, ret, length, progress


run_period = jax.jit(period, static_argnames=("env", "args"))


def finished(episodes, args: Args):
    """--num-episodes reached by every repetition (checked between periods)."""
    return (args.num_episodes > 0) & jnp.all(episodes >= args.num_episodes)


@jit_static
def experiment(key, n, schedule: Schedule, env, args: Args, dims: Dims):
    """The whole experiment as one program (the benchmark's 30 runs x 3 settings
    in seconds): the periods of `run_period` in a `lax.while_loop`, until
    num_periods are done or every repetition has num_episodes episodes.

    Returns the final agents (leading seed axis), rewards and terminal flags
    (seeds, T), eval returns and lengths (num_periods, seeds; NaN after an
    early stop) and the number of steps run; T = total_timesteps. Gives the
    same numbers as main's loop over `run_period`."""
    seeds, P, E = args.num_seeds, args.eval_interval, args.num_periods

    def not_done(loop):
        i, carry = loop[0], loop[1]
        return (i < E) & ~finished(carry.episodes, args)

    def body(loop):
        i, carry, rewards, terminals, eval_ret, eval_len = loop
        carry, record, ret, length, _ = period(carry, n, schedule, env, args)
        rewards = jax.lax.dynamic_update_slice(rewards, record.reward, (0, i * P))  # (seeds, P)
        terminals = jax.lax.dynamic_update_slice(terminals, record.terminal, (0, i * P))
        return i + 1, carry, rewards, terminals, eval_ret.at[i].set(ret), eval_len.at[i].set(length)

    nan = jnp.full((E, seeds), jnp.nan)
    loop = (jnp.int32(0), init_carry(key, schedule, env, args, dims), jnp.zeros((seeds, E * P)),
            jnp.zeros((seeds, E * P), bool), nan, nan)
    i, carry, rewards, terminals, eval_ret, eval_len = jax.lax.while_loop(not_done, body, loop)
    return carry.agent, rewards, terminals, eval_ret, eval_len, i * P


def episode_lengths(terminals: np.ndarray) -> list[int]:
    """Lengths of the completed episodes in one run's (T,) terminal flags."""
    ends = np.flatnonzero(np.asarray(terminals)) + 1
    return np.diff(np.concatenate([[0], ends])).tolist()


def schedule_of(env) -> Schedule:
    """The env's task schedule: its default params, and its changed params after
    change_step steps if it has them (ChangingMaze)."""
    after = getattr(env, "changed_params", None)
    if after is None:
        return Schedule(env.default_params, env.default_params, jnp.int32(0))
    return Schedule(env.default_params, after, jnp.int32(env.change_step))


# ----------------------------------------------------------------------------
# Set-up: checks
# ----------------------------------------------------------------------------
def validate(args: Args) -> None:
    """One-line errors for settings that cannot work (before anything heavy)."""
    check_ranges(args, at_least_1=("num_seeds", "eval_max_steps"),
                 non_negative=("planning_steps", "num_episodes", "kappa"),
                 open_unit=("alpha",), discount=("gamma",), probability=("epsilon",))
    if args.total_timesteps < args.eval_interval:
        fail(f"--eval-interval ({args.eval_interval}) must be <= --total-timesteps ({args.total_timesteps})")
    if args.total_timesteps % args.eval_interval:
        fail(f"--total-timesteps ({args.total_timesteps}) must be a multiple of --eval-interval ({args.eval_interval})")


def make_func_env(env_id: str):
    """The pure-JAX env behind `env_id`, or a one-line error saying why not."""
    func_env = func_env_of(make_env(env_id))
    if func_env is None:
        fail(f"Dyna-Q runs the whole experiment under jit and needs a pure-JAX env "
             f"(common/jax_envs/, e.g. DynaMaze-v0); '{env_id}' is not one")
    if not (isinstance(func_env.observation_space, spaces.Discrete)
            and isinstance(func_env.action_space, spaces.Discrete)):
        fail(f"tabular Dyna-Q needs Discrete observations and actions; '{env_id}' has "
             f"{func_env.observation_space} and {func_env.action_space}")
    return func_env


def check_sizes(args: Args, dims: Dims) -> None:
    """The tables and the per-step history of every repetition must fit in memory."""
    nS, nA = dims
    per_seed = 18 * nS * nA + (12 * nS * nA * nS if args.model == "expected" else 0)
    per_seed += 5 * args.total_timesteps + 9 * args.eval_interval  # rewards, flags; one period's record
    check_memory(2 * args.num_seeds * per_seed, "the Dyna-Q tables and step history",
                 "lower --num-seeds or --total-timesteps")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def main(args: Args) -> dict:
    validate(args)
    env = make_func_env(args.env_id)
    if args.capture_video:
        check_video_support(args.env_id)
    dims = Dims(env.num_states, env.num_actions)
    check_sizes(args, dims)
    schedule = schedule_of(env)
    key = seed_everything(args.seed)
    run = Run(args)
    seeds, P, T = args.num_seeds, args.eval_interval, args.total_timesteps
    progress = Progress(f"Dyna-Q{'+' if args.plus else ''} (n = {args.planning_steps}) on {args.env_id}, "
                        f"{seeds} repetition(s)", T, start=run.start_step, every=P, compiling="one evaluation period")
    # The checkpoint: the carry of every repetition (Q, model, visit times, env
    # state, step and episode counters, key) and the history the summary needs.
    state = run.restore({
        "carry": init_carry(key, schedule, env, args, dims),
        "rewards": np.zeros((seeds, T), np.float32), "terminals": np.zeros((seeds, T), bool),
        "eval_return": np.full((args.num_periods, seeds), np.nan, np.float32),
        "eval_length": np.full((args.num_periods, seeds), np.nan, np.float32),
    })
    i = run.start_step // P  # periods done
    while i < args.num_periods and not finished(state["carry"].episodes, args):
        # [1]-[7] one jitted call: eval_interval steps of every repetition, then the evaluation
        with run.timed("experiment"):
            carry, record, ret, length, metrics = jax.block_until_ready(
                run_period(state["carry"], args.planning_steps, schedule, env, args))
        steps = i * P + np.arange(1, P + 1)  # the env step of each record entry
        check_finite_series(steps, reward=record.reward.T, q=record.q.T)
        state["carry"] = carry
        state["rewards"][:, i * P:(i + 1) * P] = np.asarray(record.reward)
        state["terminals"][:, i * P:(i + 1) * P] = np.asarray(record.terminal)
        state["eval_return"][i], state["eval_length"][i] = np.asarray(ret), np.asarray(length)
        i += 1
        run.log(metrics, i * P, echo=False)
        progress.update(i * P, metrics, ["eval/return", "eval/length", "train/episodes"])
        if run.checkpoint_due(i * P, (i - 1) * P):
            run.save(state, i * P)
    steps = i * P
    run.save(state, steps)
    agent = state["carry"].agent
    rewards, terminals = state["rewards"][:, :steps], state["terminals"][:, :steps]
    eval_ret, eval_len = state["eval_return"][:i], state["eval_length"][:i]

    # Summary: the book's learning-curve statistic, steps per episode.
    lengths = [episode_lengths(terminals[k]) for k in range(seeds)]
    n_common = min(len(x) for x in lengths)
    mean_len = np.mean([x[:n_common] for x in lengths], axis=0) if n_common else np.array([])
    summary = {
        "wall_seconds": run.timings["experiment"],
        "episodes_completed": float(np.mean([len(x) for x in lengths])),
        "final_eval_return": float(eval_ret[-1].mean()),
        "final_eval_length": float(eval_len[-1].mean()),
        "cumulative_reward": float(rewards.sum(1).mean()),
    }
    run.log(summary, steps, echo=False)
    if n_common:
        shown = ", ".join(f"{k + 1}: {mean_len[k]:.1f}" for k in range(min(n_common, 10)))
        print(f"mean steps per episode over {seeds} seed(s), episodes {shown}", flush=True)
    shortest = {"DynaMaze-v0": 14}.get(args.env_id)  # S&B Example 8.1
    progress.done("final_eval_length", summary["final_eval_length"],
                  reference=f"greedy episode length; the shortest path is {shortest} steps" if shortest else
                  "greedy episode length", extra=f"{summary['episodes_completed']:.0f} episodes per repetition")

    if args.save_model:  # tables of every repetition, leading axis = seed
        tables = {k: v for k, v in agent._asdict().items() if v is not None}
        print(f"saved {save_checkpoint(run.dir / 'agent.msgpack', tables)}")
    if args.capture_video:  # greedy episodes of the first repetition
        q = np.asarray(agent.q[0])
        rng = np.random.default_rng(args.seed)

        def policy(o):
            return int(rng.choice(np.flatnonzero(q[o] == q[o].max())))

        folder = record_video(make_env(args.env_id, render_mode="rgb_array"), policy, run.dir / "videos",
                              episodes=1, seed=args.seed, max_steps=args.eval_max_steps)
        print(f"video in {folder}")
    run.close()
    return {"agent": agent, "rewards": rewards, "terminals": terminals, "eval_return": eval_ret,
            "eval_length": eval_len, "run_dir": run.dir, **summary}


if __name__ == "__main__":
    cli(Args, main)
