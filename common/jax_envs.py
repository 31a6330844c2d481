"""Pure-JAX environments written against gymnasium's functional API.

Each environment is a `gymnasium.experimental.functional.FuncEnv`: a bundle of
pure functions `initial`, `transition`, `observation`, `reward`, `terminal`
that take the environment's `params` (the *task*) explicitly. That is what lets
an algorithm put the whole experiment (env steps included) under one `jax.jit`
and `jax.vmap` it over seeds or tasks.

Every env here is also registered as a gymnasium id, so
`gymnasium.make("DynaMaze-v0")` returns an ordinary `gymnasium.Env` (through
`JaxEnv`, a thin `FunctionalJaxEnv` subclass) that passes gymnasium's
`check_env`. With the gymnasium interface a task is chosen with
`env.reset(options={"task": params})`; it stays until another is given.

Contents
- `Maze`: Sutton & Barto's grid mazes (Reinforcement Learning: An Introduction,
  2nd ed., 2018): the Dyna Maze (Example 8.1), and a "slippery" variant where
  a move succeeds with probability `success_prob` and otherwise slips to one
  of the two perpendicular directions.
- `ChangingMaze`: a maze whose layout changes after a number of steps, the
  Blocking Maze (Example 8.2) and the Shortcut Maze (Example 8.3).
- `tabular_model(env, params)`: the exact (P, R, terminal) arrays of a tabular
  env, for value iteration and tests.

Task families (meta-RL: RL², MAML, PEARL). Each has `sample_tasks(key, n)`,
which returns n tasks as one `params` pytree with a leading axis of size n,
and a fixed episode length `horizon` (registered as gymnasium's
`max_episode_steps`, so the end of an episode is a truncation, not a terminal):
- `BernoulliBandit`: k arms with means uniform in [0, 1]; one pull is one
  episode (Duan et al. 2016, "RL²", Sec. 3.1).
- `RandomMDP`: random tabular MDPs, 10 states, 5 actions, horizon 10, mean
  rewards N(1, 1) with unit-variance reward noise, transitions Dirichlet(1),
  episodes start in state 0 (Duan et al. 2016, Sec. 3.2).
- `PointNav2D`: a point moves by velocity commands clipped to [-0.1, 0.1] from
  the origin towards a goal uniform in [-0.5, 0.5]^2; reward minus the
  distance to the goal; horizon 100 (Finn et al. 2017, "MAML", Sec. 5.3).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.envs.functional_jax_env import FunctionalJaxEnv
from gymnasium.experimental.functional import FuncEnv


# --------------------------------------------------------------------------
# Gymnasium adapter
# --------------------------------------------------------------------------
class JaxEnv(FunctionalJaxEnv):
    """`FunctionalJaxEnv` that passes the task (`params`) to every function.

    gymnasium's own adapter always uses the FuncEnv's default params; this one
    keeps `self.params`, replaced by `reset(options={"task": params})`. It also
    returns NumPy observations (a Python int for a Discrete space), as any
    gymnasium env does; jitted code uses the FuncEnv directly instead.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8, "jax": False}

    def __init__(self, func_env: FuncEnv, render_mode: str | None = None):
        self.params = func_env.default_params
        func_env.transform(jax.jit)
        super().__init__(func_env, metadata=self.metadata, render_mode=render_mode)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        gym.Env.reset(self, seed=seed)
        if seed is not None:
            self.rng = jax.random.PRNGKey(seed)
        if options and "task" in options:
            self.params = options["task"]
        rng, self.rng = jax.random.split(self.rng)
        self.state = self.func_env.initial(rng, self.params)
        obs = self.func_env.observation(self.state, rng, self.params)
        return self._numpy(obs), self.func_env.state_info(self.state, self.params)

    def step(self, action):
        rng, self.rng = jax.random.split(self.rng)
        p = self.params
        next_state = self.func_env.transition(self.state, action, rng, p)
        obs = self.func_env.observation(next_state, rng, p)
        reward = self.func_env.reward(self.state, action, next_state, rng, p)
        terminated = self.func_env.terminal(next_state, rng, p)
        info = self.func_env.transition_info(self.state, action, next_state, p)
        self.state = next_state
        return self._numpy(obs), float(reward), bool(terminated), False, info

    def _numpy(self, obs):
        if isinstance(self.observation_space, spaces.Discrete):
            return int(obs)
        return np.asarray(obs, dtype=self.observation_space.dtype)

    def render(self):
        if self.render_mode != "rgb_array":
            raise NotImplementedError("create the env with render_mode='rgb_array'")
        self.render_state, image = self.func_env.render_image(
            self.state, self.render_state, self.params
        )
        return image


