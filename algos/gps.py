"""Guided policy search: LQR-FLM local controllers and mirror-descent GPS.

Papers and lecture:
- Levine & Abbeel 2014, "Learning Neural Network Policies with Guided Policy
  Search under Unknown Dynamics" (NIPS 2014 proceedings): time-varying
  linear-Gaussian controllers improved by LQR on fitted local models (LQR-FLM)
  under a KL bound, with a GMM prior on the dynamics (Sec. 3).
- Levine, Finn, Darrell & Abbeel 2016, "End-to-End Training of Deep Visuomotor
  Policies" (JMLR), https://arxiv.org/abs/1504.00702: Appendix A (dynamics
  prior A.3, trajectory optimisation with the eta search, step size).
- Montgomery & Levine 2016, "Guided Policy Search as Approximate Mirror
  Descent" (NIPS), https://arxiv.org/abs/1607.04614: MDGPS, Alg. 2 - the C-step
  bounds KL(p_i || linearised global policy), the S-step is supervised learning.
- CS 285 (Levine), "Model-Based Policy Learning" part 2: the GPS recipe.
Reference code: cbfinn/gps (Python 2, Caffe; read for constants, not copied).

What is here: M conditions (fixed initial states/targets, reset exactly by
common/envs/conditions.py), one linear-Gaussian controller p_i(u_t | x_t) =
N(K_t x_t + k_t, S_t) per condition, dynamics x_{t+1} ~ N(F_t [x_t; u_t] + f_t,
D_t) fitted per time step with a normal-inverse-Wishart prior from a GMM over
recent (x, u, x') tuples, the KL-constrained LQG backward pass (cost
derivatives by autodiff, eta by bracketing), the forward pass, step-size
adaptation, and the S-step: an MLP pi_theta(u | o) fitted to the controllers'
means weighted by their precisions. The policy sees the env's observation o
(Reacher: cos/sin of the joint angles, target, joint velocities, fingertip -
target), the controllers the state x (joint angles and velocities, fingertip -
target and its velocity). Reacher runs the reference experiment's timing (dt
0.05 s, T = 100: five seconds per trial) and starts from its LQR hold
controllers (init_lqr). Left out: BADMM GPS, PILQR, smoothed exploration
noise, images. Results against the paper: docs/gps.md.

Run:
    python -m algos.gps                          # MDGPS on Reacher-v5, 4 conditions, T = 100 at dt 0.05 s
    python -m algos.gps --algorithm lqr_flm      # local controllers only
    python -m algos.gps --frame-skip 2 --horizon 50 --init zero --total-timesteps 10000   # the earlier timing
    python -m algos.gps --env-id PointMass-v0 --horizon 30 --init-var 1.0
    python -m algos.gps --resume runs/<run>      # continue from the last iteration's checkpoint

Algorithm (Montgomery & Levine 2016, Alg. 2; the numbers mark the code below):
    [0] initialise p_i: the LQR controller holding condition i's start under a guessed model (init_lqr)
    for iteration = 1..K:
      [1] run each p_i (mdgps on-policy: pi_theta + noise) N times from condition i (exact reset)
      [2] quadratise the cost along the samples (autodiff), average over samples
      [3] fit the dynamics p(x'|x,u) per time step, NIW prior from a GMM
      [4] (mdgps) linearise pi_theta around the samples: pi_lin_i(u|x)
      [5] adapt the step epsilon_i from predicted vs actual cost improvement
      [6] C-step: p_i <- argmin E_p[cost] s.t. KL(p_i || prev_i) <= epsilon_i,
          prev_i = old p_i (lqr_flm) or pi_lin_i (mdgps); eta by bracketing
      [7] (mdgps) S-step: theta <- argmin sum_{i,j,t} ||pi_theta(o_t) - mu_i(x_t)||^2_{S_t^-1}
      [8] evaluate: samples, mean controllers, global policy on training and held-out conditions
Steps [2]-[6] run in float64 (one region in main), the policy in float32.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from gymnasium import spaces
from jax.scipy.linalg import cho_solve, cholesky
from jax.scipy.special import logsumexp
from jax.scipy.stats import multivariate_normal

from common.checkpoints import numpy_rng_state, save_checkpoint, set_numpy_rng_state
from common.checks import check_finite, check_memory, check_ranges, fail, flag
from common.command_line import cli
from common.envs.conditions import evaluate_conditions, make_conditions_env, rollout_condition
from common.experiment import CommonArgs, Run, check_video_support, record_video, seed_everything
from common.progress import Progress


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "Reacher-v5"
    """a conditions env of common/envs/conditions.py (exact state reset): Reacher-v5 or PointMass-v0"""
    total_timesteps: int = 20_000
    """real training steps; iterations = total_timesteps // (conditions * num_samples * horizon)"""
    eval_interval: int = 1
    """evaluate the global policy every this many iterations (GPS counts iterations)"""
    eval_episodes: int = 1
    """runs per condition and evaluation; must be 1 (exact resets, noise-free policies: a second run repeats)"""
    checkpoint_interval: int | None = None
    """write checkpoint.msgpack every this many iterations (None: every --eval-interval); always at the end"""
    algorithm: Literal["mdgps", "lqr_flm"] = "mdgps"
    """mdgps: C-step bounded by KL to the linearised global policy, then S-step; lqr_flm: controllers only"""
    sample_on_policy: bool = True
    """mdgps: after iteration 1 sample pi_theta + noise, not the controllers (cbfinn/gps sample_on_policy)"""
    step_rule: Literal["laplace", "mc"] = "mc"
    """mdgps step adaptation: Laplace estimates of the policy linearisations or the samples' costs (cbfinn/gps)"""
    conditions: int = 4
    """training conditions used (the env offers at most its own number)"""
    horizon: int = 100
    """T, steps per trajectory, at most the env's time limit (Reacher: 100 steps; mjc_mdgps_example T = 100)"""
    frame_skip: int | None = None
    """MuJoCo steps of 0.01 s per env step (Reacher-v5); None: 5, dt 0.05 s as mjc_mdgps_example (gymnasium: 2)"""
    num_samples: int = 5
    """N, trajectories per condition per iteration (cbfinn/gps: 5)"""
    init: Literal["lqr", "zero"] = "lqr"
    """initial controllers: lqr, cbfinn/gps init_lqr (hold the start under a guessed model); zero: zero gains"""
    init_var: float | None = None
    """initial noise variance; None: 1.0 for lqr (mjc_mdgps_example), 0.003 for zero (tuned: docs/gps.md)"""
    init_final_weight: float = 50.0
    """init_lqr's weight on the last step's hold cost (mjc_mdgps_example: 50)"""
    step_scope: Literal["shared", "per_condition"] = "shared"
    """mdgps step multiplier: shared, one for all (reference); per_condition, each its own, a condition whose
    predicted improvement is non-finite or exploded keeping its multiplier (a measured option: docs/gps.md)"""
    anchor_blend: float = 0.0
    """mdgps: C-step anchor = (1 - w) policy linearisation + w previous controller in (K, k) (a measured option)"""
    kl_step: float = 1.0
    """base KL step epsilon per time step; the bound is kl_step * step_mult * T (cbfinn/gps: 1.0)"""
    min_step_mult: float | None = None
    """lower limit of the step multiplier; default 0.01 (lqr_flm, cbfinn/gps ALG), 0.5 (mdgps, mjc_mdgps_example)"""
    max_step_mult: float | None = None
    """upper limit of the step multiplier; default 2 (lqr_flm, tuned: docs/gps.md), 3 (mdgps, mjc_mdgps_example)"""
    prior_samples: int = 20
    """trajectories per condition kept for the GMM priors (cbfinn/gps max_samples)"""
    max_clusters: int = 20
    """GMM clusters at most (cbfinn/gps)"""
    min_points_per_cluster: int = 40
    """clusters = min(max_clusters, points / this) (cbfinn/gps min_samples_per_cluster)"""
    gmm_iters: int = 100
    """EM iterations of the GMM (cbfinn/gps max_iters)"""
    policy_hidden: tuple[int, ...] = (64, 64)
    """hidden layers of the global policy MLP (relu)"""
    policy_lr: float = 1e-3
    """Adam learning rate of the S-step"""
    policy_weight_decay: float = 0.005
    """L2 penalty added to the S-step gradient (cbfinn/gps policy_opt weight_decay 0.005): a smoother policy"""
    policy_steps: int = 4000
    """Adam steps per S-step (minibatches; cbfinn/gps mjc_mdgps_example: 4000 iterations)"""
    policy_batch_size: int = 128
    """S-step minibatch size, at most the conditions * num_samples * horizon points of one iteration"""

    @property
    def steps_per_iteration(self) -> int:
        """M conditions x N samples x T steps of real interaction per iteration."""
        return self.conditions * self.num_samples * self.horizon

    @property
    def iterations(self) -> int:
        return self.total_timesteps // self.steps_per_iteration

    @property
    def noise_var(self) -> float:
        return self.init_var if self.init_var is not None else (1.0 if self.init == "lqr" else 0.003)

    @property
    def step_mult_range(self) -> tuple[float, float]:
        lo, hi = (0.01, 2.0) if self.algorithm == "lqr_flm" else (0.5, 3.0)  # defaults: see the fields
        return (lo if self.min_step_mult is None else self.min_step_mult,
                hi if self.max_step_mult is None else self.max_step_mult)


