"""PEARL's point-robot task families as pure-JAX FuncEnvs.

Rakelly, Zhou et al. 2019 (PEARL), their code katerakelly/oyster,
rlkit/envs/point_robot.py:
- `PointRobot` (PointRobot-v0): a point on the plane moves by position
  deltas clipped to [-0.1, 0.1] per coordinate; it starts uniform in
  [-1, 1]^2; the goal (the task) is uniform in [-1, 1]^2; reward minus the
  distance from the new position to the goal; horizon 20.
- `SparsePointRobot` (SparsePointRobot-v0): goals on the upper half of the
  unit circle, start at the origin; the reward (what gymnasium's `step`
  returns, what the context sees and what is reported) is 1 - distance
  within `goal_radius` = 0.2 of the goal and 0 outside. `dense_reward` keeps
  the dense one, on which oyster trains the critic.

Tasks: `sample_tasks(key, n)` draws from the family's distribution (for
other meta-RL algorithms); `oyster_tasks(n)` gives oyster's fixed list of n
goals (NumPy seed 1337, as in its env constructors), split by
`task_splits(n_train, n_test)` into the first n_train (meta-training) and
the last n_test (held-out) goals, as oyster's launch_experiment.py does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.experimental.functional import FuncEnv


class GoalParams(NamedTuple):
    """A point-robot task: where the goal is."""

    goal: jax.Array  # (2,) float32 (or (n, 2) for n tasks)


class PointRobot(FuncEnv):
    """oyster's PointEnv: position control on the plane, dense reward -|s' - g|.

    The state and the observation are the position (2,). oyster's policy acts
    in [-1, 1] and its NormalizedBoxEnv rescales to the action space
    [-0.1, 0.1] and clips; here the action space is [-0.1, 0.1] itself and
    `transition` clips (an algorithm maps its [-1, 1] output to the bounds).
    No early termination: episodes end at `horizon` (a truncation).
    """

    max_step = 0.1

    def __init__(self, horizon: int = 20):
        self.horizon = int(horizon)
        super().__init__()
        bound = 1.0 + self.max_step * self.horizon  # the farthest a point can get from a start in [-1, 1]^2
        self.observation_space = spaces.Box(-bound, bound, (2,), np.float32)
        self.action_space = spaces.Box(-self.max_step, self.max_step, (2,), np.float32)

    # ---- tasks
    def sample_tasks(self, key, n: int) -> GoalParams:
        """n goals uniform in [-1, 1]^2: goal (n, 2)."""
        return GoalParams(jax.random.uniform(key, (n, 2), minval=-1.0, maxval=1.0))

    def oyster_tasks(self, n: int = 100) -> GoalParams:
        """oyster's n goals: np.random.seed(1337), then one uniform [-1, 1] draw per coordinate, goal after goal."""
        goals = np.random.RandomState(1337).uniform(-1.0, 1.0, size=(n, 2))
        return GoalParams(jnp.asarray(goals, jnp.float32))

    def task_splits(self, n_train: int = 80, n_test: int = 20) -> tuple[GoalParams, GoalParams]:
        """(train tasks, held-out tasks): the first n_train and the last n_test of oyster_tasks(n_train + n_test)."""
        tasks = self.oyster_tasks(n_train + n_test)
        return GoalParams(tasks.goal[:n_train]), GoalParams(tasks.goal[n_train:])

    def get_default_params(self, **kwargs) -> GoalParams:
        return GoalParams(jnp.array([0.5, -0.5], jnp.float32))

    def _goal(self, params):
        return (self.default_params if params is None else params).goal

    # ---- dynamics
    def initial(self, rng, params=None):
        return jax.random.uniform(rng, (2,), minval=-1.0, maxval=1.0)

    def transition(self, state, action, rng, params=None):
        return state + jnp.clip(jnp.asarray(action, jnp.float32), -self.max_step, self.max_step)

    def observation(self, state, rng, params=None):
        return state

    def terminal(self, state, rng, params=None):
        return jnp.bool_(False)

    def dense_reward(self, state, action, next_state, rng, params=None):
        """-|s' - g|, the distance after the move (oyster: PointEnv.step)."""
        return -jnp.linalg.norm(next_state - self._goal(params))

    def reward(self, state, action, next_state, rng, params=None):
        return self.dense_reward(state, action, next_state, rng, params)

    # ---- rendering (numpy only): the square [-1.2, 1.2]^2, goal green, point blue
    def render_init(self, params=None, **kwargs):
        return None

    def render_image(self, state, render_state, params=None, size: int = 128):
        img = np.full((size, size, 3), 235, dtype=np.uint8)

        def pixel(xy):  # x to the right, y up
            col, row = (np.clip(np.asarray(xy), -1.2, 1.2) / 2.4 + 0.5) * (size - 1)
            return int(size - 1 - row), int(col)

        for xy, colour in ((self._goal(params), (60, 170, 60)), (state, (40, 90, 220))):
            r, c = pixel(xy)
            img[max(r - 2, 0): r + 3, max(c - 2, 0): c + 3] = colour
        return render_state, img

    def render_close(self, render_state, params=None):
        pass


class SparsePointRobot(PointRobot):
    """oyster's SparsePointEnv: goals on the unit upper half circle, start at
    the origin, reward 1 - |s' - g| within `goal_radius` of the goal, else 0.

    oyster's step() returns the dense reward and puts the sparse one in
    info['sparse_reward']; its algorithm trains the critic on the dense one
    and gives the encoder and the reported returns the sparse one. Here the
    gymnasium reward is the sparse one (the task's objective) and
    `dense_reward` the critic's.
    """

    def __init__(self, horizon: int = 20, goal_radius: float = 0.2):
        self.goal_radius = float(goal_radius)
        super().__init__(horizon)

    def sample_tasks(self, key, n: int) -> GoalParams:
        """n goals on the upper unit half circle, angle uniform in [0, pi]: goal (n, 2)."""
        angle = jax.random.uniform(key, (n,), minval=0.0, maxval=jnp.pi)
        return GoalParams(jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1))

    def oyster_tasks(self, n: int = 100) -> GoalParams:
        """oyster's n goals: n angles evenly spaced over [0, pi], shuffled after np.random.seed(1337)."""
        angles = np.linspace(0, np.pi, num=n)
        goals = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        np.random.RandomState(1337).shuffle(goals)
        return GoalParams(jnp.asarray(goals, jnp.float32))

    def initial(self, rng, params=None):
        return jnp.zeros(2, jnp.float32)

    def reward(self, state, action, next_state, rng, params=None):
        """oyster's sparsify_rewards (r masked to 0 where r < -radius) plus the +1 it adds inside the radius."""
        dense = self.dense_reward(state, action, next_state, rng, params)
        return jnp.where(dense >= -self.goal_radius, dense + 1.0, 0.0)
