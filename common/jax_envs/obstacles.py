"""A 2-D vehicle flying down a corridor through a random field of circular obstacles (pure JAX).

`ObstacleField` (registered as ObstacleField-v0) is the crash-counting task of
PLATO (Kahn et al. 2017; algos/plato.py), a 2-D version of its quadrotor
flying forward through a forest: a point vehicle, a double integrator with
linear drag, starts at rest near (0, 0) in a corridor |y| < half_width and must
cross the finish line x = finish; touching a circle or a wall ends the episode
and is a *crash*, crossing the line ends it as a *success*.

- state x = (position (2,), velocity (2,)): what the MPC teacher sees, with
  the layout (the task, `params`: the circles' centres and radii);
- observation o = (R range-finder readings / ray_range, velocity / v_max):
  all the learner sees. The rays (a full circle of R directions, fixed in the
  world frame: a point vehicle has no heading) return the distance to the
  nearest circle or wall, or ray_range;
- action u in [-1, 1]^2 (clipped), the commanded acceleration / a_max:
  v' = v + dt (a_max u - drag v),  p' = p + dt v'   (semi-implicit Euler);
- reward: the forward progress x' - x, and -crash_penalty on a crash.

Layouts come from a seeded sampler (`sample_tasks(key, n)`); `test_tasks(n)`
draws them from a fixed key that training never uses (held-out layouts).
The pure functions `ray_distances` and `clearance` are what the env computes;
tests check them against geometry.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.experimental.functional import FuncEnv

TEST_KEY = 20_241_201  # the key of the held-out layouts (training keys come from the seed)


class ObstacleParams(NamedTuple):
    """A layout (the task): circles (M,). Leading axis n for a batch of layouts."""

    centres: jax.Array  # (M, 2)
    radii: jax.Array  # (M,)


def ray_distances(pos, centres, radii, angles, max_range, half_width):
    """Distance along each ray from `pos` to the first circle or wall it meets, capped at max_range: (R,).

    Ray d (unit), circle (c, r): points pos + s d with |pos + s d - c| = r, i.e.
    s^2 - 2 b s + (|c - pos|^2 - r^2) = 0 with b = d.(c - pos); the first hit is
    s = b - sqrt(b^2 - |c - pos|^2 + r^2) when that is real and >= 0. A ray from
    inside a circle reads 0. Walls y = +-half_width: s = (+-half_width - y) / d_y
    for the wall the ray heads to. The square root is taken only where it is real
    (safe for jax.jacfwd through the observation)."""
    dirs = jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)  # (R, 2)
    rel = centres - pos  # (M, 2)
    b = dirs @ rel.T  # (R, M)
    c = (rel**2).sum(-1) - radii**2  # (M,), < 0 when inside
    disc = b**2 - c
    hit = (disc > 0) & (b > 0)
    s = b - jnp.sqrt(jnp.where(hit, disc, 1.0))
    s = jnp.where(hit, jnp.maximum(s, 0.0), max_range)
    s = jnp.where(c < 0, 0.0, s)  # inside a circle: nothing to see
    dy = dirs[:, 1]
    safe_dy = jnp.where(jnp.abs(dy) > 1e-6, dy, 1.0)
    wall = jnp.where(dy > 1e-6, (half_width - pos[1]) / safe_dy,
                     jnp.where(dy < -1e-6, (-half_width - pos[1]) / safe_dy, max_range))
    return jnp.minimum(jnp.minimum(s.min(-1), jnp.maximum(wall, 0.0)), max_range)


def clearance(pos, centres, radii, vehicle_radius, half_width):
    """Smallest gap between the vehicle's disc and any circle or wall (< 0: collision)."""
    circles = (jnp.linalg.norm(centres - pos, axis=-1) - radii - vehicle_radius).min()
    return jnp.minimum(circles, half_width - jnp.abs(pos[1]) - vehicle_radius)


