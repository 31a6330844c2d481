"""`make_env()` for gymnasium ids and this project's ids, and their registration.

Importing this package registers every id the project adds to gymnasium, so
one call covers `DynaMaze-v0`, `HalfCheetahVel-v0` and `Hopper-v5` alike:
- the pure-JAX envs of `common/jax_envs/` (mazes, bandits, MDPs, points),
  each a `FuncEnv` wrapped in `JaxEnv` for the gymnasium interface;
- the MuJoCo task families of `common/envs/mujoco_tasks.py`;
- the MinAtar games of gymnax (`common/envs/minatar.py`).

The other env knowledge lives beside this file, one kind per module:
- `model_fns.py`: reward and termination functions for model rollouts;
- `mujoco_tasks.py`: task families over MuJoCo envs;
- `conditions.py`: fixed initial conditions and costs for trajectory-centric
  methods (GPS).
"""

from __future__ import annotations

import difflib

import gymnasium as gym

from common.checks import fail
from common.envs.minatar import register_minatar
from common.envs.mujoco_tasks import TASK_FAMILIES, TaskFamily
from common.jax_envs.adapter import JaxEnv
from common.jax_envs.bandits_mdps import BernoulliBandit, RandomMDP
from common.jax_envs.mazes import (
    BLOCKING_MAZE,
    BLOCKING_MAZE_AFTER,
    DYNA_MAZE,
    SHORTCUT_MAZE,
    SHORTCUT_MAZE_AFTER,
    ChangingMaze,
    Maze,
)
from common.jax_envs.navigation import PointMass, PointNav2D
from common.jax_envs.obstacles import ObstacleField
from common.jax_envs.point_robot import PointRobot, SparsePointRobot


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


def lookup(table: dict, env_id: str, what: str, where: str):
    """table[env_id], or a one-line error naming the env ids that have one
    (`where`: the module that holds the table, where a new entry goes)."""
    check_env_id(env_id)
    if env_id not in table:
        fail(f"no {what} for '{env_id}' in {where}; available: {', '.join(table)}")
    return table[env_id]


# --------------------------------------------------------------------------
# Registration of the project's ids
# --------------------------------------------------------------------------
def _maze_entry(render_mode=None, **kwargs):
    return JaxEnv(Maze(**kwargs), render_mode=render_mode)


def _changing_maze_entry(render_mode=None, **kwargs):
    return JaxEnv(ChangingMaze(**kwargs), render_mode=render_mode)


def _bandit_entry(render_mode=None, **kwargs):
    return JaxEnv(BernoulliBandit(**kwargs), render_mode=render_mode)


def _mdp_entry(render_mode=None, **kwargs):
    return JaxEnv(RandomMDP(**kwargs), render_mode=render_mode)


def _point_nav_entry(render_mode=None, **kwargs):
    return JaxEnv(PointNav2D(**kwargs), render_mode=render_mode)


def _point_mass_entry(render_mode=None, **kwargs):
    return JaxEnv(PointMass(**kwargs), render_mode=render_mode)


def _obstacle_field_entry(render_mode=None, **kwargs):
    return JaxEnv(ObstacleField(**kwargs), render_mode=render_mode)


def _point_robot_entry(render_mode=None, sparse=False, **kwargs):
    return JaxEnv((SparsePointRobot if sparse else PointRobot)(**kwargs), render_mode=render_mode)


# Pure-JAX envs (common/jax_envs/): id -> (entry point, kwargs).
JAX_ENVS = {
    "DynaMaze-v0": (_maze_entry, {"layout": DYNA_MAZE}),
    "SlipperyMaze-v0": (_maze_entry, {"layout": DYNA_MAZE, "success_prob": 0.8}),
    "BlockingMaze-v0": (
        _changing_maze_entry,
        {"layout": BLOCKING_MAZE, "layout_after": BLOCKING_MAZE_AFTER, "change_step": 1000},
    ),
    "ShortcutMaze-v0": (
        _changing_maze_entry,
        {"layout": SHORTCUT_MAZE, "layout_after": SHORTCUT_MAZE_AFTER, "change_step": 3000},
    ),
    # Task families (meta-RL). The task is `params`, or reset(options={"task": ...}).
    "BernoulliBandit2-v0": (_bandit_entry, {"num_arms": 2}),
    "BernoulliBandit5-v0": (_bandit_entry, {"num_arms": 5}),
    "BernoulliBandit10-v0": (_bandit_entry, {"num_arms": 10}),
    "BernoulliBandit50-v0": (_bandit_entry, {"num_arms": 50}),
    "RandomMDP-v0": (_mdp_entry, {"num_states": 10, "num_actions": 5, "horizon": 10}),
    "PointNav2D-v0": (_point_nav_entry, {"horizon": 100}),
    # Linear point mass (guided policy search tests); the task is its start.
    "PointMass-v0": (_point_mass_entry, {"horizon": 30}),
    # PEARL's point robots (oyster rlkit/envs/point_robot.py); the task is the goal.
    "PointRobot-v0": (_point_robot_entry, {"horizon": 20}),
    "SparsePointRobot-v0": (_point_robot_entry, {"horizon": 20, "sparse": True, "goal_radius": 0.2}),
    # A vehicle in a random field of circles (PLATO); the task is the layout, a crash ends the episode.
    "ObstacleField-v0": (_obstacle_field_entry, {"horizon": 60}),
}
# Fixed episode lengths, enforced by gymnasium's TimeLimit (a truncation).
MAX_EPISODE_STEPS = {"RandomMDP-v0": 10, "PointNav2D-v0": 100, "PointMass-v0": 30}
MAX_EPISODE_STEPS["ObstacleField-v0"] = 60
MAX_EPISODE_STEPS.update({"PointRobot-v0": 20, "SparsePointRobot-v0": 20})


def register_all() -> None:
    """Register every id of this project with gymnasium (idempotent): the pure-JAX envs and the MuJoCo task
    families (episodes of `TaskFamily.horizon` steps)."""
    for env_id, (entry, kwargs) in JAX_ENVS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry, kwargs=dict(kwargs),
                         max_episode_steps=MAX_EPISODE_STEPS.get(env_id))
    for env_id, cls in TASK_FAMILIES.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=cls, max_episode_steps=TaskFamily.horizon)
    register_minatar()  # Breakout/SpaceInvaders/Asterix/Freeway-MinAtar-v0 (common/envs/minatar.py)


register_all()
