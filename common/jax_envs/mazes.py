"""Grid mazes of Sutton & Barto (Reinforcement Learning: An Introduction,
2nd ed., 2018, Chapter 8) as pure-JAX FuncEnvs, for Dyna-Q.

- `Maze`: the Dyna Maze (Example 8.1), and a "slippery" variant where a move
  succeeds with probability `success_prob` and otherwise slips to one of the
  two perpendicular directions.
- `ChangingMaze`: a maze whose layout changes after a number of steps, the
  Blocking Maze (Example 8.2) and the Shortcut Maze (Example 8.3).
- `tabular_model(env, params)`: the exact (P, R, terminal) arrays of a maze,
  for value iteration and tests.

Registered as DynaMaze-v0, SlipperyMaze-v0, BlockingMaze-v0, ShortcutMaze-v0
(common/envs/__init__.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.experimental.functional import FuncEnv

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
