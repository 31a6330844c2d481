"""Tests of algos/gps.py and its conditions envs in common/envs/conditions.py.

Math: the KL-constrained backward pass against a plain finite-horizon Riccati
recursion (both limits of eta and a finite eta), the dynamics fit on a known
linear system and the pull of the GMM prior, the closed-form trajectory KL
against Monte Carlo, the eta search against its constraint. Env knowledge:
exact resets. Then "it learns" on the linear point mass, a CLI smoke test,
kill -9 and resume, an injected divergence, and bad-input errors.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import cli_error, comparable, kill_after_checkpoint, one_line_error, run_algo

from algos import gps
from common.checkpoints import load_checkpoint
from common.checks import Divergence
from common.envs.conditions import make_conditions_env
from common.experiment import read_metrics


@pytest.fixture
def x64():
    """The model phases of algos/gps.py run in float64 (as main does), like the reference's numpy."""
    with jax.enable_x64(True):
        yield


def linear_problem(seed, dX=3, dU=2, T=12):
    """A random stable-ish linear system with a convex quadratic cost."""
    rng = np.random.default_rng(seed)
    A = np.eye(dX) + 0.1 * rng.standard_normal((dX, dX))
    B = 0.3 * rng.standard_normal((dX, dU))
    Q = np.diag(rng.uniform(0.5, 2.0, dX))
    R = np.diag(rng.uniform(0.1, 1.0, dU))
    return A, B, Q, R, T


def as_dynamics(A, B, T, x0, noise=1e-2, c=None):
    dX, dU = B.shape
    F = np.tile(np.concatenate([A, B], 1), (T, 1, 1))
    F[-1] = 0.0  # no transition after the last step
    f = np.zeros((T, dX)) if c is None else np.tile(c, (T, 1))
    f[-1] = 0.0
    cov = np.tile(noise * np.eye(dX), (T, 1, 1))
    return gps.Dynamics(*(jnp.asarray(a, jnp.float64) for a in (F, f, cov, x0, noise * np.eye(dX))))


def as_cost(Q, R, T):
    D = Q.shape[0] + R.shape[0]
    C = np.zeros((T, D, D))
    C[:, :Q.shape[0], :Q.shape[0]] = Q
    C[:, Q.shape[0]:, Q.shape[0]:] = R
    return gps.QuadCost(jnp.asarray(C, jnp.float64), jnp.zeros(C.shape[:2]), jnp.zeros(T))


def riccati_gains(A, B, Q, R, T):
    """Plain finite-horizon discrete Riccati recursion for
    sum_t 0.5 x^T Q x + 0.5 u^T R u, x' = A x + B u (no value after step T-1)."""
    V = np.zeros_like(Q)
    gains, Quus = [], []
    for t in reversed(range(T)):
        An, Bn = (A, B) if t < T - 1 else (0 * A, 0 * B)
        Quu = R + Bn.T @ V @ Bn
        K = -np.linalg.solve(Quu, Bn.T @ V @ An)
        V = Q + An.T @ V @ An + An.T @ V @ Bn @ K
        gains.append(K), Quus.append(Quu)
    return np.array(gains[::-1]), np.array(Quus[::-1])


