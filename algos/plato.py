"""PLATO: imitate an adaptive MPC teacher that never lets a half-trained learner crash.

Paper and lecture:
- Kahn, Zhang, Levine, Abbeel 2017, "PLATO: Policy Learning using Adaptive
  Trajectory Optimization" (ICRA 2017), https://arxiv.org/abs/1603.00622
  (Sec. III: the adaptive MPC objective, Eq. (2); Alg. 1; Sec. IV: DAgger-like
  guarantee). No public code.
- CS 285 (Levine), "Imitating optimal control with DAgger" / "PLATO algorithm".
- Ross, Gordon, Bagnell 2011, "A Reduction of Imitation Learning ... (DAgger)".

The learner pi_theta(u | o) is a Gaussian MLP on observations o (range-finder
rays, velocity, goal vector: common/jax_envs/obstacles.py); it is trained by
supervised learning on (o, label) pairs, the labels being the actions of an
MPC that sees the full state x (position, velocity, the obstacles). DAgger
gets on-policy data by letting the learner act, and a half-trained learner
crashes. PLATO instead lets an *adaptive* MPC act:
    pi_hat(u | x_t) = argmin_pi  sum_t' E_pi[c(x_t', u_t')] + lambda KL(pi(u | x_t') || pi_theta(u | o_t'))
which stays close to what the learner would do (so the data come from states
the learner visits) but deviates where the learner's action would be costly
(crashes). With pi_theta linearised around the plan, mu_theta(o(x)) ~
m_t + K_t (x - xbar_t) (K_t by jax.jacfwd through the observation model, the
teacher knows the obstacles), the KL term is a quadratic cost in (x, u) and
iLQR solves the problem; the teacher's Gaussian is N(u_plan, lambda Q_uu^-1).

What is here: iLQR MPC on the env's JAX dynamics with a smooth obstacle cost,
replanning every step with a fixed number of iterations, warm-started from the
previous plan (shifted by one step); the adaptive teacher (lambda > 0, the
learner's linearisation recomputed every iLQR iteration); labels from a
second, unconstrained MPC (lambda = 0) along the visited states; an aggregated
dataset; the three arms by --arm:
    plato   the adaptive teacher acts (its mean)
    dagger  the learner acts (its mean); with --beta the MPC acts at a step with
            probability beta * beta_decay^(k - 1) in iteration k
    bc      the unconstrained MPC acts ("MPC acts", behaviour cloning, lambda = 0)
All arms start with the same iteration 0, in which the unconstrained MPC acts
(the lecture's "human data D"). One jitted call per iteration does everything
(episodes, MPC replanning, aggregation, supervised epochs, the held-out
evaluation), vmapped over seeds. Left out: the paper's quadrotor and car models
and its depth images, iLQG's noise model (the plan is deterministic; the
teacher's covariance is only used for the KL we report), and executing samples
of pi_hat (we execute its mean: docs/plato.md says why).

Run:
    python -m algos.plato                          # PLATO, 10 iterations x 8 episodes, 1 seed: 72 s (2-core CPU)
    python -m algos.plato --arm dagger --num-seeds 5
    python -m algos.plato --arm bc --lam 0
    python -m algos.plato --resume runs/<run>

Algorithm (the lecture's four steps; the numbers mark the code below):
    [0] D <- episodes of the unconstrained MPC (lambda = 0), labelled by itself; train pi_theta on D
    for iteration k = 1..K:
      [1] train pi_theta(u | o) on D (supervised, Gaussian likelihood of the labels)
      [2] run pi_hat(u | x) to get D_pi = {o_1, ..., o_N}:
            at each step t: linearise pi_theta around the current plan (jacfwd through o(x)),
            run `mpc_iters` iLQR iterations on  c(x, u) + lambda KL(pi_hat || pi_theta),
            warm-started from the previous plan; execute the first action
            (dagger: the learner's action; bc: the unconstrained MPC's)
      [3] label each visited state with the unconstrained MPC (lambda = 0): u_t = pi_MPC(x_t)
      [4] aggregate: D <- D U D_pi
    (in the code one jitted call does [2]-[4] then [1]; [5] evaluates pi_theta on held-out layouts)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from common.checkpoints import save_checkpoint
from common.checks import check_finite_series, check_ranges, fail
from common.command_line import cli
from common.envs import make_env
from common.experiment import CommonArgs, Run, seed_everything
from common.jax_envs.adapter import func_env_of
from common.progress import Progress


@dataclasses.dataclass(frozen=True)
class Args(CommonArgs):
    env_id: str = "ObstacleField-v0"
    """the obstacle-field task (common/jax_envs/obstacles.py); the only env with the crashes PLATO is about"""
    total_timesteps: int = 4800
    """real training steps after iteration 0; iterations K = total_timesteps // (episodes_per_iteration * horizon)"""
    eval_interval: int = 1
    """checkpoint every this many iterations (the learner is evaluated after every iteration)"""
    eval_episodes: int = 50
    """held-out layouts the learner is evaluated on (one episode each)"""
    num_seeds: int = 1
    """independent training runs, vmapped in one jitted program; run i is the run of --seed (seed + i)"""
    arm: Literal["plato", "dagger", "bc"] = "plato"
    """plato: the adaptive MPC acts; dagger: the learner acts (MPC labels); bc: the unconstrained MPC acts"""
    lam: float = 1.0
    """lambda, the weight of KL(pi_hat || pi_theta) in the adaptive teacher's cost (plato)"""
    beta: float = 0.0
    """dagger: probability the MPC's action is executed instead of the learner's in iteration 1"""
    beta_decay: float = 0.5
    """dagger: beta is multiplied by this every iteration (beta_k = beta * beta_decay^(k-1))"""
    episodes_per_iteration: int = 8
    """N, episodes (each on a newly sampled training layout) per iteration, iteration 0 included"""
    horizon: int = 60
    """T, steps per episode (the env's time limit: 6 s)"""
    mpc_horizon: int = 15
    """H, steps the MPC plans ahead (1.5 s)"""
    mpc_iters: int = 3
    """iLQR iterations per replanning step (warm-started from the previous plan)"""
    mpc_first_iters: int = 10
    """iLQR iterations of the first plan of an episode (from zero actions)"""
    mpc_reg: float = 1e-3
    """Levenberg-Marquardt regulariser added to Q_uu in the backward pass"""
    v_des: float = 1.2
    """the commanded forward speed the MPC tracks (m/s; v_max = 2)"""
    w_sideways: float = 0.1
    """cost weight of the sideways speed^2, relative to (v_x - v_des)^2"""
    w_centre: float = 0.05
    """cost weight of y^2 (stay near the corridor's centre)"""
    w_final: float = 5.0
    """the plan's last state costs w_final steps"""
    w_obstacle: float = 300.0
    """cost weight of the squared penetration of the safety margin around each circle and wall"""
    margin: float = 0.15
    """safety margin: the obstacle cost starts this far from a circle's edge or a wall (vehicle radius included)"""
    w_control: float = 0.05
    """cost weight of |u|^2"""
    w_bound: float = 100.0
    """cost weight of the squared excess of |u_i| over 1 (the env clips actions to [-1, 1])"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden layers of the learner's MLP (tanh)"""
    learning_rate: float = 1e-3
    """Adam step size of the supervised learning"""
    grad_steps: int = 300
    """Adam steps per iteration on the aggregated dataset (the learner is not re-initialised)"""
    batch_size: int = 256
    """minibatch size (drawn from every iteration's data)"""
    min_std: float = 0.05
    """floor of the learner's standard deviation (the KL's weight 1 / std^2 stays bounded)"""