class Dims(NamedTuple):
    """Sizes read from the conditions env."""

    dX: int  # the controllers' state x
    dU: int  # the action u
    dO: int  # the policy's observation o


# --------------------------------------------------------------------------
# Containers (T = horizon, dX state, dU action, D = dX + dU), and the state of a run, GPSState: everything an
# iteration changes (and the checkpoint holds)
# --------------------------------------------------------------------------
class LinearGaussian(NamedTuple):
    """p(u_t | x_t) = N(K_t x_t + k_t, cov_t): a controller or a policy linearisation."""

    K: jax.Array  # (T, dU, dX)
    k: jax.Array  # (T, dU)
    cov: jax.Array  # (T, dU, dU)


class Dynamics(NamedTuple):
    """x_{t+1} ~ N(F_t [x_t; u_t] + f_t, cov_t) and x_0 ~ N(x0_mean, x0_cov)."""

    F: jax.Array  # (T, dX, D); F[T-1] = 0 (no transition after the last step)
    f: jax.Array  # (T, dX)
    cov: jax.Array  # (T, dX, dX)
    x0_mean: jax.Array  # (dX,)
    x0_cov: jax.Array  # (dX, dX)


class QuadCost(NamedTuple):
    """cost_t(v) ~ 0.5 v^T C_t v + v^T c_t + c0_t with v = [x; u]."""

    C: jax.Array  # (T, D, D)
    c: jax.Array  # (T, D)
    c0: jax.Array  # (T,)


class GMM(NamedTuple):
    log_mass: jax.Array  # (K,); -inf for unused clusters
    mean: jax.Array  # (K, P)
    cov: jax.Array  # (K, P, P)


class SampleBuffer(NamedTuple):
    """The last S = prior_samples trajectories of each condition (a ring), for the GMM priors of [3] and [4]."""

    X: np.ndarray  # (M, S, T, dX)
    U: np.ndarray  # (M, S, T, dU)
    Ob: np.ndarray  # (M, S, T, dO)
    mask: np.ndarray  # (M, S): 1 where a slot holds a trajectory


class Samples(NamedTuple):
    """One iteration's trajectories [1]: (M, N, T, .)."""

    X: np.ndarray
    U: np.ndarray
    Ob: np.ndarray


class Fit(NamedTuple):
    """What an iteration fitted ([2]-[4], per condition), kept for the next iteration's step adjustment [5]."""

    ctrl: LinearGaussian  # the controllers that drew the samples (before this iteration's C-step)
    dyn: Dynamics
    cost: QuadCost
    pol_lin: LinearGaussian  # mdgps; zeros for lqr_flm
    mc_cost: np.ndarray  # (M,) the samples' mean trajectory cost per condition


class GPSState(NamedTuple):
    iteration: int  # iterations done
    ctrl: LinearGaussian  # the controllers p_i, (M, T, ...)
    step_mult: np.ndarray  # (M,) KL step multipliers
    eta: np.ndarray  # (M,) the last C-step's dual variables: where the next eta search starts
    last: Fit  # the previous iteration's fit (zeros before the first)
    buffer: SampleBuffer
    policy: TrainState  # pi_theta's parameters and Adam state
    obs_mean: np.ndarray  # (dO,) whitening of the policy's input, set from the first samples
    obs_std: np.ndarray  # (dO,)
    policy_var: np.ndarray  # (dU,) exploration noise of on-policy sampling (1 / diag of the mean precision)
    key: jax.Array
    np_rng: str  # the NumPy Generator that draws the sampling noise and the reset seeds


def sym(a):
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def init_controller(T: int, dX: int, dU: int, init_var: float) -> LinearGaussian:
    """[0] Zero gains, isotropic noise (cbfinn/gps init_pd with zero gains)."""
    return LinearGaussian(jnp.zeros((T, dU, dX)), jnp.zeros((T, dU)), jnp.tile(init_var * jnp.eye(dU), (T, 1, 1)))


def riccati_backward(C, c, F, f, dX: int):
    """Finite-horizon LQR by dynamic programming: minimise sum_t 0.5 v_t^T C_t v_t + v_t^T c_t, v = [x; u], under
    x_{t+1} = F_t v_t + f_t. C (T, D, D), c (T, D), F (T, dX, D), f (T, dX). Returns K (T, dU, dX), k (T, dU),
    Q_uu^-1 (T, dU, dU) and whether every Q_uu was positive definite."""

    def step(carry, inp):
        Vxx, Vx = carry  # value of x_{t+1}: 0.5 x^T Vxx x + x^T Vx
        C_t, c_t, F_t, f_t = inp
        Q = sym(C_t + F_t.T @ Vxx @ F_t)  # (D, D)
        q = c_t + F_t.T @ (Vx + Vxx @ f_t)
        L = cholesky(Q[dX:, dX:], lower=True)
        ok = jnp.all(jnp.isfinite(L))
        K, k = -cho_solve((L, True), Q[dX:, :dX]), -cho_solve((L, True), q[dX:])
        cov = cho_solve((L, True), jnp.eye(L.shape[0]))
        Vxx, Vx = sym(Q[:dX, :dX] + Q[:dX, dX:] @ K), q[:dX] + Q[:dX, dX:] @ k
        return (Vxx, Vx), (K, k, sym(cov), ok)

    _, (K, k, cov, ok) = jax.lax.scan(step, (jnp.zeros((dX, dX)), jnp.zeros(dX)), (C, c, F, f), reverse=True)
    return K, k, cov, jnp.all(ok)


