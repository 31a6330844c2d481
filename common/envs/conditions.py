"""Fixed initial conditions and costs for trajectory-centric methods.

Guided policy search (algos/gps.py; PLATO next) trains local controllers from
conditions the env must restore exactly. Here: the conditions envs of
Reacher-v5 and PointMass-v0 (`make_conditions_env`), their cost
(`gps_cost`), and the real-env loop that runs one (`rollout_condition`,
`evaluate_conditions`).
"""

from __future__ import annotations

import gymnasium as gym
import jax
import jax.numpy as jnp
import mujoco
import numpy as np

from common.checks import fail
from common.envs import lookup
from common.jax_envs.navigation import PointMassParams

# --------------------------------------------------------------------------
# GPS conditions: exact resets, states and costs (Reacher-v5, PointMass-v0)
# --------------------------------------------------------------------------
# Guided policy search (algos/gps.py) trains one local controller per
# *condition*: a fixed initial state and target that the env must restore
# exactly each time, as a robot is put back into the same pose. A conditions
# env is a wrapper with
#   reset(options={"condition": i})  i < num_train: training conditions,
#                                    i >= num_train: held-out conditions;
#   info["state"] after reset and step: the controllers' state x (numpy);
#   cost(x, u, final) and distance(x): JAX functions of one state/action.
# rollout_condition and evaluate_conditions (end of this file) run one.
# The global policy sees the env's ordinary observation (input remapping).
# The cost is the quadratic-plus-log distance cost of cbfinn/gps
# (cost_utils.evallogl2term: 0.5 l2 d^2 + 0.5 l1 log(alpha + d^2)) at every
# step with l1 = 0.1, l2 = 10, plus a final-step-only log term (l1 = 1, l2 = 0)
# whose distance is scaled by `final_weight` = 10 inside the log, plus a torque
# penalty wu |u|^2: the structure of the reference's arm examples
# (mjc_mdgps_example: torque cost + CostFK + final-only CostFK). The final
# term's weight sits inside the log as there: CostFK multiplies the per-dimension
# weights wp by wp_final_multiplier = 10 at the last step (get_ramp_multiplier)
# and evallogl2term takes log(alpha + |wp * d|^2), so 0.5 log(alpha + 100 d^2).
# Each conditions env also gives the guessed model of init_lqr: `dt` (seconds
# per env step) and `accel_gains` (dU,), joint acceleration per unit action.


def gps_cost(dist_vec, u, final, l1=0.1, l2=10.0, alpha=1e-5, wu=1e-3, final_l1=1.0, final_weight=10.0):
    """Quadratic-plus-log distance cost plus torque penalty, one step (JAX)."""
    d2 = jnp.sum(dist_vec**2)
    running = 0.5 * l2 * d2 + 0.5 * l1 * jnp.log(alpha + d2)
    final_term = 0.5 * final_l1 * jnp.log(alpha + final_weight**2 * d2)
    return running + jnp.where(final, final_term, 0.0) + wu * jnp.sum(u**2)


class ReacherConditions(gym.Wrapper):
    """Reacher-v5 with fixed conditions: arm straight out at rest (qpos = 0,
    qvel = 0), target at a fixed position per condition, restored exactly with
    MuJoCo's set_state.

    State x (8,): joint angles (2), joint velocities (2), fingertip - target
    (x, y), fingertip velocity (x, y), as the reference code's arm state
    (joint angles and velocities, end-effector points and velocities). The
    fingertip enters the state so that the cost is a function of x alone.
    Training targets lie on a circle of radius 0.15 at 45, 135, 225, 315
    degrees; held-out targets at 0, 90, 180, 270 degrees (radius 0.12).

    Timing: `frame_skip` MuJoCo steps of 0.01 s per env step. The default 5
    gives dt = 0.05 s, the reference experiment's (mjc_mdgps_example: dt 0.05,
    T = 100, five seconds per trial); gymnasium's own Reacher-v5 uses 2
    (dt 0.02, 50-step episodes). Episodes are limited to 100 steps.
    """

    dim_state = 8
    max_steps = 100
    train_targets = [(0.15 * np.cos(a), 0.15 * np.sin(a)) for a in np.deg2rad([45, 135, 225, 315])]
    test_targets = [(0.12 * np.cos(a), 0.12 * np.sin(a)) for a in np.deg2rad([0, 90, 180, 270])]

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.targets = np.array(self.train_targets + self.test_targets)
        self.num_train = len(self.train_targets)
        base = self.env.unwrapped
        self.dt = float(base.dt)
        # Joint acceleration per unit action at the straight pose, diag(M(q0)^-1) * gear (about 200 rad/s^2):
        # the `gains` of cbfinn/gps guess_dynamics, which takes acc = gains * u.
        base.reset(seed=0)
        base.set_state(np.zeros(base.model.nq), np.zeros(base.model.nv))
        inertia = np.zeros((base.model.nv, base.model.nv))
        mujoco.mj_fullM(base.model, base.data, inertia)
        self.accel_gains = np.diag(np.linalg.inv(inertia[:2, :2])) * base.model.actuator_gear[:2, 0]

    def reset(self, *, seed=None, options=None):
        i = int((options or {}).get("condition", 0))
        if not 0 <= i < len(self.targets):
            fail(f"condition {i} out of range [0, {len(self.targets)})")
        self.env.reset(seed=seed)
        base = self.env.unwrapped
        qpos = np.zeros(base.model.nq)
        qpos[2:4] = self.targets[i]
        base.set_state(qpos, np.zeros(base.model.nv))
        mujoco.mj_forward(base.model, base.data)  # refresh body positions for obs
        obs = base._get_obs()
        return obs, {"state": self.state()}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["state"] = self.state()
        return obs, reward, terminated, truncated, info

    def state(self) -> np.ndarray:
        base = self.env.unwrapped
        model, data = base.model, base.data
        mujoco.mj_kinematics(model, data)  # positions of the current qpos (mj_step leaves them one substep old)
        mujoco.mj_comPos(model, data)
        body = model.body("fingertip").id
        jacp = np.zeros((3, model.nv))
        mujoco.mj_jacBody(model, data, jacp, None, body)
        tip = data.xpos[body][:2]
        tip_vel = (jacp @ data.qvel)[:2]
        target = data.qpos[2:4]
        return np.concatenate([data.qpos[:2], data.qvel[:2], tip - target, tip_vel]).astype(np.float64)

    @staticmethod
    def distance(x):
        return jnp.sqrt(jnp.sum(x[4:6] ** 2))

    @staticmethod
    def cost(x, u, final):
        # wu = 0.1: with gear 200 a torque of 0.1 turns the arm 2 rad in half a
        # second; a weaker penalty gives high-gain controllers whose actions
        # saturate at +-1, where the fitted linear dynamics stop holding.
        return gps_cost(x[4:6], u, final, wu=0.1)