# --------------------------------------------------------------------------
# Grid mazes (Sutton & Barto, Chapter 8)
# --------------------------------------------------------------------------
# Layouts as text: '#' wall, 'S' start, 'G' goal, '.' free. Row 0 is the top.
DYNA_MAZE = (  # Example 8.1 / Fig. 8.2: 6x9, start (2,0), goal (0,8)
    ".......#G",
    "..#....#.",
    "S.#....#.",
    "..#......",
    ".....#...",
    ".........",
)
BLOCKING_MAZE = (  # Example 8.2 / Fig. 8.4: the gap is on the right ...
    "........G",
    ".........",
    ".........",
    "########.",
    ".........",
    "...S.....",
)
BLOCKING_MAZE_AFTER = (  # ... and after 1000 steps it moves to the left.
    "........G",
    ".........",
    ".........",
    ".########",
    ".........",
    "...S.....",
)
SHORTCUT_MAZE = (  # Example 8.3 / Fig. 8.5: only a long way round the left ...
    "........G",
    ".........",
    ".........",
    ".########",
    ".........",
    "...S.....",
)
SHORTCUT_MAZE_AFTER = (  # ... and after 3000 steps a shortcut opens on the right.
    "........G",
    ".........",
    ".........",
    ".#######.",
    ".........",
    "...S.....",
)

# Actions in the book's order: up, down, right, left, as (d_row, d_col).
MOVES = np.array([[-1, 0], [1, 0], [0, 1], [0, -1]], dtype=np.int32)
# The two moves perpendicular to each action, where a slippery move may go.
PERPENDICULAR = np.array([[2, 3], [2, 3], [0, 1], [0, 1]], dtype=np.int32)


class MazeParams(NamedTuple):
    """The task of a maze: its layout and how slippery it is."""

    walls: jax.Array  # (H, W) bool
    start: jax.Array  # (2,) int32, (row, col)
    goal: jax.Array  # (2,) int32, (row, col)
    success_prob: jax.Array  # () float32; 1.0 is deterministic


def parse_layout(layout, success_prob: float = 1.0) -> MazeParams:
    """Turn a text layout into `MazeParams`."""
    grid = np.array([list(row) for row in layout])
    if grid.ndim != 2 or (grid == "S").sum() != 1 or (grid == "G").sum() != 1:
        raise ValueError("a maze layout needs equal-length rows, one 'S' and one 'G'")
    return MazeParams(
        walls=jnp.asarray(grid == "#"),
        start=jnp.asarray(np.argwhere(grid == "S")[0], dtype=jnp.int32),
        goal=jnp.asarray(np.argwhere(grid == "G")[0], dtype=jnp.int32),
        success_prob=jnp.float32(success_prob),
    )