class ObstacleField(FuncEnv):
    """The obstacle-field task (see the module docstring); a task family over layouts."""

    dt = 0.1
    accel = 2.0  # a_max
    drag = 1.0  # v_max = accel / drag = 2
    vehicle_radius = 0.1
    crash_penalty = 5.0
    half_width = 1.5  # the corridor: |y| < half_width
    finish = 4.5  # the finish line x = finish
    field = ((1.0, 4.0), (-1.5, 1.5))  # where circle centres are drawn (x range, y range)
    radius_range = (0.1, 0.25)

    def __init__(self, num_obstacles: int = 8, num_rays: int = 16, ray_range: float = 1.5,
                 horizon: int = 60, start_jitter: float = 0.5):
        self.num_obstacles, self.num_rays = int(num_obstacles), int(num_rays)
        self.ray_range, self.horizon, self.start_jitter = float(ray_range), int(horizon), float(start_jitter)
        self.angles = jnp.linspace(0.0, 2 * jnp.pi, self.num_rays, endpoint=False)
        super().__init__()
        # rays / ray_range in [0, 1], velocity / v_max in [-1, 1]
        low = np.concatenate([np.zeros(self.num_rays), -np.ones(2)]).astype(np.float32)
        self.observation_space = spaces.Box(low, np.ones(self.num_rays + 2, np.float32), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

    # ------------------------------------------------------------- layouts
    def sample_tasks(self, key, n: int) -> ObstacleParams:
        """n layouts: M circles each, centres uniform in `field`, radii uniform in `radius_range`
        (circles may overlap each other and the walls; the start, x < 1 - 0.25, is always clear)."""
        M = self.num_obstacles
        k_x, k_y, k_r = jax.random.split(key, 3)
        (x0, x1), (y0, y1) = self.field
        centres = jnp.stack([jax.random.uniform(k_x, (n, M), minval=x0, maxval=x1),
                             jax.random.uniform(k_y, (n, M), minval=y0, maxval=y1)], -1)  # (n, M, 2)
        radii = jax.random.uniform(k_r, (n, M), minval=self.radius_range[0], maxval=self.radius_range[1])
        return ObstacleParams(centres, radii)

    def test_tasks(self, n: int) -> ObstacleParams:
        """n held-out layouts, from a key no training run uses."""
        return self.sample_tasks(jax.random.PRNGKey(TEST_KEY), n)

    def get_default_params(self, **kwargs) -> ObstacleParams:
        return jax.tree.map(lambda a: a[0], self.test_tasks(1))

    def _params(self, params):
        return self.default_params if params is None else params

    # ------------------------------------------------------------- dynamics
    def initial(self, rng, params=None):
        y = jax.random.uniform(rng, (), minval=-self.start_jitter, maxval=self.start_jitter)
        return jnp.array([0.0, y, 0.0, 0.0], jnp.float32)

    def transition(self, state, action, rng=None, params=None):
        u = jnp.clip(jnp.asarray(action, jnp.float32), -1.0, 1.0)
        vel = state[2:] + self.dt * (self.accel * u - self.drag * state[2:])
        return jnp.concatenate([state[:2] + self.dt * vel, vel])

    def observation(self, state, rng=None, params=None):
        p = self._params(params)
        rays = ray_distances(state[:2], p.centres, p.radii, self.angles, self.ray_range, self.half_width)
        vel = jnp.clip(state[2:] / (self.accel / self.drag), -1.0, 1.0)
        return jnp.concatenate([rays / self.ray_range, vel]).astype(jnp.float32)

    def crashed(self, state, params=None):
        p = self._params(params)
        return clearance(state[:2], p.centres, p.radii, self.vehicle_radius, self.half_width) < 0

    def reached(self, state, params=None):
        return state[0] >= self.finish

    def terminal(self, state, rng=None, params=None):
        return self.crashed(state, params) | self.reached(state, params)

    def reward(self, state, action, next_state, rng=None, params=None):
        return next_state[0] - state[0] - self.crash_penalty * self.crashed(next_state, params)

    def transition_info(self, state, action, next_state, params=None):
        return {"crash": bool(self.crashed(next_state, params)), "success": bool(self.reached(next_state, params))}

    # ------------------------------------------------------------- rendering (numpy)
    def render_init(self, params=None, **kwargs):
        return None

    def render_image(self, state, render_state, params=None, size: int = 160):
        p = self._params(params)
        img = np.full((size, size, 3), 235, dtype=np.uint8)
        lo, span = np.array([-0.25, -2.5]), 5.0
        rows, cols = np.mgrid[0:size, 0:size]
        world = np.stack([cols / (size - 1) * span + lo[0], (size - 1 - rows) / (size - 1) * span + lo[1]], -1)

        def disc(centre, radius, colour):
            img[np.linalg.norm(world - np.asarray(centre), axis=-1) < radius] = colour

        for c, r in zip(np.asarray(p.centres), np.asarray(p.radii), strict=True):
            disc(c, r, (90, 90, 90))
        img[np.abs(world[..., 1]) > self.half_width] = (90, 90, 90)
        img[np.abs(world[..., 0] - self.finish) < 0.03] = (60, 170, 60)
        disc(np.asarray(state[:2]), self.vehicle_radius, (40, 90, 220))
        return render_state, img

    def render_close(self, render_state, params=None):
        pass