def num_iterations(args: Args) -> int:
    """K, iterations after iteration 0."""
    return args.total_timesteps // (args.episodes_per_iteration * args.horizon)


def capacity(args: Args) -> int:
    """Rows of the aggregated dataset: (K + 1) iterations x N episodes x T steps."""
    return (num_iterations(args) + 1) * args.episodes_per_iteration * args.horizon


# ----------------------------------------------------------------------------
# The learner
# ----------------------------------------------------------------------------
class GaussianPolicy(nn.Module):
    """pi_theta(u | o) = N(mu_theta(o), diag(std^2)), a state-independent std (floored at min_std)."""

    action_dim: int
    hidden: tuple[int, ...]
    min_std: float

    @nn.compact
    def __call__(self, o):
        h = o
        for width in self.hidden:
            h = nn.tanh(nn.Dense(width)(h))
        mean = nn.Dense(self.action_dim, kernel_init=nn.initializers.orthogonal(0.1))(h)
        log_std = self.param("log_std", nn.initializers.constant(np.log(0.5)), (self.action_dim,))
        return mean, jnp.maximum(log_std, np.log(self.min_std))


class Dataset(NamedTuple):
    """The aggregated dataset D, (capacity, ...); iteration k's rows are [k N T, (k + 1) N T)."""

    obs: jax.Array  # (C, obs_dim) what the learner sees
    label: jax.Array  # (C, 2) the unconstrained MPC's action at the visited state
    state: jax.Array  # (C, 4) the visited state (for tests and plots; the learner never sees it)
    mask: jax.Array  # (C,) 1 for a step that happened (an episode that ended leaves the rest of its rows 0)


