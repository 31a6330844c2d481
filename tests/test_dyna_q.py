"""Dyna-Q: the pure functions, the book's results, the command line, resume,
divergence and bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import cli_error, comparable, kill_after_checkpoint, one_line_error, run_algo
from flax import serialization

from algos import dyna_q as dq
from common.checkpoints import load_checkpoint
from common.checks import Divergence
from common.experiment import read_metrics
from common.jax_envs.mazes import (
    DYNA_MAZE,
    SHORTCUT_MAZE,
    SHORTCUT_MAZE_AFTER,
    ChangingMaze,
    Maze,
    tabular_model,
)

DIMS = dq.Dims(54, 4)  # the Dyna Maze: 6 x 9 cells, 4 moves


def config(**overrides):
    return dq.Args(**{"eval_interval": 100, "total_timesteps": 100, "eval_episodes": 1, **overrides})


def run(env, n, seed=0, **overrides):
    """The whole experiment as one program (`dq.experiment`), as the benchmark runs it."""
    args = config(**overrides)
    dims = dq.Dims(env.num_states, env.num_actions)
    return jax.block_until_ready(dq.experiment(jax.random.PRNGKey(seed), n, dq.schedule_of(env), env, args, dims))


# ------------------------------------------------------------ pure functions
def test_random_argmax_breaks_ties_uniformly():
    values = jnp.array([0.0, 1.0, 1.0, 0.5])
    picks = jax.vmap(lambda k: dq.random_argmax(k, values))(jax.random.split(jax.random.PRNGKey(0), 4000))
    counts = np.bincount(np.asarray(picks), minlength=4)
    assert counts[0] == counts[3] == 0 and abs(counts[1] - counts[2]) < 250


def test_epsilon_greedy_explores_at_rate_epsilon():
    q_row = jnp.array([0.0, 0.0, 1.0, 0.0])
    keys = jax.random.split(jax.random.PRNGKey(1), 8000)
    acts = np.asarray(jax.vmap(lambda k: dq.epsilon_greedy(k, q_row, 0.2))(keys))
    assert np.mean(acts != 2) == pytest.approx(0.2 * 3 / 4, abs=0.015)


def test_q_learning_update_on_real_transition_does_not_bootstrap_from_terminal():
    cfg = config(planning_steps=0)
    agent = dq.init_agent(cfg, DIMS)._replace(q=jnp.zeros((54, 4)).at[8].set(5.0))
    q = dq.q_update(agent.q, 17, 0, 1.0 + cfg.gamma * 0 * agent.q[8].max(), cfg.alpha)
    assert float(q[17, 0]) == pytest.approx(0.1)


def test_pick_pair_only_plans_tried_actions_but_dyna_q_plus_plans_all():
    cfg = config()
    agent = dq.remember_state(dq.init_agent(cfg, DIMS), 18)
    agent = dq.learn_model(agent, 18, 2, 0.0, 19, False, 1)  # only action 2 tried in 18
    us = jax.random.uniform(jax.random.PRNGKey(0), (500, 2))
    pairs = np.asarray(jax.vmap(lambda u: jnp.stack(dq.pick_pair(agent, u, cfg)))(us))
    assert {tuple(p) for p in pairs.tolist()} == {(18, 2)}
    plus = dataclasses.replace(cfg, plus=True)
    pairs = np.asarray(jax.vmap(lambda u: jnp.stack(dq.pick_pair(agent, u, plus)))(us))
    assert {tuple(p) for p in pairs.tolist()} == {(18, a) for a in range(4)}


def test_dyna_q_plus_bonus_and_untried_actions_model():
    cfg = config(plus=True, kappa=0.01)
    agent = dq.init_agent(cfg, DIMS)._replace(q=jnp.zeros((54, 4)).at[5].set(jnp.array([0.2, 0.4, 0.0, 0.0])))
    # an untried action leads back to its own state with reward 0 (book's footnote)
    t = 400
    target = dq.planning_target(agent, agent.q, 5, 3, t, cfg)
    assert float(target) == pytest.approx(cfg.gamma * 0.4 + 0.01 * np.sqrt(t))
    agent = dq.learn_model(agent, 5, 3, 1.0, 6, False, 300)  # tried at step 300
    target = dq.planning_target(agent, agent.q, 5, 3, t, cfg)
    assert float(target) == pytest.approx(1.0 + 0.01 * np.sqrt(100))


def test_expected_update_averages_over_observed_outcomes():
    cfg = config(model="expected")
    agent = dq.init_agent(cfg, DIMS)
    q = jnp.zeros((54, 4)).at[7].set(1.0).at[9].set(2.0)
    agent = agent._replace(q=q)
    for s_next, r, term in [(7, 0.0, False), (7, 0.0, False), (9, 1.0, True)]:
        agent = dq.learn_model(agent, 3, 1, r, s_next, term, 1)
    expected = 2 / 3 * (0 + cfg.gamma * 1.0) + 1 / 3 * (1.0 + 0.0)
    assert float(dq.planning_target(agent, q, 3, 1, 1, cfg)) == pytest.approx(expected, rel=1e-6)
    # the sample model only remembers the last outcome
    sample = dq.planning_target(agent, q, 3, 1, 1, dataclasses.replace(cfg, model="sample"))
    assert float(sample) == pytest.approx(1.0)


# ------------------------------------------------------ the book's results
# Mean steps per episode, Dyna Maze, Fig. 8.2 of Sutton & Barto (values from
# ../shared/REFERENCE.md), keyed by (n, episode), as (low, high): a point
# value has low == high; "by episode 25 all near 17-25" is the range (17, 25).
# A measurement passes if it lies within 25% of the reference:
# 0.75 * low <= measured <= 1.25 * high.
#
# One entry is not the book's. REFERENCE.md gives about 1100 for n = 0 at
# episode 2, which no faithful Dyna-Q produces here: with n = 0 the first two
# episodes are (almost) uniform random walks, whose expected length from S to
# G is 869 steps in this maze (computed exactly in docs/dyna_q.md), and the
# book's companion code (ShangtongZhang/reinforcement-learning-an-introduction,
# chapter08/maze.py), run here for 250 runs, gives 703 at episode 2. That
# independent figure is the reference for this one cell.
#
# The book averages 30 runs, but at n = 0 an early episode is a random walk
# whose length has a standard deviation about equal to its mean, so a 30-run
# mean is itself uncertain by about 20% there. We average 150 runs (five
# blocks of the book's 30) so the test judges the algorithm, not the luck of
# 30 seeds; the tolerance stays 25%.
BOOK = {
    (0, 2): (703, 703), (0, 5): (280, 280), (0, 25): (17, 25),
    (5, 2): (140, 140), (5, 5): (24, 24), (5, 25): (17, 25),
    (50, 2): (40, 40), (50, 5): (18, 18), (50, 25): (17, 25),
}


def test_dyna_q_reproduces_figure_8_2_within_25_percent():
    env = Maze(DYNA_MAZE)
    args = config(num_seeds=150, total_timesteps=20_000, eval_interval=500, num_episodes=50)
    measured = {}
    for n in (0, 5, 50):
        _, _, terminals, _, _, steps = dq.experiment(jax.random.PRNGKey(0), n, dq.schedule_of(env), env, args, DIMS)
        terminals = np.asarray(terminals)[:, : int(steps)]
        lengths = np.array([dq.episode_lengths(t)[:50] for t in terminals])  # (150, 50)
        for episode in (2, 5, 25):
            measured[n, episode] = lengths[:, episode - 1].mean()
    off = {k: f"{measured[k]:.1f} vs {lo}-{hi}" for k, (lo, hi) in BOOK.items()
           if not 0.75 * lo <= measured[k] <= 1.25 * hi}
    assert not off, off


def test_dyna_q_plus_finds_the_shortcut_and_dyna_q_does_not():
    """Fig. 8.5: the shortcut opens at step 3000; by step 6000 Dyna-Q+'s greedy
    path takes it (10 steps), Dyna-Q's still goes round the left (16 steps).
    Settings of the book's companion code: n = 50, alpha = 1, kappa = 1e-3."""
    env = ChangingMaze(SHORTCUT_MAZE, SHORTCUT_MAZE_AFTER, 3000)
    common = dict(num_seeds=10, total_timesteps=6000, eval_interval=1000, eval_episodes=5, alpha=1.0,
                  kappa=1e-3)
    found = {}
    for plus in (False, True):
        *_, eval_len, _ = run(env, 50, 0, plus=plus, **common)
        found[plus] = np.asarray(eval_len)[-1] <= 10.5  # per seed: greedy path uses the shortcut
        assert np.all(np.asarray(eval_len)[2] >= 15.5)  # before the change nobody can be that short
    assert found[True].mean() >= 0.8 and found[False].mean() == 0.0


