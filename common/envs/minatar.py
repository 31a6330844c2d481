"""The MinAtar games (Young & Tian 2019) in gymnax, as gymnasium ids and as pure JAX.

MinAtar reduces five Atari games to a 10x10 grid with one binary channel per kind
of object; gymnax (Lange 2022, pinned 0.0.9 in requirements.txt) reimplements them
in JAX, so an agent and its environments can be jitted together. Four are
registered here (Seaquest is left out, as in issue #20):

    id                          channels  actions (minimal set)   episode cap
    Breakout-MinAtar-v0         4         3: n, l, r              1000 steps
    SpaceInvaders-MinAtar-v0    6         4: n, l, r, f           1000
    Asterix-MinAtar-v0          4         5: n, l, u, r, d        1000
    Freeway-MinAtar-v0          7         3: n, u, d              2500

Two ways in:
- `make_env(id)` (common/envs): a gymnasium Env (`MinAtarEnv`) with NumPy
  observations, `terminated` for a game over and `truncated` at the cap;
- `jax_game(id)`: a `Game` of pure functions for jitted code, `reset(key)` and
  `step(key, state, action)`, which resets by itself at the end of an episode
  and reports `terminated` (no bootstrap) apart from `truncated` (bootstrap).

gymnax is imported only when a game is first made: it imports seaborn and
pandas, close to a second that scripts without MinAtar need not pay.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces

# Our id -> gymnax's name.
MINATAR = {
    "Breakout-MinAtar-v0": "Breakout-MinAtar",
    "SpaceInvaders-MinAtar-v0": "SpaceInvaders-MinAtar",
    "Asterix-MinAtar-v0": "Asterix-MinAtar",
    "Freeway-MinAtar-v0": "Freeway-MinAtar",
}


@functools.cache
def _gymnax(env_id: str):
    with warnings.catch_warnings():  # gymnax 0.0.9's own dtype warnings under jax 0.10
        warnings.simplefilter("ignore")
        import gymnax

    return gymnax.make(MINATAR[env_id])


class Game(NamedTuple):
    """A MinAtar game as pure functions (all jittable and vmappable).

    reset(key) -> (obs, state); obs float32 (10, 10, channels) in {0, 1}
    step(key, state, action) -> (obs, state, reward, terminated, truncated)
        obs is the next episode's first observation when the episode ended
    """

    env_id: str
    obs_shape: tuple
    num_actions: int
    max_steps: int
    reset: Any
    step: Any


@functools.cache
def jax_game(env_id: str) -> Game:
    """The pure-JAX game behind a registered MinAtar id."""
    env, params = _gymnax(env_id)

    def reset(key):
        with warnings.catch_warnings():  # gymnax 0.0.9's dtype warnings under jax 0.10, at trace time
            warnings.simplefilter("ignore")
            return env.reset_env(key, params)

    def step(key, state, action):
        k_step, k_reset = jax.random.split(key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs, nxt, reward, _, _ = env.step_env(k_step, state, action, params)
        terminated = jnp.asarray(nxt.terminal, bool)  # game over: no value after it
        truncated = jnp.logical_and(nxt.time >= params.max_steps_in_episode, ~terminated)  # the step cap
        obs_reset, state_reset = reset(k_reset)
        done = terminated | truncated
        nxt = jax.tree.map(lambda a, b: jnp.where(done, a, b), state_reset, nxt)
        obs = jnp.where(done, obs_reset, obs)
        return obs.astype(jnp.float32), nxt, jnp.asarray(reward, jnp.float32), terminated, truncated

    def reset_f32(key):
        obs, state = reset(key)
        return obs.astype(jnp.float32), state

    return Game(env_id=env_id, obs_shape=tuple(env.obs_shape), num_actions=int(env.num_actions),
                max_steps=int(params.max_steps_in_episode), reset=reset_f32, step=step)


class MinAtarEnv(gym.Env):
    """A gymnax MinAtar game behind gymnasium's interface (for evaluation, checks
    and the copy-one-file use; training uses `jax_game` directly)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, env_id: str, render_mode: str | None = None):
        self._env, self._params = _gymnax(env_id)
        self.env_id, self.render_mode = env_id, render_mode
        shape = tuple(self._env.obs_shape)
        self.observation_space = spaces.Box(0.0, 1.0, shape, np.float32)
        self.action_space = spaces.Discrete(int(self._env.num_actions))
        game = jax_game(env_id)
        self._reset = jax.jit(game.reset)
        self._step = jax.jit(self._raw_step)
        self._key, self._state, self._obs = None, None, None

    def _raw_step(self, key, state, action):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._env.step_env(key, state, action, self._params)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None or self._key is None:
            self._key = jax.random.PRNGKey(int(self.np_random.integers(2 ** 31)))
        self._key, k = jax.random.split(self._key)
        obs, self._state = self._reset(k)
        self._obs = np.asarray(obs, np.float32)
        return self._obs, {}

    def step(self, action):
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action {action} is not in {self.action_space}")
        self._key, k = jax.random.split(self._key)
        obs, self._state, reward, _, _ = self._step(k, self._state, int(action))
        terminated = bool(self._state.terminal)
        truncated = bool(int(self._state.time) >= self._params.max_steps_in_episode) and not terminated
        self._obs = np.asarray(obs, np.float32)
        return self._obs, float(reward), terminated, truncated, {}

    def render(self):
        """Each channel in its own colour on a black grid, 10x10 cells of 8x8 pixels."""
        if self._obs is None:
            return None
        c = self._obs.shape[-1]
        colours = (np.stack([np.linspace(60, 255, c), np.roll(np.linspace(255, 60, c), 1),
                             np.full(c, 160)], 1)).astype(np.uint8)
        img = (self._obs[..., :, None] * colours).max(axis=2).astype(np.uint8)
        return np.kron(img, np.ones((8, 8, 1), np.uint8))


def _entry(env_id: str):
    def make(render_mode=None, **kwargs):
        return MinAtarEnv(env_id, render_mode=render_mode, **kwargs)

    return make


def register_minatar() -> None:
    """Register the MinAtar ids with gymnasium (idempotent); the game's own cap
    ends episodes, as `truncated`."""
    for env_id in MINATAR:
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=_entry(env_id))
