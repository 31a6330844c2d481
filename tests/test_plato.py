"""Tests of PLATO (algos/plato.py) and its task, ObstacleField-v0 (common/jax_envs/obstacles.py)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import ROOT, cli_error, comparable, one_line_error, run_algo, stopped_at_call
from gymnasium.utils.env_checker import check_env

from algos import plato
from algos.plato import (
    Args,
    aggregate,
    gaussian_kl,
    init_carry,
    iteration,
    lqr_backward,
    main,
    make_policy,
    make_task,
    plan,
    rollout_plan,
    run_episode,
    shift,
)
from common.checkpoints import load_checkpoint
from common.checks import Divergence
from common.envs import make_env
from common.experiment import read_metrics
from common.jax_envs.obstacles import ObstacleParams, clearance, ray_distances

SMALL = dict(mpc_horizon=8, mpc_iters=2, mpc_first_iters=6, hidden=(16,), episodes_per_iteration=2,
             horizon=20, total_timesteps=80, grad_steps=20, batch_size=32, eval_episodes=4)


def env_and_args(**kw):
    args = Args(**{**SMALL, **kw})
    return make_task(args), args


def one_layout(centres, radii):
    return ObstacleParams(jnp.asarray(centres, jnp.float32), jnp.asarray(radii, jnp.float32))


def learner_with_mean(args, obs_dim, mean, log_std=-1.6):
    """Learner params whose mean is `mean` everywhere (zero output kernel, bias = mean) and std exp(log_std) (0.2)."""
    params = make_policy(args).init(jax.random.PRNGKey(0), jnp.zeros(obs_dim))
    params = jax.tree.map(lambda a: a, params)  # a mutable copy
    inner = params["params"]
    last = sorted(k for k in inner if k.startswith("Dense"))[-1]
    inner[last]["kernel"] = jnp.zeros_like(inner[last]["kernel"])
    inner[last]["bias"] = jnp.asarray(mean, jnp.float32)
    inner["log_std"] = jnp.full(2, log_std, jnp.float32)
    return params


# ----------------------------------------------------------------------------
# The task: rays, collisions, layouts, the gymnasium interface
# ----------------------------------------------------------------------------
def test_rays_match_a_geometric_march():
    """Each ray's reading equals the first point, marching along the ray in 1e-3 steps, that lies inside a
    circle or beyond a wall; plus two cases by hand."""
    env = make_task(Args())
    key = jax.random.PRNGKey(3)
    layouts = env.sample_tasks(key, 5)
    s = np.arange(0, env.ray_range, 1e-3)
    angles = np.asarray(env.angles)
    dirs = np.stack([np.cos(angles), np.sin(angles)], -1)
    for i in range(5):
        c, r = np.asarray(layouts.centres[i]), np.asarray(layouts.radii[i])
        pos = np.array([0.3 + 0.8 * i, -1.0 + 0.45 * i])
        if np.min(np.linalg.norm(c - pos, axis=-1) - r) < 0:
            continue
        got = np.asarray(ray_distances(jnp.asarray(pos), layouts.centres[i], layouts.radii[i], env.angles,
                                       env.ray_range, env.half_width))
        pts = pos + s[None, :, None] * dirs[:, None, :]  # (R, S, 2)
        inside = (np.linalg.norm(pts[:, :, None] - c, axis=-1) < r).any(-1) | (np.abs(pts[..., 1]) >= env.half_width)
        march = np.where(inside.any(1), s[np.argmax(inside, 1)], env.ray_range)
        np.testing.assert_allclose(got, march, atol=2e-3)
    # by hand: a circle of radius 0.5 at (2, 0) seen from the origin; the walls at y = +-1.5
    lay = one_layout([[2.0, 0.0]], [0.5])
    four = jnp.array([0.0, np.pi / 2, np.pi, 3 * np.pi / 2])
    np.testing.assert_allclose(ray_distances(jnp.zeros(2), lay.centres, lay.radii, four, 3.0, 1.5),
                               [1.5, 1.5, 3.0, 1.5], atol=1e-5)
    np.testing.assert_allclose(ray_distances(jnp.array([0.0, 1.0]), lay.centres, lay.radii, four, 3.0, 1.5),
                               [3.0, 0.5, 3.0, 2.5], atol=1e-5)  # the ray along y = 1 passes above the circle


def test_collisions_end_episodes_and_are_counted():
    """A learner that flies straight ahead hits the circle in its way: the episode's crash flag is set at
    exactly the step where the clearance first goes negative, nothing is alive after it, the state stays
    frozen, and the gymnasium env says terminated with info crash at the same step."""
    env, args = env_and_args(horizon=40)
    lay = one_layout([[2.0, 0.05]], [0.3])
    params = learner_with_mean(args, env.observation_space.shape[0], [1.0, 0.0])
    ep = run_episode(params, lay, jax.random.PRNGKey(0), env, args, "learner")
    x = env.initial(jax.random.split(jax.random.PRNGKey(0))[0], lay)
    crash_step = None
    for t in range(args.horizon):  # the same flight, step by step in Python
        x = env.transition(x, jnp.array([1.0, 0.0]), None, lay)
        if clearance(x[:2], lay.centres, lay.radii, env.vehicle_radius, env.half_width) < 0:
            crash_step = t
            break
    assert crash_step is not None and crash_step < args.horizon - 1
    assert np.flatnonzero(np.asarray(ep.crash)).tolist() == [crash_step]
    assert np.asarray(ep.alive).sum() == crash_step + 1 and not ep.success.any()
    frozen = np.asarray(ep.state[crash_step + 1:])
    np.testing.assert_allclose(frozen, np.broadcast_to(frozen[0], frozen.shape))
    # the gymnasium side: terminated, with the crash in info and the penalty in the reward
    genv = make_env("ObstacleField-v0")
    genv.reset(seed=0, options={"task": lay})
    for t in range(args.horizon):
        _, reward, terminated, truncated, info = genv.step(np.array([1.0, 0.0], np.float32))
        if terminated:
            ended = t
            break
    assert ended == crash_step and info["crash"] and not info["success"] and reward < -env.crash_penalty + 0.2
    # and the iteration's crash count: the dagger arm with this learner crashes every episode on a layout
    # with a barrier of circles across the corridor (whatever the start)
    lay = one_layout([[2.0, -1.2], [2.0, -0.6], [2.0, 0.0], [2.0, 0.6], [2.0, 1.2]], [0.35] * 5)
    carry = init_carry(jax.random.PRNGKey(1), env, args)
    carry = carry._replace(train_state=carry.train_state.replace(params=params))
    env_one = type(env)(num_obstacles=5, horizon=args.horizon)
    env_one.sample_tasks = lambda key, n: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), lay)
    _, m = jax.jit(lambda c: iteration(c._replace(iteration=jnp.int32(1)), env_one,
                                       Args(**{**SMALL, "horizon": 40, "arm": "dagger", "grad_steps": 1}),
                                       False))(carry)
    assert int(m["train/crashes"]) == args.episodes_per_iteration


def test_env_passes_check_env_and_test_layouts_are_held_out():
    env = make_env("ObstacleField-v0")
    check_env(env.unwrapped)
    fe = env.unwrapped.func_env
    test = fe.test_tasks(20)
    train = fe.sample_tasks(jax.random.PRNGKey(0), 20)
    assert test.centres.shape == (20, fe.num_obstacles, 2)
    np.testing.assert_array_equal(test.centres, fe.test_tasks(20).centres)  # seeded: the same every time
    assert not np.isclose(np.asarray(test.centres)[:, None], np.asarray(train.centres)[None]).all(-1).any()


# ----------------------------------------------------------------------------
# The teacher: KL, lambda = 0, lambda -> infinity, iLQR vs Riccati
# ----------------------------------------------------------------------------
def test_gaussian_kl_against_closed_form_and_monte_carlo():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=2), rng.normal(size=2)
    a1, a2 = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
    S1, S2 = a1 @ a1.T + 0.3 * np.eye(2), a2 @ a2.T + 0.3 * np.eye(2)
    got = float(gaussian_kl(jnp.asarray(m1), jnp.asarray(S1), jnp.asarray(m2), jnp.asarray(S2)))
    # Monte Carlo: E_{x ~ N1}[log N1(x) - log N2(x)]
    from scipy.stats import multivariate_normal as mvn
    x = rng.multivariate_normal(m1, S1, size=400_000)
    mc = float((mvn(m1, S1).logpdf(x) - mvn(m2, S2).logpdf(x)).mean())
    assert abs(got - mc) < 0.02 * max(1.0, mc), (got, mc)
    # diagonal covariances: the sum of the 1-D closed forms log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2
    s1, s2 = np.array([0.3, 1.2]), np.array([0.7, 0.4])
    oned = (np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5).sum()
    got = float(gaussian_kl(jnp.asarray(m1), jnp.diag(jnp.asarray(s1**2)), jnp.asarray(m2),
                            jnp.diag(jnp.asarray(s2**2))))
    np.testing.assert_allclose(got, oned, rtol=1e-5)
    assert abs(float(gaussian_kl(jnp.asarray(m1), jnp.asarray(S1), jnp.asarray(m1), jnp.asarray(S1)))) < 1e-5


def teacher_case():
    env, args = env_and_args(mpc_horizon=12, mpc_first_iters=15)
    lay = one_layout([[1.2, -0.3], [2.0, 0.4]], [0.25, 0.2])
    x0 = jnp.array([0.3, 0.0, 0.8, 0.0])
    params = learner_with_mean(args, env.observation_space.shape[0], [-0.4, 0.6])
    return env, args, lay, x0, params


def test_lambda_zero_teacher_equals_unconstrained_mpc():
    env, args, lay, x0, params = teacher_case()
    U0 = 0.1 * jnp.ones((args.mpc_horizon, 2))
    U_mpc, c_mpc, _ = jax.jit(lambda: plan(x0, U0, lay, env, args, 8))()
    U_ada, c_ada, _ = jax.jit(lambda: plan(x0, U0, lay, env, args, 8, params, 0.0))()
    np.testing.assert_allclose(U_ada, U_mpc, atol=1e-6)
    np.testing.assert_allclose(c_ada, c_mpc, rtol=1e-6)
    U_pos = jax.jit(lambda: plan(x0, U0, lay, env, args, 8, params, 1.0)[0])()
    assert float(jnp.abs(U_pos[0] - U_mpc[0]).max()) > 0.05  # lambda > 0 does change the teacher


def test_teacher_action_approaches_learner_mean_as_lambda_grows():
    """|u_teacher(lambda) - mu_theta(o)| measured for lambda = 0 .. 1e4: it falls monotonically, from the
    unconstrained MPC's distance to under 2% of it."""
    env, args, lay, x0, params = teacher_case()
    mu = make_policy(args).apply(params, env.observation(x0, None, lay))[0]
    lams = [0.0, 0.01, 0.1, 1.0, 10.0, 100.0, 1e4]
    U0 = jnp.zeros((args.mpc_horizon, 2))
    first = jax.jit(jax.vmap(lambda lam: plan(x0, U0, lay, env, args, 20, params, lam)[0][0]))(jnp.array(lams))
    gaps = np.linalg.norm(np.asarray(first) - np.asarray(mu), axis=-1)
    print(dict(zip(lams, np.round(gaps, 4), strict=True)))
    assert gaps[0] > 0.3
    assert np.all(np.diff(gaps) <= 1e-4), gaps
    assert gaps[-1] < 0.02 * gaps[0], gaps