def q_star(env, gamma):
    P, R, terminal = map(np.asarray, tabular_model(env))
    q = np.zeros(P.shape[:2])
    for _ in range(1000):
        q = (P * (R + gamma * (1 - terminal) * q.max(1))).sum(-1)
    return q


def test_expected_updates_converge_to_value_iteration_on_the_slippery_maze():
    """With a distribution model and expected planning updates, Dyna-Q's Q
    approaches Q* of the true model; the last-outcome model does not."""
    env = Maze(DYNA_MAZE, success_prob=0.8)
    target = q_star(env, 0.95)
    reachable = ~np.asarray(env.default_params.walls).ravel()
    reachable[8] = False  # the goal is terminal: its Q is never used
    errors = {}
    for model in ("expected", "sample"):
        # epsilon 0.5 so that every pair is tried often; Q-learning is off-policy
        agent, *_ = run(env, 50, 0, num_seeds=4, total_timesteps=10_000, eval_interval=10_000,
                        model=model, epsilon=0.5)
        assert np.asarray(agent.tried)[:, reachable].all()
        errors[model] = np.abs(np.asarray(agent.q)[:, reachable] - target[reachable]).max(axis=(1, 2))
    assert errors["expected"].max() < 0.05, errors
    assert errors["sample"].min() > 2 * errors["expected"].max(), errors