# ----------------------------------------------------------------------------
# The KL-constrained backward pass
# ----------------------------------------------------------------------------
def test_backward_pass_finite_eta_equals_riccati_with_kl_action_cost(x64):
    """With prev = N(0, s2 I), cost/eta - log prev = (0.5 x^T Q x + 0.5 u^T (R + eta/s2 I) u) / eta:
    the gains are Riccati's with R + eta/s2 I and the covariance is eta Quu^-1."""
    A, B, Q, R, T = linear_problem(0)
    dX, dU = B.shape
    eta, s2 = 0.7, 0.5
    prev = gps.init_controller(T, dX, dU, s2)
    ctrl, ok = gps.lqg_backward(eta, prev, as_dynamics(A, B, T, np.ones(dX)), as_cost(Q, R, T))
    K, Quu = riccati_gains(A, B, Q, R + eta / s2 * np.eye(dU), T)
    assert bool(ok)
    np.testing.assert_allclose(ctrl.K, K, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(ctrl.k, 0.0, atol=1e-6)
    np.testing.assert_allclose(ctrl.cov, eta * np.linalg.inv(Quu), rtol=1e-3, atol=1e-6)


def test_backward_pass_limits_of_eta(x64):
    """eta -> 0: the KL term vanishes against the cost, the gains are plain LQR's
    (Riccati with R) and the noise vanishes; eta -> infinity: the cost vanishes and
    the new controller is the previous one, whatever it was."""
    A, B, Q, R, T = linear_problem(1)
    dX, dU = B.shape
    dyn, cost = as_dynamics(A, B, T, np.ones(dX)), as_cost(Q, R, T)
    ctrl, ok = gps.lqg_backward(1e-5, gps.init_controller(T, dX, dU, 1.0), dyn, cost)
    K, _ = riccati_gains(A, B, Q, R, T)
    assert bool(ok)
    np.testing.assert_allclose(ctrl.K, K, rtol=1e-3, atol=1e-4)
    assert float(jnp.max(ctrl.cov)) < 1e-4
    rng = np.random.default_rng(2)
    L = 0.3 * rng.standard_normal((T, dU, dU)) + np.eye(dU)
    prev = gps.LinearGaussian(jnp.asarray(rng.standard_normal((T, dU, dX)), jnp.float64),
                              jnp.asarray(rng.standard_normal((T, dU)), jnp.float64),
                              jnp.asarray(L @ np.swapaxes(L, 1, 2), jnp.float64))
    ctrl, ok = gps.lqg_backward(1e6, prev, dyn, cost)
    assert bool(ok)
    for new, old in zip(ctrl, prev, strict=True):
        np.testing.assert_allclose(new, old, rtol=1e-3, atol=2e-3)


# ----------------------------------------------------------------------------
# Dynamics fitting with the GMM prior
# ----------------------------------------------------------------------------
def linear_samples(A, B, c, N, T, seed, noise=1e-3):
    rng = np.random.default_rng(seed)
    X = np.zeros((N, T, A.shape[0]))
    U = rng.standard_normal((N, T, B.shape[1]))
    X[:, 0] = rng.standard_normal((N, A.shape[0]))
    for t in range(T - 1):
        X[:, t + 1] = X[:, t] @ A.T + U[:, t] @ B.T + c + noise * rng.standard_normal((N, A.shape[0]))
    return jnp.asarray(X, jnp.float64), jnp.asarray(U, jnp.float64)


FIT_ARGS = gps.Args(min_points_per_cluster=40, max_clusters=20, gmm_iters=50)  # static argument of the fits


def test_dynamics_fit_recovers_linear_system(x64):
    A, B, _, _, T = linear_problem(3, T=8)
    c = np.array([0.1, -0.2, 0.05])
    X, U = linear_samples(A, B, c, N=40, T=T, seed=0)
    dyn = gps.fit_dynamics(jax.random.PRNGKey(0), X, U, jnp.ones(40), X, U, FIT_ARGS)
    AB = np.concatenate([A, B], 1)
    np.testing.assert_allclose(dyn.F[:-1], np.broadcast_to(AB, (T - 1, *AB.shape)), atol=0.02)
    np.testing.assert_allclose(dyn.f[:-1], np.broadcast_to(c, (T - 1, 3)), atol=0.02)
    assert float(jnp.max(jnp.abs(dyn.F[-1]))) == 0.0  # no transition after the last step


def test_gmm_prior_pulls_few_sample_estimate_toward_mixture(x64):
    """With N = 3 samples (fewer than dX + dU = 5 regressors) the estimate is
    dominated by the prior: it lies much closer to the mixture's own regression
    (conditioning its moments mu0, Phi) than the same fit with a vanishing prior."""
    A, B, _, _, T = linear_problem(4, T=10)
    c = np.array([0.3, 0.0, -0.1])
    bX, bU = linear_samples(A, B, c, N=20, T=T, seed=1)
    X, U = linear_samples(A, B, c, N=3, T=T, seed=2)
    data = jnp.concatenate([bX[:, :-1], bU[:, :-1], bX[:, 1:]], -1).reshape(-1, 8)
    gmm = gps.fit_gmm(jax.random.PRNGKey(0), data, jnp.ones(data.shape[0]), 4, 20, 50)
    pts = jnp.concatenate([X[:, 3], U[:, 3], X[:, 4]], -1)  # (3, 8) at t = 3
    prior = gps.niw_prior(gmm, pts, data.shape[0])
    F_prior, _, _ = gps.fit_linear_gaussian(pts, 5, prior)
    weak = (prior[0], 1e-6 * jnp.eye(8), 1e-6, 1e-6)
    F_weak, _, _ = gps.fit_linear_gaussian(pts, 5, weak)
    Phi = prior[1]
    F_mix = np.linalg.solve(Phi[:5, :5], Phi[:5, 5:]).T
    AB = np.concatenate([A, B], 1)
    assert np.linalg.norm(F_prior - F_mix) < 0.5 * np.linalg.norm(F_weak - F_mix)
    assert np.linalg.norm(F_prior - AB) < 0.5 * np.linalg.norm(F_weak - AB)


# ----------------------------------------------------------------------------
# Trajectory KL and the eta search
# ----------------------------------------------------------------------------
def random_controller(rng, T, dX, dU, scale=0.3):
    L = scale * rng.standard_normal((T, dU, dU)) + 0.7 * np.eye(dU)
    return gps.LinearGaussian(*(jnp.asarray(a, jnp.float64) for a in (
        scale * rng.standard_normal((T, dU, dX)), scale * rng.standard_normal((T, dU)), L @ np.swapaxes(L, 1, 2))))


def test_trajectory_kl_equals_monte_carlo(x64):
    A, B, _, _, T = linear_problem(5, T=6)
    dX, dU = B.shape
    rng = np.random.default_rng(0)
    new, prev = random_controller(rng, T, dX, dU), random_controller(rng, T, dX, dU)
    dyn = as_dynamics(A, B, T, np.array([0.5, -0.3, 0.2]), noise=0.05)
    closed = float(gps.traj_kl(*gps.lqg_forward(new, dyn), new, prev))

    def logp(c, t, x, u):
        d = u - x @ np.asarray(c.K[t]).T - np.asarray(c.k[t])
        P = np.linalg.inv(np.asarray(c.cov[t], np.float64))
        return -0.5 * np.einsum("ni,ij,nj->n", d, P, d) + 0.5 * np.linalg.slogdet(P)[1]

    n = 40_000
    x = np.asarray(dyn.x0_mean) + np.sqrt(0.05) * rng.standard_normal((n, dX))
    total = np.zeros(n)
    for t in range(T):
        u = x @ np.asarray(new.K[t]).T + np.asarray(new.k[t]) + rng.standard_normal((n, dU)) @ np.linalg.cholesky(
            np.asarray(new.cov[t], np.float64)).T
        total += logp(new, t, x, u) - logp(prev, t, x, u)
        x = x @ A.T + u @ B.T + np.sqrt(0.05) * rng.standard_normal((n, dX))
    mc, se = total.mean(), total.std() / np.sqrt(n)
    assert closed > 1.0  # far enough apart for the comparison to mean something
    assert abs(closed - mc) < 4 * se + 1e-3 * abs(mc), (closed, mc, se)


@pytest.mark.parametrize("bound", [2.0, 10.0])
def test_eta_search_meets_kl_constraint(bound, x64):
    A, B, Q, R, T = linear_problem(6)
    dX, dU = B.shape
    dyn, cost = as_dynamics(A, B, T, np.array([1.0, -1.0, 0.5])), as_cost(Q, R, T)
    prev = gps.init_controller(T, dX, dU, 1.0)
    ctrl, eta, kl = gps.c_step(prev, dyn, cost, jnp.float64(1.0), jnp.float64(bound))
    recomputed = float(gps.traj_kl(*gps.lqg_forward(ctrl, dyn), ctrl, prev))
    assert abs(recomputed - bound) < 0.1 * bound, (recomputed, bound, float(eta))
    assert abs(float(kl) - recomputed) < 1e-3 * bound
    # the step improves the expected cost, and a looser bound improves it more
    assert float(gps.estimate_cost(ctrl, dyn, cost)) < float(gps.estimate_cost(prev, dyn, cost))


def test_policy_linearization_recovers_linear_policy(x64):
    """A policy that is exactly linear in the state is recovered by the
    per-time-step regression (with its GMM prior), plus the policy's variance."""
    rng = np.random.default_rng(7)
    T, dX, dU, N = 6, 3, 2, 8
    K = rng.standard_normal((dU, dX))
    X = jnp.asarray(rng.standard_normal((N, T, dX)))
    U = jnp.einsum("ux,ntx->ntu", K, X) + 0.5
    var = jnp.array([0.1, 0.2])
    lin = gps.fit_policy_linearization(jax.random.PRNGKey(0), X, U, jnp.ones(N), X, U, var, FIT_ARGS)
    np.testing.assert_allclose(lin.K, np.broadcast_to(K, (T, dU, dX)), atol=1e-3)
    np.testing.assert_allclose(lin.k, 0.5, atol=1e-3)
    np.testing.assert_allclose(jnp.diagonal(lin.cov, axis1=1, axis2=2), np.broadcast_to(var, (T, dU)), atol=1e-3)


def test_step_multiplier_follows_predicted_vs_actual_improvement():
    # cbfinn/gps _set_new_mult: m *= clip(pred / (2 (pred - actual)), 0.1, 5), then m in [lo, hi]
    mult = lambda pred, actual, m=1.0: float(gps.new_step_mult(m, pred, actual, 0.01, 3.0))  # noqa: E731
    assert mult(10.0, 5.0) == pytest.approx(1.0)  # half the predicted gain realised: keep the step
    assert mult(10.0, 10.0) == pytest.approx(3.0)  # all of it: grow (x5), capped at hi
    assert mult(10.0, 7.5) == pytest.approx(2.0)
    assert mult(10.0, -100.0) == pytest.approx(0.1)  # worse than before: shrink (x0.1)
    assert mult(10.0, -100.0, m=0.05) == pytest.approx(0.01)  # floored at lo


def test_exploded_predictions_are_flagged():
    """Per-condition MDGPS steps ignore predictions the quadratic model cannot support (non-finite, or over ten
    times the cost they would improve): the traced -3e4 to -5e34 of docs/gps.md."""
    bad = gps.exploded(np.array([5.0, -3e4, np.nan, np.inf, -40.0]), np.array([50.0, 60.0, 50.0, 50.0, 50.0]))
    assert bad.tolist() == [False, True, True, True, False]


def test_init_lqr_is_the_riccati_hold_controller(x64):
    """cbfinn/gps init_lqr: LQR on 0.5 (z - [x0; 0])^T L (z - [x0; 0]), L = diag(1, 0.5, 1) / init_var (final step x50),
    under the guessed double integrator. On PointMass-v0 that model is exact (v' = v + dt u, p' = p + dt v'),
    so: the gains are a plain Riccati recursion's in the deviation x - x0, the mean controller keeps the mass at
    its start, pulls a displaced one back toward it, and its noise is Q_uu^-1 (at most init_var)."""
    T, dt, var, x0 = 15, 0.1, 2.0, np.array([0.3, -0.5, 0.0, 0.0])
    ctrl = gps.init_lqr(jnp.asarray(x0), T, 2, dt, np.ones(2), var, 50.0)
    A = np.block([[np.eye(2), dt * np.eye(2)], [np.zeros((2, 2)), np.eye(2)]])
    B = np.vstack([dt**2 * np.eye(2), dt * np.eye(2)])
    Q, R = np.diag([1.0, 1.0, 0.5, 0.5]) / var, np.eye(2) / var
    V, Ks, Quus = np.zeros((4, 4)), [], []
    for t in reversed(range(T)):
        w = 50.0 if t == T - 1 else 1.0
        Quu = w * R + B.T @ V @ B
        K = -np.linalg.solve(Quu, B.T @ V @ A)
        V = w * Q + A.T @ V @ A + A.T @ V @ B @ K
        Ks.append(K), Quus.append(Quu)
    np.testing.assert_allclose(ctrl.K, np.array(Ks[::-1]), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ctrl.k, -np.einsum("tux,x->tu", ctrl.K, x0), atol=1e-10)  # u = K (x - x0)
    np.testing.assert_allclose(ctrl.cov, np.linalg.inv(np.array(Quus[::-1])), rtol=1e-8)
    assert float(jnp.max(jnp.diagonal(ctrl.cov, axis1=1, axis2=2))) <= var + 1e-9
    x, far = np.array([0.6, -0.1, 0.0, 0.0]), []
    for t in range(T):
        far.append(np.linalg.norm(x[:2] - x0[:2]))
        x = A @ x + B @ (np.asarray(ctrl.K[t]) @ x + np.asarray(ctrl.k[t]))
    assert far[-1] < 0.5 * far[0], far
    u_at_start = np.einsum("tux,x->tu", ctrl.K, x0) + ctrl.k
    np.testing.assert_allclose(u_at_start, 0.0, atol=1e-10)


def test_s_step_fits_precision_weighted_targets():
    """The S-step drives the precision-weighted loss down on a linear target."""
    import optax
    from flax.training.train_state import TrainState

    rng = np.random.default_rng(8)
    obs = jnp.asarray(rng.standard_normal((256, 4)), jnp.float32)
    target = obs[:, :2] @ jnp.array([[1.0, -0.5], [0.3, 2.0]], jnp.float32)
    prec = jnp.broadcast_to(jnp.eye(2, dtype=jnp.float32), (256, 2, 2))
    policy = gps.Policy((32, 32), 2)
    state = TrainState.create(apply_fn=policy.apply, params=policy.init(jax.random.PRNGKey(0), obs[0]),
                              tx=optax.adam(1e-2))
    d0 = policy.apply(state.params, obs) - target
    loss0 = float(jnp.mean(jnp.sum(d0**2, -1)))
    args = gps.Args(policy_steps=500, policy_batch_size=64)
    state, loss = gps.s_step(state, jax.random.PRNGKey(1), obs, target, prec, args)
    assert float(loss) < 0.05 * loss0, (float(loss), loss0)


# ----------------------------------------------------------------------------
# Env knowledge: exact resets
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["Reacher-v5", "PointMass-v0"])
def test_conditions_reset_exactly(env_id):
    env = make_conditions_env(env_id)
    rng = np.random.default_rng(0)
    for cond in range(len(getattr(env, "targets", getattr(env, "starts", [])))):
        obs0, info0 = env.reset(seed=cond, options={"condition": cond})
        for _ in range(5):
            env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        obs1, info1 = env.reset(seed=100 + cond, options={"condition": cond})
        np.testing.assert_array_equal(obs0, obs1)
        np.testing.assert_array_equal(info0["state"], info1["state"])
        assert info0["state"].shape == (env.dim_state,)
    assert np.isfinite(float(env.cost(jnp.asarray(info0["state"]), jnp.zeros(2), True)))


