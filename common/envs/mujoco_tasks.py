"""Meta-RL task families over MuJoCo envs (gymnasium -v5).

The locomotion families of MAML (HalfCheetahVel-v0, HalfCheetahDir-v0,
AntDir-v0): gymnasium wrappers whose reward depends on a task, set with
`reset(options={"task": t})`, drawn with `sample_tasks(key, n)`.
`task_family_of(env)` finds the family inside a made env. The ids are
registered in common/envs/__init__.py from `TASK_FAMILIES`.
"""

from __future__ import annotations

import gymnasium as gym
import jax


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
        return jax.random.uniform(key, (n,), minval=0.0, maxval=2.0)

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


TASK_FAMILIES = {"HalfCheetahVel-v0": HalfCheetahVel, "HalfCheetahDir-v0": HalfCheetahDir, "AntDir-v0": AntDir}


def task_family_of(env: gym.Env):
    """The TaskFamily wrapper inside a gymnasium env, else None."""
    while isinstance(env, gym.Wrapper):
        if isinstance(env, TaskFamily):
            return env
        env = env.env
    return None
