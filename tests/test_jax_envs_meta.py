"""Tests of the meta-RL task families in common/jax_envs/ (bandits_mdps.py, navigation.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from common.envs import make_env
from common.jax_envs.adapter import is_task_family
from common.jax_envs.bandits_mdps import BernoulliBandit, RandomMDP
from common.jax_envs.navigation import PointNav2D


@pytest.mark.parametrize("env_id, steps", [("BernoulliBandit5-v0", 1), ("RandomMDP-v0", 10),
                                           ("PointNav2D-v0", 100)])
def test_registered_and_pass_gymnasium_checker(env_id, steps):
    env = make_env(env_id)
    check_env(env.unwrapped, skip_render_check=False)
    assert is_task_family(env.unwrapped.func_env)
    env.reset(seed=0)
    env.action_space.seed(0)  # PointNav2D-v0 ends at the goal: a random walk may reach it (3% of walks); not this one
    for t in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        assert (terminated or truncated) == (t == steps - 1)


def test_sample_tasks_shapes_and_ranges():
    key = jax.random.PRNGKey(0)
    means = BernoulliBandit(7).sample_tasks(key, 500).means
    assert means.shape == (500, 7) and float(means.min()) >= 0 and float(means.max()) <= 1
    assert abs(float(means.mean()) - 0.5) < 0.02
    mdp = RandomMDP().sample_tasks(key, 300)
    assert mdp.transitions.shape == (300, 10, 5, 10) and mdp.mean_rewards.shape == (300, 10, 5)
    np.testing.assert_allclose(mdp.transitions.sum(-1), 1.0, atol=1e-5)
    # Dirichlet(1) over 10 states: each probability has mean 0.1 and variance 9 / 1100
    assert abs(float(mdp.transitions.mean()) - 0.1) < 1e-3
    assert abs(float(mdp.transitions.var()) - 9 / 1100) < 1e-3
    assert abs(float(mdp.mean_rewards.mean()) - 1.0) < 0.05
    assert abs(float(mdp.mean_rewards.std()) - 1.0) < 0.05
    goals = PointNav2D().sample_tasks(key, 1000).goal
    assert goals.shape == (1000, 2) and float(jnp.abs(goals).max()) <= 0.5


def test_tasks_change_rewards_and_dynamics_as_specified():
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    bandit = BernoulliBandit(3)
    task = bandit.sample_tasks(jax.random.PRNGKey(2), 1)._replace(means=jnp.array([[0.1, 0.5, 0.9]]))
    task = jax.tree.map(lambda x: x[0], task)
    for arm, p in enumerate([0.1, 0.5, 0.9]):
        r = jax.vmap(lambda k, a=arm: bandit.reward(0, a, 1, k, task))(keys)
        assert abs(float(r.mean()) - p) < 0.03
    mdp = RandomMDP()
    task = jax.tree.map(lambda x: x[0], mdp.sample_tasks(jax.random.PRNGKey(3), 1))
    nxt = jax.vmap(lambda k: mdp.transition(jnp.int32(4), 2, k, task))(keys)
    freq = np.bincount(np.asarray(nxt), minlength=10) / len(keys)
    np.testing.assert_allclose(freq, task.transitions[4, 2], atol=0.03)
    r = jax.vmap(lambda k: mdp.reward(jnp.int32(4), 2, jnp.int32(0), k, task))(keys)
    assert abs(float(r.mean()) - float(task.mean_rewards[4, 2])) < 0.06 and abs(float(r.std()) - 1) < 0.05
    nav = PointNav2D()
    goal = nav.sample_tasks(jax.random.PRNGKey(4), 1)._replace(goal=jnp.array([[0.3, -0.4]]))
    goal = jax.tree.map(lambda x: x[0], goal)
    s1 = nav.transition(nav.initial(None, goal), jnp.array([0.5, -0.05]), None, goal)  # x clipped to 0.1
    np.testing.assert_allclose(s1, [0.1, -0.05], atol=1e-6)
    r = nav.reward(jnp.zeros(2), None, s1, None, goal)
    assert float(r) == pytest.approx(-np.hypot(0.2, 0.35), abs=1e-5)


def test_gymnasium_reset_with_task_option():
    env = make_env("BernoulliBandit2-v0")
    task = env.unwrapped.func_env.default_params._replace(means=jnp.array([0.0, 1.0]))
    env.reset(seed=0, options={"task": task})
    rewards = []
    for _ in range(20):
        rewards.append(env.step(1)[1])
        env.reset()  # the task stays until another is given
    assert rewards == [1.0] * 20
    env.reset(options={"task": task._replace(means=jnp.array([0.0, 0.0]))})
    assert env.step(1)[1] == 0.0