def init_lqr(x0, T: int, dU: int, dt: float, gains, init_var: float, final_weight: float,
             stiffness: float = 1.0, stiffness_vel: float = 0.5) -> LinearGaussian:
    """[0] cbfinn/gps lin_gauss_init.init_lqr: the LQR controller that holds the start x0 (dX,) under a guessed
    model, the controller's noise its Q_uu^-1. The model (guess_dynamics) takes x = [q (dU); v (dU); rest] with
    joint accelerations gains * u: q' = q + dt v + dt^2 g u, v' = v + dt g u, the rest 0. The cost is
    0.5 (z - [x0; 0])^T L (z - [x0; 0]), L = diag(stiffness, stiffness * stiffness_vel, 0 (rest), 1 (u)) / init_var,
    weighted final_weight at the last step (INIT_LG_LQR defaults: stiffness 1, stiffness_vel 0.5)."""
    dX, g = x0.shape[0], jnp.asarray(gains, x0.dtype)
    eye, zeros = jnp.eye(dU), jnp.zeros((dU, dX - 2 * dU))
    F = jnp.concatenate([jnp.concatenate([eye, dt * eye, zeros, dt**2 * jnp.diag(g)], 1),
                         jnp.concatenate([jnp.zeros((dU, dU)), eye, zeros, dt * jnp.diag(g)], 1),
                         jnp.zeros((dX - 2 * dU, dX + dU))], 0)  # (dX, D)
    L = jnp.diag(jnp.concatenate([jnp.full(dU, stiffness), jnp.full(dU, stiffness * stiffness_vel),
                                  jnp.zeros(dX - 2 * dU), jnp.ones(dU)])) / init_var
    lin = -L @ jnp.concatenate([x0, jnp.zeros(dU)])
    w = jnp.where(jnp.arange(T) == T - 1, final_weight, 1.0)[:, None]
    K, k, cov, _ = riccati_backward(w[:, :, None] * L, w * lin, jnp.tile(F, (T, 1, 1)), jnp.zeros((T, dX)), dX)
    return LinearGaussian(K, k, cov)


# --------------------------------------------------------------------------
# GMM prior and linear-Gaussian regression (Levine et al. 2016, App. A.3)
# --------------------------------------------------------------------------
def fit_gmm(key, data, weights, num_clusters, max_clusters: int, iters: int) -> GMM:
    """EM on `data` (P, D) with 0/1 point `weights` (P,), using `num_clusters` (traced, <= max_clusters) clusters so
    that the shapes never change. Random hard assignment to start; clusters whose mass falls under 1e-4 / K are
    rebooted to uniform weights (as cbfinn/gps utility/gmm.py)."""
    P, D = data.shape
    active = jnp.arange(max_clusters) < num_clusters
    start = jax.random.randint(key, (P,), 0, num_clusters)
    resp = jax.nn.one_hot(start, max_clusters, dtype=data.dtype) * weights[:, None]
    log_mass = jnp.where(active, -jnp.log(jnp.asarray(num_clusters, data.dtype)), -jnp.inf).astype(data.dtype)

    def m_step(resp, log_mass):
        rn = resp / jnp.maximum(resp.sum(0), 1e-12)  # (P, K), columns sum to 1
        small = jnp.exp(log_mass) < 1e-4 / num_clusters
        rn = jnp.where(small[None, :], (weights / weights.sum())[:, None], rn)
        mean = rn.T @ data  # (K, D)
        cov = jnp.einsum("pk,pd,pe->kde", rn, data, data) - mean[:, :, None] * mean[:, None, :]
        return GMM(log_mass, mean, sym(cov) + 1e-6 * jnp.eye(D))

    def em(_, gmm):
        log_obs = gmm_log_obs(gmm, data)  # (P, K)
        resp = jnp.exp(log_obs - logsumexp(log_obs, axis=1, keepdims=True)) * weights[:, None]
        log_mass = jnp.where(active, jnp.log(resp.sum(0) / weights.sum()), -jnp.inf)
        return m_step(resp, log_mass)

    return jax.lax.fori_loop(0, iters, em, m_step(resp, log_mass))


def gmm_log_obs(gmm: GMM, pts):
    """log pi_k + log N(pts | mu_k, Sigma_k): (n, K)."""
    return jax.vmap(lambda m, c: multivariate_normal.logpdf(pts, m, c))(gmm.mean, gmm.cov).T + gmm.log_mass


def niw_prior(gmm: GMM, pts, num_points):
    """Prior (mu0, Phi, m, n0) for the points `pts` (n, D): the mixture's moments under the cluster weights averaged
    over pts, with m = 1 and n0 = (num_points - 2 - D) / num_points (cbfinn/gps GMM.inference: the prior counts as
    about one sample)."""
    log_obs = gmm_log_obs(gmm, pts)
    w = jnp.exp(logsumexp(log_obs - logsumexp(log_obs, axis=1, keepdims=True), axis=0) - jnp.log(pts.shape[0]))  # (K,)
    mu0 = w @ gmm.mean
    diff = gmm.mean - mu0
    Phi = jnp.einsum("k,kde->de", w, gmm.cov + diff[:, :, None] * diff[:, None, :])
    return mu0, Phi, 1.0, (num_points - 2.0 - pts.shape[1]) / num_points


def fit_linear_gaussian(pts, d_in: int, prior, reg: float = 1e-6):
    """Regress the last columns of `pts` (N, d_in + d_out) on the first d_in: y ~ N(F z + f, cov), from the joint
    Gaussian's NIW posterior mode
        Sigma = (N S_emp + Phi + N m / (N + m) (mu_emp - mu0)(mu_emp - mu0)^T) / (N + n0)
    then conditioning: F = Sigma_yz Sigma_zz^-1, f = mu_y - F mu_z, cov = Sigma_yy - F Sigma_zz F^T
    (Levine et al. 2016, App. A.3)."""
    mu0, Phi, m, n0 = prior
    N, mu = pts.shape[0], pts.mean(0)
    diff, d = pts - mu, mu - mu0
    emp = diff.T @ diff / N
    sigma = sym((N * emp + Phi + (N * m) / (N + m) * jnp.outer(d, d)) / (N + n0))
    szz = sigma[:d_in, :d_in] + reg * jnp.eye(d_in)
    F = cho_solve((cholesky(szz, lower=True), True), sigma[:d_in, d_in:]).T  # (d_out, d_in)
    f = mu[d_in:] - F @ mu[:d_in]
    cov = sym(sigma[d_in:, d_in:] - F @ szz @ F.T)
    return F, f, cov


