"""Tests of algos/me_trpo.py and the observation rewards it uses (common/envs/model_fns.py).

Env knowledge: the known rewards and terminations against the real envs. Imagined rollouts: a random member per
row and step (checked against a loop over the rows and steps), termination masks. TRPO against direct
computations: the Fisher-vector product against the explicit Fisher, conjugate gradient against a solve, the line
search against its KL bound, the baseline against least squares, advantages and returns against loops. The
stopping rule on scripted per-model returns. Then "it learns" on InvertedPendulum, CLI smoke runs of the
ablations, kill -9 and resume, an injected divergence, and bad input.
"""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import cli_error, comparable, kill_after_checkpoint, one_line_error, run_algo
from jax.flatten_util import ravel_pytree

from algos import me_trpo as mt
from common import ensembles as ens
from common.checkpoints import load_checkpoint
from common.checks import Divergence
from common.envs import make_env
from common.envs.model_fns import (
    OBS_REWARD_FUNCTIONS,
    OBS_TERMINATION_FUNCTIONS,
    POSITION_DIMS,
    REWARD_OBS_KWARGS,
    never_terminated,
)
from common.experiment import read_metrics


# ----------------------------------------------------------------------------
# Env knowledge: the known rewards and terminations equal the env's
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", sorted(OBS_REWARD_FUNCTIONS))
def test_known_rewards_and_terminations_match_real_envs(env_id):
    """On random real transitions (float32, as the models produce them), the reward function equals the env's
    reward and the termination function its `terminated`, terminal transitions included."""
    env = make_env(env_id, **REWARD_OBS_KWARGS.get(env_id, {}))
    assert set(OBS_REWARD_FUNCTIONS) == set(OBS_TERMINATION_FUNCTIONS)
    reward_fn = jax.jit(jax.vmap(OBS_REWARD_FUNCTIONS[env_id]))
    term_fn = jax.jit(jax.vmap(OBS_TERMINATION_FUNCTIONS[env_id]))
    rng = np.random.default_rng(0)
    rows, rewards, flags = [], [], []
    obs, _ = env.reset(seed=0)
    for _ in range(300):
        action = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, next_obs))
        rewards.append(reward)
        flags.append(terminated)
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
    o, a, n = (jnp.asarray(np.stack(x), jnp.float32) for x in zip(*rows, strict=True))
    rewards, flags = np.asarray(rewards), np.asarray(flags)
    assert o.shape[1] == env.observation_space.shape[0]
    if env_id in POSITION_DIMS:  # the x position is in the observation: it moved, and the reward depends on it
        assert float(jnp.abs(n[:, 0] - o[:, 0]).max()) > 1e-3
    pred = np.asarray(reward_fn(o, a, n))
    scale = max(1.0, float(np.abs(rewards).max()))
    np.testing.assert_allclose(pred, rewards, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_array_equal(np.asarray(term_fn(o, a, n)), flags)
    if env_id in ("Hopper-v5", "InvertedPendulum-v5"):
        assert flags.sum() >= 3 and (~flags).sum() >= 30, flags.sum()  # both kinds of transition were checked
    else:
        assert not flags.any()


# ----------------------------------------------------------------------------
# Imagined rollouts
# ----------------------------------------------------------------------------
def constant_delta_model(cfg, deltas, key=0):
    """An ensemble whose member k adds deltas[k] (in the dims where deltas is not NaN) whatever the input; the
    NaN dims keep the member's random (nonlinear) output. Identity normaliser (as ens.create makes it)."""
    state = ens.create(cfg, jax.random.PRNGKey(key))
    deltas = np.asarray(deltas, np.float32)
    fixed = ~np.isnan(deltas[0])
    last = dict(state.params["params"][f"Dense_{cfg.num_layers}"])
    last["kernel"] = jnp.where(fixed, 0.0, last["kernel"])
    last["bias"] = jnp.where(fixed, jnp.asarray(np.where(np.isnan(deltas), 0.0, deltas)), last["bias"])
    params = {"params": {**state.params["params"], f"Dense_{cfg.num_layers}": last}}
    return state._replace(params=params)


def test_imagined_rollouts_use_a_random_member_at_every_step():
    """Dimension 0 (a position: the models do not see it) moves by k + 1 under member k, so each step tells which
    member made it; the other dimensions are the members' own nonlinear outputs. A loop over rows and steps then
    recomputes every step with the member it names, and every reward; members change along time within a row
    and all are used about equally."""
    K, N, T, skip = 4, 64, 12, 1
    dims = mt.Dims(obs_dim=3, act_dim=1, skip=skip, horizon=T)
    cfg = ens.EnsembleConfig(in_dim=dims.obs_dim - skip + dims.act_dim, out_dim=dims.obs_dim, num_members=K,
                             num_elites=K, hidden=8, num_layers=2, probabilistic=False, activation="relu")
    ids = np.full((K, dims.obs_dim), np.nan)
    ids[:, 0] = np.arange(K) + 1.0
    model = constant_delta_model(cfg, ids)
    reward_fn = lambda o, a, n: n[1] - 2.0 * o[2] + a[0]  # noqa: E731
    to_env = lambda a: 2.0 * a + 0.5  # noqa: E731
    task = mt.Task(reward_fn, never_terminated, to_env, None, dims)
    policy = mt.Policy(dims.act_dim, 8)
    params = policy.init(jax.random.PRNGKey(1), jnp.zeros((1, dims.obs_dim - skip)))
    starts = jax.random.normal(jax.random.PRNGKey(2), (N, dims.obs_dim))
    batch = jax.jit(mt.imagine, static_argnums=(0, 1, 2))(task, cfg, policy, params, model, starts,
                                                          jax.random.PRNGKey(3))
    obs, action, reward, mask = (np.asarray(x) for x in batch)
    assert obs.shape == (N, T, 3) and action.shape == (N, T, 1) and reward.shape == mask.shape == (N, T)
    np.testing.assert_allclose(obs[:, 0], np.asarray(starts), atol=1e-6)
    np.testing.assert_array_equal(mask, 1.0)
    assert np.abs(action).max() > 1.0  # the policy's Gaussian draws: some beyond the bounds, clipped for the model
    step = obs[:, 1:, 0] - obs[:, :-1, 0]  # (N, T - 1)
    member = np.rint(step).astype(int) - 1
    np.testing.assert_allclose(step, member + 1.0, atol=1e-4)
    assert set(member.ravel().tolist()) == set(range(K))
    counts = np.bincount(member.ravel(), minlength=K) / member.size
    assert np.all(np.abs(counts - 1 / K) < 0.05), counts
    switches = (member[:, 1:] != member[:, :-1]).sum(1)
    assert np.all(switches >= 1) and switches.mean() > 0.5 * (T - 2), switches  # a fresh draw at every step
    # Every member's prediction for every (row, step), the model seeing (s without positions, clip(a)).
    clipped = np.clip(action[:, :-1], -1.0, 1.0)
    x = np.concatenate([obs[:, :-1, skip:], clipped], -1).reshape(N * (T - 1), -1)
    preds = np.asarray(ens.predict(cfg, model.params, model.norm, jnp.asarray(x))[0]).reshape(K, N, T - 1, -1)
    for i in range(N):
        for t in range(T - 1):
            np.testing.assert_allclose(obs[i, t + 1] - obs[i, t], preds[member[i, t], i, t], atol=2e-5)
            expected = reward_fn(obs[i, t], to_env(clipped[i, t]), obs[i, t + 1])
            np.testing.assert_allclose(reward[i, t], expected, atol=1e-4)


def test_termination_masks_on_inverted_pendulum():
    """Every member moves the pole angle by +0.03 a step: from start angle a0 the first step whose next angle has
    |angle| > 0.2 terminates. The mask is 1 up to and including that step and 0 after; the reward (the env's:
    1 per step that does not terminate) is 1 before it and 0 from it on."""
    env_id, T = "InvertedPendulum-v5", 12
    dims = mt.Dims(obs_dim=4, act_dim=1, skip=POSITION_DIMS.get(env_id, 0), horizon=T)
    cfg = ens.EnsembleConfig(in_dim=5, out_dim=4, num_members=3, num_elites=3, hidden=8, num_layers=2,
                             probabilistic=False)
    model = constant_delta_model(cfg, np.tile([0.0, 0.03, 0.0, 0.0], (3, 1)))
    task = mt.Task(OBS_REWARD_FUNCTIONS[env_id], OBS_TERMINATION_FUNCTIONS[env_id], lambda a: 3.0 * a, None, dims)
    policy = mt.Policy(1, 8)
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    a0 = np.array([0.0, 0.1, 0.185, 0.25, -0.105, -0.3, -0.2, 0.012], np.float32)
    starts = np.zeros((len(a0), 4), np.float32)
    starts[:, 1] = a0
    batch = mt.imagine(task, cfg, policy, params, model, jnp.asarray(starts), jax.random.PRNGKey(1))
    mask, reward = np.asarray(batch.mask), np.asarray(batch.reward)
    for i, start in enumerate(a0):
        angles = start + 0.03 * np.arange(1, T + 1)  # the angle after each step
        ends = np.flatnonzero(np.abs(angles) > 0.2)
        k = ends[0] if ends.size else T  # the terminating step (T: none within the horizon)
        np.testing.assert_array_equal(mask[i], (np.arange(T) <= k).astype(np.float32), err_msg=f"a0 {start}")
        np.testing.assert_array_equal(reward[i], (np.arange(T) < k).astype(np.float32), err_msg=f"a0 {start}")
    assert mask.sum(1).min() == 1 and mask.sum(1).max() == T  # rows that end at once and rows that never end


# ----------------------------------------------------------------------------
# TRPO pieces against direct computations
# ----------------------------------------------------------------------------
def tiny_batch(seed=0, N=50, T=20, obs_dim=2, act_dim=2, hidden=3):
    """A tiny policy (31 weights), a batch of its own actions with some steps masked out (moved away, so that
    they would change every result if they counted) and random advantages."""
    policy = mt.Policy(act_dim, hidden)
    params = policy.init(jax.random.PRNGKey(seed), jnp.zeros((1, obs_dim)))
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(N, T, obs_dim)).astype(np.float32)
    mask = np.ones((N, T), np.float32)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    mask[5:10, 12:] = 0
    mean, log_std = policy.apply(params, jnp.asarray(obs))
    act = np.array(mean + jnp.exp(log_std) * rng.normal(size=(N, T, act_dim)).astype(np.float32))
    obs[mask == 0] += 3.0  # steps after the end: they must not count (the policy's own draws there, shifted)
    act[mask == 0] -= 1.0
    adv = (rng.normal(size=(N, T)) * mask).astype(np.float32)
    batch = mt.Batch(jnp.asarray(obs), jnp.asarray(act), jnp.zeros((N, T)), jnp.asarray(mask))
    return policy, params, batch, jnp.asarray(adv)