class Carry(NamedTuple):
    """One seed's training state (what the checkpoint holds per seed)."""

    train_state: TrainState
    data: Dataset
    iteration: jax.Array  # () int32, iterations done (iteration 0 included)
    key: jax.Array


class Episode(NamedTuple):
    """One episode's record (T, ...)."""

    obs: jax.Array  # (T, obs_dim)
    state: jax.Array  # (T, 4) the state the step started from
    label: jax.Array  # (T, 2) the unconstrained MPC's action there
    action: jax.Array  # (T, 2) the executed action
    alive: jax.Array  # (T,) the step happened (the episode had not ended)
    crash: jax.Array  # (T,) the step ended in a collision
    success: jax.Array  # (T,) the step reached the goal
    cost: jax.Array  # (T,) (finish - x') dt, the distance still to go (frozen after the end: a crash pays on)
    gap: jax.Array  # (T,) |executed action - mu_theta(o)|, how far the data are from the learner's own actions
    kl: jax.Array  # (T,) KL(pi_hat || pi_theta) at the step (plato; 0 otherwise)


def make_policy(args: Args) -> GaussianPolicy:
    return GaussianPolicy(2, args.hidden, args.min_std)


# ----------------------------------------------------------------------------
# The MPC: smooth cost and iLQR (the teacher sees the full state and the layout)
# ----------------------------------------------------------------------------
def task_cost(x, u, layout, env, args: Args):
    """c(x, u) per step: track the forward speed v_des (and no sideways speed), stay near the corridor's centre
    (weakly), squared penetration of the safety margin around each circle and wall (smooth: zero and flat
    outside the margin), control effort, squared excess over the action bounds. All quadratic near the plan
    but the obstacle terms, whose Hessian iLQR projects to PSD."""
    p, v = x[:2], x[2:]
    gaps = jnp.linalg.norm(layout.centres - p, axis=-1) - layout.radii - env.vehicle_radius  # (M,)
    wall = env.half_width - jnp.abs(p[1]) - env.vehicle_radius
    obstacle = (jax.nn.relu(args.margin - gaps) ** 2).sum() + jax.nn.relu(args.margin - wall) ** 2
    track = (v[0] - args.v_des) ** 2 + args.w_sideways * v[1] ** 2 + args.w_centre * p[1] ** 2
    bound = (jax.nn.relu(jnp.abs(u) - 1.0) ** 2).sum()
    return env.dt * (track + args.w_obstacle * obstacle + args.w_control * (u**2).sum()) + args.w_bound * bound


def final_cost(x, layout, env, args: Args):
    """The cost of the plan's last state: w_final times a step's (with u = 0)."""
    return args.w_final * task_cost(x, jnp.zeros(2), layout, env, args)


class LearnerLinearisation(NamedTuple):
    """mu_theta(o(x)) ~ m_t + K_t (x - xbar_t) along a plan, and the learner's inverse variances."""

    m: jax.Array  # (H, 2)
    K: jax.Array  # (H, 2, 4)
    xbar: jax.Array  # (H, 4)
    inv_var: jax.Array  # (H, 2) 1 / std^2 (the same at every step)


def linearise_learner(params, X, layout, env, args: Args) -> LearnerLinearisation:
    """[2] The learner as a linear-Gaussian policy of the *state*: mean and Jacobian of mu_theta(o(x)) at each
    planned state, through the observation model (rays need the layout, which the teacher knows)."""
    net = make_policy(args)
    mu = lambda x: net.apply(params, env.observation(x, None, layout))[0]
    m, K = jax.vmap(lambda x: (mu(x), jax.jacfwd(mu)(x)))(X)
    log_std = net.apply(params, env.observation(X[0], None, layout))[1]
    return LearnerLinearisation(m, K, X, jnp.broadcast_to(jnp.exp(-2 * log_std), m.shape))