def test_ilqr_matches_riccati_on_a_linear_quadratic_problem():
    """On x' = A x + B u with cost 1/2 x'Qx + 1/2 u'Ru (final 1/2 x'Q_f x), one iLQR iteration from any plan
    gives the LQR solution: gains from the backward pass equal the Riccati gains, the plan equals the
    closed-loop Riccati trajectory's controls."""
    rng = np.random.default_rng(1)
    dX, dU, H = 4, 2, 10
    A = np.eye(dX) + 0.1 * rng.normal(size=(dX, dX))
    B = rng.normal(size=(dX, dU))
    Q, R, Qf = np.diag([1.0, 2.0, 0.5, 0.3]), np.diag([0.4, 0.7]), 3 * np.eye(dX)
    x0 = rng.normal(size=dX)
    P, gains = Qf, []
    for _ in range(H):  # Riccati, backwards
        K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        P = Q + A.T @ P @ (A - B @ K)
        gains.append(K)
    gains = gains[::-1]
    x, U_lqr = x0, []
    for K in gains:
        U_lqr.append(-K @ x)
        x = A @ x + B @ U_lqr[-1]
    A_, B_ = jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32)
    dyn = lambda x, u: A_ @ x + B_ @ u
    cost = lambda x, u, a: 0.5 * x @ jnp.asarray(Q, jnp.float32) @ x + 0.5 * u @ jnp.asarray(R, jnp.float32) @ u
    fin = lambda x: 0.5 * x @ jnp.asarray(Qf, jnp.float32) @ x
    U_init = jnp.asarray(rng.normal(size=(H, dU)), jnp.float32)
    U, _, _ = jax.jit(lambda: plato.ilqr(jnp.asarray(x0, jnp.float32), U_init, cost, fin, dyn, 1, 0.0))()
    np.testing.assert_allclose(U, np.array(U_lqr), atol=2e-4)
    # the backward pass alone, about the zero plan: K_t = -K_riccati_t, k_t = 0
    X = rollout_plan(jnp.zeros(dX), jnp.zeros((H, dU)), dyn)
    D = dX + dU
    l_zz = jnp.broadcast_to(jnp.asarray(np.block([[Q, np.zeros((dX, dU))], [np.zeros((dU, dX)), R]]),
                                        jnp.float32), (H, D, D))
    K, k, _ = lqr_backward(jnp.broadcast_to(A_, (H, dX, dX)), jnp.broadcast_to(B_, (H, dX, dU)),
                           jnp.zeros((H, D)), l_zz, jnp.zeros(dX), jnp.asarray(Qf, jnp.float32), 0.0)
    np.testing.assert_allclose(K, -np.array(gains), atol=1e-4)
    np.testing.assert_allclose(k, 0.0, atol=1e-6)
    assert X.shape == (H + 1, dX)


