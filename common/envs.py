"""`make_env()` for gymnasium ids and this project's ids.

Importing this module registers the project's pure-JAX envs
(`common/jax_envs.py`), so one call covers `DynaMaze-v0` and `Hopper-v5` alike.
Later additions here: MuJoCo task families, fixed initial conditions, and the
termination and reward functions that model rollouts need.
"""

from __future__ import annotations

import difflib

import gymnasium as gym

from common import jax_envs  # noqa: F401  (registers the project's ids)
from common.experiment import fail


def check_env_id(env_id: str) -> None:
    """Exit with a one-line error naming close matches if `env_id` is unknown."""
    if env_id in gym.registry:
        return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    fail(f"unknown env id '{env_id}'{hint}")


def make_env(env_id: str, render_mode: str | None = None, **kwargs) -> gym.Env:
    """`gymnasium.make` with a clear error for an unknown id."""
    check_env_id(env_id)
    return gym.make(env_id, render_mode=render_mode, **kwargs)


# --------------------------------------------------------------------------
# Differentiable reward functions (env knowledge, written in JAX)
# --------------------------------------------------------------------------
# Each is `reward(obs, action, next_obs) -> r` on single (unbatched) arrays,
# equal to the env's own reward on real transitions (tests/test_backprop_
# through_model.py checks this), and differentiable, so that model-based
# methods can backpropagate the return of an imagined trajectory into the
# actions and the policy. Importing JAX lazily keeps `make_env` light.


def pendulum_reward(obs, action, next_obs):
    """Pendulum-v1: -(theta^2 + 0.1 thetadot^2 + 0.001 u^2), theta in [-pi, pi].

    The env computes it from the state *before* the step, so only `obs` and the
    (clipped) action matter. theta = atan2(sin, cos) equals the env's
    angle_normalize(theta); the cost has a kink at theta = +-pi (hanging down).
    """
    import jax.numpy as jnp

    cos, sin, thetadot = obs[0], obs[1], obs[2]
    u = jnp.clip(action[0], -2.0, 2.0)
    theta = jnp.arctan2(sin, cos)
    return -(theta**2 + 0.1 * thetadot**2 + 0.001 * u**2)


def reacher_reward(obs, action, next_obs):
    """Reacher-v5: -||fingertip - target|| - ||a||^2, after the step (the v5
    defaults reward_dist_weight = reward_control_weight = 1).

    The last two entries of the observation are fingertip - target (x, y); both
    bodies sit at the same height, so the 2-D norm is the env's 3-D norm. The
    norm is smoothed by 1e-12 inside the root: the plain norm has an infinite
    (NaN) gradient when the fingertip is exactly on the target.
    """
    import jax.numpy as jnp

    vec = next_obs[-2:]
    return -jnp.sqrt(jnp.sum(vec**2) + 1e-12) - jnp.sum(action**2)


REWARD_FUNCTIONS = {
    "Pendulum-v1": pendulum_reward,
    "Reacher-v5": reacher_reward,
}


def reward_function(env_id: str):
    """The differentiable reward of `env_id`, or a one-line error naming those known."""
    check_env_id(env_id)
    if env_id not in REWARD_FUNCTIONS:
        fail(f"no differentiable reward function for '{env_id}' in common/envs.py; "
             f"available: {', '.join(REWARD_FUNCTIONS)}")
    return REWARD_FUNCTIONS[env_id]
