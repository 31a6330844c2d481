"""FuncEnv -> gymnasium adapter for the pure-JAX environments of this package.

Each environment of `common/jax_envs/` is a
`gymnasium.experimental.functional.FuncEnv`: pure functions that take the
task (`params`) explicitly, so jitted code steps the FuncEnv itself. For the
gymnasium interface (`make_env`, `check_env`, videos) `JaxEnv` wraps one; a
task is then chosen with `env.reset(options={"task": params})`. The ids are
registered in `common/envs/__init__.py`.

Also here: `func_env_of(env)`, the FuncEnv behind a gymnasium env, and
`is_task_family(func_env)`, whether a FuncEnv is a meta-RL task family
(`sample_tasks(key, n)` and a fixed `horizon`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import jax
import numpy as np
from gymnasium import spaces
from gymnasium.envs.functional_jax_env import FunctionalJaxEnv
from gymnasium.experimental.functional import FuncEnv


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


def func_env_of(env: gym.Env) -> Any:
    """The FuncEnv behind a gymnasium env made from a `JaxEnv`, else None."""
    return getattr(env.unwrapped, "func_env", None)


def is_task_family(func_env: Any) -> bool:
    """True for a FuncEnv that can sample tasks (a meta-RL task family)."""
    return callable(getattr(func_env, "sample_tasks", None)) and hasattr(func_env, "horizon")