def np_gaussian_kl(mp, sp, mq, sq):
    """KL(N(mp, diag e^2sp) || N(mq, diag e^2sq)) from the textbook formula for full covariances, per row."""
    k = mp.shape[-1]
    Sp, Sq = np.diag(np.exp(2 * sp)), np.diag(np.exp(2 * sq))
    iq = np.linalg.inv(Sq)
    d = mq - mp
    return 0.5 * (np.trace(iq @ Sp) + np.einsum("...i,ij,...j->...", d, iq, d) - k
                  + np.log(np.linalg.det(Sq) / np.linalg.det(Sp)))


def direct(policy, params, batch, adv):
    """Mean KL(old || new) and surrogate mean(ratio A) over the valid steps, in float64 NumPy from the policy's
    outputs (nothing from trpo_step), as functions of the flat parameter vector."""
    flat, unravel = ravel_pytree(params)
    mask = np.asarray(batch.mask, np.float64)
    valid = mask > 0
    a = np.asarray(batch.action, np.float64)[valid]
    m0, s0 = (np.asarray(x, np.float64) for x in policy.apply(params, batch.obs))
    m0 = m0[valid]

    def logp(m, s):
        return np.sum(-0.5 * ((a - m) / np.exp(s)) ** 2 - s - 0.5 * np.log(2 * np.pi), -1)

    def at(f):
        m, s = (np.asarray(x, np.float64) for x in policy.apply(unravel(jnp.asarray(f, jnp.float32)), batch.obs))
        m = m[valid]
        kl = np_gaussian_kl(m0, s0, m, s).mean()
        surr = np.mean(np.exp(logp(m, s) - logp(m0, s0)) * np.asarray(adv, np.float64)[valid])
        return kl, surr

    return np.asarray(flat, np.float64), at