def fit_time_varying(key, buf_in, buf_out, buf_mask, cur_in, cur_out, args):
    """Per-time-step linear-Gaussian fits of out_t on in_t from the current samples cur_* (N, T', .), each with the
    NIW prior of one GMM over all (in, out) pairs of the buffer buf_* (S, T', .) (rows with mask 0 unused). Returns
    F (T', d_out, d_in), f (T', d_out), cov (T', d_out, d_out)."""
    S, Tp, d_in = buf_in.shape
    data = jnp.concatenate([buf_in, buf_out], -1).reshape(S * Tp, -1)
    weights = jnp.repeat(buf_mask, Tp)
    num_points = weights.sum()
    K = jnp.clip(jnp.floor(num_points / args.min_points_per_cluster), 2, args.max_clusters).astype(jnp.int32)
    gmm = fit_gmm(key, data, weights, K, args.max_clusters, args.gmm_iters)
    pts = jnp.concatenate([cur_in, cur_out], -1)  # (N, T', P)
    return jax.vmap(lambda pts_t: fit_linear_gaussian(pts_t, d_in, niw_prior(gmm, pts_t, num_points)), 1)(pts)


@partial(jax.jit, static_argnames="args")
def fit_dynamics(key, buf_X, buf_U, buf_mask, X, U, args: Args) -> Dynamics:
    """[3] Dynamics of one condition from its samples X (N, T, dX), U (N, T, dU) and the GMM buffer (S, T, .).
    x0 ~ N(sample mean, diag(max(var, 1e-6))): exact resets make the prior's x0 term of cbfinn/gps zero, left out."""
    xu = lambda X, U: jnp.concatenate([X[:, :-1], U[:, :-1]], -1)
    F, f, cov = fit_time_varying(key, xu(buf_X, buf_U), buf_X[:, 1:], buf_mask, xu(X, U), X[:, 1:], args)
    pad = lambda a: jnp.concatenate([a, jnp.zeros_like(a[:1])])  # no transition after T-1
    return Dynamics(pad(F), pad(f), pad(cov), X[:, 0].mean(0), jnp.diag(jnp.maximum(X[:, 0].var(0), 1e-6)))


@partial(jax.jit, static_argnames="args")
def fit_policy_linearization(key, buf_X, buf_pol, buf_mask, X, pol_mu, pol_var, args: Args) -> LinearGaussian:
    """[4] pi_lin(u_t | x_t) = N(K_t x_t + k_t, cov_t + diag(pol_var)): a regression of the global policy's mean
    actions on the states along the samples, with a GMM prior over (x, pi_theta(o)) (cbfinn/gps PolicyPriorGMM)."""
    K, k, cov = fit_time_varying(key, buf_X, buf_pol, buf_mask, X, pol_mu, args)
    return LinearGaussian(K, k, cov + jnp.diag(pol_var))


# --------------------------------------------------------------------------
# Cost quadratisation by autodiff
# --------------------------------------------------------------------------
def quadratize_cost(cost_fn, X, U) -> tuple[QuadCost, jax.Array]:
    """[2] Second-order expansion of cost_fn(x, u, final) at every sample, re-centred at the origin and averaged
    over the N samples (cbfinn/gps _eval_cost). X (N, T, dX), U (N, T, dU). Also returns the costs (N, T)."""
    T, dX = X.shape[1], X.shape[2]
    final = jnp.arange(T) == T - 1

    def one(x, u, fin):
        v = jnp.concatenate([x, u])
        f = lambda v: cost_fn(v[:dX], v[dX:], fin)
        val, g = f(v), jax.grad(f)(v)
        # Negative eigenvalues clipped: the log term's Hessian is indefinite far from the target, and an LQR cost
        # must be convex (Gauss-Newton practice).
        w, V = jnp.linalg.eigh(sym(jax.hessian(f)(v)))
        H = (V * jnp.maximum(w, 0.0)) @ V.T
        return H, g - H @ v, val - g @ v + 0.5 * v @ H @ v, val

    C, c, c0, vals = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0)), in_axes=(0, 0, None))(X, U, final)
    return QuadCost(C.mean(0), c.mean(0), c0.mean(0)), vals


# --------------------------------------------------------------------------
# The KL-constrained LQG step (Levine & Abbeel 2014, Sec. 3; Levine et al. 2016, App. A)
# --------------------------------------------------------------------------
def lqg_backward(eta, prev: LinearGaussian, dyn: Dynamics, cost: QuadCost):
    """Minimise E_p[cost/eta - log prev(u|x)] - H(p) by dynamic programming.

    The Lagrangian of min E_p[cost] s.t. KL(p || prev) <= eps, divided by eta, is the LQR problem with cost
    c/eta - log prev(u|x) plus an entropy bonus. -log prev is quadratic in (x, u) because prev is linear-Gaussian:
        0.5 [x;u]^T [[K^T P K, -K^T P], [-P K, P]] [x;u] + [x;u]^T [K^T P k; -P k],
    P = prev.cov^-1. The maximum-entropy solution is N(K x + k, Q_uu^-1). Returns the new controller and whether
    every Q_uu was positive definite."""
    dX = dyn.F.shape[1]
    P = jnp.linalg.inv(prev.cov)  # (T, dU, dU)
    KtP = jnp.swapaxes(prev.K, 1, 2) @ P  # (T, dX, dU)
    Ckl = jnp.concatenate([jnp.concatenate([KtP @ prev.K, -KtP], 2),
                           jnp.concatenate([-jnp.swapaxes(KtP, 1, 2), P], 2)], 1)
    ckl = jnp.concatenate([jnp.einsum("txu,tu->tx", KtP, prev.k), -jnp.einsum("tuv,tv->tu", P, prev.k)], 1)
    K, k, cov, ok = riccati_backward(cost.C / eta + Ckl, cost.c / eta + ckl, dyn.F, dyn.f, dX)
    return LinearGaussian(K, k, cov), ok


def lqg_forward(ctrl: LinearGaussian, dyn: Dynamics):
    """State-action marginals N(mu_t, sigma_t) of the controller under the fitted dynamics:
    mu (T, D), sigma (T, D, D)."""

    def step(carry, inp):
        mx, Sx = carry
        K, k, cov, F, f, Dcov = inp
        mu = jnp.concatenate([mx, K @ mx + k])
        SKt = Sx @ K.T
        sigma = jnp.block([[Sx, SKt], [SKt.T, K @ SKt + cov]])
        return (F @ mu + f, sym(F @ sigma @ F.T + Dcov)), (mu, sigma)

    _, (mu, sigma) = jax.lax.scan(step, (dyn.x0_mean, dyn.x0_cov), (*ctrl, dyn.F, dyn.f, dyn.cov))
    return mu, sigma


