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