def mean_kl_fn(policy, params, batch):
    """The mean KL(old || new) over the valid steps as a JAX function of the flat parameters (as trpo_step)."""
    flat, unravel = ravel_pytree(params)
    m0, s0 = jax.lax.stop_gradient(policy.apply(params, batch.obs))

    def kl(f):
        m, s = policy.apply(unravel(f), batch.obs)
        return (mt.gaussian_kl(m0, s0, m, s) * batch.mask).sum() / batch.mask.sum()

    return flat, kl


def test_gaussian_kl_and_log_prob_against_textbook_formulas():
    rng = np.random.default_rng(0)
    mp, mq = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    sp, sq = rng.normal(size=3) * 0.5, rng.normal(size=3) * 0.5
    got = np.asarray(mt.gaussian_kl(jnp.asarray(mp), jnp.asarray(sp), jnp.asarray(mq), jnp.asarray(sq)))
    np.testing.assert_allclose(got, np_gaussian_kl(mp, sp, mq, sq), rtol=1e-5)
    a = rng.normal(size=(7, 3))
    logp = np.asarray(mt.gaussian_log_prob(jnp.asarray(mp), jnp.asarray(sp), jnp.asarray(a)))
    var = np.exp(2 * sp)
    expected = [-0.5 * (d @ np.diag(1 / var) @ d) - 0.5 * np.log(np.prod(2 * np.pi * var)) for d in a - mp]
    np.testing.assert_allclose(logp, expected, rtol=1e-5)


def test_fisher_vector_product_equals_explicit_fisher():
    """trpo_step's F v (forward-over-reverse: jvp of the gradient of the mean KL at the old params) against the
    explicit Hessian of the mean KL and against the Fisher information of the Gaussian policy written out,
    mean over valid steps of J^T diag(1/sigma^2) J for the mean network plus 2 on each log-std."""
    policy, params, batch, _ = tiny_batch(N=8, T=5)
    flat, kl = mean_kl_fn(policy, params, batch)
    fvp = jax.jit(lambda v: jax.jvp(jax.grad(kl), (flat,), (v,))[1])
    H = np.asarray(jax.jit(jax.hessian(kl))(flat), np.float64)
    _, unravel = ravel_pytree(params)
    mean_of = lambda f: policy.apply(unravel(f), batch.obs)[0]  # noqa: E731
    J = np.asarray(jax.jit(jax.jacobian(mean_of))(flat), np.float64)  # (N, T, A, P)
    valid = np.asarray(batch.mask) > 0
    J = J[valid]  # (n, A, P)
    inv_var = np.exp(-2 * np.asarray(params["params"]["log_std"], np.float64))
    F = np.einsum("nap,a,naq->pq", J, inv_var, J) / len(J)
    log_std_at = np.flatnonzero(np.asarray(ravel_pytree(jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.full_like(p, float(path[-1].key == "log_std")), params))[0]))
    F[log_std_at, log_std_at] += 2.0
    np.testing.assert_allclose(H, F, atol=1e-4 * np.abs(F).max())
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.normal(size=flat.shape).astype(np.float32)
        got = np.asarray(fvp(jnp.asarray(v)), np.float64)
        np.testing.assert_allclose(got, H @ v, rtol=1e-4, atol=1e-5 * np.abs(H @ v).max())
        np.testing.assert_allclose(got, F @ v, rtol=1e-3, atol=1e-4 * np.abs(F @ v).max())