def traj_kl(mu, sigma, new: LinearGaussian, prev: LinearGaussian):
    """sum_t E_{x_t ~ p_new}[KL(new(u|x_t) || prev(u|x_t))] in closed form. Both conditionals are Gaussians whose
    means are affine in x, so the KL is quadratic in x and its expectation under the Gaussian marginal is exact."""
    dU, dX = new.K.shape[1:]

    def one(mu, sigma, K, k, cov, Kp, kp, covp):
        Lp = cholesky(covp, lower=True)
        Pp = cho_solve((Lp, True), jnp.eye(dU))
        dK, dm = K - Kp, (K - Kp) @ mu[:dX] + k - kp
        logdet = lambda L: 2 * jnp.sum(jnp.log(jnp.diag(L)))
        quad = dm @ Pp @ dm + jnp.trace(dK.T @ Pp @ dK @ sigma[:dX, :dX])
        return 0.5 * (jnp.trace(Pp @ cov) - dU + logdet(Lp) - logdet(cholesky(cov, lower=True)) + quad)

    return jnp.maximum(jax.vmap(one)(mu, sigma, *new, *prev).sum(), 0.0)


def estimate_cost(ctrl: LinearGaussian, dyn: Dynamics, cost: QuadCost):
    """The controller's expected cost under the fitted dynamics and quadratic cost (cbfinn/gps's 'Laplace' estimate)."""
    mu, sigma = lqg_forward(ctrl, dyn)
    return jnp.sum(cost.c0 + 0.5 * jnp.einsum("tij,tij->t", sigma, cost.C)
                   + 0.5 * jnp.einsum("ti,tij,tj->t", mu, cost.C, mu) + jnp.einsum("ti,ti->t", mu, cost.c))


@jax.jit
def c_step(prev: LinearGaussian, dyn: Dynamics, cost: QuadCost, eta0, kl_bound):
    """[6] Find eta with KL(p_eta || prev) = kl_bound (within 10 %) by the bracketing search of cbfinn/gps
    (geometric mean of the bracket, at most a factor 10 per step, eta in [1e-8, 1e16], 50 iterations). A non-PD Q_uu
    means eta is too small. Falls back to prev (KL 0) if nothing feasible."""

    def body(s):
        itr, eta, lo, hi, _, best, best_kl, best_eta = s
        ctrl, ok = lqg_backward(eta, prev, dyn, cost)
        kl = traj_kl(*lqg_forward(ctrl, dyn), ctrl, prev)
        ok = ok & jnp.isfinite(kl) & jnp.all(jnp.isfinite(ctrl.K))
        con = jnp.where(ok, kl - kl_bound, jnp.inf)
        feasible = ok & (con < 0.1 * kl_bound)
        best = jax.tree.map(lambda a, b: jnp.where(feasible, a, b), ctrl, best)
        best_kl, best_eta = jnp.where(feasible, kl, best_kl), jnp.where(feasible, eta, best_eta)
        too_small = con < 0  # KL below the bound: eta can decrease
        hi, lo = jnp.where(too_small, eta, hi), jnp.where(too_small, lo, eta)
        geo = jnp.sqrt(lo * hi)
        new_eta = jnp.where(too_small, jnp.maximum(geo, 0.1 * hi), jnp.minimum(geo, 10.0 * lo))
        done = (jnp.abs(con) < 0.1 * kl_bound) | (hi / lo < 1.0001) | (feasible & (itr >= 20))
        return itr + 1, new_eta, lo, hi, done, best, best_kl, best_eta

    dt = cost.C.dtype
    init = (0, jnp.asarray(eta0, dt), jnp.asarray(1e-8, dt), jnp.asarray(1e16, dt), False, prev,
            jnp.asarray(0.0, dt), jnp.asarray(1e16, dt))
    s = jax.lax.while_loop(lambda s: (~s[4]) & (s[0] < 50), body, init)
    return s[5], s[7], s[6]


def new_step_mult(step_mult, predicted, actual, lo, hi):
    """[5] Model the improvement as pred * m - (pred - actual) * m^2 in the step multiplier m; its maximiser scales
    m by pred / (2 (pred - actual)), clipped to [0.1, 5], then m to [lo, hi] (cbfinn/gps _set_new_mult)."""
    mult = np.clip(predicted / (2.0 * np.maximum(1e-4, predicted - actual)), 0.1, 5.0)
    return np.clip(mult * step_mult, lo, hi)


def exploded(predicted, prev_obj):
    """Predicted improvements the quadratic model cannot be trusted with: non-finite, or larger in size than ten
    times the cost they improve (the C-step's controller blew up under the fitted dynamics)."""
    return ~np.isfinite(predicted) | (np.abs(predicted) > 10.0 * np.maximum(np.abs(prev_obj), 1.0))


# --------------------------------------------------------------------------
# Global policy and the S-step
# --------------------------------------------------------------------------
class Policy(nn.Module):
    hidden: tuple[int, ...]
    act_dim: int

    @nn.compact
    def __call__(self, o):
        for h in self.hidden:
            o = nn.relu(nn.Dense(h)(o))
        return nn.Dense(self.act_dim)(o)


