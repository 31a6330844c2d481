"""Tests of algos/backprop_through_model.py and its reward functions in common/envs/model_fns.py.

Math: the differentiable rewards and the JAX pendulum against the real envs,
jax.grad of the imagined return against finite differences and against the
analytic gradient of a linear-quadratic system, the exponential growth of the
gradient with the horizon on an unstable system, the model fit. Then a CLI
smoke test (with a video), bad-input errors, kill -9 and resume, a divergence
report, and "it learns" on Pendulum-v1.
"""

import json
from functools import partial

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli import cli_error, comparable, kill_after_checkpoint, one_line_error, run_algo
from flax.training.train_state import TrainState

from algos import backprop_through_model as btm
from common.checkpoints import load_checkpoint
from common.checks import Divergence
from common.envs.model_fns import pendulum_reward, reacher_reward, reward_function
from common.experiment import read_metrics


# ----------------------------------------------------------------------------
# Env knowledge: rewards and the true pendulum against the real envs
# ----------------------------------------------------------------------------
def real_transitions(env_id, steps, seed, action_scale=1.0):
    """(obs, action, next_obs, reward) from random actions in the real env;
    actions drawn beyond the bounds (x action_scale) exercise the clip."""
    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        a = (rng.uniform(-1, 1, env.action_space.shape) * env.action_space.high * action_scale
             ).astype(np.float32)
        next_obs, r, terminated, truncated, _ = env.step(a)
        out.append((obs, a, next_obs, r))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return [np.asarray(x) for x in zip(*out, strict=True)]


@pytest.mark.parametrize("env_id, fn, scale", [("Pendulum-v1", pendulum_reward, 1.5),
                                                ("Reacher-v5", reacher_reward, 1.0)])
def test_reward_functions_equal_env_rewards(env_id, fn, scale):
    obs, act, nxt, rew = real_transitions(env_id, 400, seed=3, action_scale=scale)
    ours = np.asarray(jax.vmap(fn)(obs, act, nxt))
    np.testing.assert_allclose(ours, rew, rtol=1e-4, atol=1e-4)
    assert reward_function(env_id) is fn
    # differentiable: finite gradients everywhere on real data (Reacher's norm at 0 too)
    grads = jax.vmap(jax.grad(fn, argnums=(1, 2)))(obs, act, nxt)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    at_target = jax.grad(reacher_reward, 2)(jnp.zeros(10), jnp.zeros(2), jnp.zeros(10))
    assert np.isfinite(np.asarray(at_target)).all()


def test_true_pendulum_step_matches_pendulum_v1():
    obs, act, nxt, _ = real_transitions("Pendulum-v1", 400, seed=4, action_scale=1.5)
    ours = np.asarray(jax.vmap(partial(btm.pendulum_true_step, ()))(obs, act))
    np.testing.assert_allclose(ours, nxt, atol=2e-4)


# ----------------------------------------------------------------------------
# Gradients of the imagined return
# ----------------------------------------------------------------------------
A = np.array([[1.0, 0.1], [-0.2, 0.95]])
B = np.array([[0.0], [0.1]])
Q = np.diag([1.0, 0.1])
R = np.array([[0.01]])


def linear_step(s, a):
    return jnp.asarray(A) @ s + jnp.asarray(B) @ a


def quadratic_reward(s, a, s_next):
    return -(s @ jnp.asarray(Q) @ s + a @ jnp.asarray(R) @ a)


def linear_policy(params, s):
    return params["K"] @ s