def test_conjugate_gradient_solves_spd_systems():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    b = rng.normal(size=8)
    A = Q @ np.diag(rng.uniform(0.5, 3.0, 8)) @ Q.T
    x = mt.conjugate_gradient(lambda v: jnp.asarray(A, jnp.float32) @ v, jnp.asarray(b, jnp.float32), 20)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(A, b), rtol=1e-4, atol=1e-5)
    # CG is exact after as many iterations as the matrix has distinct eigenvalues (3 here), not before.
    A3 = Q @ np.diag([1.0, 1.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0]) @ Q.T
    solve = lambda iters: np.asarray(mt.conjugate_gradient(  # noqa: E731
        lambda v: jnp.asarray(A3, jnp.float32) @ v, jnp.asarray(b, jnp.float32), iters))
    exact = np.linalg.solve(A3, b)
    np.testing.assert_allclose(solve(3), exact, rtol=1e-4, atol=1e-5)
    assert np.abs(solve(2) - exact).max() > 1e-2


trpo_step = jax.jit(mt.trpo_step, static_argnums=(0, 4, 5))  # policy, skip and args are static


def natural_step(policy, params, batch, adv, max_kl, damping):
    """The full TRPO step computed directly: x = (H + damping I)^-1 g with the explicit Hessian H of the mean KL
    and g the gradient of the surrogate, scaled so that 1/2 s^T (H + damping I) s = max_kl."""
    flat, kl = mean_kl_fn(policy, params, batch)
    _, unravel = ravel_pytree(params)
    m0, s0 = policy.apply(params, batch.obs)
    logp0 = mt.gaussian_log_prob(m0, s0, batch.action)

    def surrogate(f):
        m, s = policy.apply(unravel(f), batch.obs)
        return (jnp.exp(mt.gaussian_log_prob(m, s, batch.action) - logp0) * adv * batch.mask).sum() / batch.mask.sum()

    A = np.asarray(jax.jit(jax.hessian(kl))(flat), np.float64) + damping * np.eye(flat.size)
    x = np.linalg.solve(A, np.asarray(jax.jit(jax.grad(surrogate))(flat), np.float64))
    return np.sqrt(2 * max_kl / (x @ A @ x)) * x


@pytest.mark.parametrize("damping, backtracks, tol", [(1e-1, False, 2e-3), (1e-3, True, 5e-2)])
def test_trpo_step_is_the_natural_gradient_step_and_first_passing_try(damping, backtracks, tol):
    """The step taken is coef x the natural-gradient step computed with the explicit Fisher, coef = 0.8^i for the
    first try i whose KL (recomputed here in float64) is <= max_kl and whose surrogate (recomputed) improves.
    Damping 0.1: the full step already passes; damping 1e-3: it overshoots the trust region and the line search
    backs off (F + 1e-3 I is ill-conditioned: float32 conjugate gradient gets the direction to a few %)."""
    policy, params, batch, adv = tiny_batch()
    flat, at = direct(policy, params, batch, adv)
    args = mt.Args(max_kl=0.01, cg_iters=flat.size, cg_damping=damping, backtrack_ratio=0.8, backtrack_steps=15)
    new, info = trpo_step(policy, params, batch, adv, 0, args)
    step = natural_step(policy, params, batch, adv, args.max_kl, damping)
    kl0, surr0 = at(flat)
    assert abs(kl0) < 1e-10
    tries = (at(flat + args.backtrack_ratio ** i * step) for i in range(args.backtrack_steps))
    first = next(i for i, (kl, surr) in enumerate(tries) if kl <= args.max_kl and surr > surr0)
    assert (first > 0) == backtracks, first
    coef = args.backtrack_ratio ** first
    taken = np.asarray(ravel_pytree(new)[0], np.float64) - flat
    np.testing.assert_allclose(float(info["step_coef"]), coef, rtol=1e-5)
    assert np.linalg.norm(taken - coef * step) < tol * np.linalg.norm(coef * step)
    kl, surr = at(flat + taken)
    assert kl <= args.max_kl and surr > surr0, (kl, surr, surr0)
    np.testing.assert_allclose(float(info["kl"]), kl, rtol=2e-3)
    np.testing.assert_allclose(float(info["surrogate_gain"]), surr - surr0, rtol=2e-3)


def test_trpo_step_is_rejected_when_no_try_passes():
    """With one try only, a full step that leaves the trust region (damping 1e-3: its KL, recomputed here, is
    several times max_kl) is rejected: the params come back unchanged. Zero advantages cannot improve the
    surrogate: no step either."""
    policy, params, batch, adv = tiny_batch()
    flat, at = direct(policy, params, batch, adv)
    args = mt.Args(max_kl=0.01, cg_iters=flat.size, cg_damping=1e-3, backtrack_steps=1)
    full_kl, _ = at(flat + natural_step(policy, params, batch, adv, args.max_kl, args.cg_damping))
    assert full_kl > 2 * args.max_kl, full_kl
    for a in (adv, jnp.zeros_like(adv)):
        new, info = trpo_step(policy, params, batch, a, 0, args)
        for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert float(info["step_coef"]) == 0.0 and float(info["kl"]) == 0.0 and float(info["surrogate_gain"]) == 0.0