@partial(jax.jit, static_argnames="args")
def s_step(state: TrainState, key, obs, target_mu, target_prec, args: Args):
    """[7] Minimise the precision-weighted squared error
        mean_j (pi_theta(o_j) - mu_j)^T S_j^-1 (pi_theta(o_j) - mu_j)
    over all (condition, sample, time) points j: obs (P, dO) normalised, target_mu (P, dU), target_prec (P, dU, dU).
    The weighting makes the policy follow a controller where it is certain (small S) and ignore it where its noise
    is large (Levine et al. 2016; Montgomery & Levine 2016, Alg. 2)."""

    def loss_fn(params, idx):
        d = state.apply_fn(params, obs[idx]) - target_mu[idx]
        return jnp.mean(jnp.einsum("bi,bij,bj->b", d, target_prec[idx], d))

    def update(state, k):
        idx = jax.random.randint(k, (args.policy_batch_size,), 0, obs.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(state.params, idx)
        return state.apply_gradients(grads=grads), loss

    state, losses = jax.lax.scan(update, state, jax.random.split(key, args.policy_steps))
    return state, losses[-100:].mean()


@partial(jax.jit, static_argnames=("args", "dims"))
def policy_mean(params, obs_mean, obs_std, o, args: Args, dims: Dims):
    """pi_theta's mean action on whitened observations o (..., dO), float32. The product with 1 / std is what
    XLA makes of a division by constant statistics; written out, the numbers do not depend on whether they are
    constants."""
    return Policy(args.policy_hidden, dims.dU).apply(params, (o - obs_mean) * (1.0 / obs_std))


# --------------------------------------------------------------------------
# The phases of an iteration (main calls them in order). Real-env sampling is common/envs/conditions.py
# rollout_condition: the only Python loop, the env stands for the robot.
# --------------------------------------------------------------------------
def init_state(args: Args, dims: Dims, key, env) -> GPSState:
    """[0] The initial controllers (init_lqr around each condition's start state, or zero gains), an empty buffer,
    a fresh policy."""
    M, S, T = args.conditions, args.prior_samples, args.horizon
    dX, dU, dO = dims
    D = dX + dU
    if args.init == "lqr":
        x0 = jnp.asarray(np.stack([env.reset(options={"condition": m})[1]["state"] for m in range(M)]), jnp.float32)
        ctrl = jax.vmap(lambda x: init_lqr(x, T, dU, env.dt, env.accel_gains, args.noise_var,
                                           args.init_final_weight))(x0)
    else:
        ctrl = jax.vmap(lambda _: init_controller(T, dX, dU, args.noise_var))(jnp.arange(M))
    z = lambda *shape: np.zeros((M, *shape))
    lin = LinearGaussian(z(T, dU, dX), z(T, dU), z(T, dU, dU))
    last = Fit(lin, Dynamics(z(T, dX, D), z(T, dX), z(T, dX, dX), z(dX), z(dX, dX)),
               QuadCost(z(T, D, D), z(T, D), z(T)), lin, z())
    policy = Policy(args.policy_hidden, dU)
    key, k_init = jax.random.split(key)
    pstate = TrainState.create(apply_fn=policy.apply, params=policy.init(k_init, jnp.zeros(dO)),
                               tx=optax.chain(optax.add_decayed_weights(args.policy_weight_decay),
                                              optax.adam(args.policy_lr)))
    noise = np.asarray(jnp.diagonal(ctrl.cov, axis1=-2, axis2=-1).mean((0, 1)))  # (dU,) before the first S-step
    return GPSState(0, ctrl, np.ones(M), np.ones(M), last, SampleBuffer(z(S, T, dX), z(S, T, dU), z(S, T, dO), z(S)),
                    pstate, np.zeros(dO), np.ones(dO), noise, key, numpy_rng_state(np.random.default_rng(args.seed)))


def controller_act(K, k, L=None, noise=None):
    """u_t = K_t x + k_t + L_t eps_t with L_t L_t^T = S_t (one trajectory's noise eps (T, dU)); the mean controller
    if noise is None."""
    if noise is None:
        return lambda x, o, t: K[t] @ x + k[t]
    return lambda x, o, t: K[t] @ x + k[t] + L[t] @ noise[t]


def policy_actions(args: Args, dims: Dims, state: GPSState, Ob) -> np.ndarray:
    """pi_theta's mean actions at observations Ob (..., dO), float32."""
    return np.asarray(policy_mean(state.policy.params, state.obs_mean, state.obs_std, jnp.asarray(Ob, jnp.float32),
                                  args, dims))


def policy_act(state: GPSState, args: Args, dims: Dims, noise):
    """u_t = pi_theta(o_t) + noise_t, noise (T, dU)."""
    return lambda x, o, t: policy_actions(args, dims, state, o) + noise[t]


def sample(env, args: Args, dims: Dims, state: GPSState) -> tuple[GPSState, Samples]:
    """[1] N trajectories per condition from the controllers, or (on-policy MDGPS after the first iteration) from
    the global policy with noise of variance policy_var (cbfinn/gps sample_on_policy); exact resets. They enter the
    buffer's ring."""
    M, N, T, S = args.conditions, args.num_samples, args.horizon, args.prior_samples
    rng = set_numpy_rng_state(np.random.default_rng(), state.np_rng)
    X, U, Ob = (np.zeros((M, N, T, d)) for d in dims)
    Kn, kn, Ln = (np.asarray(a) for a in (state.ctrl.K, state.ctrl.k, np.linalg.cholesky(np.asarray(state.ctrl.cov))))
    on_policy = args.sample_on_policy and args.algorithm == "mdgps" and state.iteration > 0
    for m in range(M):
        for n in range(N):
            eps = rng.standard_normal((T, dims.dU))
            act = (policy_act(state, args, dims, np.sqrt(state.policy_var) * eps)
                   if on_policy else controller_act(Kn[m], kn[m], Ln[m], eps))
            X[m, n], U[m, n], Ob[m, n] = rollout_condition(env, m, T, act, seed=int(rng.integers(2**31)))
    slot = [(state.iteration * N + n) % S for n in range(N)]
    buf = SampleBuffer(*(a.copy() for a in state.buffer))
    for ring, new in ((buf.X, X), (buf.U, U), (buf.Ob, Ob)):
        ring[:, slot] = new
    buf.mask[:, slot] = 1.0
    return state._replace(buffer=buf, np_rng=numpy_rng_state(rng)), Samples(X, U, Ob)


def train_policy(args: Args, dims: Dims, state: GPSState, key, samples: Samples, ctrl: LinearGaussian):
    """[7] S-step on this iteration's samples of all conditions: the targets are the controllers' means K x + k, the
    weights their precisions S^-1."""
    M, N, T, dU = args.conditions, args.num_samples, args.horizon, dims.dU
    X, ctrl = jnp.asarray(samples.X, jnp.float32), jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), ctrl)
    mu_t = jnp.einsum("mtux,mntx->mntu", ctrl.K, X) + ctrl.k[:, None]  # (M, N, T, dU)
    prec = jnp.linalg.inv(ctrl.cov)  # (M, T, dU, dU)
    prec = jnp.broadcast_to(prec[:, None], (M, N, T, dU, dU)).reshape(-1, dU, dU)
    obs = ((samples.Ob - state.obs_mean) / state.obs_std).reshape(-1, dims.dO)
    pstate, loss = s_step(state.policy, key, jnp.asarray(obs, jnp.float32), mu_t.reshape(-1, dU), prec, args)
    policy_var = 1.0 / np.diag(np.asarray(prec.mean(0)))  # cbfinn/gps: var = 1 / diag(mean precision)
    return state._replace(policy=pstate, policy_var=policy_var), loss


# Over the M conditions: X (M, N, T, dX), U (M, N, T, dU); the env's cost and distance are static
quadratize_all = jax.jit(lambda cost_fn, X, U: jax.vmap(partial(quadratize_cost, cost_fn))(X, U), static_argnums=0)
estimate_costs = jax.jit(jax.vmap(estimate_cost))
distances = jax.jit(lambda distance_fn, X: jax.vmap(distance_fn)(X), static_argnums=0)


def fit_local_models(env, args: Args, state: GPSState, samples: Samples, k_dyn, k_pol, pol_buf, pol_mu) -> Fit:
    """[2] The quadratic cost along the samples, [3] the dynamics with their GMM prior, [4] (mdgps) the global
    policy's linearisation: per condition (vmapped), in float64 (call inside main's float64 region)."""
    M = args.conditions
    X, U = jnp.asarray(samples.X), jnp.asarray(samples.U)
    buf = SampleBuffer(*(jnp.asarray(a) for a in state.buffer))
    cost, costs = quadratize_all(env.cost, X, U)  # costs (M, N, T)
    dyn = jax.vmap(partial(fit_dynamics, args=args))(jax.random.split(k_dyn, M), buf.X, buf.U, buf.mask, X, U)
    pol_lin = state.last.pol_lin  # lqr_flm has no global policy: its zeros stay
    if args.algorithm == "mdgps":
        pol_lin = jax.vmap(partial(fit_policy_linearization, args=args), in_axes=(0, 0, 0, 0, 0, 0, None))(
            jax.random.split(k_pol, M), buf.X, jnp.asarray(pol_buf), buf.mask, X, jnp.asarray(pol_mu),
            jnp.asarray(state.policy_var, jnp.float64))
    return Fit(state.ctrl, dyn, cost, pol_lin, np.asarray(costs.sum(-1).mean(-1)))