def test_grad_matches_finite_differences_with_mlp_policy():
    with jax.enable_x64(True):
        policy = btm.make_policy(1, 8)
        params = policy.init(jax.random.PRNGKey(0), jnp.zeros(2))
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        policy_fn = partial(btm.policy_action, policy, action_scale=2.0)
        s0 = jnp.array([0.7, -0.3])

        def J(p):
            return btm.imagined_return(policy_fn, linear_step, quadratic_reward, p, s0, 15, 0.9)

        flat, unravel = jax.flatten_util.ravel_pytree(params)
        g = jax.flatten_util.ravel_pytree(jax.grad(J)(params))[0]
        rng = np.random.default_rng(0)
        for _ in range(5):
            d = rng.standard_normal(flat.shape)
            d /= np.linalg.norm(d)
            eps = 1e-5
            fd = (J(unravel(flat + eps * d)) - J(unravel(flat - eps * d))) / (2 * eps)
            np.testing.assert_allclose(float(g @ d), float(fd), rtol=1e-6, atol=1e-9)


def analytic_lq_gradient(K, s0, H, gamma):
    """dJ/dK for s_{t+1} = M s_t, M = A + B K, J = -sum_t gamma^t s_t'(Q + K'RK)s_t.

    ds_t = sum_{j<t} M^j B dK s_{t-1-j}, so
    dJ/dK = -sum_t gamma^t [2 R K s_t s_t' + 2 sum_{j<t} B'(M^j)'C s_t s_{t-1-j}'], C = Q + K'RK."""
    M, C = A + B @ K, Q + K.T @ R @ K
    s = [s0]
    for _ in range(H):
        s.append(M @ s[-1])
    grad = np.zeros_like(K)
    for t in range(H):
        grad -= gamma**t * 2 * R @ K @ np.outer(s[t], s[t])
        for j in range(t):
            grad -= gamma**t * 2 * B.T @ np.linalg.matrix_power(M, j).T @ C @ np.outer(s[t], s[t - 1 - j])
    return grad


def test_policy_gradient_through_true_linear_dynamics_is_analytic():
    K = np.array([[-1.5, -0.8]])
    s0s = np.array([[1.0, 0.0], [0.3, -2.0], [-0.5, 0.5]])
    cfg = btm.Args(horizon=30, gamma=0.97, num_start_states=3, policy_steps=1, model_steps=1,
                   model_batch_size=1)
    with jax.enable_x64(True):
        g = jax.grad(partial(btm.policy_objective, linear_policy, linear_step, quadratic_reward, cfg))(
            {"K": jnp.asarray(K)}, jnp.asarray(s0s))["K"]
    expected = np.mean([analytic_lq_gradient(K, s0, 30, 0.97) for s0 in s0s], axis=0)
    np.testing.assert_allclose(-np.asarray(g), expected, rtol=1e-8)


def test_gradient_norm_explodes_with_horizon_on_unstable_system():
    """Closed loop M = A + BK with spectral radius rho > 1: ||dJ/dK|| grows like rho^(2H);
    with rho < 1 it converges. The ratio between H = 40 and H = 20 tells them apart."""
    s0 = jnp.array([[1.0, 0.0]])

    def norms(K, H):
        cfg = btm.Args(horizon=H, gamma=1.0, num_start_states=1, policy_steps=1)
        return float(btm.per_start_grad_norms(linear_policy, linear_step, quadratic_reward, cfg,
                                              {"K": jnp.asarray(K)}, s0)[0])

    unstable, stable = np.array([[2.0, 1.0]]), np.array([[-3.0, -3.0]])
    rho = max(abs(np.linalg.eigvals(A + B @ unstable)))
    assert rho > 1.01 and max(abs(np.linalg.eigvals(A + B @ stable))) < 1
    assert norms(unstable, 40) / norms(unstable, 20) > rho**20  # exponential growth
    assert norms(stable, 40) / norms(stable, 20) < 1.05  # converged: far terms vanish


