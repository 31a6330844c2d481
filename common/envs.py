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


# --------------------------------------------------------------------------
# Termination functions for model rollouts (MuJoCo -v5), and MBPO's
# truncated observations for Ant and Humanoid
# --------------------------------------------------------------------------
# Each is `terminated(obs, action, next_obs) -> bool` on single (unbatched)
# arrays, in JAX (vmap it for a batch), equal to the env's own `terminated` on
# real transitions (tests/test_mbpo.py checks this on real episodes, done states
# included). A model predicts s'; whether s' ends the episode is known physics
# of the task (the health checks below), so model-based methods use these
# instead of learning termination (as jannerm/mbpo's `static_fns` do).
# With exclude_current_positions_from_observation (the default), obs[0] is the
# torso height z and, for the planar robots, obs[1] the torso angle.


def hopper_terminated(obs, action, next_obs):
    """Hopper-v5 unhealthy: not (z > 0.7, |angle| < 0.2, all |obs[1:]| < 100)."""
    import jax.numpy as jnp

    z, angle = next_obs[0], next_obs[1]
    healthy = (z > 0.7) & (jnp.abs(angle) < 0.2) & jnp.all(jnp.abs(next_obs[1:]) < 100.0)
    return ~healthy


def walker2d_terminated(obs, action, next_obs):
    """Walker2d-v5 unhealthy: not (0.8 < z < 2.0, -1 < angle < 1)."""
    z, angle = next_obs[0], next_obs[1]
    return ~((z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0))


def ant_terminated(obs, action, next_obs):
    """Ant-v5 unhealthy: not (state finite, 0.2 <= z <= 1.0) (inclusive bounds)."""
    import jax.numpy as jnp

    z = next_obs[0]
    return ~(jnp.all(jnp.isfinite(next_obs)) & (z >= 0.2) & (z <= 1.0))


def humanoid_terminated(obs, action, next_obs):
    """Humanoid-v5 unhealthy: not (1.0 < z < 2.0)."""
    z = next_obs[0]
    return ~((z > 1.0) & (z < 2.0))


def inverted_pendulum_terminated(obs, action, next_obs):
    """InvertedPendulum-v5: obs not finite or pole angle |obs[1]| > 0.2."""
    import jax.numpy as jnp

    return ~jnp.all(jnp.isfinite(next_obs)) | (jnp.abs(next_obs[1]) > 0.2)


def never_terminated(obs, action, next_obs):
    """HalfCheetah-v5 (and any env whose episodes only end by the time limit)."""
    import jax.numpy as jnp

    return jnp.zeros((), bool)


TERMINATION_FUNCTIONS = {
    "Hopper-v5": hopper_terminated,
    "Walker2d-v5": walker2d_terminated,
    "Ant-v5": ant_terminated,
    "Humanoid-v5": humanoid_terminated,
    "InvertedPendulum-v5": inverted_pendulum_terminated,
    "HalfCheetah-v5": never_terminated,
}

# MBPO (Janner et al. 2019, App. C; jannerm/mbpo `AntTruncatedObs-v2`,
# `HumanoidTruncatedObs-v2`) drops the contact forces (and, for Humanoid, the
# centre-of-mass inertia, velocity and actuator forces) from the observations:
# they are hard to predict and the policy does well without them. In -v5 these
# are env options: Ant 105 -> 27 dims, Humanoid 348 -> 45 dims (qpos[2:], qvel).
TRUNCATED_OBS_KWARGS = {
    "Ant-v5": {"include_cfrc_ext_in_observation": False},
    "Humanoid-v5": {"include_cinert_in_observation": False, "include_cvel_in_observation": False,
                    "include_qfrc_actuator_in_observation": False, "include_cfrc_ext_in_observation": False},
}


def termination_function(env_id: str):
    """The JAX termination function of `env_id`, or a one-line error naming those known."""
    check_env_id(env_id)
    if env_id not in TERMINATION_FUNCTIONS:
        fail(f"no termination function for '{env_id}' in common/envs.py; "
             f"available: {', '.join(TERMINATION_FUNCTIONS)}")
    return TERMINATION_FUNCTIONS[env_id]