def adjust_step(args: Args, state: GPSState, fit: Fit) -> tuple[np.ndarray, dict]:
    """[5] Step size from predicted vs actual improvement (Laplace estimates under fitted dynamics and cost).
    LQR-FLM, per condition (cbfinn/gps algorithm_traj_opt._stepadjust): old controller vs new one under the old fit
    (predicted) and the new fit (actual). MDGPS, one step for all (algorithm_mdgps._stepadjust): previous cost vs
    the C-step's controller under the old fit (predicted) and vs the current cost (actual): did the S-step's policy
    realise the planned improvement? In float64."""
    last = state.last
    if args.algorithm == "lqr_flm":
        prev_obj = np.asarray(estimate_costs(last.ctrl, last.dyn, last.cost))
        predicted = prev_obj - np.asarray(estimate_costs(state.ctrl, last.dyn, last.cost))
        actual = prev_obj - np.asarray(estimate_costs(state.ctrl, fit.dyn, fit.cost))
    else:  # previous vs current policy cost per condition: linearisations' estimates, or the samples' ("mc")
        prev_obj, cur_obj = (np.asarray(last.mc_cost), np.asarray(fit.mc_cost)) if args.step_rule == "mc" else (
            np.asarray(estimate_costs(last.pol_lin, last.dyn, last.cost)),
            np.asarray(estimate_costs(fit.pol_lin, fit.dyn, fit.cost)))
        predicted = prev_obj - np.asarray(estimate_costs(state.ctrl, last.dyn, last.cost))
        actual = prev_obj - cur_obj
        if args.step_scope == "shared":  # the reference: one multiplier from the means over the conditions
            predicted, actual = predicted.mean(), actual.mean()
        else:  # each condition its own; an exploded prediction leaves that condition's multiplier as it was
            bad = exploded(predicted, prev_obj)
            step_mult = new_step_mult(state.step_mult, np.where(bad, 1.0, predicted), np.where(bad, 0.0, actual),
                                      *args.step_mult_range)
            return np.where(bad, state.step_mult, step_mult), {
                "predicted_improvement": np.mean(predicted), "actual_improvement": np.mean(actual),
                "exploded_predictions": bad.mean()}
    step_mult = new_step_mult(state.step_mult, predicted, actual, *args.step_mult_range)
    return step_mult, {"predicted_improvement": np.mean(predicted), "actual_improvement": np.mean(actual)}


def improve_controllers(args: Args, state: GPSState, fit: Fit, step_mult):
    """[6] C-step: the KL-bounded LQG step of every condition against its old controller (lqr_flm) or the policy
    linearisation (mdgps), bound kl_step * step_mult * T. In float64. Returns the controllers, eta, KL, bound."""
    anchor = state.ctrl if args.algorithm == "lqr_flm" else fit.pol_lin
    if args.algorithm == "mdgps" and args.anchor_blend > 0:  # toward the previous controller (a measured option)
        w = args.anchor_blend
        anchor = anchor._replace(K=(1 - w) * anchor.K + w * state.ctrl.K, k=(1 - w) * anchor.k + w * state.ctrl.k)
    bound = args.kl_step * step_mult * args.horizon
    anchor = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), anchor)
    ctrl, eta, kl = jax.vmap(c_step)(anchor, fit.dyn, fit.cost, jnp.asarray(state.eta), jnp.asarray(bound))
    return ctrl, np.asarray(eta), kl, bound


def evaluate_local(env, args: Args, dims: Dims, state: GPSState, samples: Samples) -> dict:
    """[8] The samples' final distances, and the noise-free mean controllers u = K x + k, one run per condition
    (real steps, but not training samples: nothing is fitted on them)."""
    M, N, T = args.conditions, args.num_samples, args.horizon
    final = np.asarray(distances(env.distance, jnp.asarray(samples.X[:, :, -1].reshape(-1, dims.dX), jnp.float32)))
    at_bound = np.isclose(np.abs(samples.U), env.action_space.high, rtol=0, atol=1e-6)
    Kc, kc = np.asarray(state.ctrl.K), np.asarray(state.ctrl.k)
    mean_ctrl, _ = evaluate_conditions(env, range(M), T, [controller_act(Kc[m], kc[m]) for m in range(M)], args.seed)
    return {"local/mean_controller_final_distance": mean_ctrl, "local/final_distance": final.mean(),
            "local/final_distance_per_condition": final.reshape(M, N).mean(1).round(4),
            "local/actions_at_bound": at_bound.mean()}


def evaluate_global(env, args: Args, dims: Dims, state: GPSState) -> dict:
    """[8] One deterministic run of the global policy per training and held-out condition."""
    metrics, held_out = {}, list(range(env.num_train, len(getattr(env, "targets", getattr(env, "starts", [])))))
    for name, conds in (("train", range(args.conditions)), ("test", held_out)):
        if conds:
            acts = [policy_act(state, args, dims, np.zeros((args.horizon, dims.dU)))] * len(conds)
            metrics[f"global/{name}_final_distance"], metrics[f"global/{name}_cost"] = evaluate_conditions(
                env, conds, args.horizon, acts, args.seed)
    return metrics