def test_model_fit_learns_linear_dynamics():
    rng = np.random.default_rng(0)
    n = 512
    obs = rng.uniform(-2, 2, (n, 2)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    nxt = np.asarray(jax.vmap(linear_step)(obs, act), np.float32)
    data_np = {"obs": obs, "action": act, "next_obs": nxt}
    norm = btm.normalizer_from(data_np, n)
    model = btm.MLP(32, 2)
    params = jax.vmap(model.init, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(0), 2),
                                                     jnp.zeros(3))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(3e-3))
    cfg = btm.Args(model_steps=1500, model_batch_size=64)
    data = btm.Data(jnp.asarray(obs), jnp.asarray(act), jnp.asarray(nxt))
    before = float(btm.model_loss(model, state.params, norm, data.obs, data.action, data.next_obs))
    state, _ = btm.fit_model(model, cfg, state, norm, data, n, jax.random.PRNGKey(1))
    pred = jax.vmap(lambda o, a: btm.model_predict(model, state.params, norm, o, a))(data.obs, data.action)
    err = np.abs(np.asarray(pred) - nxt).max()
    assert before > 0.1 and err < 0.02, (before, err)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def run_cli(tmp_path, *flags):
    return run_algo("backprop_through_model", *flags, cwd=tmp_path)


TINY = ["--total-timesteps", "300", "--random-steps", "100", "--eval-interval", "100",
        "--eval-episodes", "1", "--horizon", "5", "--num-start-states", "8", "--policy-steps", "3",
        "--model-steps", "5", "--model-batch-size", "32", "--model-hidden", "16", "--policy-hidden", "8"]


@pytest.mark.parametrize("extra", [["--save-model", "--ensemble-size", "2", "--grad-clip", "1.0", "--capture-video"],
                                   ["--dynamics", "true"],
                                   ["--env-id", "Reacher-v5"]])
def test_cli_smoke(tmp_path, extra):
    out = run_cli(tmp_path, *TINY, *extra)
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/return" in r]
    assert [r["global_step"] for r in evals] == [200, 300]  # evaluation every iteration
    assert all(np.isfinite(r["eval/return"]) and np.isfinite(r["policy/grad_norm"]) for r in evals)
    assert ("model/train_loss" in evals[0]) == ("--dynamics" not in extra)
    if "--save-model" in extra:
        assert (run_dir / "model.msgpack").stat().st_size > 0
    if "--capture-video" in extra:  # Pendulum-v1 renders with pygame (requirements.txt)
        assert [p.suffix for p in (run_dir / "videos").iterdir()] == [".mp4"]


def test_help_lists_every_option(tmp_path):
    out = run_cli(tmp_path, "--help")
    assert out.returncode == 0
    for field in ("--horizon", "--dynamics", "--grad-clip", "--ensemble-size", "--seed", "--save-model"):
        assert field in out.stdout