def kl_cost(x, u, lin_t, lam):
    """lambda KL(pi_hat || pi_theta) up to terms free of (x, u): lambda/2 |u - m - K (x - xbar)|^2_{Sigma_theta^-1}
    (-lambda E log pi_theta; the teacher-entropy part only sets its covariance, lambda Q_uu^-1)."""
    m, K, xbar, inv_var = lin_t
    d = u - m - K @ (x - xbar)
    return 0.5 * lam * (inv_var * d**2).sum()


def gaussian_kl(mu1, cov1, mu2, cov2):
    """KL(N(mu1, cov1) || N(mu2, cov2)), closed form."""
    k = mu1.shape[-1]
    inv2 = jnp.linalg.inv(cov2)
    d = mu2 - mu1
    return 0.5 * (jnp.trace(inv2 @ cov1) + d @ inv2 @ d - k
                  + jnp.linalg.slogdet(cov2)[1] - jnp.linalg.slogdet(cov1)[1])


def psd(h):
    """The nearest positive semi-definite matrix (eigenvalues clipped at 0): the obstacle cost is not convex."""
    w, v = jnp.linalg.eigh(0.5 * (h + h.T))
    return (v * jnp.maximum(w, 0.0)) @ v.T


def rollout_plan(x0, U, dynamics):
    """X (H + 1, dX) from x0 under the open-loop actions U (H, dU)."""
    def step(x, u):
        x1 = dynamics(x, u)
        return x1, x1
    _, X = jax.lax.scan(step, x0, U)
    return jnp.concatenate([x0[None], X])


def lqr_backward(A, B, l_z, l_zz, v_x, v_xx, reg):
    """The iLQR backward pass (Riccati recursion on the local LQ problem), t = H-1..0.

    Q_x = l_x + A^T V_x,   Q_u = l_u + B^T V_x,   Q_xx = l_xx + A^T V_xx A,
    Q_uu = l_uu + B^T V_xx B,  Q_ux = l_ux + B^T V_xx A;
    k = -Q_uu^-1 Q_u,  K = -Q_uu^-1 Q_ux  (Q_uu + reg I in the solves);
    V_x = Q_x + K^T Q_uu k + K^T Q_u + Q_ux^T k,  V_xx = Q_xx + K^T Q_uu K + K^T Q_ux + Q_ux^T K.
    Returns gains K (H, dU, dX), k (H, dU), and Q_uu (H, dU, dU)."""
    dX = A.shape[-1]

    def step(carry, inp):
        v_x, v_xx = carry
        A_t, B_t, lz, lzz = inp
        l_x, l_u = lz[:dX], lz[dX:]
        l_xx, l_uu, l_ux = lzz[:dX, :dX], lzz[dX:, dX:], lzz[dX:, :dX]
        Q_x, Q_u = l_x + A_t.T @ v_x, l_u + B_t.T @ v_x
        Q_xx = l_xx + A_t.T @ v_xx @ A_t
        Q_uu = l_uu + B_t.T @ v_xx @ B_t
        Q_ux = l_ux + B_t.T @ v_xx @ A_t
        Q_reg = Q_uu + reg * jnp.eye(Q_uu.shape[0])
        k = -jnp.linalg.solve(Q_reg, Q_u)
        K = -jnp.linalg.solve(Q_reg, Q_ux)
        v_x = Q_x + K.T @ Q_uu @ k + K.T @ Q_u + Q_ux.T @ k
        v_xx = Q_xx + K.T @ Q_uu @ K + K.T @ Q_ux + Q_ux.T @ K
        return (v_x, 0.5 * (v_xx + v_xx.T)), (K, k, Q_uu)

    _, (K, k, Q_uu) = jax.lax.scan(step, (v_x, v_xx), (A, B, l_z, l_zz), reverse=True)
    return K, k, Q_uu


# The step sizes the forward pass tries at once; 0 keeps the current plan (so an iteration never gets worse).
LINE_SEARCH = (1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01, 0.0)