def test_steps_after_the_end_do_not_count_even_when_not_finite():
    policy, params, batch, adv = tiny_batch()
    dead = batch.mask == 0
    broken = batch._replace(obs=jnp.where(dead[..., None], jnp.nan, batch.obs),
                            action=jnp.where(dead[..., None], jnp.nan, batch.action))
    args = mt.Args(max_kl=0.01, cg_iters=31, cg_damping=1e-1)
    new_clean, info_clean = trpo_step(policy, params, batch, adv, 0, args)
    new_broken, info_broken = trpo_step(policy, params, broken, adv, 0, args)
    assert float(info_clean["step_coef"]) > 0
    np.testing.assert_allclose(float(info_broken["step_coef"]), float(info_clean["step_coef"]))
    for x, y in zip(jax.tree.leaves(new_broken), jax.tree.leaves(new_clean), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    reward = jnp.asarray(np.random.default_rng(0).normal(size=batch.mask.shape), jnp.float32)
    adv_clean, w_clean = mt.advantages(batch._replace(reward=reward), 0, jnp.zeros(8), 1.0)
    adv_broken, w_broken = mt.advantages(broken._replace(reward=reward), 0, jnp.zeros(8), 1.0)
    np.testing.assert_allclose(np.asarray(adv_broken), np.asarray(adv_clean), atol=1e-5)
    np.testing.assert_allclose(np.asarray(w_broken), np.asarray(w_clean), rtol=1e-4, atol=1e-5)


def test_trpo_iteration_survives_a_model_that_overflows_into_termination():
    """Member 0 of the model sends the pole angle to +inf: the rows it steps end there (terminated, as the env
    ends on a non-finite observation); the other rows go on. The iteration must still return finite params."""
    env_id, T = "InvertedPendulum-v5", 20
    dims = mt.Dims(obs_dim=4, act_dim=1, skip=0, horizon=T)
    cfg = ens.EnsembleConfig(in_dim=5, out_dim=4, num_members=4, num_elites=4, hidden=8, num_layers=2,
                             probabilistic=False)
    deltas = np.zeros((4, 4))
    deltas[:, 1] = [np.inf, 0.001, -0.001, 0.0]
    model = constant_delta_model(cfg, deltas)
    task = mt.Task(OBS_REWARD_FUNCTIONS[env_id], OBS_TERMINATION_FUNCTIONS[env_id], lambda a: 3.0 * a, None, dims)
    policy = mt.Policy(1, 8)
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    args = mt.Args(horizon=T, imagined_steps=64 * T, policy_hidden=8)
    pool = jnp.asarray(np.random.default_rng(0).uniform(-0.01, 0.01, (100, 4)), jnp.float32)
    batch = mt.imagine(task, cfg, policy, params, model, pool[:64], jax.random.PRNGKey(1))
    mask = np.asarray(batch.mask)
    assert (mask[:, -1] == 0).any() and (mask[:, -1] == 1).any()  # member 0 ended some rows, not all
    assert np.isfinite(np.asarray(batch.obs)).all()  # an ended row stays at its last finite state
    new, w, info = mt.trpo_iteration(task, cfg, policy, args, params, jnp.zeros(2 * 4 + 4), model, pool,
                                     jax.random.PRNGKey(1))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((new, w, info))), info


def returns_by_loop(reward, mask, gamma):
    reward, mask = np.asarray(reward, np.float64), np.asarray(mask, np.float64)
    out = np.zeros_like(reward)
    for i in range(reward.shape[0]):
        for t in range(reward.shape[1]):
            out[i, t] = sum(gamma ** (u - t) * reward[i, u] * mask[i, u] for u in range(t, reward.shape[1]))
    return out * mask


def test_discounted_returns_equal_a_loop():
    rng = np.random.default_rng(0)
    reward = rng.normal(size=(5, 9)).astype(np.float32)
    mask = np.ones((5, 9), np.float32)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    for gamma in (1.0, 0.9):
        got = mt.discounted_returns(jnp.asarray(reward), jnp.asarray(mask), gamma)
        np.testing.assert_allclose(np.asarray(got), returns_by_loop(reward, mask, gamma), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reg", [1e-5, 50.0])
def test_fit_baseline_is_ridge_least_squares(reg):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(6, 10, 4)).astype(np.float32)
    y = rng.normal(size=(6, 10)).astype(np.float32)
    mask = np.ones((6, 10), np.float32)
    mask[2, 3:] = 0
    X = X * mask[..., None]
    w = np.asarray(mt.fit_baseline(jnp.asarray(X), jnp.asarray(y), jnp.asarray(mask), reg))
    # min ||X w - y||^2 + reg ||w||^2 over the valid rows, as least squares on rows [X; sqrt(reg) I], [y; 0]
    Xv, yv = X[mask > 0].astype(np.float64), y[mask > 0].astype(np.float64)
    A = np.concatenate([Xv, np.sqrt(reg) * np.eye(4)])
    expected = np.linalg.lstsq(A, np.concatenate([yv, np.zeros(4)]), rcond=None)[0]
    np.testing.assert_allclose(w, expected, rtol=1e-3, atol=1e-4)
    if reg > 1:
        assert np.abs(expected - np.linalg.lstsq(Xv, yv, rcond=None)[0]).max() > 1e-2  # the ridge term mattered


