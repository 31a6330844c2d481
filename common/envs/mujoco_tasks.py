"""Meta-RL task families over MuJoCo envs (gymnasium -v5).

The locomotion families of MAML (HalfCheetahVel-v0, HalfCheetahDir-v0,
AntDir-v0): gymnasium wrappers whose reward depends on a task, set with
`reset(options={"task": t})`, drawn with `sample_tasks(key, n)`.
`task_family_of(env)` finds the family inside a made env. The ids are
registered in common/envs/__init__.py from `TASK_FAMILIES`. PEARL's versions
(HalfCheetahVelOyster-v0: targets U[0, 3]; AntDirOyster-v0: directions in the
plane) add oyster's fixed seed-1337 task lists and train/test splits;
HalfCheetahDirOyster-v0 is MAML's cheetah-dir with oyster's split (both
directions for training and for meta-test). `VectorTasks` steps W copies of
a family in a gymnasium SyncVectorEnv, one task each (PEARL's and MAML's collection).
"""

from __future__ import annotations

import gymnasium as gym
import jax
import numpy as np


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
    """Run at a target velocity v ~ U[0, max_velocity]: r = -|v_x - v| - 0.05 |a|^2 (MAML: max_velocity 2)."""

    def __init__(self, max_velocity: float = 2.0, **kwargs):
        self.max_velocity = float(max_velocity)
        super().__init__(gym.make("HalfCheetah-v5", ctrl_cost_weight=0.05, **kwargs), task=1.0)

    def sample_tasks(self, key, n: int):
        return jax.random.uniform(key, (n,), minval=0.0, maxval=self.max_velocity)

    def task_reward(self, info, task):
        return -abs(info["x_velocity"] - float(task)) + info["reward_ctrl"]


class HalfCheetahDir(TaskFamily):
    """Run forward (d = 1) or backward (d = -1): r = d v_x - 0.05 |a|^2."""

    def __init__(self, **kwargs):
        super().__init__(gym.make("HalfCheetah-v5", ctrl_cost_weight=0.05, **kwargs), task=1.0)

    def sample_tasks(self, key, n: int):
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
        return jax.random.choice(key, jax.numpy.array([-1.0, 1.0]), (n,))

    def task_reward(self, info, task):
        return float(task) * info["x_velocity"] + info["reward_ctrl"] + info["reward_contact"] + info["reward_survive"]


# PEARL's versions (katerakelly/oyster rlkit/envs/half_cheetah_vel.py, ant_dir.py, configs/*.json): fixed task
# lists drawn once with np.random.seed(1337), meta-training on the first n_train, meta-test on the last n_test.
class HalfCheetahVelOyster(HalfCheetahVel):
    """oyster's cheetah-vel: targets U[0, 3] (not MAML's [0, 2]), 100 train / 30 test tasks."""

    def __init__(self, **kwargs):
        super().__init__(max_velocity=3.0, **kwargs)

    def oyster_tasks(self, n: int = 130):
        return np.random.RandomState(1337).uniform(0.0, 3.0, size=(n,)).astype(np.float32)

    def task_splits(self, n_train: int = 100, n_test: int = 30):
        tasks = self.oyster_tasks(n_train + n_test)
        return tasks[:n_train], tasks[n_train:]


class HalfCheetahDirOyster(HalfCheetahDir):
    """oyster's cheetah-dir: MAML's reward, tasks [-1, 1]; train = the first n, test = the last n of them."""

    def task_splits(self, n_train: int = 2, n_test: int = 2):
        tasks = np.array([-1.0, 1.0], np.float32)
        return tasks[:n_train], tasks[-n_test:]