@pytest.mark.parametrize("flags, message", [
    (["--env-id", "CartPole-v1"], "continuous (Box) action space"),
    (["--env-id", "Pendullum-v1"], "unknown env id"),
    (["--env-id", "MountainCarContinuous-v0"], "no differentiable reward"),
    (["--horizon", "0"], "--horizon must be >= 1"),
    (["--model-batch-size", "500", "--random-steps", "200"], "larger than the data"),
    (["--env-id", "Reacher-v5", "--dynamics", "true"], "only Pendulum-v1"),
    (["--policy-hidden", "0"], "--policy-hidden must be >= 1, got 0"),
    (["--model-hidden", "0"], "--model-hidden must be >= 1"),
    (["--policy-lr", "-1e-3"], "--policy-lr must be > 0"),
    (["--model-lr", "0"], "--model-lr must be > 0"),
    (["--horizon", "201"], "--horizon 201 is longer than Pendulum-v1's episodes (200 steps)"),
    (["--env-id", "Reacher-v5", "--horizon", "51"], "longer than Reacher-v5's episodes (50 steps)"),
    (["--gamma", "1.5"], "--gamma must be in (0, 1]"),
    (["--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (["--exploration-noise", "-0.1"], "--exploration-noise must be >= 0"),
    (["--ensemble-size", "0"], "--ensemble-size must be >= 1"),
    (["--model-steps", "0"], "--model-steps must be >= 1"),
    (["--policy-steps", "0"], "--policy-steps must be >= 1"),
    (["--num-start-states", "0"], "--num-start-states must be >= 1"),
    (["--random-steps", "0"], "--random-steps must be >= 1"),
    (["--total-timesteps", "300"], "--total-timesteps (300) must be >= --random-steps + --eval-interval (400)"),
    (["--total-timesteps", str(10**13)], "the dataset D needs about"),
    (["--eval-episodes", "0"], "--eval-episodes must be >= 1"),
    (["--seed", "-1"], "--seed must be in"),
    (["--policy-lr", "nan"], "--policy-lr must be a finite number"),
    (["--resume", "no/such/run"], "not a run directory"),
    (["--dynamics", "fake"], "--dynamics"),
])
def test_bad_input_is_one_line_error(tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not in the repo
    assert message in cli_error(btm, *flags)
    assert not (tmp_path / "runs").exists()  # refused before the run directory


def test_bad_input_through_the_real_entry_point(tmp_path):
    for flags, message in ((["--policy-hidden", "0"], "--policy-hidden must be >= 1"),
                           (["--env-id", "CartPole-v1"], "continuous (Box) action space")):
        assert message in one_line_error(run_cli(tmp_path, *flags))


# ----------------------------------------------------------------------------
# Surviving: kill -9 and resume, divergence
# ----------------------------------------------------------------------------
def test_kill_and_resume_gives_the_uninterrupted_metrics(tmp_path):
    """Checkpoints land mid-episode (100-step iterations, 200-step episodes): the
    env, D, the NumPy noise generator and the JAX key all continue exactly."""
    flags = [*TINY, "--total-timesteps", "1100"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = run_cli(tmp_path / "a", *flags)
    assert full.returncode == 0, full.stderr[-2000:]
    run_dir, step = kill_after_checkpoint("backprop_through_model", *flags, cwd=tmp_path / "b", min_step=500)
    assert step < 1100
    resumed = run_cli(tmp_path / "b", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {step}" in resumed.stdout
    (full_dir,) = (tmp_path / "a" / "runs").iterdir()
    expected = comparable(read_metrics(full_dir))
    assert comparable(read_metrics(run_dir)) == expected
    assert len(expected) == 11 and expected[-1]["global_step"] == 1100  # 10 iterations and the summary


def test_divergence_names_the_step_and_quantity_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real, calls = btm.improve_policy, []

    def poisoned(*a, **k):  # the third policy update (at env step 300) returns a NaN return
        state, imagined, norms = real(*a, **k)
        calls.append(1)
        return state, (imagined.at[-1].set(jnp.nan) if len(calls) == 3 else imagined), norms

    monkeypatch.setattr(btm, "improve_policy", poisoned)
    args = btm.Args(total_timesteps=500, random_steps=100, eval_interval=100, eval_episodes=1, horizon=5,
                    num_start_states=8, policy_steps=3, model_steps=5, model_batch_size=32, model_hidden=16,
                    policy_hidden=8)
    with pytest.raises(Divergence) as e:
        btm.main(args)
    message = str(e.value)
    assert message.startswith("error: training diverged at env step 300: 'policy/imagined_return' is not finite")
    assert "\n" not in message and "checkpoint.msgpack (step 300)" in message
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = load_checkpoint(run_dir / "checkpoint.msgpack")
    assert int(saved["run"]["step"]) == 300 and int(saved["state"]["n"]) == 300
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [200, 300]


# ----------------------------------------------------------------------------
# It learns
# ----------------------------------------------------------------------------
def test_it_learns_pendulum(tmp_path, monkeypatch):
    """From about -1200 (random) to better than -400 within 3,000 real steps."""
    monkeypatch.chdir(tmp_path)
    args = btm.Args(seed=1, total_timesteps=3000, eval_episodes=5)
    out = btm.main(args)
    returns = [h["eval/return"] for h in out["history"]]
    assert returns[0] < -700, returns  # the first policy is bad: the threshold means something
    assert max(returns[-3:]) > -400, returns