def test_final_cost_weight_sits_inside_the_log():
    """cbfinn/gps CostFK at the last step: wp * wp_final_multiplier (10) inside evallogl2term's log, so the final
    term is 0.5 log(alpha + 100 d^2), not 10 x 0.5 log(alpha + d^2)."""
    from common.envs.conditions import gps_cost
    d, u = jnp.array([0.03, -0.04]), jnp.zeros(2)
    final_only = float(gps_cost(d, u, True) - gps_cost(d, u, False))
    assert final_only == pytest.approx(0.5 * np.log(1e-5 + 100 * 0.05**2), rel=1e-5)


def test_reacher_timing_is_the_reference_experiment():
    """Reacher's conditions env runs dt = 0.05 s (frame_skip 5) with 100-step episodes: T = 100 is five seconds,
    mjc_mdgps_example's trial; its init_lqr gains are the joint accelerations per unit action."""
    env = make_conditions_env("Reacher-v5")
    assert env.dt == pytest.approx(0.05) and env.spec.max_episode_steps == 100
    np.testing.assert_allclose(env.accel_gains, 200.0, rtol=0.01)  # gear 200 over a unit joint inertia
    assert make_conditions_env("Reacher-v5", frame_skip=2).dt == pytest.approx(0.02)


def test_reacher_state_distance_matches_env():
    """The state's fingertip - target equals the env's own (after a step's positions are refreshed)."""
    env = make_conditions_env("Reacher-v5")
    env.reset(options={"condition": 2})
    for _ in range(4):
        obs, _, _, _, info = env.step(np.array([0.5, -0.3], np.float32))
    base = env.unwrapped
    tip = base.get_body_com("fingertip")[:2] - base.get_body_com("target")[:2]
    np.testing.assert_allclose(info["state"][4:6], tip, atol=1e-9)
    assert float(env.distance(jnp.asarray(info["state"]))) == pytest.approx(np.linalg.norm(tip), rel=1e-5)