# --------------------------------------------------------------------------
# Meta-RL task families over MuJoCo (gymnasium -v5)
# --------------------------------------------------------------------------
# The locomotion families of MAML (Finn et al. 2017, Sec. 5.3; cbfinn/maml_rl
# half_cheetah_env_rand*.py, ant_env_rand_direc.py), reused by ProMP, PEARL
# and MB-MPO. A family is a gymnasium wrapper whose reward depends on a task;
# `sample_tasks(key, n)` draws tasks and `reset(options={"task": t})` sets one
# (it stays until another is given). Rewards follow the MAML code: the
# forward term is replaced by the task's, the control cost (and, for the ant,
# the contact cost and survival bonus) keep MAML's weights, passed to the
# -v5 env as its own cost weights. Episodes last `horizon` = 200 steps.
class TaskFamily(gym.Wrapper):
    """Base class: a MuJoCo env whose forward reward is set by `self.task`."""

    horizon = 200

    def __init__(self, env: gym.Env, task):
        super().__init__(env)
        self.task = task

    def sample_tasks(self, key, n: int):
        raise NotImplementedError

    def task_reward(self, info, task) -> float:
        raise NotImplementedError

    def reset(self, *, seed=None, options=None):
        if options and "task" in options:
            self.task = options["task"]
        return self.env.reset(seed=seed, options={k: v for k, v in (options or {}).items() if k != "task"})

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        info["task"] = self.task
        return obs, self.task_reward(info, self.task), terminated, truncated, info


class HalfCheetahVel(TaskFamily):
    """Run at a target velocity v ~ U[0, 2]: r = -|v_x - v| - 0.05 |a|^2."""

    def __init__(self, **kwargs):
        super().__init__(gym.make("HalfCheetah-v5", ctrl_cost_weight=0.05, **kwargs), task=1.0)

    def sample_tasks(self, key, n: int):
        import jax

        return jax.random.uniform(key, (n,), minval=0.0, maxval=2.0)

    def task_reward(self, info, task):
        return -abs(info["x_velocity"] - float(task)) + info["reward_ctrl"]


class HalfCheetahDir(TaskFamily):
    """Run forward (d = 1) or backward (d = -1): r = d v_x - 0.05 |a|^2."""

    def __init__(self, **kwargs):
        super().__init__(gym.make("HalfCheetah-v5", ctrl_cost_weight=0.05, **kwargs), task=1.0)

    def sample_tasks(self, key, n: int):
        import jax

        return jax.random.choice(key, jax.numpy.array([-1.0, 1.0]), (n,))

    def task_reward(self, info, task):
        return float(task) * info["x_velocity"] + info["reward_ctrl"]


class AntDir(TaskFamily):
    """Walk forward or backward along x: r = d v_x - 0.01 |a|^2 - contact
    cost + 0.05 while healthy (MAML's ant; the episode ends when unhealthy)."""

    def __init__(self, **kwargs):
        super().__init__(gym.make("Ant-v5", ctrl_cost_weight=0.01, contact_cost_weight=5e-4, healthy_reward=0.05,
                                  **kwargs), task=1.0)

    def sample_tasks(self, key, n: int):
        import jax

        return jax.random.choice(key, jax.numpy.array([-1.0, 1.0]), (n,))

    def task_reward(self, info, task):
        return float(task) * info["x_velocity"] + info["reward_ctrl"] + info["reward_contact"] + info["reward_survive"]


TASK_FAMILIES = {"HalfCheetahVel-v0": HalfCheetahVel, "HalfCheetahDir-v0": HalfCheetahDir, "AntDir-v0": AntDir}
for _id, _cls in TASK_FAMILIES.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_cls, max_episode_steps=TaskFamily.horizon)


def task_family_of(env: gym.Env):
    """The TaskFamily wrapper inside a gymnasium env, else None."""
    while isinstance(env, gym.Wrapper):
        if isinstance(env, TaskFamily):
            return env
        env = env.env
    return None
