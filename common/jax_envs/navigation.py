"""Continuous 2-D point environments as pure-JAX FuncEnvs.

- `PointNav2D` (a meta-RL task family): a point moves by velocity commands
  clipped to [-0.1, 0.1] from the origin towards a goal uniform in
  [-0.5, 0.5]^2; reward minus the distance to the goal; horizon 100 (Finn et
  al. 2017, "MAML", Sec. 5.3); the episode ends when the point is within
  0.01 of the goal in both coordinates (the authors' env). Registered as
  PointNav2D-v0.
- `PointMass`: a point mass with exactly linear dynamics, for testing
  LQR-based methods (guided policy search); its task is the start position,
  a GPS condition (common/envs/conditions.py). Registered as PointMass-v0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.experimental.functional import FuncEnv


# --------------------------------------------------------------------------
# 2-D point navigation (meta-RL task family)
# --------------------------------------------------------------------------
class PointNavParams(NamedTuple):
    """The task of 2-D point navigation: where the goal is."""

    goal: jax.Array  # (2,) float32


class PointNav2D(FuncEnv):
    """2-D point navigation (Finn et al. 2017, Sec. 5.3; their code's point env).

    The state and observation are the position (2,), starting at the origin;
    an action is a velocity command, clipped to [-0.1, 0.1] per coordinate;
    the reward is minus the distance from the new position to the goal.
    Episodes last at most `horizon` = 100 steps and end (terminated) as soon
    as |x - goal_x| < goal_tolerance and |y - goal_y| < goal_tolerance, with
    goal_tolerance = 0.01 as in the authors' env (cbfinn/maml_rl,
    maml_examples/point_env_randgoal.py). goal_tolerance = 0 never ends an
    episode early (the point must then hover at the goal until the horizon).
    """

    def __init__(self, horizon: int = 100, goal_tolerance: float = 0.01):
        self.horizon = int(horizon)
        self.goal_tolerance = float(goal_tolerance)
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
        # both coordinates strictly within the tolerance (a box, not a disc, as the authors' env has it)
        return jnp.all(jnp.abs(state - self._params(params).goal) < self.goal_tolerance)

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