class Maze(FuncEnv):
    """A grid maze: reach the goal; reward 1 on arrival, 0 otherwise.

    - Observation: the cell index `row * W + col` (Discrete(H*W)).
    - Actions: 0 up, 1 down, 2 right, 3 left (Discrete(4)). A move into a wall
      or off the grid leaves the agent where it is.
    - With `success_prob < 1` the move goes to each perpendicular direction
      with probability (1 - success_prob) / 2.
    - The episode terminates on reaching the goal. There is no time limit (the
      book's episodes have none); add `gymnasium.wrappers.TimeLimit` if needed.
    """

    def __init__(self, layout=DYNA_MAZE, success_prob: float = 1.0):
        self.layout, self.success_prob = tuple(layout), float(success_prob)
        super().__init__()
        self.height, self.width = self.default_params.walls.shape
        self.num_states, self.num_actions = self.height * self.width, 4
        self.observation_space = spaces.Discrete(self.num_states)
        self.action_space = spaces.Discrete(self.num_actions)

    def get_default_params(self, **kwargs) -> MazeParams:
        return parse_layout(self.layout, self.success_prob)

    def _params(self, params):
        return self.default_params if params is None else params

    def initial(self, rng, params=None):
        return self._params(params).start  # the state is the agent's (row, col)

    def move_probs(self, action, params=None):
        """Probability of each actual move given the chosen `action`: (4,)."""
        p = self._params(params).success_prob
        slip = jnp.zeros(4).at[jnp.asarray(PERPENDICULAR)[action]].add((1.0 - p) / 2)
        return slip.at[action].add(p)

    def move(self, pos, move, params=None):
        """Deterministic effect of an actual move from `pos` (walls, borders)."""
        walls = self._params(params).walls
        h, w = walls.shape
        target = jnp.clip(pos + jnp.asarray(MOVES)[move], 0, jnp.array([h - 1, w - 1]))
        return jnp.where(walls[target[0], target[1]], pos, target)

    def transition(self, state, action, rng, params=None):
        move = jax.random.choice(rng, 4, p=self.move_probs(action, params))
        return self.move(state, move, params)

    def observation(self, state, rng, params=None):
        return state[0] * self.width + state[1]

    def terminal(self, state, rng, params=None):
        return jnp.all(state == self._params(params).goal)

    def reward(self, state, action, next_state, rng, params=None):
        return self.terminal(next_state, rng, params).astype(jnp.float32)

    # Rendering: a small RGB picture, numpy only (no pygame needed).
    def render_init(self, params=None, **kwargs):
        return None

    def render_image(self, state, render_state, params=None, cell: int = 24):
        params = self._params(params)
        img = np.full((self.height, self.width, 3), 235, dtype=np.uint8)
        img[np.asarray(params.walls)] = (60, 60, 60)
        img[tuple(np.asarray(params.goal))] = (60, 170, 60)
        img[tuple(np.asarray(state))] = (40, 90, 220)
        return render_state, np.kron(img, np.ones((cell, cell, 1), dtype=np.uint8))

    def render_close(self, render_state, params=None):
        pass


class ChangingMaze(Maze):
    """A maze whose layout is replaced by `layout_after` after `change_step`
    steps of the agent's experience, counted across episodes (S&B 8.3).

    The env itself stays stationary: `default_params` is the first layout,
    `changed_params` the second, and the experiment switches task at
    `change_step` (with the gymnasium interface:
    `env.reset(options={"task": env.unwrapped.func_env.changed_params})`).
    """

    def __init__(self, layout, layout_after, change_step: int, success_prob: float = 1.0):
        super().__init__(layout, success_prob)
        self.changed_params = parse_layout(layout_after, success_prob)
        self.change_step = int(change_step)