def ilqr(x0, U, step_cost, final_cost_fn, dynamics, iters: int, reg: float, aux_fn=None):
    """`iters` iLQR iterations from the plan U (H, dU) at state x0.

    step_cost(x, u, aux_t) and final_cost_fn(x) are scalars; aux_fn(X) (or None) gives per-step data the cost
    reads, recomputed from the nominal states at the start of each iteration (the learner's linearisation).
    Each iteration: roll out, quadratise the cost (autodiff, PSD-projected) and linearise the dynamics, backward
    pass, forward passes at the step sizes of LINE_SEARCH with the feedback gains, keep the cheapest.
    Returns the new plan U, its cost and Q_uu at t = 0 (the teacher's covariance is lambda Q_uu^-1)."""
    dX = x0.shape[0]
    aux_fn = aux_fn or (lambda X: jnp.zeros(X.shape[0]))

    def total(X, U, aux):
        return jax.vmap(step_cost)(X[:-1], U, aux).sum() + final_cost_fn(X[-1])

    def iteration(carry, _):
        U, _, _ = carry
        X = rollout_plan(x0, U, dynamics)
        aux = aux_fn(X[:-1])

        def quad(x, u, a):
            f = lambda z: step_cost(z[:dX], z[dX:], a)
            z = jnp.concatenate([x, u])
            return jax.grad(f)(z), psd(jax.hessian(f)(z))

        l_z, l_zz = jax.vmap(quad)(X[:-1], U, aux)
        A, B = jax.vmap(jax.jacfwd(dynamics, argnums=(0, 1)))(X[:-1], U)
        v_x, v_xx = jax.grad(final_cost_fn)(X[-1]), psd(jax.hessian(final_cost_fn)(X[-1]))
        K, k, Q_uu = lqr_backward(A, B, l_z, l_zz, v_x, v_xx, reg)

        def forward(alpha):
            def step(x, inp):
                u_bar, x_bar, K_t, k_t = inp
                u = u_bar + alpha * k_t + K_t @ (x - x_bar)
                return dynamics(x, u), (x, u)
            x_end, (Xn, Un) = jax.lax.scan(step, x0, (U, X[:-1], K, k))
            Xn = jnp.concatenate([Xn, x_end[None]])
            return Un, total(Xn, Un, aux)

        Us, costs = jax.vmap(forward)(jnp.array(LINE_SEARCH))
        costs = jnp.where(jnp.isfinite(costs), costs, jnp.inf)
        best = jnp.argmin(costs)
        return (Us[best], costs[best], Q_uu[0]), None

    dU = U.shape[1]
    (U, cost, Q_uu0), _ = jax.lax.scan(iteration, (U, jnp.float32(0.0), jnp.eye(dU)), None, length=iters)
    return U, cost, Q_uu0


def plan(x0, U, layout, env, args: Args, iters: int, params=None, lam=0.0):
    """The MPC at state x0: unconstrained (params None) or adaptive (lambda KL to the learner `params`)."""
    dynamics = lambda x, u: env.transition(x, u, None, layout)
    fin = lambda x: final_cost(x, layout, env, args)
    if params is None:
        cost = lambda x, u, a: task_cost(x, u, layout, env, args)
        return ilqr(x0, U, cost, fin, dynamics, iters, args.mpc_reg)
    cost = lambda x, u, lin_t: task_cost(x, u, layout, env, args) + kl_cost(x, u, lin_t, lam)
    aux_fn = lambda X: linearise_learner(params, X, layout, env, args)
    return ilqr(x0, U, cost, fin, dynamics, iters, args.mpc_reg, aux_fn)


def shift(U):
    """Warm start: the previous plan moved one step on, its last action repeated."""
    return jnp.concatenate([U[1:], U[-1:]])


