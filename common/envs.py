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


def _lookup(table: dict, env_id: str, what: str):
    """table[env_id], or a one-line error naming the env ids that have one."""
    check_env_id(env_id)
    if env_id not in table:
        fail(f"no {what} for '{env_id}' in common/envs.py; available: {', '.join(table)}")
    return table[env_id]


def reward_function(env_id: str):
    """The differentiable reward of `env_id`, or a one-line error naming those known."""
    return _lookup(REWARD_FUNCTIONS, env_id, "differentiable reward function")


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
    return _lookup(TERMINATION_FUNCTIONS, env_id, "termination function")


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
# weighted `final_weight` = 10, plus a torque penalty wu |u|^2: the structure
# of the reference's arm examples (torque cost + CostFK + final-only CostFK).
import numpy as np  # noqa: E402  (this section's only extra import)


def gps_cost(dist_vec, u, final, l1=0.1, l2=10.0, alpha=1e-5, wu=1e-3, final_l1=1.0, final_weight=10.0):
    """Quadratic-plus-log distance cost plus torque penalty, one step (JAX)."""
    import jax.numpy as jnp

    d2 = jnp.sum(dist_vec**2)
    running = 0.5 * l2 * d2 + 0.5 * l1 * jnp.log(alpha + d2)
    final_term = final_weight * 0.5 * final_l1 * jnp.log(alpha + d2)
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
    """

    dim_state = 8
    train_targets = [(0.15 * np.cos(a), 0.15 * np.sin(a)) for a in np.deg2rad([45, 135, 225, 315])]
    test_targets = [(0.12 * np.cos(a), 0.12 * np.sin(a)) for a in np.deg2rad([0, 90, 180, 270])]

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.targets = np.array(self.train_targets + self.test_targets)
        self.num_train = len(self.train_targets)

    def reset(self, *, seed=None, options=None):
        import mujoco

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
        import mujoco

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
        import jax.numpy as jnp

        return jnp.sqrt(jnp.sum(x[4:6] ** 2))

    @staticmethod
    def cost(x, u, final):
        # wu = 0.1: with gear 200 a torque of 0.1 turns the arm 2 rad in half a
        # second; a weaker penalty gives high-gain controllers whose actions
        # saturate at +-1, where the fitted linear dynamics stop holding.
        return gps_cost(x[4:6], u, final, wu=0.1)


class PointMassConditions(gym.Wrapper):
    """PointMass-v0 (common/jax_envs.py) with fixed start positions; the target
    is the origin. State x (4,) = (position, velocity), which is also the
    observation; a condition is the FuncEnv's task (its start). The cost is
    quadratic: 5 |p|^2 + 0.01 |u|^2 per step."""

    dim_state = 4
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
        task = jax_envs.PointMassParams(np.asarray(self.starts[i]))
        obs, info = self.env.reset(seed=seed, options={"task": task})
        return obs, {**info, "state": np.asarray(obs, np.float64)}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["state"] = np.asarray(obs, np.float64)
        return obs, reward, terminated, truncated, info

    @staticmethod
    def distance(x):
        import jax.numpy as jnp

        return jnp.sqrt(jnp.sum(x[:2] ** 2))

    @staticmethod
    def cost(x, u, final):
        # Purely quadratic (no log terms): with linear dynamics this is an exact
        # LQR problem, which LQR-FLM must solve in a few iterations.
        return gps_cost(x[:2], u, final, l1=0.0, final_l1=0.0, wu=1e-2)


GPS_CONDITIONS = {"Reacher-v5": ReacherConditions, "PointMass-v0": PointMassConditions}


def make_conditions_env(env_id: str, render_mode: str | None = None) -> gym.Wrapper:
    """The conditions env of `env_id` (exact state reset per condition), or a
    one-line error for an env without one."""
    conditions = _lookup(GPS_CONDITIONS, env_id, "exact state reset (GPS conditions)")
    return conditions(gym.make(env_id, render_mode=render_mode))


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
    import jax
    import jax.numpy as jnp

    runs = [rollout_condition(env, c, T, act, seed) for c, act in zip(conds, acts, strict=True)]
    xs, us = (jnp.asarray(np.stack([r[i] for r in runs]), jnp.float32) for i in (0, 1))
    cs = jax.vmap(jax.vmap(env.cost))(xs, us, jnp.broadcast_to(jnp.arange(T) == T - 1, xs.shape[:2]))
    return float(jax.vmap(env.distance)(xs[:, -1]).mean()), float(cs.sum(-1).mean())