# ----------------------------------------------------------------------------
# Labels and aggregation
# ----------------------------------------------------------------------------
def test_labels_are_the_unconstrained_mpc_actions_at_the_visited_states():
    """In a PLATO episode (a strong pull towards a bad learner, so the executed actions differ from the
    labels), every label equals the unconstrained MPC re-run along the visited states, with its own warm
    start; executed actions are the adaptive teacher's, not the labels."""
    env, args, lay, _, params = teacher_case()
    ep = jax.jit(lambda: run_episode(params, lay, jax.random.PRNGKey(2), env, args, "plato", 5.0))()
    states, labels, alive = np.asarray(ep.state), np.asarray(ep.label), np.asarray(ep.alive)
    replan = jax.jit(lambda x, U, iters: plan(x, U, lay, env, args, iters)[0], static_argnums=2)
    U = replan(jnp.asarray(states[0]), jnp.zeros((args.mpc_horizon, 2)), args.mpc_first_iters)
    for t in range(int(alive.sum())):
        U = replan(jnp.asarray(states[t]), U if t == 0 else shift(U), args.mpc_iters)
        np.testing.assert_allclose(labels[t], np.clip(U[0], -1, 1), atol=1e-4)
    moved = np.linalg.norm(np.asarray(ep.action) - labels, axis=-1)[alive]
    assert moved.max() > 0.1