# ----------------------------------------------------------------------------
# Episodes
# ----------------------------------------------------------------------------
def run_episode(params, layout, key, env, args: Args, mode: str, lam=0.0, beta=0.0) -> Episode:
    """[2]-[3] One episode on `layout`. mode: "mpc" (the unconstrained MPC acts), "plato" (the adaptive teacher
    acts), "dagger" (the learner's mean acts, the MPC's with probability beta), "learner" (the learner's mean,
    no MPC at all: the evaluation). Except for "learner", every visited state is labelled by the unconstrained
    MPC, which keeps its own warm-started plan whoever acts."""
    net = make_policy(args)
    k_init, key = jax.random.split(key)
    x = env.initial(k_init, layout)
    U0 = jnp.zeros((args.mpc_horizon, 2))
    labelled = mode != "learner"
    # The first plans of the episode, from zero actions with more iterations; from t = 1 on each MPC starts
    # from its own previous plan shifted by one step (at t = 0 from this one, unshifted).
    U_lab = plan(x, U0, layout, env, args, args.mpc_first_iters)[0] if labelled else U0
    U_act = plan(x, U0, layout, env, args, args.mpc_first_iters, params, lam)[0] if mode == "plato" else U0

    def step(carry, t):
        x, alive, U_lab, U_act, key = carry
        key, k_mix = jax.random.split(key)
        warm = lambda U: jnp.where(t > 0, shift(U), U)
        o = env.observation(x, None, layout)
        mu, log_std = net.apply(params, o)
        # [3] the label: the unconstrained MPC (lambda = 0) at the visited state
        if labelled:
            U_lab = plan(x, warm(U_lab), layout, env, args, args.mpc_iters)[0]
        label = jnp.clip(U_lab[0], -1.0, 1.0)
        kl = jnp.float32(0.0)
        if mode == "mpc":
            a = label
        elif mode == "plato":  # [2] the adaptive teacher: argmin cost + lambda KL(pi_hat || pi_theta)
            U_act, _, Q_uu = plan(x, warm(U_act), layout, env, args, args.mpc_iters, params, lam)
            a = jnp.clip(U_act[0], -1.0, 1.0)
            # pi_hat(u | x_t) = N(u_plan, lambda Q_uu^-1) (the maximum-entropy solution of the KL objective)
            cov_teacher = lam * jnp.linalg.inv(Q_uu + args.mpc_reg * jnp.eye(2))
            kl = gaussian_kl(U_act[0], cov_teacher, mu, jnp.diag(jnp.exp(2 * log_std)))
        elif mode == "dagger":
            a = jnp.where(jax.random.uniform(k_mix) < beta, label, jnp.clip(mu, -1.0, 1.0))
        else:  # "learner"
            a = jnp.clip(mu, -1.0, 1.0)
        x1 = env.transition(x, a, None, layout)
        crash, success = env.crashed(x1, layout), env.reached(x1, layout)
        x_next = jnp.where(alive, x1, x)  # frozen after the end
        cost = jnp.maximum(env.finish - x_next[0], 0.0) * env.dt
        rec = Episode(o, x, label, a, alive, alive & crash, alive & success, cost,
                      jnp.linalg.norm(a - jnp.clip(mu, -1.0, 1.0)), kl)
        return (x_next, alive & ~crash & ~success, U_lab, U_act, key), rec

    _, ep = jax.lax.scan(step, (x, jnp.bool_(True), U_lab, U_act, key), jnp.arange(args.horizon))
    return ep