def test_advantages_use_the_previous_baseline_and_refit_on_this_batch():
    """A = R - b_w(s, t) with the weights w passed in (rllab predicts before it refits), centred and scaled over
    the valid steps; the weights returned are the fit on this batch, whatever w was. Features recomputed here:
    [o, o^2, t, t^2, t^3, 1] with o the observation without positions, clipped to [-10, 10], t = step / 100."""
    rng = np.random.default_rng(2)
    N, T, obs_dim, skip, gamma = 4, 7, 3, 1, 0.95
    obs = rng.normal(size=(N, T, obs_dim)).astype(np.float32) * 4
    obs[0, 0, 1] = 25.0  # clipped to 10 in the features
    mask = np.ones((N, T), np.float32)
    mask[1, 5:] = 0
    reward = rng.normal(size=(N, T)).astype(np.float32)
    batch = mt.Batch(jnp.asarray(obs), jnp.zeros((N, T, 1)), jnp.asarray(reward), jnp.asarray(mask))
    o = np.clip(obs[..., skip:], -10, 10).astype(np.float64)
    t = np.broadcast_to((np.arange(T) / 100.0)[None, :, None], (N, T, 1))
    feats = np.concatenate([o, o ** 2, t, t ** 2, t ** 3, np.ones_like(t)], -1) * mask[..., None]
    R = returns_by_loop(reward, mask, gamma)
    fitted = np.asarray(mt.fit_baseline(jnp.asarray(feats, jnp.float32), jnp.asarray(R, jnp.float32),
                                        jnp.asarray(mask)))
    results = []
    for w in (np.zeros(feats.shape[-1]), rng.normal(size=feats.shape[-1])):
        adv, w_new = mt.advantages(batch, skip, jnp.asarray(w, jnp.float32), gamma)
        raw = (R - feats @ w)[mask > 0]
        expected = np.zeros((N, T))
        expected[mask > 0] = (raw - raw.mean()) / raw.std()
        np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(np.asarray(w_new), fitted, rtol=1e-3, atol=1e-4)
        results.append(np.asarray(adv))
    assert np.abs(results[0] - results[1]).max() > 0.1  # the previous weights do change A


# ----------------------------------------------------------------------------
# The stopping rule
# ----------------------------------------------------------------------------
def test_check_passes_unless_more_than_the_fraction_got_worse():
    ref = np.arange(10.0)
    worse = lambda k: np.concatenate([ref[:k] - 0.5, ref[k:] + 1.0])  # noqa: E731 (k models got worse)
    assert mt.check_passes(ref, worse(0), 0.3)
    assert mt.check_passes(ref, worse(3), 0.3)  # 30 % worse: not more than 30 %
    assert not mt.check_passes(ref, worse(4), 0.3)
    assert not mt.check_passes(ref, worse(10), 0.3)
    assert mt.check_passes(ref, ref.copy(), 0.0)  # equal returns are not worse
    assert mt.check_passes(ref, np.concatenate([ref[:3], ref[3:] - 1e-3]), 0.7)  # 7 worse of 10 at 0.7
    assert not mt.check_passes(ref, worse(1), 0.0)


def test_stopping_rule_accepts_rejects_and_restores():
    args = mt.Args(worse_fraction=0.3, policy_patience=6, check_every=2)
    p0, p2, p4, p6, p8 = (object() for _ in range(5))
    rule = mt.StoppingRule(p0, np.zeros(10), args)
    assert not rule.should_stop(5) and rule.should_stop(6)  # no pass since iteration 0
    assert rule.check(2, p2, np.ones(10))  # all better: saved, reference replaced
    assert rule.best is p2 and rule.best_iter == 2
    assert not rule.check(4, p4, np.r_[[0.5] * 4, [2.0] * 6])  # 4 of 10 worse: rejected, nothing changes
    assert rule.best is p2 and rule.best_iter == 2
    np.testing.assert_array_equal(rule.reference, np.ones(10))
    new_ref = np.r_[[0.5] * 3, [2.0] * 7]
    assert rule.check(6, p6, new_ref)  # 3 of 10 worse: passes; ALL references replaced, the worse ones too
    assert rule.best is p6 and rule.best_iter == 6
    np.testing.assert_array_equal(rule.reference, new_ref)
    # Against the old reference (all 1) this would pass; against the replaced one, 7 of 10 are worse.
    assert not rule.check(8, p8, np.ones(10))
    assert rule.best is p6
    assert not rule.should_stop(11) and rule.should_stop(12)  # patience 6 after the pass at 6


def test_no_stopping_rule_passes_every_check_and_never_stops():
    args = mt.Args(stopping_rule=False, worse_fraction=0.3, policy_patience=2, check_every=1)
    rule = mt.StoppingRule("p0", np.zeros(3), args)
    assert rule.check(1, "p1", -np.ones(3)) and rule.best == "p1"
    np.testing.assert_array_equal(rule.reference, -np.ones(3))
    assert not rule.should_stop(10_000)


def scripted_policy_phase(monkeypatch, scripted_returns, **arg_changes):
    """policy_phase with validation_check returning the scripted per-model returns (the first is the reference
    taken before any iteration) and a fake TRPO iteration that counts its calls into the params."""
    calls, checked = [], []
    returns = iter(scripted_returns)

    def fake_check(task, cfg, policy, gamma, params, model, starts):
        checked.append(float(params["params"]["count"]))
        return jnp.asarray(next(returns))

    def fake_iteration(task, cfg, policy, args, params, baseline_w, model, start_pool, key):
        calls.append(1)
        inner = dict(params["params"], count=params["params"]["count"] + 1)
        return {"params": inner}, baseline_w + 1, {"kl": jnp.float32(0.001)}

    monkeypatch.setattr(mt, "validation_check", fake_check)
    monkeypatch.setattr(mt, "trpo_iteration", fake_iteration)
    args = mt.Args(**{"max_policy_iters": 100, "check_every": 2, "policy_patience": 6, "worse_fraction": 0.3,
                      "init_std": 0.5, **arg_changes})
    params = {"params": {"log_std": jnp.full(2, 1.7), "count": jnp.float32(0)}}
    best, baseline_w, _, metrics = mt.policy_phase(None, None, None, args, params, jnp.zeros(3), None, None, None,
                                                   jax.random.PRNGKey(0), 500, lambda name: contextlib.nullcontext())
    return best, baseline_w, metrics, len(calls), checked