def tabular_model(env: Maze, params=None):
    """Exact model of a tabular env: P (S, A, S), R (S, A, S), terminal (S,).

    Built from the env's own `move_probs` and `move`, so it cannot disagree
    with `transition`. Walls appear as states that are never reached.
    """
    params = env._params(params)
    s_idx = jnp.arange(env.num_states)
    pos = jnp.stack([s_idx // env.width, s_idx % env.width], axis=-1)  # (S, 2)
    # next position for every (state, actual move): (S, 4, 2)
    nxt = jax.vmap(lambda p: jax.vmap(lambda m: env.move(p, m, params))(jnp.arange(4)))(pos)
    nxt_idx = nxt[..., 0] * env.width + nxt[..., 1]  # (S, 4)
    probs = jax.vmap(lambda a: env.move_probs(a, params))(jnp.arange(4))  # (A, 4 moves)
    one_hot = jax.nn.one_hot(nxt_idx, env.num_states)  # (S, moves, S)
    P = jnp.einsum("am,smt->sat", probs, one_hot)
    terminal = jax.vmap(lambda p: env.terminal(p, None, params))(pos)  # (S,)
    R = jnp.broadcast_to(terminal.astype(jnp.float32), P.shape)  # reward on arrival
    return P, R, terminal


# --------------------------------------------------------------------------
# Task families for meta-RL
# --------------------------------------------------------------------------
class BanditParams(NamedTuple):
    """The task of a Bernoulli bandit: the arms' success probabilities."""

    means: jax.Array  # (k,) float32


class BernoulliBandit(FuncEnv):
    """k-armed Bernoulli bandit; a pull of arm a pays 1 with probability means[a].

    Following Duan et al. (2016, Sec. 3.1), one pull is one episode: the
    observation is a constant 0 (Discrete(1)) and the state only records
    whether the arm was pulled (terminal then). A "trial" of n pulls is n
    episodes on the same task.
    """

    horizon = 1

    def __init__(self, num_arms: int = 5):
        self.num_arms = int(num_arms)
        super().__init__()
        self.observation_space = spaces.Discrete(1)
        self.action_space = spaces.Discrete(self.num_arms)

    def sample_tasks(self, key, n: int) -> BanditParams:
        """n tasks, arm means i.i.d. uniform in [0, 1]: means (n, k)."""
        return BanditParams(jax.random.uniform(key, (n, self.num_arms)))

    def get_default_params(self, **kwargs) -> BanditParams:
        return jax.tree.map(lambda x: x[0], self.sample_tasks(jax.random.PRNGKey(0), 1))

    def _params(self, params):
        return self.default_params if params is None else params

    def initial(self, rng, params=None):
        return jnp.int32(0)  # 0: not pulled yet, 1: pulled

    def transition(self, state, action, rng, params=None):
        return jnp.int32(1)

    def observation(self, state, rng, params=None):
        return jnp.int32(0)

    def terminal(self, state, rng, params=None):
        return state == 1

    def reward(self, state, action, next_state, rng, params=None):
        p = self._params(params).means[action]
        return jax.random.bernoulli(rng, p).astype(jnp.float32)

    # Rendering (numpy only): one bar per arm, as tall as its mean.
    def render_init(self, params=None, **kwargs):
        return None

    def render_image(self, state, render_state, params=None, size: int = 64):
        means = np.asarray(self._params(params).means)
        img = np.full((size, 8 * self.num_arms, 3), 235, dtype=np.uint8)
        for a, m in enumerate(means):
            img[size - int(m * size):, 8 * a + 1: 8 * a + 7] = (40, 90, 220)
        return render_state, img

    def render_close(self, render_state, params=None):
        pass


class MDPParams(NamedTuple):
    """The task of a tabular MDP."""

    transitions: jax.Array  # (S, A, S) P(s' | s, a)
    mean_rewards: jax.Array  # (S, A) E[r | s, a]


class RandomMDP(FuncEnv):
    """Random tabular MDPs as in Duan et al. (2016, Sec. 3.2).

    Per task: P(. | s, a) ~ Dirichlet(1, ..., 1) (a flat Dirichlet) and mean
    rewards mu(s, a) ~ N(1, 1); a step pays mu(s, a) + N(0, 1). Every episode
    starts in state 0 and lasts `horizon` steps; there is no terminal state.
    The observation is the state index (Discrete(S)).
    """

    def __init__(self, num_states: int = 10, num_actions: int = 5, horizon: int = 10):
        self.num_states, self.num_actions, self.horizon = int(num_states), int(num_actions), int(horizon)
        super().__init__()
        self.observation_space = spaces.Discrete(self.num_states)
        self.action_space = spaces.Discrete(self.num_actions)

    def sample_tasks(self, key, n: int) -> MDPParams:
        """n tasks: transitions (n, S, A, S), mean rewards (n, S, A)."""
        k_p, k_r = jax.random.split(key)
        S, A = self.num_states, self.num_actions
        P = jax.random.dirichlet(k_p, jnp.ones(S), (n, S, A))
        return MDPParams(P, 1.0 + jax.random.normal(k_r, (n, S, A)))

    def get_default_params(self, **kwargs) -> MDPParams:
        return jax.tree.map(lambda x: x[0], self.sample_tasks(jax.random.PRNGKey(0), 1))

    def _params(self, params):
        return self.default_params if params is None else params

    def initial(self, rng, params=None):
        return jnp.int32(0)

    def transition(self, state, action, rng, params=None):
        p = self._params(params).transitions[state, action]
        return jax.random.choice(rng, self.num_states, p=p).astype(jnp.int32)

    def observation(self, state, rng, params=None):
        return state

    def terminal(self, state, rng, params=None):
        return jnp.bool_(False)

    def reward(self, state, action, next_state, rng, params=None):
        noise = jax.random.normal(jax.random.fold_in(rng, 1))  # independent of the transition's draw
        return self._params(params).mean_rewards[state, action] + noise

    # Rendering (numpy only): a row of states, the current one in blue.
    def render_init(self, params=None, **kwargs):
        return None

    def render_image(self, state, render_state, params=None, cell: int = 24):
        img = np.full((1, self.num_states, 3), 235, dtype=np.uint8)
        img[0, int(state)] = (40, 90, 220)
        return render_state, np.kron(img, np.ones((cell, cell, 1), dtype=np.uint8))

    def render_close(self, render_state, params=None):
        pass


class PointNavParams(NamedTuple):
    """The task of 2-D point navigation: where the goal is."""

    goal: jax.Array  # (2,) float32


class PointNav2D(FuncEnv):
    """2-D point navigation (Finn et al. 2017, Sec. 5.3; their code's point env).

    The state and observation are the position (2,), starting at the origin;
    an action is a velocity command, clipped to [-0.1, 0.1] per coordinate;
    the reward is minus the distance from the new position to the goal.
    Episodes last `horizon` = 100 steps (no early termination).
    """

    def __init__(self, horizon: int = 100):
        self.horizon = int(horizon)
        super().__init__()
        bound = 0.1 * self.horizon  # the farthest a point can get in one episode
        self.observation_space = spaces.Box(-bound, bound, (2,), np.float32)
        self.action_space = spaces.Box(-0.1, 0.1, (2,), np.float32)

    def sample_tasks(self, key, n: int) -> PointNavParams:
        """n tasks, goals uniform in [-0.5, 0.5]^2: goal (n, 2)."""
        return PointNavParams(jax.random.uniform(key, (n, 2), minval=-0.5, maxval=0.5))

    def get_default_params(self, **kwargs) -> PointNavParams:
        return PointNavParams(jnp.array([0.3, -0.2], jnp.float32))

    def _params(self, params):
        return self.default_params if params is None else params

    def initial(self, rng, params=None):
        return jnp.zeros(2, jnp.float32)

    def transition(self, state, action, rng, params=None):
        return state + jnp.clip(jnp.asarray(action, jnp.float32), -0.1, 0.1)

    def observation(self, state, rng, params=None):
        return state

    def terminal(self, state, rng, params=None):
        return jnp.bool_(False)

    def reward(self, state, action, next_state, rng, params=None):
        return -jnp.linalg.norm(next_state - self._params(params).goal)

    # Rendering (numpy only): the square [-1, 1]^2, goal in green, point in blue.
    def render_init(self, params=None, **kwargs):
        return None

    def render_image(self, state, render_state, params=None, size: int = 128):
        img = np.full((size, size, 3), 235, dtype=np.uint8)

        def pixel(xy):  # x to the right, y up
            col, row = (np.clip(np.asarray(xy), -1, 1) + 1) / 2 * (size - 1)
            return int(size - 1 - row), int(col)

        for xy, colour in ((self._params(params).goal, (60, 170, 60)), (state, (40, 90, 220))):
            r, c = pixel(xy)
            img[max(r - 2, 0): r + 3, max(c - 2, 0): c + 3] = colour
        return render_state, img

    def render_close(self, render_state, params=None):
        pass


def is_task_family(func_env: Any) -> bool:
    """True for a FuncEnv that can sample tasks (a meta-RL task family)."""
    return callable(getattr(func_env, "sample_tasks", None)) and hasattr(func_env, "horizon")


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------
def _maze_entry(render_mode=None, **kwargs):
    return JaxEnv(Maze(**kwargs), render_mode=render_mode)


def _changing_maze_entry(render_mode=None, **kwargs):
    return JaxEnv(ChangingMaze(**kwargs), render_mode=render_mode)


def _bandit_entry(render_mode=None, **kwargs):
    return JaxEnv(BernoulliBandit(**kwargs), render_mode=render_mode)


def _mdp_entry(render_mode=None, **kwargs):
    return JaxEnv(RandomMDP(**kwargs), render_mode=render_mode)


def _point_nav_entry(render_mode=None, **kwargs):
    return JaxEnv(PointNav2D(**kwargs), render_mode=render_mode)


REGISTERED = {
    "DynaMaze-v0": (_maze_entry, {"layout": DYNA_MAZE}),
    "SlipperyMaze-v0": (_maze_entry, {"layout": DYNA_MAZE, "success_prob": 0.8}),
    "BlockingMaze-v0": (
        _changing_maze_entry,
        {"layout": BLOCKING_MAZE, "layout_after": BLOCKING_MAZE_AFTER, "change_step": 1000},
    ),
    "ShortcutMaze-v0": (
        _changing_maze_entry,
        {"layout": SHORTCUT_MAZE, "layout_after": SHORTCUT_MAZE_AFTER, "change_step": 3000},
    ),
    # Task families (meta-RL). The task is `params`, or reset(options={"task": ...}).
    "BernoulliBandit2-v0": (_bandit_entry, {"num_arms": 2}),
    "BernoulliBandit5-v0": (_bandit_entry, {"num_arms": 5}),
    "BernoulliBandit10-v0": (_bandit_entry, {"num_arms": 10}),
    "BernoulliBandit50-v0": (_bandit_entry, {"num_arms": 50}),
    "RandomMDP-v0": (_mdp_entry, {"num_states": 10, "num_actions": 5, "horizon": 10}),
    "PointNav2D-v0": (_point_nav_entry, {"horizon": 100}),
}
# Fixed episode lengths, enforced by gymnasium's TimeLimit (a truncation).
MAX_EPISODE_STEPS = {"RandomMDP-v0": 10, "PointNav2D-v0": 100}


def register_all() -> None:
    """Register every env of this module with gymnasium (idempotent)."""
    for env_id, (entry, kwargs) in REGISTERED.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry, kwargs=dict(kwargs),
                         max_episode_steps=MAX_EPISODE_STEPS.get(env_id))


register_all()


def func_env_of(env: gym.Env) -> Any:
    """The FuncEnv behind a gymnasium env made from this module, else None."""
    return getattr(env.unwrapped, "func_env", None)


# --------------------------------------------------------------------------
# Linear point mass (guided policy search tests)
# --------------------------------------------------------------------------
class PointMassParams(NamedTuple):
    """The task (a GPS condition) of the point mass: where it starts."""

    start: jax.Array  # (2,) float32


class PointMass(FuncEnv):
    """A 2-D point mass with linear dynamics, for testing LQR-based methods.

    State = observation = (position (2,), velocity (2,)), starting at rest at
    `params.start`; the action is a force (2,), unclipped, so the dynamics are
    exactly linear: v' = v + dt u, p' = p + dt v' (semi-implicit Euler,
    dt = 0.1). The reward is minus the distance of the new position to the
    origin. Episodes last `horizon` = 30 steps (no early termination).
    """

    dt = 0.1

    def __init__(self, horizon: int = 30):
        self.horizon = int(horizon)
        super().__init__()
        self.observation_space = spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self.action_space = spaces.Box(-10.0, 10.0, (2,), np.float32)

    def get_default_params(self, **kwargs) -> PointMassParams:
        return PointMassParams(jnp.array([1.0, 0.0], jnp.float32))

    def initial(self, rng, params=None):
        params = self.default_params if params is None else params
        return jnp.concatenate([jnp.asarray(params.start, jnp.float32), jnp.zeros(2, jnp.float32)])

    def transition(self, state, action, rng, params=None):
        vel = state[2:] + self.dt * jnp.asarray(action, jnp.float32)
        return jnp.concatenate([state[:2] + self.dt * vel, vel])

    def observation(self, state, rng, params=None):
        return state

    def terminal(self, state, rng, params=None):
        return jnp.bool_(False)

    def reward(self, state, action, next_state, rng, params=None):
        return -jnp.linalg.norm(next_state[:2])

    def render_init(self, params=None, **kwargs):
        return None

    def render_image(self, state, render_state, params=None, size: int = 128):
        img = np.full((size, size, 3), 235, dtype=np.uint8)
        col, row = (np.clip(np.asarray(state[:2]), -1.5, 1.5) / 3 + 0.5) * (size - 1)
        r, c = int(size - 1 - row), int(col)
        img[max(r - 2, 0): r + 3, max(c - 2, 0): c + 3] = (40, 90, 220)
        return render_state, img

    def render_close(self, render_state, params=None):
        pass


def _point_mass_entry(render_mode=None, **kwargs):
    return JaxEnv(PointMass(**kwargs), render_mode=render_mode)


REGISTERED["PointMass-v0"] = (_point_mass_entry, {"horizon": 30})
MAX_EPISODE_STEPS["PointMass-v0"] = 30
register_all()