def block(data, k, rows):
    """Iteration k's rows of the dataset, as NumPy."""
    return jax.tree.map(lambda a: np.asarray(a[k * rows:(k + 1) * rows]), data)


def test_aggregation_keeps_every_iterations_data():
    """Three iterations: iteration 0's rows are untouched after iterations 1 and 2, each iteration's block
    holds its own episodes' steps, and the row count is the sum of every iteration's alive steps."""
    env, args = env_and_args(arm="bc", total_timesteps=80)  # 2 iterations after iteration 0: 3 blocks
    step = jax.jit(lambda c, first: iteration(c, env, args, first), static_argnums=1)
    carry = init_carry(jax.random.PRNGKey(0), env, args)
    rows = args.episodes_per_iteration * args.horizon
    blocks, counts = [], []
    for k in range(3):
        carry, m = step(carry, False)  # (bc: the same program for iteration 0 and the others)
        blocks.append(block(carry.data, k, rows))
        counts.append(blocks[-1].mask.sum())
        assert float(m["data/rows"]) == sum(counts)
    for k in range(3):
        now = block(carry.data, k, rows)
        for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(blocks[k]), strict=True):
            np.testing.assert_array_equal(a, b)
    assert all(c > 0 for c in counts) and not np.array_equal(blocks[0].obs, blocks[1].obs)
    assert int(carry.iteration) == 3 and float(carry.data.mask[3 * rows:].sum()) == 0
    # aggregate() on its own: a block written at k = 1 changes those rows only
    data = carry.data
    fake = plato.Episode(*(jnp.ones((2, args.horizon, *shape)) for shape in
                           [(env.observation_space.shape[0],), (4,), (2,), (2,), (), (), (), (), (), ()]))
    new = aggregate(data, fake, 1)
    for k in (0, 2):
        np.testing.assert_array_equal(block(new, k, rows).obs, block(data, k, rows).obs)
    assert float(block(new, 1, rows).mask.sum()) == rows and float(block(new, 1, rows).obs.min()) == 1.0


# ----------------------------------------------------------------------------
# It learns; CLI smoke; bad input
# ----------------------------------------------------------------------------
def test_plato_it_learns(tmp_path, monkeypatch):
    """A short PLATO run (iteration 0 + 3 iterations of 8 episodes): the learner's success on 30 held-out
    layouts beats the untrained learner's (which does not reach the line) by at least 0.3."""
    monkeypatch.chdir(tmp_path)
    out = main(Args(total_timesteps=3 * 8 * 60, mpc_horizon=12, eval_episodes=30, seed=0))
    print(out["final_success"], out["initial_success"], out["training_crashes"])
    assert out["final_success"] >= out["initial_success"] + 0.3, (out["final_success"], out["initial_success"])