def test_policy_phase_returns_the_last_passing_check_and_stops_after_patience(monkeypatch):
    script = [np.zeros(10), np.ones(10), np.r_[[0.5] * 4, [2.0] * 6], np.r_[[0.5] * 3, [2.0] * 7], np.ones(10),
              np.full(10, 5.0) * np.r_[[-1] * 4, [1] * 6], np.zeros(10)] + [np.full(10, 9.0)] * 50
    # checks at iterations 2 (pass), 4 (fail), 6 (pass), 8, 10, 12 (fail) -> stop at 12 = 6 + patience
    best, baseline_w, metrics, n_calls, checked = scripted_policy_phase(monkeypatch, script)
    assert checked == [0, 2, 4, 6, 8, 10, 12]  # the reference before any iteration, then every check_every
    assert n_calls == 12 and metrics["policy/iterations"] == 12
    assert float(best["params"]["count"]) == 6  # the params saved at the last passing check
    np.testing.assert_allclose(np.asarray(best["params"]["log_std"]), np.log(0.5), rtol=1e-6)  # reset at start
    assert metrics["policy/best_iteration"] == 6 and metrics["policy/checks"] == 6
    assert metrics["policy/passed_checks"] == 2
    np.testing.assert_allclose(metrics["policy/model_return"], np.mean(script[3]))
    np.testing.assert_array_equal(np.asarray(baseline_w), 12.0)  # the baseline keeps its latest fit


def test_policy_phase_without_stopping_rule_runs_every_iteration(monkeypatch):
    script = [np.zeros(10)] + [np.full(10, -1.0 - i) for i in range(20)]  # every check worse than the last
    best, _, metrics, n_calls, _ = scripted_policy_phase(monkeypatch, script, stopping_rule=False,
                                                         max_policy_iters=20)
    assert n_calls == 20 and metrics["policy/iterations"] == 20 and metrics["policy/passed_checks"] == 10
    assert float(best["params"]["count"]) == 20


def test_policy_phase_without_stopping_rule_keeps_the_last_check(monkeypatch):
    """--no-stopping-rule is the authors' mode no_early (thanard/me-trpo model_based_rl.py `is_done` returns
    False): every check saves the policy, all max_policy_iters iterations run, and the end restores the last
    SAVED policy (`log_and_restore`): with checks every 5 of 7 iterations, iteration 5's."""
    script = [np.zeros(10)] + [np.full(10, -1.0 - i) for i in range(20)]
    best, _, metrics, n_calls, _ = scripted_policy_phase(monkeypatch, script, stopping_rule=False,
                                                         max_policy_iters=7, check_every=5)
    assert n_calls == 7
    assert float(best["params"]["count"]) == 5


# ----------------------------------------------------------------------------
# It learns
# ----------------------------------------------------------------------------
def test_it_learns_inverted_pendulum(tmp_path, monkeypatch):
    """The default settings for one 500-step iteration (seed 1): the exploring initial policy's real episodes
    last a few steps (return about 5), the policy trained on the models alone balances the pole for the whole
    100-step horizon in every evaluation episode (max 100). About 20 s."""
    monkeypatch.chdir(tmp_path)
    out = mt.main(mt.Args(seed=1, total_timesteps=500))
    rows = out["history"]
    print([(r["step"], r["eval/return"], r["train/episode_return"]) for r in rows], f"{out['wall_seconds']:.0f} s")
    assert rows[-1]["step"] >= 500 and rows[-1]["eval/return"] >= 90, rows[-1]
    assert rows[0]["train/episode_return"] < 30, rows[0]


# ----------------------------------------------------------------------------
# Command line: smoke runs of the ablations, kill -9 and resume, divergence, bad input
# ----------------------------------------------------------------------------
CHEAP_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TINY = ["--horizon", "20", "--steps-per-iteration", "100", "--eval-interval", "100", "--eval-episodes", "1",
        "--model-hidden", "16", "--model-batch-size", "64", "--model-max-passes", "5", "--model-eval-every", "1",
        "--model-patience", "3", "--policy-hidden", "8", "--imagined-steps", "200", "--max-policy-iters", "4",
        "--check-every", "2", "--policy-patience", "2", "--validation-starts", "20", "--bptt-batch", "20"]


def run_cli(tmp_path, *flags):
    return run_algo("me_trpo", *flags, cwd=tmp_path, XLA_FLAGS=CHEAP_XLA)


@pytest.mark.parametrize("flags", [["--policy-update", "bptt"], ["--ensemble-size", "1", "--no-stopping-rule"]])
def test_cli_smoke_ablations(tmp_path, flags):
    res = run_cli(tmp_path, *TINY, "--total-timesteps", "200", "--save-model", *flags)
    assert res.returncode == 0, res.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert 100 <= rows[0]["global_step"] < 120 and 200 <= rows[1]["global_step"] < 240  # whole 20-step episodes
    for key in ("eval/return", "train/episode_return", "model/validation_mse", "policy/imagined_return",
                "policy/model_return"):
        assert all(np.isfinite(r[key]) for r in rows), key
    if "--no-stopping-rule" in flags:
        assert all(r["policy/iterations"] == 4 and r["policy/passed_checks"] == r["policy/checks"] == 2
                   for r in rows), rows
        assert "policy/kl" in rows[0]
    else:
        assert "policy/kl" not in rows[0]  # bptt has no trust region
    assert (run_dir / "me_trpo.msgpack").stat().st_size > 0