# ----------------------------------------------------------------------------
# Supervised learning, aggregation, evaluation
# ----------------------------------------------------------------------------
def nll(params, obs, label, weight, args: Args):
    """[1] -log pi_theta(label | o), averaged with weights (the mask): the Gaussian likelihood of the MPC's
    labels (its mean part is a weighted squared error; the std learns the residual spread)."""
    mean, log_std = make_policy(args).apply(params, obs)
    ll = -0.5 * ((label - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    return -(ll.sum(-1) * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def train_learner(ts: TrainState, data: Dataset, key, args: Args):
    """[1] grad_steps Adam steps on minibatches drawn uniformly from every valid row of D."""
    p = data.mask / jnp.maximum(data.mask.sum(), 1.0)

    def update(ts, k):
        idx = jax.random.choice(k, data.mask.shape[0], (args.batch_size,), p=p)
        loss, g = jax.value_and_grad(nll)(ts.params, data.obs[idx], data.label[idx], data.mask[idx], args)
        return ts.apply_gradients(grads=g), loss

    ts, losses = jax.lax.scan(update, ts, jax.random.split(key, args.grad_steps))
    return ts, losses[-1]


def aggregate(data: Dataset, eps: Episode, k) -> Dataset:
    """[4] D <- D U D_pi: iteration k's N T rows go in their own block; nothing earlier is overwritten."""
    rows = eps.obs.shape[0] * eps.obs.shape[1]
    flat = lambda a: a.reshape(rows, *a.shape[2:])
    new = Dataset(flat(eps.obs), flat(eps.label), flat(eps.state), flat(eps.alive).astype(jnp.float32))
    return jax.tree.map(lambda d, n: jax.lax.dynamic_update_slice_in_dim(d, n, k * rows, 0), data, new)


def evaluate(params, env, args: Args):
    """[5] The learner alone (its mean) on the held-out layouts: success rate, crash rate, mean episode cost."""
    layouts = env.test_tasks(args.eval_episodes)
    keys = jax.random.split(jax.random.PRNGKey(0), args.eval_episodes)  # the same starts for every learner
    ep = jax.vmap(lambda lay, k: run_episode(params, lay, k, env, args, "learner"))(layouts, keys)
    return {"eval/success": ep.success.any(-1).mean(), "eval/crash": ep.crash.any(-1).mean(),
            "eval/cost": ep.cost.sum(-1).mean()}


def init_carry(key, env, args: Args) -> Carry:
    k_net, key = jax.random.split(key)
    obs_dim = env.observation_space.shape[0]
    params = make_policy(args).init(k_net, jnp.zeros(obs_dim))
    ts = TrainState.create(apply_fn=None, params=params, tx=optax.adam(args.learning_rate))
    C = capacity(args)
    data = Dataset(jnp.zeros((C, obs_dim)), jnp.zeros((C, 2)), jnp.zeros((C, 4)), jnp.zeros(C))
    return Carry(ts, data, jnp.int32(0), key)


def iteration(carry: Carry, env, args: Args, first: bool):
    """[2]-[4] then [1] (and [5]) for one seed. first: iteration 0, where the unconstrained MPC acts ([0])."""
    ts, data, k, key = carry
    key, k_lay, k_ep, k_train = jax.random.split(key, 4)
    N = args.episodes_per_iteration
    layouts = env.sample_tasks(k_lay, N)  # training layouts: from the seed's key, never the held-out key
    mode = "mpc" if first or args.arm == "bc" else args.arm
    beta = args.beta * args.beta_decay ** jnp.maximum(k - 1, 0)
    # [2] run the acting policy, [3] label with the unconstrained MPC: (N, T, ...)
    eps = jax.vmap(lambda lay, kk: run_episode(ts.params, lay, kk, env, args, mode, args.lam, beta))(
        layouts, jax.random.split(k_ep, N))
    data = aggregate(data, eps, k)  # [4]
    ts, loss = train_learner(ts, data, k_train, args)  # [1] (for the next iteration)
    alive = eps.alive.astype(jnp.float32)
    metrics = {"train/crashes": eps.crash.any(-1).sum(), "train/successes": eps.success.any(-1).sum(),
               "train/action_gap": (eps.gap * alive).sum() / alive.sum(),
               "train/kl": (eps.kl * alive).sum() / alive.sum(),
               "train/label_gap": (jnp.linalg.norm(eps.action - eps.label, axis=-1) * alive).sum() / alive.sum(),
               "data/rows": data.mask.sum(), "loss/nll": loss, "params": optax.global_norm(ts.params),
               **evaluate(ts.params, env, args)}
    return Carry(ts, data, k + 1, key), metrics


jit_static = functools.partial(jax.jit, static_argnames=("env", "args", "first"))


@functools.partial(jax.jit, static_argnames=("env", "args"))
def start(keys, env, args: Args):
    """Every seed's fresh carry (leading axis: seed; run i from keys[i]) and the untrained learners'
    held-out evaluation."""
    carry = jax.vmap(lambda k: init_carry(k, env, args))(keys)
    return carry, jax.vmap(lambda p: evaluate(p, env, args))(carry.train_state.params)


@jit_static
def run_iteration(carry: Carry, env, args: Args, first: bool):
    """One iteration of every seed (vmapped): the whole of [2]-[4], [1] and [5] in one program."""
    return jax.vmap(lambda c: iteration(c, env, args, first))(carry)


# ----------------------------------------------------------------------------
# Set-up: checks
# ----------------------------------------------------------------------------
def make_task(args: Args):
    func_env = func_env_of(make_env(args.env_id))
    if func_env is None or not hasattr(func_env, "crashed") or not hasattr(func_env, "test_tasks"):
        fail(f"PLATO needs a pure-JAX obstacle task with crashes, a layout sampler and held-out layouts "
             f"(ObstacleField-v0); '{args.env_id}' is not one")
    if args.horizon != func_env.horizon:
        func_env = type(func_env)(num_obstacles=func_env.num_obstacles, num_rays=func_env.num_rays,
                                  ray_range=func_env.ray_range, horizon=args.horizon,
                                  start_jitter=func_env.start_jitter)
    return func_env


def validate(args: Args) -> None:
    check_ranges(args, at_least_1=("num_seeds", "episodes_per_iteration", "horizon", "mpc_horizon", "mpc_iters",
                                   "mpc_first_iters", "grad_steps", "batch_size", "eval_episodes", "hidden"),
                 non_negative=("lam", "v_des", "w_sideways", "w_centre", "w_final", "w_obstacle", "margin",
                               "w_control", "w_bound", "mpc_reg"),
                 positive=("learning_rate", "min_std"), probability=("beta", "beta_decay"))
    if num_iterations(args) < 1:
        fail(f"--total-timesteps ({args.total_timesteps}) is less than one iteration "
             f"({args.episodes_per_iteration} episodes x {args.horizon} steps = "
             f"{args.episodes_per_iteration * args.horizon})")
    if args.arm == "plato" and args.lam <= 0:
        fail("--arm plato needs --lam > 0 (lambda = 0 is the unconstrained MPC: --arm bc)")
    if args.capture_video:
        fail("--capture-video is not supported by PLATO yet; render a layout with ObstacleField-v0's rgb_array")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
METRICS = ("train/crashes", "train/successes", "train/action_gap", "train/kl", "train/label_gap", "data/rows",
           "loss/nll", "eval/success", "eval/crash", "eval/cost")


def main(args: Args) -> dict:
    validate(args)
    env = make_task(args)
    seed_everything(args.seed)
    # run i of --num-seeds N is the run of --seed (seed + i) alone: its key is PRNGKey(seed + i)
    keys = jnp.stack([jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)])
    run = Run(args)
    K = num_iterations(args)
    progress = Progress(f"PLATO ({args.arm}{f', lambda {args.lam:g}' if args.arm == 'plato' else ''}) on "
                        f"{args.env_id}: iteration 0 + {K} iterations x {args.episodes_per_iteration} episodes, "
                        f"{args.num_seeds} seed(s)", K + 1, unit="iterations", start=run.start_step,
                        compiling="the MPC episodes, the supervised learning and the evaluation")
    with run.timed("train"):
        carry, eval0 = jax.block_until_ready(start(keys, env, args))
    # The checkpoint: every seed's carry (params, Adam state, the whole dataset, iteration, key) and the
    # per-iteration metrics; row 0 of the eval metrics is the untrained learner.
    state = run.restore({"carry": carry,
                         "metrics": {m: np.zeros((K + 1, args.num_seeds), np.float32) for m in METRICS},
                         "eval0": {m: np.asarray(v, np.float32) for m, v in eval0.items()}})
    for k in range(run.start_step, K + 1):
        with run.timed("train"):
            carry, rec = jax.block_until_ready(run_iteration(state["carry"], env, args, k == 0))
        # the learner's parameters first (the cause; jit returns the metrics in sorted order, the eval after them)
        order = ["params", "loss/nll"] + [m for m in rec if m not in ("params", "loss/nll")]
        check_finite_series([k], unit="iteration", **{m: np.asarray(rec[m])[None] for m in order})
        state["carry"] = carry
        for m in METRICS:
            state["metrics"][m][k] = np.asarray(rec[m])
        metrics = {m: float(np.mean(rec[m])) for m in METRICS}
        metrics["train/cumulative_crashes"] = float(state["metrics"]["train/crashes"][: k + 1].sum(0).mean())
        run.log({"iteration": k, **metrics}, k + 1, echo=False)
        progress.update(k + 1, metrics, ["train/crashes", "train/cumulative_crashes", "eval/success",
                                         "eval/crash", "eval/cost", "train/action_gap", "loss/nll"])
        if run.checkpoint_due(k + 1, k) or k == K:
            run.save(state, k + 1)

    m = state["metrics"]
    summary = {"wall_seconds": run.timings["train"], "final_success": float(m["eval/success"][-1].mean()),
               "final_crash": float(m["eval/crash"][-1].mean()), "final_cost": float(m["eval/cost"][-1].mean()),
               "training_crashes": float(m["train/crashes"][1:].sum(0).mean()),
               "initial_success": float(np.mean(state["eval0"]["eval/success"]))}
    run.log(summary, K + 1, echo=False)
    progress.done("final_success", summary["final_success"],
                  reference=f"untrained learner {summary['initial_success']:.2f}",
                  extra=f"{summary['training_crashes']:.1f} crashes per seed in iterations 1..{K}")
    params = state["carry"].train_state.params
    if args.save_model:
        path = save_checkpoint(run.dir / "plato.msgpack",
                               {"params": params, "config": {"hidden": list(args.hidden), "min_std": args.min_std}})
        print(f"saved {path}")
    run.close()
    return {"params": params, "metrics": m, "eval0": state["eval0"], "carry": state["carry"], "args": args,
            "run_dir": run.dir, **summary}


if __name__ == "__main__":
    cli(Args, main)
