"""Reward and termination functions for model rollouts, written in JAX.

A model predicts s'; what s' pays and whether it ends the episode is known
physics of the task, so model-based methods use these functions instead of
learning them. Each is `f(obs, action, next_obs)` on single (unbatched)
arrays (vmap it for a batch), equal to the env's own reward or `terminated`
on real transitions (tests check both).
- Differentiable rewards (`REWARD_FUNCTIONS`, `reward_function(env_id)`):
  backprop through a learned model needs the reward's gradient.
- Observation rewards (`OBS_REWARD_FUNCTIONS`, with `OBS_TERMINATION_FUNCTIONS`):
  the env's exact reward as a function of (s, a, s'), non-differentiable ones
  included. For the locomotion envs, whose reward is a forward velocity
  (x' - x) / dt, the env option `REWARD_OBS_KWARGS` keeps the x position in the
  observation (its first `POSITION_DIMS` entries); the policy and the model
  drop those entries from their inputs (ME-TRPO).
- Termination functions (`TERMINATION_FUNCTIONS`, `termination_function(env_id)`)
  for the MuJoCo -v5 envs, and `TRUNCATED_OBS_KWARGS`, MBPO's truncated
  observations for Ant and Humanoid.
"""

from __future__ import annotations

import jax.numpy as jnp

from common.envs import lookup

# --------------------------------------------------------------------------
# Differentiable reward functions (env knowledge, written in JAX)
# --------------------------------------------------------------------------
# Each is `reward(obs, action, next_obs) -> r` on single (unbatched) arrays,
# equal to the env's own reward on real transitions (tests/test_backprop_
# through_model.py checks this), and differentiable, so that model-based
# methods can backpropagate the return of an imagined trajectory into the
# actions and the policy.


def pendulum_reward(obs, action, next_obs):
    """Pendulum-v1: -(theta^2 + 0.1 thetadot^2 + 0.001 u^2), theta in [-pi, pi].

    The env computes it from the state *before* the step, so only `obs` and the
    (clipped) action matter. theta = atan2(sin, cos) equals the env's
    angle_normalize(theta); the cost has a kink at theta = +-pi (hanging down).
    """
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
    vec = next_obs[-2:]
    return -jnp.sqrt(jnp.sum(vec**2) + 1e-12) - jnp.sum(action**2)


REWARD_FUNCTIONS = {
    "Pendulum-v1": pendulum_reward,
    "Reacher-v5": reacher_reward,
}


def reward_function(env_id: str):
    """The differentiable reward of `env_id`, or a one-line error naming those known."""
    return lookup(REWARD_FUNCTIONS, env_id, "differentiable reward function", "common/envs/model_fns.py")


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
    z, angle = next_obs[0], next_obs[1]
    healthy = (z > 0.7) & (jnp.abs(angle) < 0.2) & jnp.all(jnp.abs(next_obs[1:]) < 100.0)
    return ~healthy


def walker2d_terminated(obs, action, next_obs):
    """Walker2d-v5 unhealthy: not (0.8 < z < 2.0, -1 < angle < 1)."""
    z, angle = next_obs[0], next_obs[1]
    return ~((z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0))


def ant_terminated(obs, action, next_obs):
    """Ant-v5 unhealthy: not (state finite, 0.2 <= z <= 1.0) (inclusive bounds)."""
    z = next_obs[0]
    return ~(jnp.all(jnp.isfinite(next_obs)) & (z >= 0.2) & (z <= 1.0))


def humanoid_terminated(obs, action, next_obs):
    """Humanoid-v5 unhealthy: not (1.0 < z < 2.0)."""
    z = next_obs[0]
    return ~((z > 1.0) & (z < 2.0))


def inverted_pendulum_terminated(obs, action, next_obs):
    """InvertedPendulum-v5: obs not finite or pole angle |obs[1]| > 0.2."""
    return ~jnp.all(jnp.isfinite(next_obs)) | (jnp.abs(next_obs[1]) > 0.2)


def never_terminated(obs, action, next_obs):
    """HalfCheetah-v5 (and any env whose episodes only end by the time limit)."""
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
    return lookup(TERMINATION_FUNCTIONS, env_id, "termination function", "common/envs/model_fns.py")


# --------------------------------------------------------------------------
# Observation rewards: exact env rewards as functions of (s, a, s')
# --------------------------------------------------------------------------
# The -v5 locomotion rewards pay the forward velocity (x' - x) / dt, and x is
# left out of the default observation. With exclude_current_positions_from_
# observation=False it is obs[0] (Swimmer: obs[0:2] = x, y), so a model that
# predicts s' - s predicts the displacement too, and the reward below equals the
# env's exactly (tests/test_me_trpo.py checks these on real transitions). dt is the
# env's frame_skip x timestep.
REWARD_OBS_KWARGS = {env_id: {"exclude_current_positions_from_observation": False}
                     for env_id in ("HalfCheetah-v5", "Hopper-v5", "Swimmer-v5")}
# Leading observation entries that are positions only the reward needs (0 if absent).
POSITION_DIMS = {"HalfCheetah-v5": 1, "Hopper-v5": 1, "Swimmer-v5": 2}


def halfcheetah_full_obs_reward(obs, action, next_obs):
    """HalfCheetah-v5 (dt 0.05): (x' - x) / dt - 0.1 ||a||^2."""
    return (next_obs[0] - obs[0]) / 0.05 - 0.1 * jnp.sum(action**2)


def hopper_full_obs_terminated(obs, action, next_obs):
    """Hopper-v5's health check on the observation without x."""
    return hopper_terminated(obs[1:], action, next_obs[1:])


def hopper_full_obs_reward(obs, action, next_obs):
    """Hopper-v5 (dt 0.008): (x' - x) / dt + 1 while healthy - 0.001 ||a||^2."""
    healthy = 1.0 - hopper_full_obs_terminated(obs, action, next_obs).astype(jnp.float32)
    return (next_obs[0] - obs[0]) / 0.008 + healthy - 1e-3 * jnp.sum(action**2)


def swimmer_full_obs_reward(obs, action, next_obs):
    """Swimmer-v5 (dt 0.04): (x' - x) / dt - 1e-4 ||a||^2."""
    return (next_obs[0] - obs[0]) / 0.04 - 1e-4 * jnp.sum(action**2)


def inverted_pendulum_reward(obs, action, next_obs):
    """InvertedPendulum-v5: 1 for every step that does not end the episode."""
    return 1.0 - inverted_pendulum_terminated(obs, action, next_obs).astype(jnp.float32)


OBS_REWARD_FUNCTIONS = {
    "HalfCheetah-v5": halfcheetah_full_obs_reward,
    "Hopper-v5": hopper_full_obs_reward,
    "Swimmer-v5": swimmer_full_obs_reward,
    "InvertedPendulum-v5": inverted_pendulum_reward,
}
OBS_TERMINATION_FUNCTIONS = {
    "HalfCheetah-v5": never_terminated,
    "Hopper-v5": hopper_full_obs_terminated,
    "Swimmer-v5": never_terminated,
    "InvertedPendulum-v5": inverted_pendulum_terminated,
}