def test_kill_and_resume_equals_the_uninterrupted_run(tmp_path):
    """kill -9 after an iteration's checkpoint, then --resume: the same metrics as the run never interrupted
    (the checkpoint holds the policy and its last change, the models, D and D_val, the baseline, the keys, the
    exploration generator and both envs)."""
    flags = [*TINY, "--total-timesteps", "300"]
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    full = run_cli(tmp_path / "full", *flags)
    assert full.returncode == 0, full.stderr[-2000:]
    (full_dir,) = (tmp_path / "full" / "runs").iterdir()
    expected = comparable(read_metrics(full_dir))
    assert [r["iteration"] for r in expected] == [1, 2, 3]
    run_dir, step = kill_after_checkpoint("me_trpo", *flags, cwd=tmp_path / "killed", min_step=100,
                                          XLA_FLAGS=CHEAP_XLA)
    assert 100 <= step < expected[-1]["global_step"], step
    resumed = run_cli(tmp_path / "killed", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {step}" in resumed.stdout
    assert comparable(read_metrics(run_dir)) == expected


def test_divergence_names_the_real_step_and_quantity(tmp_path, monkeypatch):
    """NaN policy weights from the 6th TRPO iteration (the 2nd of outer iteration 2, no stopping rule: 4 a phase)
    are caught at the next iteration as a 'policy/' quantity, at outer iteration 2's real step; the checkpoint of
    iteration 1 stays."""
    monkeypatch.chdir(tmp_path)
    real_iteration, real_phase = mt.trpo_iteration, mt.policy_phase
    calls, steps = [], []

    def poisoned(*a):
        params, baseline_w, info = real_iteration(*a)
        calls.append(1)
        if len(calls) == 6:
            params = jax.tree.map(lambda p: p * jnp.nan, params)
        return params, baseline_w, info

    def recording(*a, **k):
        steps.append(a[10])
        return real_phase(*a, **k)

    monkeypatch.setattr(mt, "trpo_iteration", poisoned)
    monkeypatch.setattr(mt, "policy_phase", recording)
    args = mt.Args(total_timesteps=400, horizon=20, steps_per_iteration=100, eval_interval=100, eval_episodes=1,
                   model_hidden=16, model_batch_size=64, model_max_passes=5, policy_hidden=8, imagined_steps=200,
                   max_policy_iters=4, check_every=2, policy_patience=2, validation_starts=20, stopping_rule=False)
    with pytest.raises(Divergence) as err:
        mt.main(args)
    message = str(err.value)
    assert len(steps) == 2 and len(calls) == 7 and steps[1] > steps[0], (steps, len(calls))
    assert message.startswith(f"error: training diverged at real step {steps[1]}: 'policy/"), message
    assert "\n" not in message and f"checkpoint.msgpack (step {steps[0]})" in message, message
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = load_checkpoint(run_dir / "checkpoint.msgpack")
    assert int(saved["run"]["step"]) == steps[0] and int(saved["state"]["iteration"]) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["state"]["params"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1]


BASE = ["--total-timesteps", "500"]


@pytest.mark.parametrize("argv, message", [
    (["--env-id", "CartPole-v1"], "ME-TRPO needs a continuous (Box) action space; 'CartPole-v1' has Discrete(2)"),
    (["--env-id", "Pendulum-v1"], "ME-TRPO needs a known reward for --env-id; 'Pendulum-v1' has none"),
    (["--env-id", "Hoper-v5"], "unknown env id 'Hoper-v5'"),
    (["--ensemble-size", "0"], "--ensemble-size must be >= 1, got 0"),
    (["--policy-patience", "0"], "--policy-patience must be >= 1, got 0"),
    (["--policy-patience", "3"], "--policy-patience (3) must be at least --check-every (5)"),
    (["--check-every", "0"], "--check-every must be >= 1, got 0"),
    (["--max-kl", "0"], "--max-kl must be > 0, got 0.0"),
    (["--worse-fraction", "1.5"], "--worse-fraction must be in [0, 1], got 1.5"),
    (["--validation-fraction", "0"], "--validation-fraction must be in (0, 1], got 0.0"),
    (["--validation-fraction", "1"], "leaves no training or no validation rows"),
    (["--total-timesteps", "499"], "--total-timesteps (499) must be at least --steps-per-iteration (500)"),
    (["--policy-update", "foo"], "--policy-update"),
    (["--horizon", "0"], "--horizon must be >= 1, got 0"),
    (["--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--backtrack-ratio", "1.5"], "--backtrack-ratio must be in (0, 1]"),
    (["--max-train-rows", "1000000000000"], "D + D_val (1000000100000 rows) needs about"),
    (["--resume", "no/such/run"], "not a run directory"),
])
def test_bad_input_table(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    text = cli_error(mt, *BASE, *argv)
    assert message in text, text
    assert not list(tmp_path.glob("runs/*/args.json"))  # refused before a run directory exists


def test_bad_input_through_the_real_entry_point(tmp_path):
    assert "continuous (Box) action space" in one_line_error(run_algo("me_trpo", "--env-id", "CartPole-v1",
                                                                      cwd=tmp_path))