class PointMassConditions(gym.Wrapper):
    """PointMass-v0 (common/jax_envs/navigation.py) with fixed start positions; the target
    is the origin. State x (4,) = (position, velocity), which is also the
    observation; a condition is the FuncEnv's task (its start). The cost is
    quadratic: 5 |p|^2 + 0.01 |u|^2 per step."""

    dim_state = 4
    max_steps = 30
    dt = 0.1  # PointMass.dt: v' = v + dt u, p' = p + dt v', exactly cbfinn/gps guess_dynamics with gains 1
    accel_gains = np.ones(2)
    train_starts = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)]
    test_starts = [(0.7, 0.7), (-0.7, -0.7)]

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.starts = np.array(self.train_starts + self.test_starts, np.float32)
        self.num_train = len(self.train_starts)

    def reset(self, *, seed=None, options=None):
        i = int((options or {}).get("condition", 0))
        if not 0 <= i < len(self.starts):
            fail(f"condition {i} out of range [0, {len(self.starts)})")
        task = PointMassParams(np.asarray(self.starts[i]))
        obs, info = self.env.reset(seed=seed, options={"task": task})
        return obs, {**info, "state": np.asarray(obs, np.float64)}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["state"] = np.asarray(obs, np.float64)
        return obs, reward, terminated, truncated, info

    @staticmethod
    def distance(x):
        return jnp.sqrt(jnp.sum(x[:2] ** 2))

    @staticmethod
    def cost(x, u, final):
        # Purely quadratic (no log terms): with linear dynamics this is an exact
        # LQR problem, which LQR-FLM must solve in a few iterations.
        return gps_cost(x[:2], u, final, l1=0.0, final_l1=0.0, wu=1e-2)


GPS_CONDITIONS = {"Reacher-v5": ReacherConditions, "PointMass-v0": PointMassConditions}


def make_conditions_env(env_id: str, render_mode: str | None = None, frame_skip: int | None = None) -> gym.Wrapper:
    """The conditions env of `env_id` (exact state reset per condition), or a
    one-line error for an env without one. `frame_skip` (MuJoCo envs only):
    simulator steps per env step; None: 5 for Reacher-v5 (dt 0.05 s)."""
    conditions = lookup(GPS_CONDITIONS, env_id, "exact state reset (GPS conditions)", "common/envs/conditions.py")
    kwargs = {"max_episode_steps": conditions.max_steps}
    if conditions is ReacherConditions:
        kwargs["frame_skip"] = 5 if frame_skip is None else int(frame_skip)
    elif frame_skip is not None:
        fail(f"--frame-skip applies to MuJoCo envs; '{env_id}' has a fixed time step")
    return conditions(gym.make(env_id, render_mode=render_mode, **kwargs))


def rollout_condition(env, condition: int, T: int, act, seed: int):
    """One trajectory of a conditions env from the exact reset of `condition`; act(x, o, t) -> u. Records the
    applied (clipped) action. Returns X (T, dX), U (T, dU), observations (T, dO)."""
    obs, info = env.reset(seed=seed, options={"condition": condition})
    low, high = env.action_space.low, env.action_space.high
    xs, us, obses = [], [], []
    for t in range(T):
        x = info["state"]
        u = np.clip(act(x, obs, t), low, high)
        xs.append(x), us.append(u), obses.append(np.asarray(obs, np.float64))
        obs, _, _, _, info = env.step(u.astype(env.action_space.dtype))
    return np.stack(xs), np.stack(us), np.stack(obses)


def evaluate_conditions(env, conds, T: int, acts, seed: int):
    """One run per condition conds[i] with acts[i]: mean final distance and mean trajectory cost."""
    runs = [rollout_condition(env, c, T, act, seed) for c, act in zip(conds, acts, strict=True)]
    xs, us = (jnp.asarray(np.stack([r[i] for r in runs]), jnp.float32) for i in (0, 1))
    cs = jax.vmap(jax.vmap(env.cost))(xs, us, jnp.broadcast_to(jnp.arange(T) == T - 1, xs.shape[:2]))
    return float(jax.vmap(env.distance)(xs[:, -1]).mean()), float(cs.sum(-1).mean())