class AntDirOyster(TaskFamily):
    """oyster's ant-dir as released (forward_backward=False): a direction theta ~ U[0, 2 pi) in the plane,
    r = v_xy . (cos theta, sin theta) - 0.5 |a|^2 - 5e-4 |clip(cfrc_ext, -1, 1)|^2 + 1 while healthy (torso
    height in [0.2, 1], else the episode ends); observation qpos[2:], qvel (no contact forces); 2 train and 2
    test directions. (oyster measures the torso's centre of mass; gymnasium's x/y velocity is the torso's.)"""

    def __init__(self, **kwargs):
        super().__init__(gym.make("Ant-v5", ctrl_cost_weight=0.5, contact_cost_weight=5e-4, healthy_reward=1.0,
                                  healthy_z_range=(0.2, 1.0), include_cfrc_ext_in_observation=False, **kwargs),
                         task=0.0)

    def sample_tasks(self, key, n: int):
        return jax.random.uniform(key, (n,), minval=0.0, maxval=2 * np.pi)

    def oyster_tasks(self, n: int = 4):
        return np.random.RandomState(1337).uniform(0.0, 2 * np.pi, size=(n,)).astype(np.float32)

    def task_splits(self, n_train: int = 2, n_test: int = 2):
        tasks = self.oyster_tasks(n_train + n_test)
        return tasks[:n_train], tasks[n_train:]

    def task_reward(self, info, task):
        forward = np.cos(float(task)) * info["x_velocity"] + np.sin(float(task)) * info["y_velocity"]
        return forward + info["reward_ctrl"] + info["reward_contact"] + info["reward_survive"]


TASK_FAMILIES = {"HalfCheetahVel-v0": HalfCheetahVel, "HalfCheetahDir-v0": HalfCheetahDir, "AntDir-v0": AntDir,
                 "HalfCheetahVelOyster-v0": HalfCheetahVelOyster, "HalfCheetahDirOyster-v0": HalfCheetahDirOyster,
                 "AntDirOyster-v0": AntDirOyster}


def task_family_of(env: gym.Env):
    """The TaskFamily wrapper inside a gymnasium env, else None."""
    while isinstance(env, gym.Wrapper):
        if isinstance(env, TaskFamily):
            return env
        env = env.env
    return None


class VectorTasks:
    """`width` copies of a registered task family in a gymnasium SyncVectorEnv, one task each, stepped in
    lockstep: collection from several tasks at once (PEARL, MAML). Spaces and task lists are the family's, the
    horizon too unless a shorter one is given."""

    def __init__(self, env_id: str, width: int, horizon: int | None = None):
        self.vec = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * width)  # autoreset: NEXT_STEP
        self.family = task_family_of(self.vec.envs[0])
        self.num_envs, self.horizon = width, horizon or self.family.horizon
        self.observation_space, self.action_space = self.family.observation_space, self.family.action_space

    def set_tasks(self, tasks) -> None:
        self.vec.set_attr("task", [float(t) for t in tasks])  # reaches the TaskFamily wrapper of each env

    def rollout(self, policy, seeds):
        """One trajectory of `horizon` steps in every env, reset with `seeds`: policy(obs (W, obs_dim), t) ->
        (action to store, action for the env). Returns float32 arrays (W, H, ...) "obs", "action", "reward",
        "next_obs", "terminal" and the alive mask (W, H): an env's steps after its episode ended are masked
        out (with NEXT_STEP autoreset the step that ends an episode returns its true final observation)."""
        cols = {k: [] for k in ("obs", "action", "reward", "next_obs", "terminal")}
        alive, live = np.zeros((self.num_envs, self.horizon), bool), np.ones(self.num_envs, bool)
        obs, _ = self.vec.reset(seed=[int(s) for s in seeds])
        for t in range(self.horizon):
            a, env_a = policy(obs, t)
            obs2, r, term, trunc, _ = self.vec.step(env_a)
            for k, x in zip(cols, (obs, a, r, obs2, term), strict=True):
                cols[k].append(x)
            alive[:, t], live, obs = live, live & ~(term | trunc), obs2
        return {k: np.stack(v, 1).astype(np.float32) for k, v in cols.items()}, alive