# --------------------------------------------------------------------------
# Input checks and the training loop
# --------------------------------------------------------------------------
def validate(args: Args, env) -> Dims:
    """One-line errors for settings GPS cannot run, before anything is fitted."""
    for name, least in (("horizon", 2), ("num_samples", 2)):  # a dynamics fit needs two steps and two samples
        if getattr(args, name) < least:
            fail(f"{flag(name)} must be at least {least}, got {getattr(args, name)}")
    for name in ("init_var", "kl_step", "policy_lr", "min_step_mult", "max_step_mult", "init_final_weight"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            fail(f"{flag(name)} must be positive, got {value}")
    check_ranges(args, at_least_1=("conditions", "prior_samples", "max_clusters", "min_points_per_cluster",
                                   "gmm_iters", "policy_hidden", "policy_steps", "policy_batch_size"),
                 non_negative=("policy_weight_decay",))
    if not 0.0 <= args.anchor_blend < 1.0:
        fail(f"--anchor-blend must be in [0, 1), got {args.anchor_blend}")
    lo, hi = args.step_mult_range
    if lo > hi:
        fail(f"the step multiplier range is empty: --min-step-mult {lo} > --max-step-mult {hi}")
    if args.prior_samples < args.num_samples:
        fail(f"--prior-samples ({args.prior_samples}) must be at least --num-samples ({args.num_samples})")
    if args.eval_episodes != 1:
        fail(f"--eval-episodes must be 1 in GPS, got {args.eval_episodes}: the conditions reset exactly and the "
             "evaluated policies are noise-free, so every further run would repeat the first")
    if args.capture_video and args.algorithm == "lqr_flm":
        fail("--capture-video films the global policy, which --algorithm lqr_flm does not train")
    if args.capture_video:
        check_video_support(args.env_id)
    if not isinstance(env.action_space, spaces.Box):
        fail(f"GPS needs a continuous (Box) action space; '{args.env_id}' has {env.action_space}")
    if args.conditions > env.num_train:
        fail(f"--conditions {args.conditions} exceeds the {env.num_train} training conditions of '{args.env_id}'")
    limit = env.spec.max_episode_steps if env.spec is not None else None
    if limit is not None and args.horizon > limit:
        fail(f"--horizon {args.horizon} exceeds the {limit}-step time limit of '{args.env_id}'")
    if args.iterations < 1:
        fail(f"--total-timesteps {args.total_timesteps} is less than one iteration ({args.steps_per_iteration} "
             "steps = --conditions x --num-samples x --horizon)")
    if args.algorithm == "mdgps" and args.policy_batch_size > args.steps_per_iteration:
        fail(f"--policy-batch-size {args.policy_batch_size} exceeds the {args.steps_per_iteration} points the S-step "
             "trains on (--conditions x --num-samples x --horizon)")
    dims = Dims(env.dim_state, env.action_space.shape[0], env.observation_space.shape[0])
    # The largest arrays: the buffer (NumPy, its float64 copy, the policy's actions on it) and, per condition, the
    # GMM's per-cluster residuals over all its (x, u, x') points.
    points, P = args.conditions * args.prior_samples * args.horizon, 2 * dims.dX + dims.dU
    check_memory(8 * points * (3 * sum(dims) + args.max_clusters * (P + 3)),
                 f"the GMM prior over {args.prior_samples} trajectories per condition",
                 hint="lower --prior-samples or --max-clusters")
    return dims


def main(args: Args) -> dict:
    if args.frame_skip is not None and args.frame_skip < 1:
        fail(f"--frame-skip must be at least 1, got {args.frame_skip}")
    env = make_conditions_env(args.env_id, frame_skip=args.frame_skip)
    dims = validate(args, env)
    key = seed_everything(args.seed)
    run = Run(args)
    state = run.restore(init_state(args, dims, key, env))  # [0], or the checkpoint's state on --resume
    mdgps, history, start = args.algorithm == "mdgps", [], time.time()
    progress = Progress(f"GPS ({args.algorithm}) on {args.env_id}, {args.conditions} training conditions, "
                        f"{args.steps_per_iteration:,} env steps per iteration", args.iterations, unit="iterations",
                        start=int(state.iteration), compiling="the LQR, dynamics-fit and policy phases")

    for it in range(state.iteration + 1, args.iterations + 1):  # 1-based, as logged
        t0 = time.time()
        with run.timed("sample"):
            state, samples = sample(env, args, dims, state)  # [1]
        key, k_dyn, k_pol, k_s = jax.random.split(state.key, 4)
        state = state._replace(key=key)
        pol_buf = pol_mu = None
        if mdgps:
            with run.timed("policy"):
                if it == 1:  # the policy first catches up with the initial controllers [7], its input
                    flat = samples.Ob.reshape(-1, dims.dO)  # whitened once, from these samples (as cbfinn/gps)
                    state = state._replace(obs_mean=flat.mean(0), obs_std=flat.std(0) + 1e-3)
                    state, loss = train_policy(args, dims, state, k_s, samples, state.ctrl)
                    check_finite(it, unit="iteration", policy_loss=loss)
                # pi_theta's actions along the buffer and the samples: the data of its linearisation [4]
                pol_buf, pol_mu = (policy_actions(args, dims, state, ob).astype(np.float64)
                                   for ob in (state.buffer.Ob, samples.Ob))

        # The float64 region, [2]-[6], as the reference's numpy: the (x, u, x') covariances are nearly singular (the
        # dynamics are almost deterministic) and the GMM's Cholesky factorisations fail in float32. The policy stays
        # float32, outside.
        with jax.enable_x64(True), run.timed("trajectory_optimisation"):
            fit = fit_local_models(env, args, state, samples, k_dyn, k_pol, pol_buf, pol_mu)  # [2]-[4]
            check_finite(it, unit="iteration", dynamics_F=fit.dyn.F, dynamics_cov=fit.dyn.cov, cost_C=fit.cost.C)
            metrics, step_mult = {}, state.step_mult
            if it > 1:
                step_mult, metrics = adjust_step(args, state, fit)  # [5]
            ctrl, eta, kl, bound = improve_controllers(args, state, fit, step_mult)  # [6]
            check_finite(it, unit="iteration", controller_K=ctrl.K, controller_cov=ctrl.cov)
        state = state._replace(ctrl=ctrl, step_mult=step_mult, eta=eta, last=fit)

        if mdgps:  # [7] S-step with the new controllers' means on this iteration's samples
            with run.timed("policy"):
                state, s_loss = train_policy(args, dims, state, k_s, samples, ctrl)
            check_finite(it, unit="iteration", policy_loss=s_loss)
            metrics["policy_loss"] = s_loss

        with run.timed("evaluate"):  # [8]
            metrics |= {"iteration": it, **evaluate_local(env, args, dims, state, samples),
                        "local/cost": float(np.mean(fit.mc_cost)), "kl": np.asarray(kl).mean(),
                        "kl_bound": float(np.mean(bound)), "eta": eta.mean(), "step_mult": step_mult.mean(),
                        "iteration_time": time.time() - t0}
            if mdgps and (it % args.eval_interval == 0 or it == args.iterations):
                metrics |= evaluate_global(env, args, dims, state)
        state, steps = state._replace(iteration=it), it * args.steps_per_iteration
        run.log(metrics, steps, echo=False)
        progress.update(it, metrics, ["local/final_distance", "local/mean_controller_final_distance",
                                      "global/train_final_distance", "global/test_final_distance", "local/cost",
                                      "kl", "step_mult"])
        history.append({k: np.asarray(v).tolist() for k, v in metrics.items()}
                       | {"samples": steps, "time": time.time() - start})
        if run.checkpoint_due(it, it - 1) or it == args.iterations:  # counted in iterations
            run.save(state, steps)

    if args.save_model:
        save_checkpoint(run.dir / "model.msgpack", {"policy": state.policy.params, "controllers": state.ctrl._asdict(),
                                                    "obs_mean": state.obs_mean, "obs_std": state.obs_std})
    if args.capture_video:
        video_env = make_conditions_env(args.env_id, render_mode="rgb_array", frame_skip=args.frame_skip)
        record_video(video_env, lambda o: policy_act(state, args, dims, np.zeros((1, dims.dU)))(None, o, 0),
                     run.dir / "videos", episodes=1, seed=args.seed, max_steps=args.horizon)
    if history:
        key = "global/train_final_distance" if mdgps else "local/final_distance"
        targets = {"Reacher-v5": "target <= 0.03 after 10 iterations" if mdgps else
                   "target <= 0.02 after 10 iterations"}
        progress.done(key, history[-1][key], reference=targets.get(args.env_id),
                      extra=f"{args.iterations * args.steps_per_iteration:,} env steps")
    run.close()
    return {"history": history, "controllers": state.ctrl, "policy_params": state.policy.params, "run_dir": run.dir}


if __name__ == "__main__":
    cli(Args, main)