# ----------------------------------------------------------------------------
# It learns (the linear point mass: LQR-FLM should solve it in a few iterations)
# ----------------------------------------------------------------------------
def test_it_learns_point_mass_lqr_flm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = gps.Args(env_id="PointMass-v0", algorithm="lqr_flm", horizon=30, init_var=1.0,
                    total_timesteps=5 * 4 * 5 * 30, gmm_iters=50, seed=1)
    history = gps.main(args)["history"]
    dist = [h["local/final_distance"] for h in history]
    assert dist[0] > 0.7, dist  # the zero-gain controllers stay near the start (distance 1)
    assert dist[-1] < 0.01, dist  # linear dynamics, quadratic cost: LQR-FLM solves it


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def run_cli(tmp_path, *flags):
    return run_algo("gps", *flags, cwd=tmp_path)


TINY = ["--env-id", "PointMass-v0", "--horizon", "8", "--num-samples", "2", "--conditions", "2",
        "--total-timesteps", "64", "--policy-steps", "20", "--gmm-iters", "5", "--prior-samples", "4",
        "--policy-hidden", "8", "--init-var", "1.0", "--policy-batch-size", "32"]


@pytest.mark.parametrize("flags", [[], ["--no-sample-on-policy", "--step-rule", "laplace"]])
def test_cli_smoke_mdgps(tmp_path, flags):
    out = run_cli(tmp_path, *TINY, "--save-model", *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [32, 64]  # 2 conditions x 2 samples x 8 steps per iteration
    for key in ("global/train_final_distance", "global/test_final_distance", "local/final_distance", "kl",
                "local/mean_controller_final_distance"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert "predicted_improvement" in rows[1] and "predicted_improvement" not in rows[0]
    assert (run_dir / "model.msgpack").stat().st_size > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"env_id": "Hopper-v5"}, "no exact state reset"),
    ({"env_id": "Reacherr-v5"}, "unknown env id"),
    ({"horizon": 1}, "--horizon must be at least 2"),
    ({"num_samples": 1}, "--num-samples must be at least 2"),
    ({"conditions": 9}, "exceeds the 4 training conditions"),
    ({"kl_step": 0.0}, "--kl-step must be positive"),
    ({"total_timesteps": 10}, "less than one iteration"),
])
def test_bad_input_is_one_line_error(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        gps.main(gps.Args(**({"env_id": "PointMass-v0", "horizon": 30} | kwargs)))
    text = str(err.value)
    assert text.startswith("error:") and message in text and "\n" not in text, text


def test_bad_input_from_the_command_line(tmp_path):
    out = run_cli(tmp_path, "--env-id", "Hopper-v5")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "no exact state reset" in lines[0], out.stderr


# ----------------------------------------------------------------------------
# Runs that survive: resume, divergence, bad input
# ----------------------------------------------------------------------------
def test_kill_and_resume_equals_the_uninterrupted_run(tmp_path):
    """A run killed with kill -9 after an iteration's checkpoint and resumed writes
    the same metrics as the run that was never interrupted: the checkpoint holds
    the controllers, the previous fit, the buffer, the policy and its Adam state,
    the normaliser, step multipliers and eta, the JAX key and the NumPy generator."""
    flags = [*TINY, "--total-timesteps", str(10 * 32)]  # 10 iterations of 32 steps
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    full = run_algo("gps", *flags, cwd=tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    (full_dir,) = (tmp_path / "full" / "runs").iterdir()
    run_dir, step = kill_after_checkpoint("gps", *flags, cwd=tmp_path / "killed", min_step=64)
    assert 64 <= step < 320, step  # killed mid-run, after the iteration whose step adjustment needs the last fit
    resumed = run_algo("gps", "--resume", str(run_dir), cwd=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {step}" in resumed.stdout
    expected = comparable(read_metrics(full_dir))
    assert [r["global_step"] for r in expected] == list(range(32, 321, 32))
    assert comparable(read_metrics(run_dir)) == expected


def test_divergence_names_the_iteration_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A NaN gain injected into the C-step of iteration 3 stops the run there
    (1-based, as logged), naming the quantity; iteration 2's checkpoint loads."""
    monkeypatch.chdir(tmp_path)
    real = gps.improve_controllers

    def poisoned(args, state, fit, step_mult):
        ctrl, eta, kl, bound = real(args, state, fit, step_mult)
        if state.iteration == 2:  # iterations done so far: this is the third
            ctrl = ctrl._replace(K=ctrl.K.at[0, 0, 0, 0].set(jnp.nan))
        return ctrl, eta, kl, bound

    monkeypatch.setattr(gps, "improve_controllers", poisoned)
    args = gps.Args(env_id="PointMass-v0", horizon=8, num_samples=2, conditions=2, total_timesteps=5 * 32,
                    policy_steps=20, gmm_iters=5, prior_samples=4, policy_hidden=(8,), init_var=1.0,
                    policy_batch_size=32)
    with pytest.raises(Divergence) as err:
        gps.main(args)
    message = str(err.value)
    assert message.startswith("error: training diverged at iteration 3: 'controller_K' is not finite (1 of ")
    assert "\n" not in message and "checkpoint.msgpack (step 64)" in message, message
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = load_checkpoint(run_dir / "checkpoint.msgpack")
    assert int(saved["run"]["step"]) == 64 and int(saved["state"]["iteration"]) == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]


BASE = ["--env-id", "PointMass-v0", "--horizon", "8", "--num-samples", "2", "--conditions", "2",
        "--total-timesteps", "64", "--prior-samples", "4", "--policy-batch-size", "32"]  # valid: 32 steps/iteration


@pytest.mark.parametrize("argv, message", [
    (["--eval-interval", "0"], "--eval-interval must be >= 1, got 0"),
    (["--policy-steps", "0"], "--policy-steps must be >= 1, got 0"),
    (["--policy-batch-size", "33"], "--policy-batch-size 33 exceeds the 32 points the S-step trains on"),
    (["--horizon", "31"], "--horizon 31 exceeds the 30-step time limit of 'PointMass-v0'"),
    (["--env-id", "Reacher-v5", "--horizon", "101"], "--horizon 101 exceeds the 100-step time limit of 'Reacher-v5'"),
    (["--frame-skip", "2"], "--frame-skip applies to MuJoCo envs; 'PointMass-v0' has a fixed time step"),
    (["--env-id", "Reacher-v5", "--frame-skip", "0"], "--frame-skip must be at least 1, got 0"),
    (["--anchor-blend", "1.0"], "--anchor-blend must be in [0, 1), got 1.0"),
    (["--eval-episodes", "5"], "--eval-episodes must be 1 in GPS, got 5"),
    (["--env-id", "CartPole-v1"], "no exact state reset"),
    (["--env-id", "Nope-v0"], "unknown env id"),
    (["--conditions", "0"], "--conditions must be >= 1, got 0"),
    (["--conditions", "5"], "--conditions 5 exceeds the 4 training conditions of 'PointMass-v0'"),
    (["--num-samples", "1"], "--num-samples must be at least 2, got 1"),
    (["--horizon", "1"], "--horizon must be at least 2, got 1"),
    (["--prior-samples", "1"], "--prior-samples (1) must be at least --num-samples (2)"),
    (["--kl-step", "-1"], "--kl-step must be positive, got -1.0"),
    (["--policy-lr", "0"], "--policy-lr must be positive, got 0.0"),
    (["--init-var", "nan"], "--init-var must be a finite number"),
    (["--min-step-mult", "2", "--max-step-mult", "1"], "the step multiplier range is empty"),
    (["--gmm-iters", "0"], "--gmm-iters must be >= 1"),
    (["--max-clusters", "0"], "--max-clusters must be >= 1"),
    (["--policy-hidden", "8", "0"], "--policy-hidden must be >= 1"),
    (["--policy-weight-decay", "-0.1"], "--policy-weight-decay must be >= 0"),
    (["--total-timesteps", "31"], "--total-timesteps 31 is less than one iteration (32 steps"),
    (["--algorithm", "lqr_flm", "--capture-video"], "which --algorithm lqr_flm does not train"),
    (["--prior-samples", "100000000"], "the GMM prior over 100000000 trajectories per condition needs about"),
    (["--seed", "-1"], "--seed must be in [0, 2^32 - 1]"),
    (["--step-rule", "median"], "--step-rule"),
    (["--resume", "no/such/run"], "not a run directory"),
])
def test_bad_input_table(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    text = cli_error(gps, *BASE, *argv)
    assert message in text, text
    assert not (tmp_path / "runs").exists() or argv[0] == "--resume"  # refused before a run directory exists


@pytest.mark.parametrize("argv, message", [
    (["--policy-steps", "0"], "--policy-steps must be >= 1"),  # was reported as divergence
    (["--eval-interval", "0"], "--eval-interval must be >= 1"),  # was a traceback after a full iteration
])
def test_bad_input_through_the_real_entry_point(tmp_path, argv, message):
    assert message in one_line_error(run_cli(tmp_path, *BASE, *argv))