def test_divergence_names_the_iteration_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """Parameters that turn NaN in the training step of iteration 1 are reported at iteration 1 (not later,
    when the MPC would see them), in one line, with the checkpoint of iteration 0 kept."""
    monkeypatch.chdir(tmp_path)
    real = plato.train_learner

    def poisoned(ts, data, key, args):
        ts, loss = real(ts, data, key, args)
        later = data.mask[args.episodes_per_iteration * args.horizon:].sum() > 0  # iteration 1's rows exist
        return ts.replace(params=jax.tree.map(lambda p: jnp.where(later, jnp.nan, p), ts.params)), loss

    monkeypatch.setattr(plato, "train_learner", poisoned)
    with pytest.raises(Divergence) as e:
        main(Args(**{**SMALL, "arm": "bc", "exp_name": "nan"}))
    message = str(e.value)
    assert "diverged at iteration 1: 'params' is not finite" in message and "\n" not in message
    assert "checkpoint.msgpack (step 1)" in message
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = load_checkpoint(run_dir / "checkpoint.msgpack")
    assert int(saved["run"]["step"]) == 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved["state"]["carry"]["train_state"]["params"]))


# The settings of the resume test and of the CLI smoke test: the same programs (the second finds them in the
# persistent compilation cache); dagger with beta mixing and two vmapped seeds.
SMOKE = dict(total_timesteps=3 * 2 * 20, hidden=(8,), num_seeds=2, arm="dagger", beta=0.5)


def test_kill_then_resume_writes_the_same_metrics(tmp_path, monkeypatch):
    """A run stopped in its third iteration (after the checkpoint of iteration 2) and resumed writes the same
    metrics as the run that was not stopped: the checkpoint holds the params, Adam state, dataset and keys."""
    monkeypatch.chdir(tmp_path)
    args = Args(**{**SMALL, **SMOKE, "exp_name": "whole"})
    whole = main(args)
    with stopped_at_call(monkeypatch, plato, "run_iteration", 3):
        main(dataclasses.replace(args, exp_name="killed"))
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if "killed" in d.name]
    resumed = main(dataclasses.replace(args, exp_name="killed", resume=str(run_dir)))
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(whole["run_dir"]))
    assert len(read_metrics(run_dir)) == 5  # iterations 0..3 and the summary
    np.testing.assert_array_equal(resumed["carry"].data.obs, whole["carry"].data.obs)


def test_cli_smoke(tmp_path):
    settings = {**SMALL, **SMOKE, "hidden": 8}
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    res = run_algo("plato", *flags, "--save-model", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in rows if "iteration" in r]
    assert [r["iteration"] for r in its] == [0, 1, 2, 3]
    assert all(0 <= r["eval/success"] <= 1 and r["data/rows"] > 0 for r in its)
    assert its[-1]["train/cumulative_crashes"] >= its[-1]["train/crashes"]
    saved = load_checkpoint(run_dir / "plato.msgpack", None)
    assert saved["params"]["params"]["log_std"].shape == (2, 2)  # one set per seed
    assert "done: final_success" in res.stdout


@pytest.mark.parametrize("argv, message", [
    (["--env-id", "NoSuchEnv-v0"], "unknown env id"),
    (["--env-id", "CartPole-v1"], "obstacle task"),
    (["--total-timesteps", "10"], "less than one iteration"),
    (["--arm", "plato", "--lam", "0"], "needs --lam > 0"),
    (["--lam", "-1"], "--lam must be >= 0"),
    (["--mpc-horizon", "0"], "--mpc-horizon must be >= 1"),
    (["--mpc-iters", "0"], "--mpc-iters must be >= 1"),
    (["--beta", "1.5"], "--beta must be in [0, 1]"),
    (["--min-std", "0"], "--min-std must be > 0"),
    (["--hidden", "0"], "--hidden must be >= 1"),
    (["--capture-video"], "--capture-video is not supported"),
    (["--arm", "ppo"], "--arm"),
])
def test_bad_input_is_a_one_line_error(argv, message):
    assert message in cli_error(plato, *argv)


def test_bad_input_gives_one_line_error_from_the_script():
    assert "less than one iteration" in one_line_error(run_algo("plato", "--total-timesteps", "1", cwd=ROOT,
                                                                timeout=120))