# ------------------------------------------------------------ command line
def cli(*flags, cwd):
    return run_algo("dyna_q", *flags, cwd=cwd)


def test_cli_smoke_writes_metrics_checkpoint_and_video(tmp_path):
    out = cli("--total-timesteps", "400", "--eval-interval", "200", "--planning-steps", "5",
              "--num-seeds", "2", "--save-model", "--capture-video", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "eval/return" in out.stdout and "final_eval_length" in out.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert '"global_step": 200' in rows[0] and '"global_step": 400' in rows[1]
    tables = serialization.msgpack_restore((run_dir / "agent.msgpack").read_bytes())
    assert tables["q"].shape == (2, 54, 4) and np.isfinite(tables["q"]).all()
    assert list((run_dir / "videos").glob("*.mp4"))


def test_the_period_loop_of_main_equals_the_one_program_experiment(tmp_path, monkeypatch):
    """main runs one jitted call per period (for checkpoints); the benchmark runs
    `experiment`, the same periods in one program: the same numbers."""
    monkeypatch.chdir(tmp_path)
    args = dq.Args(total_timesteps=600, eval_interval=200, eval_episodes=2, planning_steps=5, num_seeds=3,
                   plus=True, exp_name="loop")
    out = dq.main(args)
    env = dq.make_func_env(args.env_id)
    agent, rewards, terminals, eval_ret, eval_len, steps = dq.experiment(
        jax.random.PRNGKey(args.seed), 5, dq.schedule_of(env), env, args, DIMS)
    assert int(steps) == 600
    np.testing.assert_array_equal(out["agent"].q, agent.q)
    np.testing.assert_array_equal(out["rewards"], rewards)
    np.testing.assert_array_equal(out["terminals"], terminals)
    np.testing.assert_array_equal(out["eval_length"], eval_len)


# ------------------------------------------------------ resume and divergence
def test_kill_9_then_resume_writes_the_same_metrics(tmp_path):
    flags = ["--total-timesteps", "10000", "--eval-interval", "500", "--checkpoint-interval", "1000",
             "--planning-steps", "100", "--num-seeds", "4", "--eval-episodes", "2"]
    whole = tmp_path / "whole"
    whole.mkdir()
    assert cli(*flags, cwd=whole).returncode == 0
    (whole_dir,) = (whole / "runs").iterdir()
    killed = tmp_path / "killed"
    killed.mkdir()
    run_dir, step = kill_after_checkpoint("dyna_q", *flags, cwd=killed, min_step=1000)
    assert step < 10000, "the kill landed after the end: nothing left to resume"
    res = cli("--resume", str(run_dir), cwd=killed)
    assert res.returncode == 0, res.stderr
    assert f"resumed at step {step}" in res.stdout
    expected = comparable(read_metrics(whole_dir))
    assert comparable(read_metrics(run_dir)) == expected and len(expected) == 21


def test_divergence_names_the_true_env_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A NaN written into Q at env step 737 (mid-period: periods end at 800) is
    reported at step 737, not at the end of the jitted period or of the run."""
    monkeypatch.chdir(tmp_path)
    learn_model = dq.learn_model

    def poisoned(agent, s, a, r, s_next, terminal, t):
        agent = learn_model(agent, s, a, r, s_next, terminal, t)
        return agent._replace(q=jnp.where(t == 737, agent.q.at[s, a].set(jnp.nan), agent.q))

    monkeypatch.setattr(dq, "learn_model", poisoned)
    args = dq.Args(total_timesteps=1200, eval_interval=400, eval_episodes=1, planning_steps=0,
                   exp_name="nan")  # planning off: the NaN is not copied into other entries before the check
    with pytest.raises(Divergence) as e:
        dq.main(args)
    message = str(e.value)
    assert "diverged at env step 737: 'q' is not finite" in message and "\n" not in message
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "checkpoint.msgpack (step 400)" in message
    saved = load_checkpoint(run_dir / "checkpoint.msgpack")
    assert int(saved["run"]["step"]) == 400 and np.isfinite(saved["state"]["carry"]["agent"]["q"]).all()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [400]


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv, message", [
    (["--env-id", "DynaMaz-v0"], "unknown env id 'DynaMaz-v0'; did you mean DynaMaze-v0"),
    (["--env-id", "CartPole-v1"], "needs a pure-JAX env (common/jax_envs/"),
    (["--env-id", "PointNav2D-v0"], "needs Discrete observations and actions"),
    (["--total-timesteps", "450", "--eval-interval", "100"], "must be a multiple of --eval-interval"),
    (["--total-timesteps", "100", "--eval-interval", "200"], "--eval-interval (200) must be <= --total-timesteps"),
    (["--planning-steps", "-1"], "--planning-steps must be >= 0"),
    (["--num-seeds", "0"], "--num-seeds must be >= 1"),
    (["--alpha", "0"], "--alpha must be in (0, 1]"),
    (["--alpha", "1.5"], "--alpha must be in (0, 1]"),
    (["--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--epsilon", "1.2"], "--epsilon must be in [0, 1]"),
    (["--kappa", "-1"], "--kappa must be >= 0"),
    (["--eval-max-steps", "0"], "--eval-max-steps must be >= 1"),
    (["--num-episodes", "-3"], "--num-episodes must be >= 0"),
    (["--eval-episodes", "0"], "--eval-episodes must be >= 1"),
    (["--model", "exact"], "--model"),
    (["--num-seeds", "100000000"], "needs about"),
    (["--resume", "no/such/run"], "not a run directory"),
])
def test_bad_input_is_one_line_error(argv, message):
    assert message in cli_error(dq, *argv)


@pytest.mark.parametrize("flags, message", [
    (["--env-id", "DynaMaz-v0"], "unknown env id 'DynaMaz-v0'; did you mean DynaMaze-v0"),
    (["--gamma", "1.5"], "--gamma must be in (0, 1]"),
])
def test_cli_bad_input_is_one_line(tmp_path, flags, message):
    assert message in one_line_error(cli(*flags, cwd=tmp_path))
