"""The maze envs of common/jax_envs/mazes.py: dynamics, FuncEnv vs gymnasium, check_env."""

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from common import envs
from common.jax_envs.adapter import JaxEnv
from common.jax_envs.mazes import DYNA_MAZE, ChangingMaze, Maze, tabular_model

UP, DOWN, RIGHT, LEFT = range(4)


def test_dyna_maze_is_the_books():
    p = Maze(DYNA_MAZE).default_params
    assert p.walls.shape == (6, 9)
    assert tuple(p.start.tolist()) == (2, 0) and tuple(p.goal.tolist()) == (0, 8)
    walls = {tuple(x) for x in np.argwhere(np.asarray(p.walls)).tolist()}
    assert walls == {(1, 2), (2, 2), (3, 2), (4, 5), (0, 7), (1, 7), (2, 7)}


def test_walls_borders_goal_and_reset():
    env, key = Maze(DYNA_MAZE), jax.random.PRNGKey(0)
    s = env.initial(key)
    assert s.tolist() == [2, 0]
    assert env.transition(s, LEFT, key).tolist() == [2, 0]  # border: stay
    s = env.transition(s, RIGHT, key)
    assert s.tolist() == [2, 1]
    assert env.transition(s, RIGHT, key).tolist() == [2, 1]  # wall at (2, 2): stay
    assert int(env.observation(s, key)) == 2 * 9 + 1
    below_goal = jnp.array([1, 8])
    at_goal = env.transition(below_goal, UP, key)
    assert bool(env.terminal(at_goal, key)) and not bool(env.terminal(below_goal, key))
    assert float(env.reward(below_goal, UP, at_goal, key)) == 1.0
    assert float(env.reward(s, DOWN, env.transition(s, DOWN, key), key)) == 0.0


def test_slippery_moves_follow_their_probabilities():
    env = Maze(DYNA_MAZE, success_prob=0.6)
    s = jnp.array([4, 1])  # open cell: every move lands somewhere different
    keys = jax.random.split(jax.random.PRNGKey(1), 20_000)
    nxt = np.asarray(jax.vmap(lambda k: env.transition(s, UP, k))(keys))
    freq = {m: np.mean(np.all(nxt == np.asarray(env.move(s, m)), axis=1)) for m in range(4)}
    # intended 0.6, the two perpendicular moves 0.2 each, never backwards
    assert freq[UP] == pytest.approx(0.6, abs=0.015)
    assert freq[LEFT] == pytest.approx(0.2, abs=0.015) and freq[RIGHT] == pytest.approx(0.2, abs=0.015)
    assert freq[DOWN] == 0.0


def test_tabular_model_is_a_distribution_matching_the_dynamics():
    env = Maze(DYNA_MAZE, success_prob=0.8)
    P, R, terminal = map(np.asarray, tabular_model(env))
    assert P.shape == (54, 4, 54) and np.allclose(P.sum(-1), 1.0)
    assert P[2 * 9 + 1, RIGHT, 2 * 9 + 1] == pytest.approx(0.8)  # blocked by the wall
    assert terminal.sum() == 1 and terminal[8]
    assert np.all(R[:, :, 8] == 1.0) and np.all(R[:, :, :8] == 0.0)


@pytest.mark.parametrize("success_prob", [1.0, 0.7])
def test_func_env_and_gymnasium_env_agree(success_prob):
    """The gymnasium env is the FuncEnv stepped with the same keys."""
    gym_env = JaxEnv(Maze(DYNA_MAZE, success_prob))
    func = Maze(DYNA_MAZE, success_prob)
    actions = np.random.default_rng(0).integers(0, 4, size=200)
    obs, _ = gym_env.reset(seed=3)
    key, rng = jax.random.split(jax.random.PRNGKey(3))  # as JaxEnv.reset splits
    state = func.initial(key)
    assert obs == int(func.observation(state, key))
    for a in actions:
        key, rng = jax.random.split(rng)
        nxt = func.transition(state, a, key)
        obs, r, term, trunc, _ = gym_env.step(a)
        assert obs == int(func.observation(nxt, key))
        assert r == float(func.reward(state, a, nxt, key)) and term == bool(func.terminal(nxt, key))
        assert not trunc
        state = nxt
        if term:
            break


@pytest.mark.parametrize("env_id", sorted(envs.JAX_ENVS))
def test_check_env_passes_for_every_registered_id(env_id):
    env = gym.make(env_id, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    env.reset(seed=0)
    frame = env.render()
    assert frame.ndim == 3 and frame.shape[-1] == 3 and frame.dtype == np.uint8


def test_changing_maze_switches_layout_through_the_task_option():
    env = gym.make("BlockingMaze-v0")
    func = env.unwrapped.func_env
    assert isinstance(func, ChangingMaze) and func.change_step == 1000
    gap = (3, 8)  # open before the change, a wall after it
    assert not bool(func.default_params.walls[gap]) and bool(func.changed_params.walls[gap])
    env.reset(seed=0, options={"task": func.changed_params})
    assert env.unwrapped.params is func.changed_params
    env.reset(seed=1)  # the task stays until another is given
    assert env.unwrapped.params is func.changed_params
